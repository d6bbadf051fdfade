"""Structured pruning of Mamba-2 mixers after Ghattas et al., "On Pruning State-Space LLMs".

Every method takes ``--ratio R`` (the fraction removed) and applies it to every Mamba layer alike,
because an HF config holds one size per field (shared/reference/methods.md, section 5):

- ``state-taylor2`` / ``state-taylor1`` / ``state-magnitude`` / ``state-random``: SSM state channels,
  scored over the B and C rows of ``in_proj`` (all groups), cut through a `Plan` (exact).
- ``headdim-taylor``: Mamba head channels (head_dim) by second-order Taylor saliency of the z and x
  rows, cut through a `Plan`.
- ``head-merge``: consecutive B/C groups mean-pooled into one (in_proj rows, conv filters and biases);
  ``n_groups`` shrinks, every head keeps its position and reads its merged group.
- ``ssm-flap``: FLAP's fluctuation metric on the out_proj input, whole heads removed, the removed
  heads' mean contribution written into an out_proj bias that the saved config enables.

Scores, in the notation of apply.py (H heads, P head_dim, G groups, N states, I = H*P, D = hidden),
with g the gradient of the mean LM loss of one calibration batch (``--batch-size`` windows):

    taylor2  I_n = sum_{B,C rows of n in every group} mean_d W^2 E[g^2]   (diagonal Fisher ~ Hessian)
    taylor1  I_n = | sum_batches sum_{same rows, d} W g |                 (first-order loss change)
    magnitude I_n = || W[B and C rows of n] ||_2
    head_dim I_p = sum_{z and x rows of p in every head} mean_d W^2 E[g^2]

The paper scores states per group; our plans keep the same states in every group (one ``state`` list
per layer, as the Minitron-SSM plans do), so the per-group scores are summed.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from hyprune.apply import apply_plan, model_from_state_dict
from hyprune.arch.family import MAMBA, Family, registered
from hyprune.errors import HypruneError
from hyprune.methods import Method, MethodOptions, MethodResult, register
from hyprune.parts.base import top_k, top_k_within_groups
from hyprune.plan import identity_plan

STATE_SCORES = {
    "state-taylor2": "second-order Taylor (W^2 E[g^2]) over the B and C rows",
    "state-taylor1": "first-order Taylor |sum W g| over the B and C rows",
    "state-magnitude": "L2 norm of the B and C rows",
    "state-random": "uniform random (seeded by --seed)",
}


# ---------------------------------------------------------------------------------------------
# Checks (before any weights are read)
# ---------------------------------------------------------------------------------------------
def _check_ratio(name: str, options: MethodOptions) -> float:
    if options.ratio is None:
        raise HypruneError(f"--method {name} needs --ratio R, the fraction to remove (for example --ratio 0.5).")
    if not 0 < options.ratio < 1:
        raise HypruneError(f"--ratio {options.ratio}: the fraction removed must lie strictly between 0 and 1.")
    if options.sparsity is not None or options.nm is not None or options.targets is not None:
        raise HypruneError(f"--method {name} is structured: it takes --ratio, not --sparsity, --nm or --targets.")
    return options.ratio


def _check_mamba(name: str, family: Family, config) -> None:
    if MAMBA not in family.part_kinds(config):
        raise HypruneError(f"--method {name} prunes Mamba layers, and this {family.name} model has none. "
                           "Use --method activation (or an unstructured method) for it.")


def _check_free_heads(name: str, family: Family, axis: str) -> None:
    """Refuse an axis that the family ties to the hidden size (Mamba2, Bamba: width = expand * hidden)."""
    if family.mamba_width_coupled_to_hidden:
        raise HypruneError(
            f"--method {name} shrinks {family.fields[axis]}, but {family.name} ties the Mamba width "
            f"({family.fields['mamba_heads']} * {family.fields['mamba_head_dim']}) to expand * hidden_size, so the "
            "config cannot express it. On this family use a state method (state-taylor2, ...) or head-merge, or "
            "prune the width with --method activation --target that changes hidden_size too."
        )


def kept_count(total: int, ratio: float, what: str) -> int:
    """How many of ``total`` units survive removing the fraction ``ratio`` (rounded; at least 1, at most total-1)."""
    keep = round(total * (1 - ratio))
    if keep < 1 or keep >= total:
        raise HypruneError(
            f"--ratio {ratio} of {total} {what} keeps {keep}: it must remove at least one and keep at least one. "
            f"Pick a ratio between {1 / total:.3g} and {1 - 1 / total:.3g}."
        )
    return keep


def _sizes(family: Family, config) -> tuple[int, int, int, int]:
    s = family.sizes(config)
    return s["mamba_heads"], s["mamba_head_dim"], s["mamba_groups"], s["ssm_state"]


# ---------------------------------------------------------------------------------------------
# Calibration statistics
# ---------------------------------------------------------------------------------------------
def mamba_mixers(model, family: Family) -> list[tuple[int, str, torch.nn.Module]]:
    """(block index, mixer attribute name, mixer) of every Mamba part, in order."""
    return [(i, part.mixer, mixer) for i, part, mixer in family.mixers(model, MAMBA)]


def _batches(windows: torch.Tensor, batch_size: int, desc: str, progress: bool):
    return tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress)


def in_proj_taylor(model, family: Family, windows: torch.Tensor, batch_size: int = 8,
                   progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per in_proj row of every Mamba layer, Taylor statistics of the LM loss over calibration batches.

    Returns block index -> ``{"first": [rows], "second": [rows]}`` (float64, CPU) with
    ``first[r] = sum_batches sum_d W[r, d] g[r, d]`` and ``second[r] = mean_batches sum_d W[r, d]^2 g[r, d]^2``,
    g being the gradient of one batch's mean next-token loss. Rows are reduced as each batch passes, so
    memory stays at one gradient of in_proj per layer; only in_proj weights require grad meanwhile.
    """
    mixers = mamba_mixers(model, family)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, _, mixer in mixers:
        mixer.in_proj.weight.requires_grad_(True)
    stats = {i: {"first": 0.0, "second": 0.0} for i, _, _ in mixers}
    device = next(model.parameters()).device
    batches = 0
    try:
        with torch.enable_grad():
            for start in _batches(windows, batch_size, "taylor sweep", progress):
                batch = windows[start : start + batch_size].to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                for i, _, mixer in mixers:
                    weight = mixer.in_proj.weight
                    wg = (weight.detach() * weight.grad).double()  # [rows, hidden]
                    stats[i]["first"] = stats[i]["first"] + wg.sum(dim=1).cpu()
                    stats[i]["second"] = stats[i]["second"] + wg.pow(2).sum(dim=1).cpu()
                    weight.grad = None
                batches += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {i: {"first": s["first"], "second": s["second"] / batches} for i, s in stats.items()}


@torch.inference_mode()
def out_proj_input_moments(model, family: Family, windows: torch.Tensor, batch_size: int = 8,
                           progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Mean and sample variance over all calibration tokens of every Mamba out_proj input channel.

    Returns block index -> ``{"mean": [I], "var": [I]}`` (float64, CPU), from running sums in float64.
    """
    sums: dict[int, list] = {}
    handles = []

    def hook(i):
        def record(module, args):
            x = args[0].detach().double().flatten(0, -2)  # [tokens, I]
            acc = sums.setdefault(i, [0.0, 0.0, 0])
            acc[0] = acc[0] + x.sum(dim=0)
            acc[1] = acc[1] + x.pow(2).sum(dim=0)
            acc[2] += x.shape[0]

        return record

    for i, _, mixer in mamba_mixers(model, family):
        handles.append(mixer.out_proj.register_forward_pre_hook(hook(i)))
    device = next(model.parameters()).device
    try:
        for start in _batches(windows, batch_size, "fluctuation sweep", progress):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, (total, total_sq, n) in sums.items():
        mean = total / n
        out[i] = {"mean": mean.cpu(), "var": ((total_sq - n * mean.pow(2)) / (n - 1)).clamp(min=0).cpu()}
    return out


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def bc_rows(H: int, P: int, G: int, N: int) -> torch.Tensor:
    """in_proj row of every (B or C, group, state): [2, G, N]."""
    return 2 * H * P + torch.arange(2 * G * N).view(2, G, N)


def zx_rows(H: int, P: int) -> torch.Tensor:
    """in_proj row of every (z or x, head, channel): [2, H, P]."""
    return torch.arange(2 * H * P).view(2, H, P)


def state_scores(method: str, model, family: Family, windows, options: MethodOptions, batch_size: int = 8,
                 progress: bool = True, taylor: dict | None = None) -> dict[int, torch.Tensor]:
    """Block index -> [N] score of every SSM state (higher = keep), for one of `STATE_SCORES`.

    ``taylor``: the `in_proj_taylor` statistics when already computed (they serve every Taylor score).
    """
    H, P, G, N = _sizes(family, model.config)
    rows = bc_rows(H, P, G, N)
    mixers = mamba_mixers(model, family)
    if method == "state-random":
        generator = torch.Generator().manual_seed(options.seed)
        return {i: torch.rand(N, generator=generator, dtype=torch.float64) for i, _, _ in mixers}
    if method == "state-magnitude":
        return {i: mixer.in_proj.weight.detach().double()[rows].pow(2).sum(dim=(0, 1, 3)).sqrt().cpu()
                for i, _, mixer in mixers}
    taylor = taylor or in_proj_taylor(model, family, windows, batch_size, progress)
    hidden = model.config.hidden_size
    if method == "state-taylor1":
        return {i: t["first"][rows].sum(dim=(0, 1)).abs() for i, t in taylor.items()}
    return {i: t["second"][rows].sum(dim=(0, 1)) / hidden for i, t in taylor.items()}


def headdim_scores(model, family: Family, windows, batch_size: int = 8, progress: bool = True,
                   taylor: dict | None = None) -> dict[int, torch.Tensor]:
    """Block index -> [P] second-order Taylor saliency of each head channel (z and x rows, all heads)."""
    H, P, _, _ = _sizes(family, model.config)
    rows = zx_rows(H, P)
    taylor = taylor or in_proj_taylor(model, family, windows, batch_size, progress)
    return {i: t["second"][rows].sum(dim=(0, 1)) / model.config.hidden_size for i, t in taylor.items()}


def flap_head_scores(model, family: Family, moments: dict[int, dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Block index -> [H] FLAP score of each head.

    Fluctuation of out_proj input channel j: sample variance of x_j times ||W_out[:, j]||^2 (how much
    the output moves when x_j moves); standardised over the layer's channels so layers compare on one
    scale; averaged over the head's P channels.
    """
    H, P, _, _ = _sizes(family, model.config)
    out = {}
    for i, _, mixer in mamba_mixers(model, family):
        column_sq = mixer.out_proj.weight.detach().double().pow(2).sum(dim=0).cpu()  # [I]
        fluctuation = moments[i]["var"] * column_sq
        standard = (fluctuation - fluctuation.mean()) / fluctuation.std()
        out[i] = standard.view(H, P).mean(dim=1)
    return out


def _score_summary(score: torch.Tensor) -> dict:
    s = score.double()
    return {"min": float(s.min()), "median": float(s.median()), "max": float(s.max())}


# ---------------------------------------------------------------------------------------------
# Plan methods: states and head channels
# ---------------------------------------------------------------------------------------------
def _axis_plan(model, family: Family, method: str, axis: str, layer_field: str, scores: dict[int, torch.Tensor],
               keep: int):
    """A keep-everything plan whose Mamba layers keep the ``keep`` best units of ``axis``, and its report."""
    plan = identity_plan(family, model.config)
    plan.method = method
    plan.target = {family.fields[axis]: keep}
    layers = []
    for i, score in scores.items():
        kept = top_k(score, keep)
        setattr(plan.layers[i], layer_field, kept)
        layers.append({"layer": i, "score": _score_summary(score),
                       "removed": sorted(set(range(len(score))) - set(kept))})
    report = {"axis": family.fields[axis], "kept": keep, "of": family.sizes(model.config)[axis], "layers": layers}
    return plan, report


def _check_state(name):
    def check(family: Family, config, options: MethodOptions) -> None:
        ratio = _check_ratio(name, options)
        _check_mamba(name, family, config)
        kept_count(family.sizes(config)["ssm_state"], ratio, f"SSM states ({family.fields['ssm_state']})")

    return check


def prune_states(model, family: Family, name: str, scores: dict[int, torch.Tensor], ratio: float) -> MethodResult:
    """Keep the best ``1 - ratio`` of the SSM states of every Mamba layer by ``scores`` (from `state_scores`)."""
    keep = kept_count(family.sizes(model.config)["ssm_state"], ratio, "SSM states")
    plan, report = _axis_plan(model, family, name, "ssm_state", "state", scores, keep)
    report = {"ratio": ratio, "score": STATE_SCORES[name], **report}
    return MethodResult(model=apply_plan(model, plan, family), report=report, plan=plan)


def _run_state(name):
    def run(model, family, windows, options, *, batch_size=8, progress=True) -> MethodResult:
        scores = state_scores(name, model, family, windows, options, batch_size, progress)
        return prune_states(model, family, name, scores, options.ratio)

    return run


def _check_headdim(family: Family, config, options: MethodOptions) -> None:
    ratio = _check_ratio("headdim-taylor", options)
    _check_mamba("headdim-taylor", family, config)
    _check_free_heads("headdim-taylor", family, "mamba_head_dim")
    kept_count(family.sizes(config)["mamba_head_dim"], ratio, f"head channels ({family.fields['mamba_head_dim']})")


def prune_head_channels(model, family: Family, scores: dict[int, torch.Tensor], ratio: float) -> MethodResult:
    """Keep the best ``1 - ratio`` of the head channels (the same in every head) by ``scores`` (`headdim_scores`)."""
    keep = kept_count(family.sizes(model.config)["mamba_head_dim"], ratio, "head channels")
    plan, report = _axis_plan(model, family, "headdim-taylor", "mamba_head_dim", "head_dim", scores, keep)
    report = {"ratio": ratio, "score": "second-order Taylor (W^2 E[g^2]) over the z and x rows, all heads",
              **report}
    return MethodResult(model=apply_plan(model, plan, family), report=report, plan=plan)


def _run_headdim(model, family, windows, options, *, batch_size=8, progress=True) -> MethodResult:
    return prune_head_channels(model, family, headdim_scores(model, family, windows, batch_size, progress),
                               options.ratio)


# ---------------------------------------------------------------------------------------------
# Head merging
# ---------------------------------------------------------------------------------------------
def merged_group_count(groups: int, ratio: float) -> int:
    """Groups left after merging: ``groups * (1 - ratio)``, which must divide ``groups`` (equal clusters)."""
    keep = kept_count(groups, ratio, "B/C groups")
    if groups % keep:
        valid = [f"{1 - d / groups:.3g} ({d} left)" for d in range(1, groups) if groups % d == 0]
        raise HypruneError(
            f"--ratio {ratio} merges {groups} B/C groups into {keep}, but head-merge pools equal runs of consecutive "
            f"groups, so the count left must divide {groups}. Valid ratios: {', '.join(valid)}."
        )
    return keep


@torch.no_grad()
def pool_groups_(model, family: Family, groups_left: int) -> list[int]:
    """Mean-pool every run of ``G / groups_left`` consecutive B/C groups into its first group, in place.

    Pooled: the B and C rows of in_proj (and its bias), and the B and C channels of the conv filters and
    conv bias. Returns the groups that now hold the pooled values (the first of every run); a plan that
    keeps them and regroups the heads (``heads_regrouped``) then gives each head its merged group.
    """
    H, P, G, N = _sizes(family, model.config)
    run = G // groups_left
    rows = bc_rows(H, P, G, N).view(2, groups_left, run, N)  # in_proj rows
    channels = rows - H * P  # conv channels: [x: I | B: GN | C: GN]
    for _, _, mixer in mamba_mixers(model, family):
        for tensor, index in ((mixer.in_proj.weight, rows), (mixer.in_proj.bias, rows),
                              (mixer.conv1d.weight, channels), (mixer.conv1d.bias, channels)):
            if tensor is not None:
                tensor[index[:, :, 0]] = tensor[index].mean(dim=2)  # [2, groups_left, N, ...]
    return [c * run for c in range(groups_left)]


def _check_merge(family: Family, config, options: MethodOptions) -> None:
    ratio = _check_ratio("head-merge", options)
    _check_mamba("head-merge", family, config)
    merged_group_count(family.sizes(config)["mamba_groups"], ratio)


def merge_groups(model, family: Family, ratio: float) -> MethodResult:
    """head-merge: pool runs of consecutive B/C groups (``model`` is changed in place) and cut the model."""
    G = family.sizes(model.config)["mamba_groups"]
    groups_left = merged_group_count(G, ratio)
    representatives = pool_groups_(model, family, groups_left)
    plan = identity_plan(family, model.config)
    plan.method = "head-merge"
    plan.target = {family.fields["mamba_groups"]: groups_left}
    plan.heads_regrouped = True
    for i, _, _ in mamba_mixers(model, family):
        plan.layers[i].groups = representatives
    run = G // groups_left
    report = {"ratio": ratio, "axis": family.fields["mamba_groups"], "kept": groups_left, "of": G,
              "merged": [list(range(c * run, (c + 1) * run)) for c in range(groups_left)],
              "note": "B/C in_proj rows, conv filters and biases mean-pooled over each run of consecutive groups"}
    return MethodResult(model=apply_plan(model, plan, family), report=report, plan=plan)


def _run_merge(model, family, windows, options, *, batch_size=8, progress=True) -> MethodResult:
    return merge_groups(model, family, options.ratio)


# ---------------------------------------------------------------------------------------------
# SSM-FLAP
# ---------------------------------------------------------------------------------------------
def _check_flap(family: Family, config, options: MethodOptions) -> None:
    ratio = _check_ratio("ssm-flap", options)
    _check_mamba("ssm-flap", family, config)
    _check_free_heads("ssm-flap", family, "mamba_heads")
    if family.mamba_proj_bias_field is None:
        known = [f.name for f in registered() if f.mamba_proj_bias_field is not None]
        raise HypruneError(f"--method ssm-flap writes its bias compensation into the Mamba out_proj bias, which "
                           f"hyprune only knows how to enable for {', '.join(known)}; not {family.name}.")
    H, _, G, _ = _sizes(family, config)
    fields = f"{family.fields['mamba_heads']} / {family.fields['mamba_groups']}"
    kept_count(H // G, ratio, f"Mamba heads per B/C group ({fields})")


def flap_compensation(weight: torch.Tensor, mean: torch.Tensor, removed_channels: list[int]) -> torch.Tensor:
    """The out_proj bias that replaces removed input channels by their calibration mean: W[:, removed] @ mean."""
    return weight.detach().double().cpu()[:, removed_channels] @ mean[removed_channels]


def _run_flap(model, family, windows, options, *, batch_size=8, progress=True) -> MethodResult:
    return prune_heads_flap(model, family, out_proj_input_moments(model, family, windows, batch_size, progress),
                            options.ratio)


def prune_heads_flap(model, family: Family, moments: dict[int, dict[str, torch.Tensor]], ratio: float) -> MethodResult:
    """SSM-FLAP from the out_proj input ``moments`` (`out_proj_input_moments`): cut heads, compensate the bias."""
    H, P, G, _ = _sizes(family, model.config)
    per_group = H // G
    keep = kept_count(per_group, ratio, "Mamba heads per group")
    scores = flap_head_scores(model, family, moments)
    # FLAP's one global threshold: the lowest ratio of all heads, all layers together. An HF config
    # holds one head count, and every group must keep the same number, so the heads actually removed
    # are the lowest (per_group - keep) of every group; the global choice is reported next to it.
    everything = torch.cat(list(scores.values()))
    n_remove = max(1, round(ratio * len(everything)))
    threshold = everything.sort().values[n_remove - 1].item()
    plan = identity_plan(family, model.config)
    plan.method = "ssm-flap"
    plan.target = {family.fields["mamba_heads"]: keep * G}
    compensation, layers = {}, []
    for i, _, mixer in mamba_mixers(model, family):
        kept = top_k_within_groups(scores[i], list(range(G)), per_group, keep)
        plan.layers[i].heads = kept
        removed = sorted(set(range(H)) - set(kept))
        channels = [h * P + p for h in removed for p in range(P)]
        compensation[i] = flap_compensation(mixer.out_proj.weight, moments[i]["mean"], channels)
        layers.append({"layer": i, "score": _score_summary(scores[i]), "removed": removed,
                       "global_threshold_would_remove": int((scores[i] <= threshold).sum()),
                       "compensation_norm": float(compensation[i].norm())})
    pruned = apply_plan(model, plan, family)
    report = {"ratio": ratio, "axis": family.fields["mamba_heads"], "kept": keep * G, "of": H,
              "score": "standardised fluctuation (var(x_j) * ||W_out[:, j]||^2), mean per head",
              "global_threshold": threshold, "layers": layers,
              "reconciled": "HF configs need equal head counts per layer and per group: each group drops its "
                            "lowest-scored heads; 'global_threshold_would_remove' shows the global choice"}
    return MethodResult(model=with_out_proj_bias(pruned, family, compensation), report=report, plan=plan)


def with_out_proj_bias(model, family: Family, extra: dict[int, torch.Tensor]):
    """``model`` rebuilt with the Mamba projection biases enabled in its config: out_proj bias += ``extra``
    (block index -> [hidden]), in_proj bias zero where the source had none. Loads with no custom code."""
    state = dict(model.state_dict())
    config = copy.deepcopy(model.config)
    setattr(config, family.mamba_proj_bias_field, True)
    for i, name, mixer in mamba_mixers(model, family):
        prefix = f"{family.layer_prefix(i)}.{name}"
        weight = mixer.out_proj.weight
        if mixer.in_proj.bias is None:
            state[f"{prefix}.in_proj.bias"] = weight.new_zeros(mixer.in_proj.weight.shape[0])
        base = mixer.out_proj.bias if mixer.out_proj.bias is not None else weight.new_zeros(weight.shape[0])
        state[f"{prefix}.out_proj.bias"] = (base.detach().double() + extra[i].to(weight.device)).to(weight.dtype)
    return model_from_state_dict(config, state, model)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
for _name, _summary in STATE_SCORES.items():
    register(Method(_name, f"SSM state pruning, {_summary}", needs_data=_name in ("state-taylor2", "state-taylor1"),
                    check=_check_state(_name), run=_run_state(_name)))
register(Method("headdim-taylor", "Mamba head-channel pruning by second-order Taylor saliency", needs_data=True,
                check=_check_headdim, run=_run_headdim))
register(Method("head-merge", "mean-pool consecutive B/C groups; n_groups shrinks", needs_data=False,
                check=_check_merge, run=_run_merge))
register(Method("ssm-flap", "FLAP fluctuation on Mamba heads with out_proj bias compensation", needs_data=True,
                check=_check_flap, run=_run_flap))
