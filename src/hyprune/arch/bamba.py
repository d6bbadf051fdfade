"""Bamba (IBM): decoder layers of (Mamba-2 mixer or attention) + gated MLP, each behind a pre-norm.

A layer is one block for depth pruning: ``mamba+mlp`` (``input_layernorm`` + ``mamba``, then
``pre_ff_layernorm`` + ``feed_forward``) or ``attention+mlp``. Attention layers are listed in
``attn_layer_indices``. The Mamba width is ``mamba_expand * hidden_size`` (coupled), and attention
derives head_dim from hidden / heads unless the config states it, so pruned configs state it.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, Family, Part, register

MAMBA_MLP, ATTENTION_MLP = "mamba+mlp", "attention+mlp"


def _block_kinds(config) -> list[str]:
    attention = set(config.attn_layer_indices or [])
    return [ATTENTION_MLP if i in attention else MAMBA_MLP for i in range(int(config.num_hidden_layers))]


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    config_dict["attn_layer_indices"] = [i for i, kind in enumerate(kinds) if kind == ATTENTION_MLP]


def _parts(kind: str) -> list[Part]:
    first = Part(MAMBA, "input_layernorm", "mamba") if kind == MAMBA_MLP else Part(ATTENTION, "input_layernorm",
                                                                                    "self_attn")
    return [first, Part(MLP, "pre_ff_layernorm", "feed_forward")]


BAMBA = register(
    Family(
        name="bamba",
        base="model",
        fields={
            "hidden": "hidden_size",
            "ffn": "intermediate_size",
            "attention_heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads",
            "mamba_heads": "mamba_n_heads",
            "mamba_head_dim": "mamba_d_head",
            "ssm_state": "mamba_d_state",
            "mamba_groups": "mamba_n_groups",
        },
        block_kinds=_block_kinds,
        set_block_kinds=_set_block_kinds,
        parts=_parts,
        embeddings="embed_tokens",
        final_norm="final_layernorm",
        mamba_width_coupled_to_hidden=True,
        expand_field="mamba_expand",
        notes=("Mamba width = mamba_expand * hidden_size: prune mamba_n_heads/mamba_d_head together with "
               "hidden_size.",),
    )
)
