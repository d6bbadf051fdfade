"""The Mamba-1 mixer (Jamba, Mamba, FalconMamba): a per-channel selective scan, no heads or groups.

Layout (I inner channels = ``mamba_expand * hidden``, N states, R = dt_rank)::

    in_proj rows = [x: I | z: I];  conv channels, dt_proj rows, A_log rows, D = I
    x_proj rows = [dt: R | B: N | C: N], columns I;  A_log columns and b/c_layernorm = N

The dt/B/C RMSNorms are optional: Jamba's carry weights, FalconMamba's are weightless (a non-persistent
buffer, nothing in the state dict) and Mamba has none. A family without them names ``b_norm``/``c_norm``
as "" in `Part.names`, and the states are then scored from x_proj's B and C rows instead. Both norms
take their statistic over the states, so a pruned model normalises over the kept states only.

An inner channel's recurrence is its own; it meets the others only through x_proj's columns (its
share of dt, B and C) and out_proj's columns. dt_rank stays.

Scores: ``layers.i.mamba1_inner`` [I] (input of out_proj, the gated scan output) and
``layers.i.mamba1_bc`` [2, N] (outputs of b_layernorm and c_layernorm, or x_proj's B and C rows).
"""

from __future__ import annotations

import torch

from hyprune.arch.family import MAMBA, MAMBA1
from hyprune.errors import HypruneError
from hyprune.parts.base import BasePart, Context, check_indices, conv_kernel, full, idx, input_hook, output_hook, top_k


def inner_size(sizes: dict[str, int]) -> int:
    return sizes["mamba_expand"] * sizes["hidden"]


DT_RANK_FIELDS = ("mamba_dt_rank", "time_step_rank")  # Jamba's, Mamba's and FalconMamba's


def dt_rank(config) -> int:
    """The rank of dt's projection, which pruning keeps (whichever of `DT_RANK_FIELDS` the config has)."""
    for name in DT_RANK_FIELDS:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise HypruneError(f"{type(config).__name__} names no Mamba-1 dt rank ({', '.join(DT_RANK_FIELDS)}).")


class Mamba1(BasePart):
    kind = MAMBA1
    component = MAMBA  # the parameter counts file Mamba-1 mixers under ``mamba``
    axes = ("mamba_expand", "ssm_state")
    # the config fields a Mamba-1 family names (a family may override them in `Part.names`)
    # b_norm / c_norm: the mixer's B and C norm modules ("" where it has none: Mamba)
    names = {"dt_rank": "mamba_dt_rank", "expand": "mamba_expand", "state": "mamba_d_state",
             "b_norm": "b_layernorm", "c_norm": "c_layernorm"}

    # ---- scoring -------------------------------------------------------------------------------
    def hooks(self, mixer, i, stat, names):
        handles = [mixer.out_proj.register_forward_pre_hook(input_hook(stat(f"layers.{i}.mamba1_inner")))]
        if names["b_norm"]:
            return handles + [getattr(mixer, names[f"{x}_norm"]).register_forward_hook(
                output_hook(stat(f"layers.{i}.mamba1_{x}"))) for x in "bc"]
        N = int(mixer.ssm_state_size)  # x_proj rows = [dt | B | C]: the last 2N rows, without norms
        return handles + [
            mixer.x_proj.register_forward_hook(output_hook(stat(f"layers.{i}.mamba1_b"), lambda y: y[..., -2 * N:-N])),
            mixer.x_proj.register_forward_hook(output_hook(stat(f"layers.{i}.mamba1_c"), lambda y: y[..., -N:]))]

    def scores(self, stat, i, mixer, config):
        return {f"layers.{i}.mamba1_inner": stat(f"layers.{i}.mamba1_inner").score(),
                f"layers.{i}.mamba1_bc": torch.stack([stat(f"layers.{i}.mamba1_{x}").score() for x in "bc"])}

    def score_shapes(self, i, sizes, config):
        return {f"layers.{i}.mamba1_inner": (inner_size(sizes),), f"layers.{i}.mamba1_bc": (2, sizes["ssm_state"])}

    def summary(self, scores, i, describe):
        return {"mamba_inner": describe(scores[f"layers.{i}.mamba1_inner"]),
                "ssm_state": describe(scores[f"layers.{i}.mamba1_bc"].norm(dim=0))}

    # ---- planning ------------------------------------------------------------------------------
    def plan(self, scores, i, sizes, ctx: Context):
        """Inner channels by their score (``mamba_expand * hidden`` kept); states by the L2 of B and C."""
        inner = top_k(scores[f"layers.{i}.mamba1_inner"], inner_size(sizes))
        return {"inner": inner, "state": top_k(scores[f"layers.{i}.mamba1_bc"].norm(dim=0), sizes["ssm_state"])}

    def identity(self, sizes, family):
        return {"inner": full(inner_size(sizes)), "state": full(sizes["ssm_state"])}

    def validate(self, where, lp, s, ctx: Context):
        inner = check_indices(f"{where} inner", lp.inner, inner_size(s))
        if len(inner) % ctx.hidden:
            raise HypruneError(
                f"Plan {where}: {ctx.family.name} ties the Mamba inner width to mamba_expand * hidden_size with a "
                f"whole-number mamba_expand; {len(inner)} inner channels is not a multiple of the "
                f"{ctx.hidden} kept hidden channels."
            )
        return (len(inner), len(check_indices(f"{where} state", lp.state, s["ssm_state"])))

    def result_sizes(self, lp, hidden):
        if lp.inner is None:
            return None
        # inner = mamba_expand * hidden (validation checked the multiple)
        return dict(mamba_expand=len(lp.inner) // hidden, ssm_state=len(lp.state))

    # ---- tensors -------------------------------------------------------------------------------
    def rules(self, lp, sizes, h, config, names):
        I, N = inner_size(sizes), sizes["ssm_state"]
        dt_rank = int(getattr(config, names["dt_rank"]))
        inner, state = idx(lp.inner), idx(lp.state)
        both = torch.cat([inner, I + inner])
        x_rows = torch.cat([torch.arange(dt_rank), dt_rank + state, dt_rank + N + state])
        return {
            "in_proj.weight": [(0, both), (1, h)],
            "in_proj.bias": [(0, both)],
            "conv1d.weight": [(0, inner)],
            "conv1d.bias": [(0, inner)],
            "x_proj.weight": [(0, x_rows), (1, inner)],
            "dt_proj.weight": [(0, inner)],
            "dt_proj.bias": [(0, inner)],
            "A_log": [(0, inner), (1, state)],
            "D": [(0, inner)],
            "out_proj.weight": [(0, h), (1, inner)],
            "out_proj.bias": [(0, h)],
            "dt_layernorm.weight": [],
            "b_layernorm.weight": [(0, state)],
            "c_layernorm.weight": [(0, state)],
        }

    def parameters(self, config, lay, sizes):
        d, N, R = sizes["hidden"], sizes["ssm_state"], dt_rank(config)
        inner = sizes["mamba_expand"] * d
        count = 2 * inner * d + 2 * inner * lay.flag(config, lay.mamba_in_bias)
        count += inner * conv_kernel(config) + inner * lay.flag(config, lay.conv_bias)
        count += (R + 2 * N) * inner + inner * R + inner  # x_proj, dt_proj with its bias
        count += inner * N + inner + (R + 2 * N) * lay.flag(config, lay.mamba_norm)  # A_log, D, the dt/B/C norms
        return count + d * inner + d * lay.flag(config, lay.mamba_out_bias)

    def cache_bytes(self, config, family, i, context, size, ssm_size):
        """Per inner channel a conv window and a state vector."""
        inner = int(getattr(config, family.fields["mamba_expand"])) * int(getattr(config, family.fields["hidden"]))
        return {"mamba_conv": inner * conv_kernel(config) * size,
                "mamba_ssm": inner * int(getattr(config, family.fields["ssm_state"])) * ssm_size}

    def linear_group(self, sub_name):
        name = sub_name.rsplit(".", 1)[-1]
        if name == "dt_proj":
            return None  # the scan reads its weight directly (no forward call): no input statistics to prune by
        return name if name in ("in_proj", "out_proj") else "ssm_proj"  # x_proj


PART = Mamba1()
