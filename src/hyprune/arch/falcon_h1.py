"""FalconH1: every decoder layer runs attention and a Mamba-2 mixer in parallel, then an MLP.

``input_layernorm`` feeds both ``mamba`` and ``self_attn`` (their outputs, scaled by mup multipliers,
are summed into the residual), then ``pre_ff_layernorm`` + ``feed_forward``. A layer is one
``parallel`` block for depth pruning. The Mamba width ``mamba_d_ssm`` is free of the hidden size, so
pruned configs always state it (= heads x head_dim). The ``mup_vector`` buffer multiplies the in_proj
output section by section; it is not saved and is rebuilt from the pruned config. Multipliers are
scalars that pruning leaves alone.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, Family, Part, Layout, register
from hyprune.arch.hybrid_decoder import MAMBA_N_BIASES, MAMBA_N_FIELDS

PARALLEL = "parallel"


def _block_kinds(config) -> list[str]:
    return [PARALLEL] * int(config.num_hidden_layers)


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)


def _parts(kind: str) -> list[Part]:
    return [Part(MAMBA, "input_layernorm", "mamba"), Part(ATTENTION, "input_layernorm", "self_attn"),
            Part(MLP, "pre_ff_layernorm", "feed_forward")]


def _finish_config(config_dict: dict) -> None:
    config_dict["mamba_d_ssm"] = config_dict["mamba_n_heads"] * config_dict["mamba_d_head"]


register(Family(
    name="falcon_h1", base="model",
    fields={**MAMBA_N_FIELDS, "ffn": "intermediate_size"},
    block_kinds=_block_kinds, set_block_kinds=_set_block_kinds, parts=_parts, embeddings="embed_tokens",
    final_norm="final_layernorm", finish_config=_finish_config,
    layout=Layout(**{**MAMBA_N_BIASES, "mamba_out_bias": "projectors_bias"}, mamba_norm="mamba_rms_norm",
                  qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    letters={PARALLEL: "P"},
))
