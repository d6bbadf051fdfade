"""NemotronH (Nemotron-H, Nemotron-Nano): Mamba-2, attention and MLP blocks in one pattern.

The pattern lives in ``layers_block_type`` (``linear_attention`` = Mamba, ``full_attention``,
``mlp``, ``moe``); ``num_hidden_layers`` is derived from it. The Mamba width is
``mamba_num_heads * mamba_head_dim`` and is free of ``hidden_size``.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, MAMBA, MLP, MOE, Family, register

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
        },
        block_kinds=_block_kinds,
        set_block_kinds=_set_block_kinds,
    )
)
