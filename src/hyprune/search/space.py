"""The search space: which shapes a search may cut to, their sizes, and the budget they must meet.

A *candidate* is one target architecture: a size for every canonical axis (hidden, ffn, Mamba heads,
head_dim, attention heads, ...) and a number of blocks to drop per block kind. Which blocks go is
decided later, from block importance (the lowest-scored blocks of each kind), so that the parameter
count of a candidate is known from the config alone, before any weights are read.

Each axis takes values ``max, max - step, ...`` down to ``min``; steps are multiples of the axis's
*unit*, the smallest change the config can express (Mamba heads: one head per B/C group; attention
heads: one per KV group; routed experts: one per router group; in a model with routed experts, 8 for
the widths they multiply over, as grouped_mm needs). Without bounds an axis runs from ``min_fraction``
of the source to the source in about eight steps (multiples of 8 for hidden and FFN widths, as
hardware likes them). Axes the user fixes, axes the family cannot prune (Zamba2's hidden size), and
axes not searched by default (KV heads, SSM state, groups), keep one value. Axes that share a config
field (Jamba's ``intermediate_size`` sizes the MLPs and the experts) are one axis.

Budgets (Minitron: +-5% of a parameter count) keep the candidates with
``|params - B| <= tolerance * B``, the same for active parameters (MoE: what one token runs through,
the total less the routed experts it skips); memory and latency budgets are limits, kept when
``(1 - tolerance) * B <= value <= B`` (under the limit, but not needlessly small).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Callable

from hyprune.arch.family import MOE, MOE_AXES, Family, expert_groups
from hyprune.config import space_from_text
from hyprune.depth import protected_kinds
from hyprune.errors import HypruneError
from hyprune.parts import kinds_with_axis
from hyprune.plan import EXPERT_ALIGNMENT, resolve_target
from hyprune.search.counting import active_parameters, count_parameters, memory_bytes, shaped_config

SEARCHED_BY_DEFAULT = ("hidden", "ffn", "mamba_heads", "mamba_head_dim", "attention_heads", "mamba_expand",
                       *MOE_AXES)
AUTO_STEPS = 8  # about this many values per axis when the step is not given
MAX_GRID = 2_000_000  # shapes enumerated at most (each is counted in Python)


# ---------------------------------------------------------------------------------------------
# Axes
# ---------------------------------------------------------------------------------------------
def axis_unit(family: Family, config, axis: str) -> int:
    """The smallest step of ``axis`` that every config can express."""
    sizes = family.sizes(config)
    if axis == "mamba_heads":
        return sizes["mamba_groups"]  # every group keeps the same number of heads
    if axis == "attention_heads":
        return sizes["kv_heads"]  # every KV group keeps the same number of query heads
    if axis == "experts":
        return expert_groups(config)  # experts go evenly from every router group
    latent = getattr(config, "moe_latent_size", None)  # NemotronH: the experts then see a fixed width
    if "experts" in sizes and (axis == "expert_ffn" or axis == "hidden" and not latent):
        return EXPERT_ALIGNMENT  # grouped_mm needs 16-byte aligned rows (plan.check_expert_alignment)
    if axis in ("hidden", "ffn") and sizes[axis] >= 64 and sizes[axis] % 8 == 0:
        return 8
    return 1


@dataclass(frozen=True)
class AxisSpace:
    """The values one axis takes, largest first."""

    axis: str
    field: str
    values: tuple[int, ...]


def _fmt_range(field_name: str, lo: int, hi: int, step: int) -> str:
    return f"{field_name}={lo}:{hi}:{step}"


def axis_space(family: Family, config, axis: str, spec: str | None, min_fraction: float) -> AxisSpace:
    """Parse one ``--space`` entry (``(MIN, MAX[, STEP])`` or ``"MIN:MAX[:STEP]"``, or ``VALUE`` to fix the
    axis); None = automatic."""
    if isinstance(spec, (tuple, list)):
        spec = ":".join(str(v) for v in spec)
    source = family.sizes(config)[axis]
    name = family.fields[axis]
    unit = axis_unit(family, config, axis)
    if axis in family.fixed_axes:
        if spec is not None and str(spec).strip() != str(source):
            raise HypruneError(f"--space {name}={spec}: {name} cannot be pruned in {family.name}: "
                               f"{family.fixed_axes[axis]} Leave it out (it stays {source}).")
        return AxisSpace(axis, name, (source,))
    if spec is None:
        if axis not in SEARCHED_BY_DEFAULT:
            return AxisSpace(axis, name, (source,))
        lo = max(unit, math.ceil(min_fraction * source / unit) * unit)
        step = unit * max(1, math.ceil(source / (AUTO_STEPS * unit)))
        return AxisSpace(axis, name, tuple(range(source, lo - 1, -step)) or (source,))
    parts = [p.strip() for p in str(spec).split(":")]
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise HypruneError(f"--space {name}={spec}: write MIN:MAX[:STEP] or one VALUE, in whole numbers "
                           f"(e.g. {_fmt_range(name, source // 2, source, unit)}).") from None
    if len(numbers) == 1:
        numbers = [numbers[0], numbers[0], unit]
    if len(numbers) == 2:
        numbers.append(unit * max(1, math.ceil(source / (AUTO_STEPS * unit))))
    if len(numbers) != 3:
        raise HypruneError(f"--space {name}={spec}: write MIN:MAX[:STEP] or one VALUE.")
    lo, hi, step = numbers
    if lo < 1 or step < 1:
        raise HypruneError(f"--space {name}={spec}: sizes and steps must be at least 1; nearest feasible: "
                           f"{_fmt_range(name, max(lo, unit), max(hi, unit), max(step, unit))}.")
    if lo > hi:
        raise HypruneError(f"--space {name}={spec}: the minimum {lo} is above the maximum {hi}. "
                           f"Did you mean {_fmt_range(name, hi, lo, step)}?")
    if hi > source:
        raise HypruneError(f"--space {name}={spec}: the maximum {hi} is above the source's {name} ({source}); "
                           f"pruning only shrinks. The largest feasible value is {source}.")
    if step % unit:
        nearest = sorted({max(unit, step // unit * unit), -(-step // unit) * unit})
        raise HypruneError(f"--space {name}={spec}: {name} must change in multiples of {unit} (one per group), "
                           f"so a step of {step} is impossible; nearest feasible step: "
                           f"{' or '.join(map(str, nearest))}.")
    values = tuple(v for v in range(hi, lo - 1, -step) if v % unit == 0)
    if not values:
        below, above = (lo // unit) * unit, math.ceil(hi / unit) * unit
        nearest = " or ".join(str(v) for v in (below, above) if 1 <= v <= source and v % unit == 0) or str(unit)
        raise HypruneError(f"--space {name}={spec} holds no multiple of {unit} (every group keeps the same "
                           f"number); nearest feasible: {nearest}.")
    return AxisSpace(axis, name, values)


def parse_space(family: Family, config, space: str | dict | None, min_fraction: float = 0.5) -> list[AxisSpace]:
    """Every axis of the family with its values: ``"hidden_size=96:192:24,mamba_num_heads=8"`` (config field
    names, as ``--target``), unlisted axes automatic (see the module docstring)."""
    if not 0 < min_fraction <= 1:
        raise HypruneError(f"--min-fraction must be in (0, 1], got {min_fraction}.")
    entries = space_from_text(space) if isinstance(space, str) else dict(space or {})
    field_axis = {name: axis for axis, name in family.fields.items() if axis in family.sizes(config)}
    unknown = [k for k in entries if k not in field_axis]
    if unknown:
        raise HypruneError(f"--space: '{unknown[0]}' is not a prunable config field of this {family.name} model. "
                           f"Use one of: {', '.join(field_axis)}.")
    specs = {field_axis[k]: v for k, v in entries.items()}
    kinds = set(family.part_kinds(config))
    # one axis per config field: the last axis a field sizes stands for all (as field_axis above)
    axes = [axis for axis in family.sizes(config) if field_axis[family.fields[axis]] == axis]
    return [axis_space(family, config, axis, specs.get(axis), min_fraction) for axis in axes
            if axis in specs or _axis_in_model(axis, kinds)]


def _axis_in_model(axis: str, part_kinds: set[str]) -> bool:
    """Whether the model has the part an axis sizes (a NemotronH config names attention fields even
    when its pattern holds no attention block)."""
    return axis == "hidden" or bool(kinds_with_axis(axis) & part_kinds)


# ---------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------
def parse_drop(spec: str | int | tuple[int, int] | None, family: Family, config) -> tuple[int, int]:
    """``--drop-blocks MIN:MAX`` (or ``N``): how many blocks a candidate drops in all. None = up to a fifth."""
    blocks = len(family.block_kinds(config))
    droppable = max_droppable(family, config)
    if spec is None:
        return 0, min(droppable, blocks // 5)
    if isinstance(spec, int):
        lo, hi = spec, spec
    elif isinstance(spec, tuple):
        lo, hi = spec
    else:
        try:
            numbers = [int(p) for p in str(spec).split(":")]
        except ValueError:
            raise HypruneError(f"--drop-blocks {spec}: write MIN:MAX or N (whole numbers), e.g. 0:2.") from None
        if len(numbers) not in (1, 2):
            raise HypruneError(f"--drop-blocks {spec}: write MIN:MAX or N, e.g. 0:2.")
        lo, hi = numbers[0], numbers[-1]
    if lo < 0 or lo > hi:
        raise HypruneError(f"--drop-blocks {spec}: need 0 <= MIN <= MAX; did you mean {min(abs(lo), abs(hi))}:"
                           f"{max(abs(lo), abs(hi))}?")
    if hi > droppable:
        kept = "one block must stay" + (", an attention block" if protected_kinds(family, config) else "")
        raise HypruneError(f"--drop-blocks {spec}: the model has {blocks} blocks and at most {droppable} can go "
                           f"({kept}); "
                           f"nearest feasible: --drop-blocks {min(lo, droppable)}:{droppable}.")
    return lo, hi


def max_droppable(family: Family, config) -> int:
    kinds = family.block_kinds(config)
    keep = protected_kinds(family, config)
    return len(kinds) - max(1, sum(1 for k in set(keep) if k in kinds))


def drop_options(family: Family, config, lo: int, hi: int) -> list[dict[str, int]]:
    """Every split of ``lo..hi`` dropped blocks over the block kinds ({kind: count}, zero counts left out)."""
    kinds = family.block_kinds(config)
    keep = set(protected_kinds(family, config))
    counts = {k: kinds.count(k) - (1 if k in keep else 0) for k in dict.fromkeys(kinds)}
    names = list(counts)
    options = []
    for split in itertools.product(*(range(counts[k] + 1) for k in names)):
        total = sum(split)
        if lo <= total <= hi and total < len(kinds):
            options.append({k: n for k, n in zip(names, split) if n})
    return sorted(options, key=lambda d: (sum(d.values()), sorted(d.items())))


def blocks_to_drop(kinds: list[str], drop: dict[str, int], scores: list[float] | None = None) -> list[int]:
    """The blocks a drop request removes: the ``n`` lowest-scored of each kind (higher = more important);
    without scores the last ``n`` of each kind (a stand-in that has the same sizes)."""
    out = []
    for kind, n in drop.items():
        members = [i for i, k in enumerate(kinds) if k == kind]
        order = sorted(members, key=lambda i: (scores[i], i)) if scores is not None else members[::-1]
        out += order[:n]
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One target architecture and what is known about it."""

    sizes: dict[str, int]  # canonical axis -> size
    drop: dict[str, int]  # block kind -> blocks dropped
    parameters: int
    target: dict[str, int]  # config field -> size, for the axes that shrink (what make_plan takes)
    id: str = ""
    uniform: bool = False
    metrics: dict = field(default_factory=dict)  # memory, predicted latency, ...

    def to_json(self) -> dict:
        return {"id": self.id, "target": self.target, "drop": self.drop, "sizes": self.sizes,
                "parameters": self.parameters, "uniform": self.uniform, **self.metrics}


def candidate_id(family: Family, target: dict[str, int], drop: dict[str, int]) -> str:
    """A stable, readable name: the shrunken fields and the drops (``source`` when nothing changes)."""
    width = ",".join(f"{k}={v}" for k, v in target.items())
    depth = ",".join(f"{k}:{n}" for k, n in sorted(drop.items()))
    return ";".join(p for p in (width, f"drop={depth}" if depth else "") if p) or "source"


def enumerate_shapes(family: Family, config, axes: list[AxisSpace], drops: list[dict[str, int]]) -> list[Candidate]:
    """Every expressible combination of axis values and drops, with its parameter count."""
    grid = math.prod(len(a.values) for a in axes) * len(drops)
    if grid > MAX_GRID:
        raise HypruneError(f"The search space holds {grid:,} shapes, more than {MAX_GRID:,}: give coarser steps or "
                           "tighter bounds with --space, or fewer --drop-blocks.")
    source = family.sizes(config)
    kinds = family.block_kinds(config)
    moe = MOE in family.part_kinds(config)
    out = []
    for values in itertools.product(*(a.values for a in axes)):
        target = {a.field: v for a, v in zip(axes, values) if v != source[a.axis]}
        try:
            sizes = resolve_target(family, config, target)  # every axis a field sizes (Jamba) follows it
        except HypruneError:
            continue  # a combination the config cannot express (coupled widths, heads per group)
        for drop in drops:
            kept = [kinds[i] for i in range(len(kinds)) if i not in set(blocks_to_drop(kinds, drop))]
            params = count_parameters(family, config, sizes, kept)["total"]
            c = Candidate(sizes, drop, params, target, candidate_id(family, target, drop))
            if moe:
                c.metrics["active_parameters"] = active_parameters(family, config, sizes, kept, total=params)
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------
@dataclass
class Budget:
    """What the candidates must meet. ``parameters`` and ``active_parameters`` (MoE) are targets
    (+-tolerance); memory and latency are limits."""

    parameters: int | None = None
    active_parameters: int | None = None  # per token: routed experts count top_k of num_experts
    memory: int | None = None  # bytes: weights + cache at ``context`` tokens
    latency: float | None = None  # ms, as the latency model predicts it
    tolerance: float = 0.05
    context: int = 2048
    dtype: str = "bfloat16"
    batch: int = 1
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.parameters is not None:
            parts.append(f"{self.parameters:,} parameters +-{self.tolerance:.0%}")
        if self.active_parameters is not None:
            parts.append(f"{self.active_parameters:,} active parameters +-{self.tolerance:.0%}")
        if self.memory is not None:
            parts.append(f"memory <= {self.memory:,} bytes ({self.dtype}, batch {self.batch}, context {self.context})")
        if self.latency is not None:
            parts.append(f"predicted latency <= {self.latency:g} ms")
        return "; ".join(parts)


def make_budget(family: Family, config, target_params: float | None = None, target_ratio: float | None = None,
                target_active_params: float | None = None, target_memory: float | None = None,
                target_latency: float | None = None, tolerance: float = 0.05, context: int = 2048,
                dtype: str = "bfloat16", batch: int = 1) -> Budget:
    """Check the budget flags against the source model (config only) and return a `Budget`."""
    source = count_parameters(family, config)["total"]
    if not 0 < tolerance < 1:
        raise HypruneError(f"--tolerance must be in (0, 1), got {tolerance}.")
    given = [x is not None for x in (target_params, target_ratio, target_active_params)]
    if sum(given) > 1:
        raise HypruneError("Pass one of --target-params, --target-ratio and --target-active-params, not several.")
    if not any(given) and target_memory is None and target_latency is None:
        raise HypruneError("No budget: pass --target-params N, --target-ratio R, --target-active-params N, "
                           "--target-memory BYTES or --target-latency MS.")
    budget = Budget(tolerance=tolerance, context=context, dtype=dtype, batch=batch)
    if target_active_params is not None and MOE in family.part_kinds(config):
        active = active_parameters(family, config, total=source)
        target = int(round(target_active_params))
        if not 1 <= target < active:
            raise HypruneError(f"--target-active-params {target:,} must be between 1 and the source's {active:,} "
                               f"active parameters (of {source:,} in all): nothing to prune otherwise. E.g. "
                               f"--target-active-params {active // 2:,}.")
        budget.active_parameters = target
    elif target_active_params is not None:
        budget.notes.append(f"This {family.name} model has no mixture-of-experts blocks, so every parameter is "
                            "active: --target-active-params is the total parameter count.")
        target_params = target_active_params
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise HypruneError(f"--target-ratio {target_ratio} must be between 0 and 1 (a fraction of the source's "
                               f"{source:,} parameters); e.g. 0.5.")
        target_params = target_ratio * source
    if target_params is not None:
        target_params = int(round(target_params))
        if target_params >= source:
            raise HypruneError(f"The budget of {target_params:,} parameters is not below the source's {source:,}: "
                               f"nothing to prune. Pick a value below {source:,} (e.g. --target-ratio 0.5 = "
                               f"{source // 2:,}).")
        if target_params < 1:
            raise HypruneError("--target-params must be at least 1.")
        budget.parameters = target_params
    if target_memory is not None:
        if context < 1 or batch < 1:
            raise HypruneError("--context and --batch for the memory budget must be at least 1.")
        full = memory_bytes(family, config, context, dtype, batch)["total"]
        if target_memory >= full:
            raise HypruneError(f"--target-memory {int(target_memory):,} bytes is not below the source's "
                               f"{full:,} ({dtype}, batch {batch}, context {context}): nothing to prune.")
        budget.memory = int(target_memory)
    if target_latency is not None:
        if target_latency <= 0:
            raise HypruneError(f"--target-latency must be positive (ms), got {target_latency}.")
        budget.latency = float(target_latency)
    return budget


def add_memory(family: Family, config, candidates: list[Candidate], budget: Budget) -> None:
    """Weights + cache bytes of every candidate, from the config it would have (`shaped_config`)."""
    kinds = family.block_kinds(config)
    for c in candidates:
        if "memory_bytes" in c.metrics:
            continue
        dropped = set(blocks_to_drop(kinds, c.drop))
        shaped = shaped_config(family, config, c.sizes, [i for i in range(len(kinds)) if i not in dropped])
        c.metrics["memory_bytes"] = memory_bytes(family, shaped, budget.context, budget.dtype, budget.batch)["total"]


def _checks(budget: Budget) -> list[tuple[str, str, Callable[[float], bool], float]]:
    """(name, metric key, test, budget value) for every budget given."""
    tol = budget.tolerance
    out = []
    for name in ("parameters", "active_parameters"):
        b = getattr(budget, name)
        if b is not None:
            out.append((name, name, lambda v, b=b: abs(v - b) <= tol * b, b))
    if budget.memory is not None:
        b = budget.memory
        out.append(("memory", "memory_bytes", lambda v, b=b: (1 - tol) * b <= v <= b, b))
    if budget.latency is not None:
        b = budget.latency
        out.append(("latency", "latency_ms", lambda v, b=b: (1 - tol) * b <= v <= b, b))
    return out


def _value(c: Candidate, key: str) -> float:
    """A candidate's value of a budget's metric (the parameter count, or one of ``metrics``)."""
    return c.parameters if key == "parameters" else c.metrics[key]


def within_budget(candidates: list[Candidate], budget: Budget, source_parameters: int) -> list[Candidate]:
    """The candidates that meet every budget; a `HypruneError` naming the nearest feasible value if none does."""
    checks = _checks(budget)
    kept = [c for c in candidates if all(test(_value(c, key)) for _, key, test, _ in checks)]
    if kept:
        return kept
    hints = []
    for name, key, test, b in checks:
        values = sorted({_value(c, key) for c in candidates})
        nearest = min(values, key=lambda v: abs(v - b))
        met = sum(1 for c in candidates if test(_value(c, key)))
        if name == "parameters":
            hint = (f"{met} of {len(candidates)} shapes meet {b:,} parameters +-{budget.tolerance:.0%}; the space "
                    f"spans {values[0]:,}..{values[-1]:,} and the nearest feasible budget is --target-params "
                    f"{nearest:,} (--target-ratio {nearest / source_parameters:.3f})")
        elif name == "active_parameters":
            hint = (f"{met} of {len(candidates)} shapes meet {b:,} active parameters +-{budget.tolerance:.0%}; the "
                    f"space spans {values[0]:,}..{values[-1]:,} and the nearest feasible budget is "
                    f"--target-active-params {nearest:,}")
        elif name == "memory":
            hint = (f"{met} shapes fit memory {b:,} bytes; the space spans {values[0]:,}..{values[-1]:,} bytes, "
                    f"nearest feasible --target-memory {nearest:,}")
        else:
            hint = (f"{met} shapes meet latency {b:g} ms; predictions span {values[0]:.4g}..{values[-1]:.4g} ms, "
                    f"nearest feasible --target-latency {nearest:.4g}")
        hints.append(hint)
    raise HypruneError("No candidate meets the budget (" + budget.describe() + "): " + "; ".join(hints) +
                       ". Widen the space (--space, --min-fraction, --drop-blocks) or raise --tolerance.")


def uniform_candidate(candidates: list[Candidate], axes: list[AxisSpace], source: dict[str, int],
                      budget: Budget) -> Candidate | None:
    """The hand-picked baseline: no dropped blocks and every searched axis cut by as nearly the same
    fraction as the grid allows (smallest spread of size ratios; ties: nearest the parameter budget)."""
    searched = [a.axis for a in axes if len(a.values) > 1]
    flat = [c for c in candidates if not c.drop]
    if not flat or not searched:
        return None

    targets = [(key, b) for _, key, _, b in _checks(budget) if key in ("parameters", "active_parameters")]

    def spread(c: Candidate) -> tuple[float, float]:
        ratios = [c.sizes[a] / source[a] for a in searched]
        closeness = sum(abs(_value(c, key) - b) for key, b in targets) if targets else -c.parameters
        return max(ratios) - min(ratios), closeness

    return min(flat, key=spread)


def sample(candidates: list[Candidate], limit: int, seed: int, keep: list[Candidate] = ()) -> list[Candidate]:
    """At most ``limit`` candidates: ``keep`` plus a seeded random choice of the rest, largest first."""
    if limit < 1:
        raise HypruneError(f"--max-candidates must be at least 1, got {limit}.")
    keep_ids = {c.id for c in keep}
    rest = [c for c in candidates if c.id not in keep_ids]
    room = max(0, limit - len(keep_ids))
    chosen = list(keep) + (random.Random(seed).sample(rest, room) if len(rest) > room else rest)
    return sorted(chosen, key=lambda c: (-c.parameters, c.id))
