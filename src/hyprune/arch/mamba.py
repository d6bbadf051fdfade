"""Mamba (``MambaForCausalLM``): a pure Mamba-1 state-space model, every block ``norm`` + a Mamba-1 ``mixer``.

The config derives the inner width, ``intermediate_size = int(expand * hidden_size)``, when it loads
(a saved ``intermediate_size`` is overwritten), so inner channels prune through a whole-number
``expand`` together with ``hidden_size``, as in Jamba. ``time_step_rank`` ("auto" = ceil(hidden / 16),
resolved to a number when the config loads) stays. The mixer has no dt/B/C norms, so SSM states are
scored from x_proj's B and C rows and removing one is exact: its B and C rows and its A_log column go.
"""

from __future__ import annotations

from hyprune.arch.family import MAMBA, MAMBA1, Family, Layout, Part, register
from hyprune.errors import HypruneError


def block_kinds(config) -> list[str]:
    return [MAMBA] * int(config.num_hidden_layers)


def set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    if any(k != MAMBA for k in kinds):
        raise HypruneError("Mamba models hold only Mamba blocks.")
    config_dict["num_hidden_layers"] = len(kinds)


def finish_config(config_dict: dict) -> None:
    """Write the inner width the config will derive anyway, so config.json reads true."""
    config_dict["intermediate_size"] = int(config_dict["expand"] * config_dict["hidden_size"])


FIELDS = {"hidden": "hidden_size", "ssm_state": "state_size", "mamba_expand": "expand"}
NAMES = {"dt_rank": "time_step_rank", "expand": "expand", "state": "state_size"}
LAYOUT = Layout(mamba_in_bias="use_bias", mamba_out_bias="use_bias", conv_bias="use_conv_bias", mamba_norm=False)
NOTES = ("Mamba-1 inner width = expand * hidden_size with a whole-number expand: prune it with expand (and "
         "hidden_size); intermediate_size is derived; state_size free; time_step_rank stays.",)


def family(name: str, names: dict[str, str], notes: tuple[str, ...] = ()) -> Family:
    """A Mamba-layout family (Mamba, FalconMamba): ``backbone.layers[i].norm`` + ``.mixer``."""
    part = [Part(MAMBA1, "norm", "mixer", names={**NAMES, **names})]
    return Family(name=name, base="backbone", fields=FIELDS, block_kinds=block_kinds, set_block_kinds=set_block_kinds,
                  parts=lambda kind: part, finish_config=finish_config, layout=LAYOUT, notes=NOTES + notes)


MAMBA_FAMILY = register(family("mamba", {"b_norm": "", "c_norm": ""}))
