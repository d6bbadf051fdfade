"""NemotronH (Nemotron-H, Nemotron-Nano): Mamba-2, attention and MLP blocks in one pattern.

The pattern lives in ``layers_block_type`` (``linear_attention`` = Mamba, ``full_attention``,
``mlp``, ``moe``); ``num_hidden_layers`` is derived from it. The Mamba width is
``mamba_num_heads * mamba_head_dim`` and is free of ``hidden_size``.

MoE blocks (``E``): a sigmoid router (``gate``, with ``e_score_correction_bias``) picks
``num_experts_per_tok`` of ``n_routed_experts`` non-gated relu2 experts, first choosing ``topk_group``
of ``n_group`` expert groups by the sum of each group's two best scores; a shared expert
(``shared_experts``) sees every token. Sigmoid scores are per expert, so removing an expert only takes
it out of the choice (the kept weights are renormalised over the chosen ones as before).
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, MOE, Family, Layout, register

_KIND = {"linear_attention": MAMBA, "full_attention": ATTENTION, "mlp": MLP, "moe": MOE}
_HF_TYPE = {kind: hf for hf, kind in _KIND.items()}


def _block_kinds(config) -> list[str]:
    return [_KIND[t] for t in config.layers_block_type]


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["layers_block_type"] = [_HF_TYPE[k] for k in kinds]
    config_dict.pop("hybrid_override_pattern", None)
    config_dict.pop("num_hidden_layers", None)


NEMOTRON_H = register(
    Family(
        name="nemotron_h",
        base="model",
        fields={
            "hidden": "hidden_size",
            "ffn": "intermediate_size",
            "attention_heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads",
            "mamba_heads": "mamba_num_heads",
            "mamba_head_dim": "mamba_head_dim",
            "ssm_state": "ssm_state_size",
            "mamba_groups": "n_groups",
            "experts": "n_routed_experts",
            "expert_ffn": "moe_intermediate_size",
            "shared_expert_ffn": "moe_shared_expert_intermediate_size",
        },
        block_kinds=_block_kinds,
        set_block_kinds=_set_block_kinds,
        keep_one=(ATTENTION,),
        # NemotronH never ties (its _tied_weights_keys is empty) and has bias-free attention
        layout=Layout(mamba_in_bias="use_bias", mamba_out_bias="use_bias", conv_bias="use_conv_bias",
                      mlp_bias="mlp_bias", mlp_matrices=2, expert_matrices=2, can_tie=False),
        mamba_proj_bias_field="use_bias",  # only the Mamba projections read it
        notes=("MoE blocks: experts are removed evenly from each of the n_group router groups; every group keeps "
               "at least 2 (the router ranks groups by their two best experts) and topk_group groups must hold "
               "num_experts_per_tok experts.",),
    )
)
