"""Mamba2: a pure state-space model, every block a Mamba-2 mixer.

The config derives the mixer width as ``expand * hidden_size``, so after pruning
``num_heads * head_dim`` must equal ``expand * hidden_size``: Mamba heads and hidden channels
cannot shrink independently.
"""

from __future__ import annotations

from hyprune.arch.family import MAMBA, Family, Layout, register
from hyprune.errors import HypruneError


def _block_kinds(config) -> list[str]:
    return [MAMBA] * int(config.num_hidden_layers)


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    if any(k != MAMBA for k in kinds):
        raise HypruneError("Mamba2 models hold only Mamba blocks.")
    config_dict["num_hidden_layers"] = len(kinds)
    config_dict.pop("layer_types", None)


MAMBA2 = register(
    Family(
        name="mamba2",
        base="backbone",
        fields={
            "hidden": "hidden_size",
            "mamba_heads": "num_heads",
            "mamba_head_dim": "head_dim",
            "ssm_state": "state_size",
            "mamba_groups": "n_groups",
        },
        block_kinds=_block_kinds,
        set_block_kinds=_set_block_kinds,
        mamba_width_coupled_to_hidden=True,
        layout=Layout(mamba_in_bias="use_bias", mamba_out_bias="use_bias", conv_bias="use_conv_bias"),
        notes=("Mamba width = expand * hidden_size: prune num_heads/head_dim together with hidden_size.",),
    )
)
