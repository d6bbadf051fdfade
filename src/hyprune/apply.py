"""Apply a plan: slice every tensor, edit the config, build the smaller model.

Slicing works on the state dict, not on live modules: each tensor is cut with ``index_select`` along
the dimensions a rule names, the config gets the new sizes and layer pattern, and a fresh model is
built from that config (on the meta device, no allocation) and handed the sliced tensors with
``load_state_dict(strict=True, assign=True)``. What comes out is therefore exactly what
``from_pretrained`` builds from the saved folder, and any tensor we do not know how to slice is an
error instead of a silent mismatch.

Mamba-2 mixer layout (H heads, P head_dim, G groups, N state, I = H*P), see
shared/reference/hf-hybrid-layouts.md:
    in_proj rows  = [z: I | x: I | B: G*N | C: G*N | dt: H]      (inner index h*P+p, B/C index g*N+n)
    conv channels = [x: I | B: G*N | C: G*N]
    A_log, D, dt_bias: [H];  norm.weight: [I];  out_proj: [hidden, I]
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hyprune.arch.family import ATTENTION, MAMBA, Family, attention_head_dim
from hyprune.errors import HypruneError
from hyprune.plan import LayerPlan, Plan, validate_plan

Index = torch.Tensor  # 1-D long tensor of kept positions


def _idx(values) -> Index:
    return torch.as_tensor(list(values), dtype=torch.long)


def mamba_indices(lp: LayerPlan, sizes: dict[str, int]) -> dict[str, Index]:
    """Kept rows/channels of every Mamba tensor, from kept heads, head channels, groups and states."""
    H, P, G, N = sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["mamba_groups"], sizes["ssm_state"]
    inner_size = H * P
    inner = _idx(h * P + p for h in lp.heads for p in lp.head_dim)  # kept (head, channel) pairs
    bc = _idx(g * N + n for g in lp.groups for n in lp.state)  # kept (group, state) pairs
    heads = _idx(lp.heads)
    return {
        "in_proj": torch.cat([inner, inner_size + inner, 2 * inner_size + bc, 2 * inner_size + G * N + bc,
                              2 * inner_size + 2 * G * N + heads]),
        "conv": torch.cat([inner, inner_size + bc, inner_size + G * N + bc]),
        "heads": heads,
        "inner": inner,
    }


def attention_indices(lp: LayerPlan, head_dim: int) -> dict[str, Index]:
    def rows(heads):
        return _idx(h * head_dim + d for h in heads for d in range(head_dim))

    return {"q": rows(lp.query_heads), "kv": rows(lp.kv_heads)}


def _mixer_rules(kind: str, lp: LayerPlan, sizes: dict[str, int], h: Index, attn_head_dim: int):
    """Parameter name inside one mixer -> list of (dim, kept index) to slice along."""
    if kind == MAMBA:
        ix = mamba_indices(lp, sizes)
        return {
            "in_proj.weight": [(0, ix["in_proj"]), (1, h)],
            "in_proj.bias": [(0, ix["in_proj"])],
            "conv1d.weight": [(0, ix["conv"])],
            "conv1d.bias": [(0, ix["conv"])],
            "A_log": [(0, ix["heads"])],
            "D": [(0, ix["heads"])],
            "dt_bias": [(0, ix["heads"])],
            "norm.weight": [(0, ix["inner"])],
            "out_proj.weight": [(0, h), (1, ix["inner"])],
            "out_proj.bias": [(0, h)],
        }
    if kind == ATTENTION:
        ix = attention_indices(lp, attn_head_dim)
        return {
            "q_proj.weight": [(0, ix["q"]), (1, h)],
            "k_proj.weight": [(0, ix["kv"]), (1, h)],
            "v_proj.weight": [(0, ix["kv"]), (1, h)],
            "o_proj.weight": [(0, h), (1, ix["q"])],
            "q_proj.bias": [(0, ix["q"])],
            "k_proj.bias": [(0, ix["kv"])],
            "v_proj.bias": [(0, ix["kv"])],
            "o_proj.bias": [(0, h)],
            "q_norm.weight": [],  # Qwen3: per head_dim, shared by all heads
            "k_norm.weight": [],
        }
    ffn = _idx(lp.ffn)
    gate_up = torch.cat([ffn, sizes["ffn"] + ffn])  # fused [gate; up] rows (Granite's input_linear)
    return {
        "input_linear.weight": [(0, gate_up), (1, h)],
        "output_linear.weight": [(0, h), (1, ffn)],
        "gate_proj.weight": [(0, ffn), (1, h)],
        "gate_proj.bias": [(0, ffn)],
        "up_proj.weight": [(0, ffn), (1, h)],
        "up_proj.bias": [(0, ffn)],
        "down_proj.weight": [(0, h), (1, ffn)],
        "down_proj.bias": [(0, h)],
    }


def layer_rules(family: Family, lp: LayerPlan, sizes: dict[str, int], hidden: Index, attn_head_dim: int):
    """Parameter name inside ``layers.i`` -> list of (dim, kept index), for every part of the block."""
    rules = {}
    for part in family.parts(lp.kind):
        rules[f"{part.norm}.weight"] = [(0, hidden)]
        for name, rule in _mixer_rules(part.kind, lp, sizes, hidden, attn_head_dim).items():
            rules[f"{part.mixer}.{name}"] = rule
    return rules


def pruned_config(family: Family, config, plan: Plan):
    """A new config of the same class with the plan's sizes and layer pattern."""
    sizes = plan.result_sizes()
    data = config.to_dict()
    for axis, field in family.fields.items():
        data[field] = sizes[axis]
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


def slice_state_dict(family: Family, config, plan: Plan, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every tensor of ``state`` to the plan and renumber kept blocks. Inputs are not modified."""
    sizes = family.sizes(config)
    hidden = _idx(plan.hidden)
    attn_head_dim = attention_head_dim(config) if "attention_heads" in family.fields else 0
    base = family.base
    top_rules = {
        f"{base}.{family.embeddings}.weight": [(1, hidden)],
        f"{base}.{family.final_norm}.weight": [(0, hidden)],
        "lm_head.weight": [(1, hidden)],
    }
    new_index = {old: new for new, old in enumerate(plan.kept_blocks())}
    layer_re = re.compile(rf"^{re.escape(base)}\.layers\.(\d+)\.(.+)$")
    cache: dict[int, dict] = {}
    out = {}
    for name, tensor in state.items():
        match = layer_re.match(name)
        if match:
            i, rest = int(match.group(1)), match.group(2)
            if i not in new_index:
                continue  # a dropped block
            if i not in cache:
                lp = plan.layers[i]
                cache[i] = layer_rules(family, lp, sizes, hidden, attn_head_dim)
            rules = cache[i].get(rest)
            new_name = f"{base}.layers.{new_index[i]}.{rest}"
        else:
            rules = top_rules.get(name)
            new_name = name
        if rules is None:
            raise HypruneError(
                f"Don't know how to prune tensor '{name}' of {family.name}; hyprune supports the dense "
                "Mamba/attention/MLP layout. Please report the model so its layout can be added."
            )
        for dim, index in rules:
            tensor = tensor.index_select(dim, index.to(tensor.device))
        out[new_name] = tensor.contiguous()
    return out


@torch.no_grad()
def apply_plan(model, plan: Plan, family: Family | None = None):
    """Return a new, smaller model built from ``model`` and ``plan``; ``model`` is left untouched.

    The new model has the same class, dtype and devices as the tensors it was cut from.
    """
    from hyprune.arch import family_for_config

    family = family or family_for_config(model.config)
    validate_plan(plan, family, model.config)
    new_config = pruned_config(family, model.config, plan)
    state = slice_state_dict(family, model.config, plan, model.state_dict())
    with _parameters_on_meta():
        new_model = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
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
    new_model.generation_config = model.generation_config
    new_model.eval()
    return new_model


def _is_tied(model, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied


@contextmanager
def _parameters_on_meta():
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
