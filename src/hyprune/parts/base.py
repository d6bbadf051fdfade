"""The one Protocol every part kind implements, and the helpers the part modules share.

A *part* is one pre-norm + mixer pair inside a block (`hyprune.arch.family.Part`); its *kind* says what
the mixer is (a Mamba-2 or Mamba-1 mixer, attention, an MLP, an MoE block). Everything that differs
between kinds lives on the kind's object in `hyprune.parts` (see `PartKind`); the orchestration (one
hooked sweep, plan assembly over layers, the state-dict slicing loop, the counts over blocks) calls
into it through ``PARTS[part.kind]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from hyprune.errors import HypruneError

Index = torch.Tensor  # 1-D long tensor of kept positions
Rules = dict[str, list]  # parameter name inside a mixer -> slicing steps (see `hyprune.apply`)


class ChannelStat:
    """Running ``sum_batch (mean_seq |A|)^2`` per channel, in float32."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.samples = 0

    def add(self, activation: torch.Tensor) -> None:
        # activation: [batch, seq, channels]
        self.add_means(activation.detach().abs().float().mean(dim=1))

    def add_means(self, per_sample: torch.Tensor) -> None:
        """Add per-sample means of |A| over the sequence, [batch, channels] float32."""
        sq = per_sample.pow(2).sum(dim=0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.samples += per_sample.shape[0]

    def score(self) -> torch.Tensor:
        if self.sum_sq is None:
            raise HypruneError("No calibration data reached a hooked module; the sweep saw no tokens.")
        return self.sum_sq.sqrt().cpu()


Stats = Callable[[str], ChannelStat]  # key -> its running statistic (created on first use)


def output_hook(stat: ChannelStat, slicer=None):
    """A forward hook that adds the module's output (or ``slicer(output)``) to ``stat``."""

    def hook(module, args, output):
        stat.add(slicer(output) if slicer else output)

    return hook


def input_hook(stat: ChannelStat):
    """A forward pre-hook that adds the module's first input to ``stat``."""

    def hook(module, args):
        stat.add(args[0])

    return hook


@dataclass
class Context:
    """What a part needs besides its own scores and sizes when it plans or validates one layer.

    family / config: the model's; source: its source sizes by axis; group_aware: Minitron-SSM's group-aware
    Mamba ranking (False: the group-blind baseline); regrouped: the plan regroups Mamba heads; hidden: the
    number of kept hidden channels; uses: block index -> the blocks sharing its MLP weights (Zamba2).
    """

    family: Any
    config: Any
    source: dict[str, int]
    group_aware: bool = True
    regrouped: bool = False
    hidden: int = 0
    uses: dict[int, list[int]] = field(default_factory=dict)


class PartKind(Protocol):
    """One part kind: how it is scored, planned, validated, sliced, counted and cached."""

    kind: str  # the `Part.kind` it serves
    component: str  # the parameter-count key its weights go under
    axes: tuple[str, ...]  # canonical axes it sizes (an axis counts in a model that has this part)
    names: dict[str, str]  # role -> default tensor name; a family overrides them in `Part.names`

    def hooks(self, mixer, i: int, stat: Stats, names: dict[str, str]) -> list:
        """Register the sweep's hooks on ``mixer`` of block ``i``; return their handles."""

    def scores(self, stat: Stats, i: int, mixer, config) -> dict[str, torch.Tensor]:
        """The finished scores of block ``i`` from the sweep's statistics (``layers.i.*`` keys)."""

    def score_shapes(self, i: int, sizes: dict[str, int], config) -> dict[str, tuple]:
        """Score key -> the shape a model of these source sizes needs (`hyprune.importance.load_scores`)."""

    def summary(self, scores: dict[str, torch.Tensor], i: int, describe) -> dict:
        """Axis -> ``describe(unit scores)`` for the JSON summary of block ``i``."""

    def check_target(self, family, config, sizes: dict[str, int], source: dict[str, int]) -> None:
        """Refuse target sizes the part's config fields cannot express (`HypruneError`)."""

    def plan(self, scores: dict[str, torch.Tensor], i: int, sizes: dict[str, int], ctx: Context) -> dict:
        """The `LayerPlan` fields this part keeps in block ``i`` for the target ``sizes``."""

    def identity(self, sizes: dict[str, int], family) -> dict:
        """The `LayerPlan` fields that keep everything."""

    def validate(self, where: str, lp, sizes: dict[str, int], ctx: Context) -> tuple:
        """Check the part's fields of one layer plan; return the counts every layer of a kind must share."""

    def result_sizes(self, lp, hidden: int) -> dict[str, int] | None:
        """Axis -> size kept by layer plan ``lp`` (``hidden`` kept channels), None if ``lp`` has no such part."""

    def check_result(self, family, config, result: dict[str, int]) -> None:
        """Refuse a plan's result sizes the family's config cannot express (`HypruneError`)."""

    def rules(self, lp, sizes: dict[str, int], hidden: Index, config, names: dict[str, str]) -> Rules:
        """Parameter name inside the mixer -> slicing steps (`hyprune.apply`)."""

    def parameters(self, config, layout, sizes: dict[str, int]) -> int:
        """Parameters of one such mixer of a model with ``sizes``, from the config alone."""

    def cache_bytes(self, config, family, i: int, context: int, size: int, ssm_size: int) -> dict[str, int]:
        """Generation-cache bytes of block ``i``'s part for one sequence after ``context`` tokens."""

    def active_reduction(self, config, layout, sizes: dict[str, int]) -> int:
        """Parameters of the part that one token does not run through (an MoE's unpicked experts)."""

    def linear_group(self, sub_name: str) -> str | None:
        """The `hyprune.methods.sparsity` target group of the mixer's ``nn.Linear`` at ``sub_name`` (None: not
        a target)."""


def idx(values) -> Index:
    return torch.as_tensor(list(values), dtype=torch.long)


def full(n: int) -> list[int]:
    return list(range(n))


# ---- ranking -----------------------------------------------------------------------------------
def top_k(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, sorted ascending; ties go to the lower index."""
    order = torch.argsort(score.float(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def top_k_within_groups(score: torch.Tensor, groups: list[int], per_group: int, keep: int) -> list[int]:
    """Keep the ``keep`` best members inside each listed group of ``per_group`` consecutive members."""
    kept = []
    for g in groups:
        offset = g * per_group
        kept += [offset + i for i in top_k(score[offset : offset + per_group], keep)]
    return kept


# ---- plan checks -------------------------------------------------------------------------------
def check_indices(where: str, values: list[int] | None, bound: int) -> list[int]:
    if values is None:
        raise HypruneError(f"Plan {where}: missing.")
    if not values:
        raise HypruneError(f"Plan {where}: keeps nothing; keep at least one.")
    if values != sorted(set(values)):
        raise HypruneError(f"Plan {where}: indices must be sorted and unique.")
    if values[0] < 0 or values[-1] >= bound:
        raise HypruneError(f"Plan {where}: indices must lie in [0, {bound}); got {values[0]}..{values[-1]}.")
    return values


def check_grouped(where: str, members: list[int], groups: list[int], per_group: int, what: str) -> None:
    counts = {g: 0 for g in groups}
    for m in members:
        g = m // per_group
        if g not in counts:
            raise HypruneError(f"Plan {where}: {what} {m} belongs to group {g}, which the plan removes.")
        counts[g] += 1
    if len(set(counts.values())) != 1:
        raise HypruneError(
            f"Plan {where}: every group must keep the same number of {what}s; got {counts}."
        )


class BasePart:
    """Defaults for the Protocol's optional behaviours (no checks, no cache)."""

    names: dict[str, str] = {}

    def check_target(self, family, config, sizes, source) -> None:
        return None

    def check_result(self, family, config, result) -> None:
        return None

    def cache_bytes(self, config, family, i, context, size, ssm_size) -> dict[str, int]:
        return {}

    def active_reduction(self, config, layout, sizes) -> int:
        return 0

    def linear_group(self, sub_name: str) -> str | None:
        return None  # not a sparsity target (MoE routers and experts: unstructured methods leave them whole)


CONV_KERNEL_FIELDS = ("conv_kernel", "mamba_d_conv", "d_conv")


def conv_kernel(config) -> int:
    """The Mamba conv kernel size a config names (whichever of `CONV_KERNEL_FIELDS` it has)."""
    for name in CONV_KERNEL_FIELDS:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise HypruneError(f"{type(config).__name__} names no Mamba conv kernel size ({', '.join(CONV_KERNEL_FIELDS)}).")
