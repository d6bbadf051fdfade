"""The Mamba-2 mixer (NemotronH, Mamba2, Bamba, Granite-4.0-H, FalconH1, Zamba2).

Layout (H heads, P head_dim, G groups, N state, I = H*P), see shared/reference/hf-hybrid-layouts.md:
    in_proj rows  = [z: I | x: I | B: G*N | C: G*N | dt: H]      (inner index h*P+p, B/C index g*N+n)
    conv channels = [x: I | B: G*N | C: G*N]
    A_log, D, dt_bias: [H];  norm.weight: [I];  out_proj: [hidden, I]

Scores: ``layers.i.mamba_x`` [H, P] (the x slice of in_proj's output) and ``layers.i.mamba_bc`` [2, G, N]
(its B and C slices).
"""

from __future__ import annotations

import torch

from hyprune.arch.family import MAMBA
from hyprune.errors import HypruneError
from hyprune.parts.base import (BasePart, Context, Index, check_grouped, check_indices, conv_kernel, full, idx,
                                output_hook, top_k, top_k_within_groups)


def dims(mixer) -> tuple[int, int, int, int]:
    return mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size


def rank(x_score: torch.Tensor, bc_score: torch.Tensor, sizes: dict[str, int], group_aware: bool = True) -> dict:
    """Group-aware Minitron-SSM ranking for one Mamba layer: the kept heads, head_dim, state and groups.

    Args:
        x_score: [heads, head_dim] activation score of the x slice of in_proj.
        bc_score: [2, groups, state] activation score of the B and C slices of in_proj.
        sizes: target sizes (``mamba_heads``, ``mamba_head_dim``, ``ssm_state``, ``mamba_groups``).

    Order (nested, as in the paper): whole groups by the L2 of their heads; head channels by the
    L2 over the heads of the kept groups (one ranking shared by all heads); heads by the L2 over the
    kept channels, ranked *inside* their group; states by the L2 of B and C over the kept groups.
    With ``group_aware=False`` (the group-blind baseline) channels and heads are ranked over all heads
    and the best heads are kept wherever they are; the plan then regroups them.
    """
    heads, head_dim = x_score.shape
    groups = bc_score.shape[1]
    per_group = heads // groups
    head_all = x_score.norm(dim=1)  # [heads]
    kept_groups = top_k(head_all.view(groups, per_group).norm(dim=1), sizes["mamba_groups"])
    in_kept_groups = [g * per_group + i for g in kept_groups for i in range(per_group)]
    candidates = in_kept_groups if group_aware else list(range(heads))
    kept_channels = top_k(x_score[candidates].norm(dim=0), sizes["mamba_head_dim"])
    head_score = x_score[:, kept_channels].norm(dim=1)  # [heads]
    if group_aware:
        kept_heads = top_k_within_groups(head_score, kept_groups, per_group, sizes["mamba_heads"] // len(kept_groups))
    else:
        kept_heads = top_k(head_score, sizes["mamba_heads"])
    state_score = bc_score[:, kept_groups].pow(2).sum(dim=(0, 1)).sqrt()  # [state]
    kept_state = top_k(state_score, sizes["ssm_state"])
    return {"heads": kept_heads, "head_dim": kept_channels, "state": kept_state, "groups": kept_groups}


def indices(lp, sizes: dict[str, int]) -> dict[str, Index]:
    """Kept rows/channels of every Mamba tensor, from kept heads, head channels, groups and states."""
    H, P, G, N = sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["mamba_groups"], sizes["ssm_state"]
    inner_size = H * P
    inner = idx(h * P + p for h in lp.heads for p in lp.head_dim)  # kept (head, channel) pairs
    bc = idx(g * N + n for g in lp.groups for n in lp.state)  # kept (group, state) pairs
    heads = idx(lp.heads)
    return {
        "in_proj": torch.cat([inner, inner_size + inner, 2 * inner_size + bc, 2 * inner_size + G * N + bc,
                              2 * inner_size + 2 * G * N + heads]),
        "conv": torch.cat([inner, inner_size + bc, inner_size + G * N + bc]),
        "heads": heads,
        "inner": inner,
    }


def _check_coupled(family, config, sizes: dict[str, int], message) -> None:
    """The Mamba width of a coupled family (Mamba2, Bamba) must stay ``expand * hidden``."""
    if not family.mamba_width_coupled_to_hidden:
        return
    width = sizes["mamba_heads"] * sizes["mamba_head_dim"]
    if width != family.expand(config) * sizes["hidden"]:
        raise HypruneError(message(width, family.expand(config)))


class Mamba2(BasePart):
    kind = MAMBA
    component = MAMBA
    axes = ("mamba_heads", "mamba_head_dim", "ssm_state", "mamba_groups")

    # ---- scoring -------------------------------------------------------------------------------
    def hooks(self, mixer, i, stat, names):
        H, P, G, N = dims(mixer)
        inner = H * P
        # in_proj output rows: z [0:I], x [I:2I], B [2I:2I+GN], C [2I+GN:2I+2GN], dt
        return [
            mixer.in_proj.register_forward_hook(
                output_hook(stat(f"layers.{i}.mamba_x"), lambda out, a=inner: out[..., a : 2 * a])),
            mixer.in_proj.register_forward_hook(
                output_hook(stat(f"layers.{i}.mamba_bc"), lambda out, a=inner, b=G * N: out[..., 2 * a : 2 * a + 2 * b])),
        ]

    def scores(self, stat, i, mixer, config):
        H, P, G, N = dims(mixer)
        return {f"layers.{i}.mamba_x": stat(f"layers.{i}.mamba_x").score().view(H, P),
                f"layers.{i}.mamba_bc": stat(f"layers.{i}.mamba_bc").score().view(2, G, N)}

    def score_shapes(self, i, sizes, config):
        return {f"layers.{i}.mamba_x": (sizes["mamba_heads"], sizes["mamba_head_dim"]),
                f"layers.{i}.mamba_bc": (2, sizes["mamba_groups"], sizes["ssm_state"])}

    def summary(self, scores, i, describe):
        x = scores[f"layers.{i}.mamba_x"]
        return {"mamba_heads": describe(x.norm(dim=1)), "mamba_head_dim": describe(x.norm(dim=0)),
                "ssm_state": describe(scores[f"layers.{i}.mamba_bc"].pow(2).sum(dim=(0, 1)).sqrt())}

    # ---- planning ------------------------------------------------------------------------------
    def check_target(self, family, config, sizes, source):
        heads, groups = sizes["mamba_heads"], sizes["mamba_groups"]
        f_heads, f_groups = family.fields["mamba_heads"], family.fields["mamba_groups"]
        if heads % groups:
            raise HypruneError(
                f"{f_heads}={heads} is not divisible by {f_groups}={groups}: every B/C group must keep the "
                f"same number of Mamba heads. Pick {f_heads} as a multiple of {groups}."
            )
        per_group_source = source["mamba_heads"] // source["mamba_groups"]
        if heads // groups > per_group_source:
            raise HypruneError(
                f"{f_heads}={heads} with {f_groups}={groups} needs {heads // groups} heads per group, but each "
                f"source group has only {per_group_source}. Lower {f_heads} or keep more groups."
            )
        _check_coupled(family, config, sizes, lambda width, expand: (
            f"In {family.name} the Mamba width is tied to the hidden size: "
            f"{f_heads} * {family.fields['mamba_head_dim']} must equal expand ({expand}) * hidden_size, "
            f"but the target gives {width} vs {expand * sizes['hidden']}. "
            "Change the heads, head_dim and hidden_size together."))

    def plan(self, scores, i, sizes, ctx: Context):
        return rank(scores[f"layers.{i}.mamba_x"], scores[f"layers.{i}.mamba_bc"], sizes, ctx.group_aware)

    def identity(self, sizes, family):
        return {"heads": full(sizes["mamba_heads"]), "head_dim": full(sizes["mamba_head_dim"]),
                "state": full(sizes["ssm_state"]), "groups": full(sizes["mamba_groups"])}

    def validate(self, where, lp, s, ctx: Context):
        groups = check_indices(f"{where} groups", lp.groups, s["mamba_groups"])
        heads = check_indices(f"{where} heads", lp.heads, s["mamba_heads"])
        check_indices(f"{where} head_dim", lp.head_dim, s["mamba_head_dim"])
        check_indices(f"{where} state", lp.state, s["ssm_state"])
        if not ctx.regrouped:
            check_grouped(where, heads, groups, s["mamba_heads"] // s["mamba_groups"], "head")
        elif len(heads) % len(groups):
            raise HypruneError(f"Plan {where}: {len(heads)} regrouped heads do not split evenly "
                               f"into {len(groups)} groups.")
        return (len(lp.heads), len(lp.head_dim), len(lp.state), len(lp.groups))

    def result_sizes(self, lp, hidden):
        if lp.groups is None:
            return None
        return dict(mamba_heads=len(lp.heads), mamba_head_dim=len(lp.head_dim), ssm_state=len(lp.state),
                    mamba_groups=len(lp.groups))

    def check_result(self, family, config, result):
        _check_coupled(family, config, result, lambda width, expand: (
            f"Plan: {family.name} ties the Mamba width to expand * hidden_size; the plan keeps {width} "
            f"Mamba channels and {result['hidden']} hidden channels (expand {expand})."))

    # ---- tensors -------------------------------------------------------------------------------
    def rules(self, lp, sizes, h, config, names):
        ix = indices(lp, sizes)
        return {
            "in_proj.weight": [(0, ix["in_proj"]), (1, h)],
            "in_proj.bias": [(0, ix["in_proj"])],
            "conv1d.weight": [(0, ix["conv"])],
            "conv1d.bias": [(0, ix["conv"])],
            "A_log": [(0, ix["heads"])],
            "D": [(0, ix["heads"])],
            "dt_bias": [(0, ix["heads"])],
            "norm.weight": [(0, ix["inner"])],
            "out_proj.weight": [(0, h), (1, ix["inner"])],
            "out_proj.bias": [(0, h)],
        }

    def parameters(self, config, lay, sizes):
        d = sizes["hidden"]
        H, P, G, N = sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["mamba_groups"], sizes["ssm_state"]
        inner, conv = H * P, H * P + 2 * G * N
        rows = 2 * inner + 2 * G * N + H
        count = rows * d + rows * lay.flag(config, lay.mamba_in_bias)
        count += conv * conv_kernel(config) + conv * lay.flag(config, lay.conv_bias)
        count += 3 * H + inner * lay.flag(config, lay.mamba_norm)
        count += d * inner + d * lay.flag(config, lay.mamba_out_bias)
        return count

    def cache_bytes(self, config, family, i, context, size, ssm_size):
        heads, head_dim, groups, state = (int(getattr(config, family.fields[a])) for a in
                                          ("mamba_heads", "mamba_head_dim", "mamba_groups", "ssm_state"))
        return {"mamba_conv": (heads * head_dim + 2 * groups * state) * conv_kernel(config) * size,
                "mamba_ssm": heads * head_dim * state * ssm_size}

    def linear_group(self, sub_name):
        return sub_name.rsplit(".", 1)[-1]  # in_proj or out_proj


PART = Mamba2()
