"""Hybrid decoder layers: (Mamba-2 mixer or attention) + MLP, each behind a pre-norm (Bamba, Granite 4.0-H).

A layer is one block for depth pruning, ``mamba+mlp`` or ``attention+mlp``. In both families the Mamba
width is ``mamba_expand * hidden_size`` (coupled), and attention derives head_dim from hidden / heads
unless the config states it, so pruned configs state it.

- Bamba: ``input_layernorm`` + ``mamba`` | ``self_attn``, then ``pre_ff_layernorm`` + ``feed_forward``
  (gate/up/down); attention layers listed in ``attn_layer_indices``; final norm ``final_layernorm``.
- GraniteMoeHybrid: ``input_layernorm`` + ``mamba`` | ``self_attn``, then
  ``post_attention_layernorm`` + ``shared_mlp`` (``input_linear`` = [gate; up], ``output_linear``);
  the pattern in ``layer_types``; embedding/residual/logit multipliers are scalars pruning leaves alone.
  With ``num_local_experts > 0`` every layer also runs ``block_sparse_moe`` on the same normed input
  (kinds ``mamba+moe`` / ``attention+moe``): a router whose softmax runs over the top-k logits only, and
  gated experts (``gate_up_proj`` = [gate; up] per expert) of width ``intermediate_size``.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, MOE, Family, Part, Layout, register

MAMBA_MLP, ATTENTION_MLP = "mamba+mlp", "attention+mlp"
MAMBA_MOE, ATTENTION_MOE = "mamba+moe", "attention+moe"  # Granite layers with experts beside the shared MLP
MAMBA_N_FIELDS = {
    "hidden": "hidden_size",
    "attention_heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "mamba_heads": "mamba_n_heads",
    "mamba_head_dim": "mamba_d_head",
    "ssm_state": "mamba_d_state",
    "mamba_groups": "mamba_n_groups",
}
# Mamba projection and conv biases from mamba_proj_bias / mamba_conv_bias (Bamba, Granite, FalconH1, Jamba)
MAMBA_N_BIASES = dict(mamba_in_bias="mamba_proj_bias", mamba_out_bias="mamba_proj_bias", conv_bias="mamba_conv_bias")
_COUPLED_NOTE = ("Mamba width = mamba_expand * hidden_size: prune mamba_n_heads/mamba_d_head together with "
                 "hidden_size.",)


def _parts_with(mlp_norm: str, mlp: str, moe: str | None = None, mlp_names: dict[str, str] | None = None):
    def parts(kind: str) -> list[Part]:
        first = Part(MAMBA, "input_layernorm", "mamba") if kind.startswith(MAMBA) else Part(
            ATTENTION, "input_layernorm", "self_attn")
        rest = [Part(MLP, mlp_norm, mlp, dict(mlp_names or {}))]
        if kind.endswith(MOE):
            rest.append(Part(MOE, mlp_norm, moe))
        return [first, *rest]

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
    layout=Layout(**MAMBA_N_BIASES, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
))


# ---- GraniteMoeHybrid -----------------------------------------------------------------------
_GRANITE_MLP_NAMES = {"gate_up": "input_linear", "down": "output_linear"}  # fused [gate; up], down projection
_GRANITE_ATTENTION = {"full_attention", "attention"}


def _granite_kinds(config) -> list[str]:
    moe = int(getattr(config, "num_local_experts", 0) or 0) > 0
    return [(ATTENTION if t in _GRANITE_ATTENTION else MAMBA) + ("+moe" if moe else "+mlp") for t in config.layer_types]


def _granite_set_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["num_hidden_layers"] = len(kept)
    config_dict["layer_types"] = ["full_attention" if k.startswith(ATTENTION) else "linear_attention" for k in kinds]


register(Family(
    name="granitemoehybrid", base="model",
    fields={**MAMBA_N_FIELDS, "ffn": "shared_intermediate_size", "experts": "num_local_experts",
            "expert_ffn": "intermediate_size"},
    block_kinds=_granite_kinds, set_block_kinds=_granite_set_kinds,
    parts=_parts_with("post_attention_layernorm", "shared_mlp", "block_sparse_moe", _GRANITE_MLP_NAMES),
    embeddings="embed_tokens",
    final_norm="norm", mamba_width_coupled_to_hidden=True, expand_field="mamba_expand",
    layout=Layout(**MAMBA_N_BIASES, qkv_bias="attention_bias", o_bias="attention_bias"),
    notes=_COUPLED_NOTE + ("MoE (num_local_experts > 0): num_local_experts and the expert width intermediate_size "
                           "prune beside the shared MLP (shared_intermediate_size); keep >= num_experts_per_tok "
                           "experts.",),
))
