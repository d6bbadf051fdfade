"""Checkpoint names <-> model names, one tensor (or one small group) at a time.

transformers renames and regroups some tensors between the file and the model: NemotronH's files say
``backbone.`` where the model says ``model.``; Jamba's files hold one ``gate_proj``/``up_proj``/``down_proj``
per expert where the model holds one fused 3-D tensor per layer. ``from_pretrained`` converts on load
and ``save_pretrained`` converts back on save, both through the model class's conversion mapping
(``transformers.conversion_mapping``). Pruning rules speak the model's names, so a stream converts each
group of file tensors to its model tensor before slicing and the sliced tensor back to file tensors
before writing: the output holds what ``save_pretrained`` of the pruned model would hold.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from transformers import AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from hyprune.errors import HypruneError


def skeleton(config):
    """A model of ``config`` on the meta device (no memory): its names, tied weights and conversions."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


class CheckpointLayout:
    """The file <-> model name conversion of one model (a meta `skeleton`)."""

    def __init__(self, model):
        self.model = model
        conversions = get_model_conversion_mapping(model)  # what from_pretrained applies
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self._by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def model_name(self, file_name: str) -> tuple[str, str | None]:
        """(the model name a file tensor loads into, the converter pattern it matched or None)."""
        return rename_source_key(file_name, self.renamings, self.converters)

    def groups(self, file_names: list[str]) -> dict[str, list[str]]:
        """Model name -> the file tensors it is built from (several for a fused tensor), in load order."""
        out: dict[str, list[str]] = {}
        for name in sorted(file_names, key=dot_natural_key):
            out.setdefault(self.model_name(name)[0], []).append(name)
        return out

    def to_model(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File tensors (one group or more) -> model tensors, as ``from_pretrained`` converts them."""
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, WeightConverter] = {}
        for name in sorted(tensors, key=dot_natural_key):
            target, pattern = self.model_name(name)
            if pattern is None:
                out[target] = tensors[name]
            else:
                converter = pending.setdefault(target, deepcopy(self._by_pattern[pattern]))
                converter.add_tensor(target, name, pattern, tensors[name])
        for target, converter in pending.items():
            for key, value in converter.convert(target, model=self.model, config=self.model.config).items():
                out[key] = value[0] if isinstance(value, list) else value
        return out

    def to_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors -> the file tensors ``save_pretrained`` writes for them."""
        return revert_weight_conversion(self.model, dict(tensors))

    def saved_names(self) -> list[str]:
        """The model names ``save_pretrained`` keeps: one of each tied group, none it ignores on save."""
        state = self.model.state_dict()
        for key in getattr(self.model, "_keys_to_ignore_on_save", None) or ():
            state.pop(key, None)
        return list(remove_tied_weights_from_state_dict(state, self.model))

    def sources(self, file_names: list[str]) -> dict[str, str]:
        """Every model name of the state dict -> the model name whose file tensors hold its data.

        A tied weight (lm_head tied to the embeddings, Zamba2's shared blocks) is saved once, under one
        name; its other names are aliases of that one. Raises when a name has no data in the files.
        """
        present = self.groups(file_names)
        holder: dict[int, str] = {}
        names = self.model.state_dict(keep_vars=True)
        for name, tensor in names.items():
            if name in present:
                holder.setdefault(id(tensor), name)
        out = {}
        for name, tensor in names.items():
            source = name if name in present else holder.get(id(tensor))
            if source is None:
                raise HypruneError(f"The checkpoint has no weights for '{name}' (nor for a weight tied to it); "
                                   "is it complete?")
            out[name] = source
        return out
