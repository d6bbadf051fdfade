"""Model families: a data description of how each Hugging Face family names its parts.

Every family we support shares one skeleton: embeddings, a list of ``<base>.layers.{i}`` blocks each
holding one or more pre-norm + mixer pairs (`Part`: a Mamba-2 or Mamba-1 mixer, attention, an MLP or an
MoE block, at an attribute path such as ``norm``/``mixer`` or ``mamba_decoder.mamba``), a final norm and
``lm_head``. What differs between families is the names, the config fields, how the layer pattern is
written and what the config cannot express (fixed axes, blocks that cannot be dropped, periodic
patterns), so a family is data (`Family`), not a subclass. A new family is one new module here that
calls `register` (README, "Adding a family"); nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from hyprune.arch.family import AXES, Family, family_for_config, registered

# A family registers itself when its module loads: every module of this package is one (or a few) families.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["AXES", "Family", "family_for_config", "registered"]
