"""Model families: a data description of how each Hugging Face family names its parts.

Every family we support so far shares the same skeleton: ``<base>.embeddings``, a list of
``<base>.layers.{i}`` blocks each holding ``norm`` (the pre-norm) and ``mixer`` (a Mamba-2 mixer, an
attention module or an MLP), ``<base>.norm_f`` and ``lm_head``. What differs between families is
the base name, the config field names and how the layer pattern is written, so a family is data
(`Family`), not a subclass.
"""

from __future__ import annotations

from hyprune.arch.family import AXES, Family, family_for_config
from hyprune.arch import dense as _dense, falcon_h1 as _falcon_h1, hybrid_decoder as _hybrid_decoder, mamba2 as _mamba2, nemotron_h as _nemotron_h, zamba2 as _zamba2, jamba as _jamba  # noqa: F401,E501

__all__ = ["AXES", "Family", "family_for_config"]
