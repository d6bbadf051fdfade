"""Model families: a data description of how each Hugging Face family names its parts.

Every family we support shares one skeleton: embeddings, a list of ``<base>.layers.{i}`` blocks each
holding one or more pre-norm + mixer pairs (`Part`: a Mamba-2 or Mamba-1 mixer, attention, an MLP or an
MoE block, at an attribute path such as ``norm``/``mixer`` or ``mamba_decoder.mamba``), a final norm and
``lm_head``. What differs between families is the names, the config fields, how the layer pattern is
written and what the config cannot express (fixed axes, blocks that cannot be dropped, periodic
patterns), so a family is data (`Family`), not a subclass.
"""

from __future__ import annotations

from hyprune.arch.family import AXES, Family, family_for_config, registered
from hyprune.arch import dense as _dense, falcon_h1 as _falcon_h1, hybrid_decoder as _hybrid_decoder, mamba2 as _mamba2, nemotron_h as _nemotron_h, zamba2 as _zamba2, jamba as _jamba  # noqa: F401,E501

__all__ = ["AXES", "Family", "family_for_config", "registered"]
