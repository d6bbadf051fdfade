"""Apply a plan: slice every tensor, edit the config, build the smaller model.

Slicing works on the state dict, not on live modules: each tensor is cut with ``index_select`` along
the dimensions a rule names, the config gets the new sizes and layer pattern, and a fresh model is
built from that config (on the meta device, no allocation) and handed the sliced tensors with
``load_state_dict(strict=True, assign=True)``. What comes out is therefore exactly what
``from_pretrained`` builds from the saved folder, and any tensor we do not know how to slice is an
error instead of a silent mismatch.

A rule is a list of steps: ``(dim, kept index)`` for an ``index_select``, or a function of the tensor
(routed experts keep a different set of neurons each, which one index cannot say).

How each part kind's tensors slice lives with the kind (`hyprune.parts`: Mamba-2, Mamba-1, attention, MLP,
MoE); here are the shared loop and the rules around the blocks (embeddings, norms, lm_head).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hyprune.arch import family_for_config
from hyprune.arch.family import Family, attention_head_dim
from hyprune.errors import HypruneError
from hyprune.parts import PARTS, names_of
from hyprune.parts.base import Index
from hyprune.parts.base import idx as _idx
from hyprune.plan import LayerPlan, Plan, validate_plan


def layer_rules(family: Family, lp: LayerPlan, sizes: dict[str, int], hidden: Index, config):
    """Parameter name inside ``layers.i`` -> list of slicing steps, for every part of the block."""
    rules = {prefix: [] for prefix in family.unsliced}
    for part in family.parts(lp.kind):
        rules[f"{part.norm}.weight"] = [(0, hidden)]
        for name, rule in PARTS[part.kind].rules(lp, sizes, hidden, config, names_of(part)).items():
            rules[f"{part.mixer}.{name}"] = rule
    return rules


def pruned_config(family: Family, config, plan: Plan):
    """A new config of the same class with the plan's sizes and layer pattern."""
    sizes = plan.result_sizes()
    data = config.to_dict()
    for axis, value in sizes.items():
        data[family.fields[axis]] = value
    kept = plan.kept_blocks()
    family.set_block_kinds(data, kept, [plan.layers[i].kind for i in kept])
    if "attention_heads" in family.fields:
        data["head_dim"] = attention_head_dim(config)  # never re-derived from a pruned hidden size
    if family.finish_config is not None:
        family.finish_config(data)
    for key in ("architectures", "transformers_version", "model_type", "quantization_config"):
        data.pop(key, None)
    new = type(config)(**data)
    new.architectures = getattr(config, "architectures", None)
    return new


class TensorSlicer:
    """How one source tensor becomes its pruned tensor: its new name (`target`) and its cut (`slice`).

    One tensor at a time, so the same rules serve a state dict in memory (`slice_state_dict`) and a
    checkpoint streamed from its shards (`hyprune.stream.apply`), and a meta tensor gives the pruned
    shape without any data.
    """

    def __init__(self, family: Family, config, plan: Plan):
        self.family, self.config, self.plan = family, config, plan
        self.sizes = family.sizes(config)
        self.hidden = _idx(plan.hidden)
        base = family.base
        self.top_rules = {
            f"{base}.{family.embeddings}.weight": [(1, self.hidden)],
            f"{base}.{family.final_norm}.weight": [(0, self.hidden)],
            "lm_head.weight": [(1, self.hidden)],
        }
        self.kept = plan.kept_blocks()
        self.new_index = {old: new for new, old in enumerate(self.kept)}
        self.layer_re = re.compile(rf"^{re.escape(base)}\.layers\.(\d+)\.(.+)$")
        self._block_rules: dict[int, dict] = {}

    def _resolve(self, name: str) -> tuple[str | None, list | None]:
        """(new name or None when the tensor is dropped, its slicing steps or None when unknown)."""
        match = self.layer_re.match(name)
        if not match:
            return name, self.top_rules.get(name)
        i, rest = int(match.group(1)), match.group(2)
        if i not in self.new_index:
            return None, None  # a dropped block
        if i not in self._block_rules:
            self._block_rules[i] = layer_rules(self.family, self.plan.layers[i], self.sizes, self.hidden, self.config)
        rules = _find_rule(self._block_rules[i], rest)
        if self.family.renumber is not None:
            rest = self.family.renumber(rest, self.config, self.kept)
            if rest is None:
                return None, rules  # part of a dropped block that a kept block also holds (a per-use adapter slot)
        return f"{self.family.base}.layers.{self.new_index[i]}.{rest}", rules

    def target(self, name: str) -> str | None:
        """The tensor's name in the pruned model, or None when the plan drops it."""
        return self._resolve(name)[0]

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the source tensor ``name``) cut to the plan; contiguous, the input is not modified."""
        new_name, rules = self._resolve(name)
        if rules is None:
            if new_name is None:
                raise HypruneError(f"Tensor '{name}' is dropped by the plan; there is nothing to slice.")
            raise HypruneError(
                f"Don't know how to prune tensor '{name}' of {self.family.name}; hyprune supports the dense "
                "Mamba/attention/MLP layout. Please report the model so its layout can be added."
            )
        for step in rules:
            tensor = step(tensor) if callable(step) else tensor.index_select(step[0], step[1].to(tensor.device))
        return tensor.contiguous()


def slice_state_dict(family: Family, config, plan: Plan, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every tensor of ``state`` to the plan and renumber kept blocks. Inputs are not modified."""
    slicer = TensorSlicer(family, config, plan)
    out = {}
    for name, tensor in state.items():
        new_name = slicer.target(name)
        if new_name is not None:
            out[new_name] = slicer.slice(name, tensor)
    return out


_ADAPTER_SLOT = re.compile(r"(_adapter_list)\.\d+\.")


def _find_rule(rules: dict, name: str):
    """The rule for a parameter name inside a block: exact, per-use adapter slot (``*``), or unsliced prefix."""
    if name in rules:
        return rules[name]
    slot = _ADAPTER_SLOT.sub(r"\1.*.", name)
    if slot in rules:
        return rules[slot]
    return next((rule for prefix, rule in rules.items() if prefix.endswith(".") and name.startswith(prefix)), None)


@torch.no_grad()
def apply_plan(model, plan: Plan, family: Family | None = None):
    """Return a new, smaller model built from ``model`` and ``plan``; ``model`` is left untouched.

    The new model has the same class, dtype and devices as the tensors it was cut from.
    """
    family = family or family_for_config(model.config)
    validate_plan(plan, family, model.config)
    new_config = pruned_config(family, model.config, plan)
    state = slice_state_dict(family, model.config, plan, model.state_dict())
    return model_from_state_dict(new_config, state, model)


def model_from_state_dict(config, state: dict[str, torch.Tensor], like):
    """A model of ``config`` holding exactly the tensors of ``state`` (dtype and generation config of ``like``).

    Built on the meta device and handed the tensors by assignment, so nothing is initialised or copied;
    any tensor the config expects but ``state`` lacks (or the reverse) is an error.
    """
    with parameters_on_meta():
        new_model = AutoModelForCausalLM.from_config(config, dtype=like.dtype)
    # Tied weights (if the config ties them) share one tensor in state_dict; load all keys present.
    missing, unexpected = new_model.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k in missing if not _is_tied(new_model, k)]
    if leftover or unexpected:
        raise HypruneError(f"Pruned weights do not fit the pruned config: missing {leftover}, unexpected {unexpected}.")
    if hasattr(new_model, "tie_weights"):
        new_model.tie_weights()
    for name, param in new_model.named_parameters():
        if param.is_meta:
            raise HypruneError(f"Parameter {name} of the pruned model received no weights.")
    new_model.generation_config = like.generation_config
    new_model.eval()
    return new_model


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


@contextmanager
def parameters_on_meta():
    """Build a model whose parameters live on the meta device (no memory, no init cost) while its
    buffers are real: non-persistent buffers (rotary ``inv_freq``, FalconH1's ``mup_vector``) are
    computed from the *pruned* config at construction, exactly as ``from_pretrained`` would.
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original
