"""Hybrid decoder layers: (Mamba-2 mixer or attention) + MLP, each behind a pre-norm (Bamba, Granite 4.0-H).

A layer is one block for depth pruning, ``mamba+mlp`` or ``attention+mlp``. In both families the Mamba
width is ``mamba_expand * hidden_size`` (coupled), and attention derives head_dim from hidden / heads
unless the config states it, so pruned configs state it.

- Bamba: ``input_layernorm`` + ``mamba`` | ``self_attn``, then ``pre_ff_layernorm`` + ``feed_forward``
  (gate/up/down); attention layers listed in ``attn_layer_indices``; final norm ``final_layernorm``.
- GraniteMoeHybrid (dense): ``input_layernorm`` + ``mamba`` | ``self_attn``, then
  ``post_attention_layernorm`` + ``shared_mlp`` (``input_linear`` = [gate; up], ``output_linear``);
  the pattern in ``layer_types``; embedding/residual/logit multipliers are scalars pruning leaves alone.
  MoE checkpoints (``num_local_experts > 0``) are not supported yet.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, Family, Part, register
from hyprune.errors import HypruneError

MAMBA_MLP, ATTENTION_MLP = "mamba+mlp", "attention+mlp"
MAMBA_N_FIELDS = {
    "hidden": "hidden_size",
    "attention_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "mamba_heads": "mamba_n_heads",
    "mamba_head_dim": "mamba_d_head",
    "ssm_state": "mamba_d_state",
    "mamba_groups": "mamba_n_groups",
}
_COUPLED_NOTE = ("Mamba width = mamba_expand * hidden_size: prune mamba_n_heads/mamba_d_head together with "
                 "hidden_size.",)


def _parts_with(mlp_norm: str, mlp: str):
    def parts(kind: str) -> list[Part]:
        first = Part(MAMBA, "input_layernorm", "mamba") if kind == MAMBA_MLP else Part(
            ATTENTION, "input_layernorm", "self_attn")
        return [first, Part(MLP, mlp_norm, mlp)]

    return parts


# ---- Bamba ----------------------------------------------------------------------------------
def _bamba_kinds(config) -> list[str]:
    attention = set(config.attn_layer_indices or [])
    return [ATTENTION_MLP if i in attention else MAMBA_MLP for i in range(int(config.num_hidden_layers))]


def _bamba_set_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    config_dict["attn_layer_indices"] = [i for i, kind in enumerate(kinds) if kind == ATTENTION_MLP]


register(Family(
    name="bamba", base="model", fields={**MAMBA_N_FIELDS, "ffn": "intermediate_size"},
    block_kinds=_bamba_kinds, set_block_kinds=_bamba_set_kinds, parts=_parts_with("pre_ff_layernorm", "feed_forward"),
    embeddings="embed_tokens", final_norm="final_layernorm", mamba_width_coupled_to_hidden=True,
    expand_field="mamba_expand", notes=_COUPLED_NOTE,
))


# ---- GraniteMoeHybrid -----------------------------------------------------------------------
_GRANITE_KIND = {"linear_attention": MAMBA_MLP, "mamba": MAMBA_MLP, "full_attention": ATTENTION_MLP,
                 "attention": ATTENTION_MLP}


def _granite_kinds(config) -> list[str]:
    if int(getattr(config, "num_local_experts", 0) or 0) > 0:
        raise HypruneError(
            "GraniteMoeHybrid checkpoints with MoE experts (num_local_experts > 0) are not supported yet: hyprune "
            "prunes the dense shared MLP, Mamba and attention. Use a dense checkpoint."
        )
    return [_GRANITE_KIND[t] for t in config.layer_types]


def _granite_set_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    config_dict["layer_types"] = ["full_attention" if k == ATTENTION_MLP else "linear_attention" for k in kinds]


register(Family(
    name="granitemoehybrid", base="model", fields={**MAMBA_N_FIELDS, "ffn": "shared_intermediate_size"},
    block_kinds=_granite_kinds, set_block_kinds=_granite_set_kinds,
    parts=_parts_with("post_attention_layernorm", "shared_mlp"), embeddings="embed_tokens", final_norm="norm",
    mamba_width_coupled_to_hidden=True, expand_field="mamba_expand", notes=_COUPLED_NOTE,
))
