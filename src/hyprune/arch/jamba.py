"""Jamba: Mamba-1 or attention, then a dense MLP or routed experts, in every decoder layer.

Layer i runs attention when ``i % attn_layer_period == attn_layer_offset`` (else a Mamba-1 mixer), and
routed experts when ``i % expert_layer_period == expert_layer_offset`` (else a gated MLP), both behind
``input_layernorm`` / ``pre_ff_layernorm``; ``feed_forward`` is the MLP or the MoE block. The config has
no layer list, only these periods, so depth pruning can only remove whole periods of
``lcm(attn_layer_period, expert_layer_period)`` consecutive layers (every later layer then keeps its
kind), or the last layers.

The Mamba-1 mixer has one SSM per inner channel (``mamba_expand * hidden_size`` of them, a whole-number
``mamba_expand``) with ``mamba_d_state`` states, B/C/dt read from all channels through ``x_proj``, and
RMSNorms on dt, B and C. Inner channels and states prune; ``mamba_dt_rank`` stays. The dense MLPs and the
experts share one width field, ``intermediate_size``. Jamba's router softmaxes over all experts and keeps
the top-k probabilities unnormalised, so removing an expert renormalises the others exactly as if its
logit were -inf.
"""

from __future__ import annotations

from math import lcm

from hyprune.arch.family import ATTENTION, MAMBA, MAMBA1, MLP, MOE, Family, Part, Layout, register
from hyprune.errors import HypruneError


def _has_experts(config) -> bool:
    return int(config.num_experts) > 1  # with one expert every layer holds a dense MLP


def _kind(config, i: int) -> str:
    mixer = ATTENTION if i % config.attn_layer_period == config.attn_layer_offset else MAMBA
    moe = _has_experts(config) and i % config.expert_layer_period == config.expert_layer_offset
    return f"{mixer}+{MOE if moe else MLP}"


def _block_kinds(config) -> list[str]:
    return [_kind(config, i) for i in range(int(config.num_hidden_layers))]


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    config = type("Periods", (), config_dict)
    if kinds != [_kind(config, i) for i in range(len(kept))]:  # plan validation catches this first
        raise HypruneError("The kept Jamba layers do not follow the config's attention/expert periods.")


def _parts(kind: str) -> list[Part]:
    mixer, ffn = kind.split("+")
    if mixer == MAMBA:
        first = Part(MAMBA1, "input_layernorm", "mamba")
    else:
        first = Part(ATTENTION, "input_layernorm", "self_attn")
    return [first, Part(ffn, "pre_ff_layernorm", "feed_forward")]


def _period(config) -> int:
    expert_period = int(config.expert_layer_period) if _has_experts(config) else 1
    return lcm(int(config.attn_layer_period), expert_period)


def _check_sizes(config, sizes: dict[str, int]) -> None:
    if "experts" in sizes and sizes["experts"] < 2:
        raise HypruneError(
            f"num_experts={sizes['experts']}: Jamba builds dense MLPs instead of experts when num_experts is 1, so the "
            "expert layers' weights would not fit. Keep at least 2 experts."
        )


register(Family(
    name="jamba", base="model",
    fields={"hidden": "hidden_size", "ffn": "intermediate_size", "expert_ffn": "intermediate_size",
            "experts": "num_experts", "attention_heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
            "ssm_state": "mamba_d_state", "mamba_expand": "mamba_expand"},
    block_kinds=_block_kinds, set_block_kinds=_set_block_kinds, parts=_parts, embeddings="embed_tokens",
    final_norm="final_layernorm", depth_period=_period, check_sizes=_check_sizes,
    layout=Layout(mamba_in_bias="mamba_proj_bias", mamba_out_bias="mamba_proj_bias", conv_bias="mamba_conv_bias"),
    notes=("Mamba-1 inner width = mamba_expand * hidden_size with a whole-number mamba_expand: prune it with "
           "mamba_expand (and hidden_size); mamba_d_state free; mamba_dt_rank stays.",
           "intermediate_size is the width of the dense MLPs and of every expert alike; num_experts >= "
           "num_experts_per_tok.",
           "Depth: the layer pattern is periodic (attn/expert layer period and offset), so only whole periods of "
           "lcm(attn_layer_period, expert_layer_period) consecutive layers, or the last layers, can be dropped: "
           "use --depth-mode contiguous with --drop-blocks a multiple of that period."),
))
