"""The plan: which indices every axis keeps, per layer, and which blocks go.

The plan is the seam between scoring (what to cut) and applying (how tensors are sliced). It is plain
JSON that a person can read and diff, validated against the model before any heavy work:

```json
{"format": "hyprune-plan/1", "family": "nemotron_h",
 "source": {"sizes": {...}, "block_kinds": ["mamba", "mlp", ...], "vocab_size": 4096},
 "target": {"hidden_size": 128, "mamba_num_heads": 8},
 "hidden": [0, 3, ...],
 "layers": [{"kind": "mamba", "heads": [...], "head_dim": [...], "state": [...], "groups": [...]},
            {"kind": "mlp", "ffn": [...]}, {"kind": "attention", "query_heads": [...], "kv_heads": [...]}],
 "drop_blocks": []}
```

Indices always refer to the *source* model, are sorted and unique. ``layers`` has one entry per
source block (dropped blocks included, so indices never shift). HF configs hold one value per field,
so every layer of a kind must keep the same number of each thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hyprune.arch import registered
from hyprune.arch.family import LETTERS, MAMBA, Family
from hyprune.errors import HypruneError, validation_message
from hyprune.io import atomic_write_text
from hyprune.parts import PARTS, Context, mamba2
from hyprune.parts.base import check_indices as _check_indices  # noqa: F401 (re-exported)
from hyprune.parts.base import top_k
from hyprune.parts.moe import EXPERT_ALIGNMENT, check_expert_alignment, check_router  # noqa: F401 (re-exported)

PLAN_FORMAT = "hyprune-plan/1"


def block_kind_words() -> set[str]:
    """The words block kinds are made of: the shared kinds and every registered family's own (`Family.letters`)."""
    return set(LETTERS) | {kind for family in registered() for kind in family.letters}


class LayerPlan(BaseModel):
    """What one source block keeps. Which fields are set depends on ``kind``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key would silently keep everything

    # transformer = attention + MLP (dense); "mamba+mlp" / "attention+mlp" = one hybrid decoder layer (Bamba);
    # parallel = attention and Mamba side by side, then MLP (FalconH1); moe = routed experts (+ a shared expert);
    # "mamba+moe" / "attention+moe" = a Granite layer whose shared MLP runs beside routed experts
    # hybrid = a Mamba layer that first runs a shared transformer block (Zamba2)
    # a block kind of a registered family: a base kind, a family's own (parallel, hybrid), or a "mixer+ffn" pair
    kind: str
    heads: list[int] | None = None  # Mamba heads
    head_dim: list[int] | None = None  # Mamba head channels, shared by every kept head
    state: list[int] | None = None  # SSM state channels, shared by every kept group
    groups: list[int] | None = None  # Mamba B/C groups
    query_heads: list[int] | None = None  # attention query heads
    kv_heads: list[int] | None = None  # attention key/value heads
    ffn: list[int] | None = None  # MLP neurons
    experts: list[int] | None = None  # routed experts of an MoE block
    expert_ffn: list[list[int]] | None = None  # FFN neurons of each kept expert, in the order of ``experts``
    shared_ffn: list[int] | None = None  # FFN neurons of the MoE block's shared expert (NemotronH)
    inner: list[int] | None = None  # Mamba-1 inner channels (Jamba, Mamba); ``state`` holds its SSM states

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        known = block_kind_words()
        if not 1 <= len(kind.split("+")) <= 2 or not set(kind.split("+")) <= known:
            raise ValueError(f"unknown block kind '{kind}'; a kind is one of {', '.join(sorted(known))} or two "
                             "of them joined by '+'")
        return kind


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown keys are refused, as in recipes

    format: Literal["hyprune-plan/1"] = PLAN_FORMAT
    family: str
    method: str = "activation"
    source: dict = Field(description="fingerprint of the model the plan was made for")
    target: dict[str, int] = Field(default_factory=dict, description="config field -> requested size")
    hidden: list[int]
    layers: list[LayerPlan]
    drop_blocks: list[int] = Field(default_factory=list)
    # group-blind plans keep Mamba heads from anywhere and hand kept head j to kept group
    # j // (heads per group): heads change B/C group (the baseline Minitron-SSM argues against)
    heads_regrouped: bool = False

    # ---- io ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.model_dump_json(indent=1, exclude_none=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise HypruneError(f"Plan file {path} does not exist. Write one with `hyprune plan`.")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise HypruneError(validation_message(f"{path} is not a valid hyprune plan", e, _plan_keys)) from None

    # ---- derived sizes -----------------------------------------------------------------------
    def kept_blocks(self) -> list[int]:
        dropped = set(self.drop_blocks)
        return [i for i in range(len(self.layers)) if i not in dropped]

    def result_sizes(self) -> dict[str, int]:
        """Canonical axis -> size after applying the plan (axes without a kept layer keep the source)."""
        sizes = dict(self.source["sizes"])
        sizes["hidden"] = len(self.hidden)
        kept = [self.layers[i] for i in self.kept_blocks()]
        # the part a layer holds shows in its fields (validation made them equal across layers)
        for part in PARTS.values():
            found = next((got for got in (part.result_sizes(lp, len(self.hidden)) for lp in kept) if got), None)
            sizes.update(found or {})
        return sizes


def fingerprint(family: Family, config) -> dict:
    """What a plan must match: the family, every axis size, the layer pattern and the vocabulary."""
    return {
        "sizes": family.sizes(config),
        "block_kinds": family.block_kinds(config),
        "vocab_size": int(config.vocab_size),
    }


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def parse_target(text: str | dict | None) -> dict[str, int]:
    """``"hidden_size=128,mamba_num_heads=8"`` -> ``{"hidden_size": 128, "mamba_num_heads": 8}``."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in text.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise HypruneError(f"Target '{part}' is not KEY=VALUE. Example: --target hidden_size=1024,n_groups=4")
            key, value = part.split("=", 1)
            items.append((key.strip(), value.strip()))
    out = {}
    for key, value in items:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HypruneError(f"Target {key}={value}: the value must be a whole number.") from None
        if number != int(number) or number < 1:
            raise HypruneError(f"Target {key}={value}: the value must be a whole number >= 1.")
        out[key] = int(number)
    return out


def resolve_target(family: Family, config, target: dict[str, int]) -> dict[str, int]:
    """Check a target (config field -> size) and return the full result sizes by canonical axis.

    Raises `HypruneError` for unknown fields, sizes above the source, and shapes the config cannot
    express (uneven groups, a coupled Mamba width that does not match).
    """
    source = family.sizes(config)
    sizes = dict(source)
    for field_name, value in target.items():
        axes = [axis for axis in family.field_to_axes(field_name) if axis in source]
        if not axes:  # only the expert axes can be missing
            raise HypruneError(f"Target {field_name}: this {family.name} model has no MoE blocks, so there are no "
                               "experts to prune.")
        for axis in axes:
            sizes[axis] = value
    kinds = set(family.part_kinds(config))
    for axis, reason in family.fixed_axes.items():
        if sizes[axis] != source[axis]:
            raise HypruneError(f"{family.fields[axis]} cannot be pruned in {family.name}: {reason}")
    for axis, value in sizes.items():
        if value > source[axis]:
            raise HypruneError(
                f"Target {family.fields[axis]}={value} is larger than the source ({source[axis]}). "
                "Pruning only shrinks: pick a value <= the source size."
            )
    for kind in PARTS:
        if kind in kinds:
            PARTS[kind].check_target(family, config, sizes, source)
    if family.check_sizes is not None:
        family.check_sizes(config, sizes)
    return sizes


def check_depth_period(family: Family, config, drop_blocks: list[int]) -> None:
    """Can the config's periodic layer pattern express the kept blocks? Raises `HypruneError` if not."""
    if family.depth_period is None or not drop_blocks:
        return
    period = family.depth_period(config)
    dropped = set(drop_blocks)
    for i in range(len(family.block_kinds(config))):
        before = sum(1 for b in drop_blocks if b < i)
        if i not in dropped and before % period:
            raise HypruneError(
                f"{family.name} writes its layer pattern as a period of {period} layers (attention and expert "
                f"layer period/offset), so a kept layer must move by whole periods: layer {i} would move by {before}. "
                f"Drop whole runs of {period} consecutive layers (--depth-mode contiguous with --drop-blocks a "
                f"multiple of {period}), or the last layers."
            )


def _check_shared_fields(family: Family, sizes: dict[str, int]) -> None:
    """Axes that one config field sizes (Jamba's MLP and expert widths) must keep the same size."""
    for name in set(family.fields.values()):
        axes = [a for a in family.field_to_axes(name) if a in sizes]
        if len({sizes[a] for a in axes}) > 1:
            raise HypruneError(
                f"{family.name} sizes {' and '.join(axes)} with one config field, {name}, so they must keep the same "
                f"size; got {', '.join(f'{a}={sizes[a]}' for a in axes)}."
            )


# ---------------------------------------------------------------------------------------------
# Scores -> plan
# ---------------------------------------------------------------------------------------------
def plan_mamba_layer(x_score: torch.Tensor, bc_score: torch.Tensor, sizes: dict[str, int],
                     group_aware: bool = True) -> LayerPlan:
    """One Mamba layer's plan by the group-aware Minitron-SSM ranking (`hyprune.parts.mamba2.rank`)."""
    return LayerPlan(kind=MAMBA, **mamba2.rank(x_score, bc_score, sizes, group_aware))


def make_plan(
    family: Family,
    config,
    scores: dict[str, torch.Tensor],
    target: dict[str, int],
    drop_blocks: list[int] | None = None,
    method: str = "activation",
    group_aware: bool = True,
) -> Plan:
    """Turn activation scores and a target (config field -> size) into a validated plan.

    ``group_aware=False`` gives the group-blind baseline (see `plan_mamba_layer`).
    """
    sizes = resolve_target(family, config, target)
    uses = {i: group for group in (family.tied_mlps(config) if family.tied_mlps else []) for i in group}
    ctx = Context(family, config, family.sizes(config), group_aware=group_aware, uses=uses)
    layers = []
    for i, kind in enumerate(family.block_kinds(config)):
        fields = {}
        for part in family.parts(kind):
            fields.update(PARTS[part.kind].plan(scores, i, sizes, ctx))
        layers.append(LayerPlan(kind=kind, **fields))
    plan = Plan(
        family=family.name,
        method=method,
        source=fingerprint(family, config),
        target=dict(target),
        hidden=top_k(scores["hidden"], sizes["hidden"]),
        layers=layers,
        drop_blocks=sorted(drop_blocks or []),
        heads_regrouped=not group_aware,
    )
    validate_plan(plan, family, config)
    return plan


def identity_plan(family: Family, config) -> Plan:
    """A plan that keeps everything (applying it must reproduce the model exactly)."""
    s = family.sizes(config)
    layers = []
    for kind in family.block_kinds(config):
        fields = {}
        for part in family.parts(kind):
            fields.update(PARTS[part.kind].identity(s, family))
        layers.append(LayerPlan(kind=kind, **fields))
    return Plan(family=family.name, method="identity", source=fingerprint(family, config),
                hidden=list(range(s["hidden"])), layers=layers)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _plan_keys(loc: tuple) -> list[str]:
    """The keys a plan accepts where ``loc`` points (for 'unknown key' messages)."""
    model = LayerPlan if loc and loc[0] == "layers" else Plan
    return sorted(model.model_fields)


# the plan field whose index lists give each axis its size (for messages)
_AXIS_LISTS = {"hidden": "hidden", "ffn": "layers[].ffn", "attention_heads": "layers[].query_heads",
               "kv_heads": "layers[].kv_heads", "mamba_heads": "layers[].heads", "mamba_head_dim": "layers[].head_dim",
               "ssm_state": "layers[].state", "mamba_groups": "layers[].groups", "experts": "layers[].experts",
               "expert_ffn": "layers[].expert_ffn", "shared_expert_ffn": "layers[].shared_ffn",
               "mamba_expand": "layers[].inner"}
# the LayerPlan field that shows a kept layer has the part an axis sizes (None: every plan has it)
_AXIS_FIELD = {"hidden": None, "ffn": "ffn", "attention_heads": "query_heads", "kv_heads": "kv_heads",
               "mamba_heads": "heads", "mamba_head_dim": "head_dim", "ssm_state": "state", "mamba_groups": "groups",
               "experts": "experts", "expert_ffn": "expert_ffn", "shared_expert_ffn": "shared_ffn",
               "mamba_expand": "inner"}


def _check_target(plan: Plan, family: Family, result: dict[str, int]) -> None:
    """The sizes the index lists give must be the ones ``target`` states (the saved plan would lie otherwise)."""
    kept = [plan.layers[i] for i in plan.kept_blocks()]
    for field_name, value in plan.target.items():
        for axis in family.field_to_axes(field_name):
            if axis not in result:
                continue
            field = _AXIS_FIELD.get(axis)
            if field is not None and not any(getattr(lp, field) is not None for lp in kept):
                continue  # no kept layer has this part: the target cannot show in the lists
            if result[axis] != value:
                raise HypruneError(
                    f"Plan field target.{field_name}: says {value}, but {_AXIS_LISTS.get(axis, axis)} keeps "
                    f"{result[axis]} indices. Fix the index lists or the target so they agree (or make a new plan with "
                    "`hyprune plan`).")


def _check_source(plan: Plan, family: Family, config) -> dict:
    """The plan was made for this family and this model; returns the model's fingerprint."""
    if plan.family != family.name:
        raise HypruneError(f"The plan was made for a {plan.family} model, but this model is {family.name}.")
    expected = fingerprint(family, config)
    if plan.source != expected:
        diffs = [k for k in expected if plan.source.get(k) != expected[k]]
        raise HypruneError(
            f"The plan was made for another model: its source {', '.join(diffs)} differ from this model's "
            f"(plan: {[plan.source.get(k) for k in diffs]}, model: {[expected[k] for k in diffs]}). "
            "Make a new plan for this model with `hyprune plan`."
        )
    if len(plan.layers) != len(expected["block_kinds"]):
        raise HypruneError(f"The plan lists {len(plan.layers)} layers; the model has {len(expected['block_kinds'])}.")
    return expected


def _check_drop_blocks(plan: Plan, family: Family, config, kinds: list[str]) -> None:
    if plan.drop_blocks != sorted(set(plan.drop_blocks)):
        raise HypruneError(f"Plan drop_blocks {plan.drop_blocks}: indices must be sorted and unique.")
    for b in plan.drop_blocks:
        if not 0 <= b < len(kinds):
            raise HypruneError(f"Plan drop_blocks: block {b} does not exist (the model has {len(kinds)}).")
    never = family.undroppable(config)
    for b in plan.drop_blocks:
        if kinds[b] in never:
            raise HypruneError(f"Plan drop_blocks: block {b} is a {kinds[b]} block, which {family.name} cannot drop: "
                               f"{never[kinds[b]]}")
    check_depth_period(family, config, plan.drop_blocks)
    if len(set(plan.drop_blocks)) == len(kinds):
        raise HypruneError("Plan drop_blocks removes every block; keep at least one.")


def _check_layers(plan: Plan, family: Family, config, s: dict[str, int], kinds: list[str]) -> None:
    """Every layer plan passes its parts' checks, and the kept layers of a kind keep the same counts."""
    ctx = Context(family, config, s, regrouped=plan.heads_regrouped, hidden=len(plan.hidden))
    seen: dict[str, tuple] = {}
    kept = set(plan.kept_blocks())
    for i, (lp, kind) in enumerate(zip(plan.layers, kinds)):
        where = f"layer {i} ({kind})"
        if lp.kind != kind:
            raise HypruneError(f"Plan {where}: the plan says '{lp.kind}'.")
        shape = ()
        for part in family.parts(kind):
            shape += PARTS[part.kind].validate(where, lp, s, ctx)
        if i not in kept:
            continue
        if kind in seen and seen[kind][1] != shape:
            raise HypruneError(
                f"Plan {where} keeps sizes {shape} but layer {seen[kind][0]} keeps {seen[kind][1]}: "
                "an HF config holds one size per field, so every layer of a kind must keep the same counts."
            )
        seen.setdefault(kind, (i, shape))


def _check_result(plan: Plan, family: Family, config, s: dict[str, int]) -> None:
    """The sizes the plan gives are ones the family's config can express."""
    result = plan.result_sizes()
    _check_target(plan, family, result)
    part_kinds = family.part_kinds(config)
    for kind in PARTS:
        if kind in part_kinds:
            PARTS[kind].check_result(family, config, result)
    _check_shared_fields(family, result)
    for axis, reason in family.fixed_axes.items():
        if result[axis] != s[axis]:
            raise HypruneError(f"Plan: {family.fields[axis]} cannot be pruned in {family.name}: {reason}")
    if family.check_sizes is not None:
        family.check_sizes(config, result)
    kept = set(plan.kept_blocks())
    for group in family.tied_mlps(config) if family.tied_mlps else []:
        uses = [i for i in group if i in kept]
        if any(plan.layers[i].ffn != plan.layers[uses[0]].ffn for i in uses):
            raise HypruneError(f"Plan: blocks {uses} share one MLP, so they must keep the same FFN neurons.")


def validate_plan(plan: Plan, family: Family, config) -> None:
    """Check a plan against a model config before any heavy work. Raises `HypruneError`."""
    expected = _check_source(plan, family, config)
    s, kinds = expected["sizes"], expected["block_kinds"]
    _check_indices("hidden", plan.hidden, s["hidden"])
    _check_drop_blocks(plan, family, config, kinds)
    _check_layers(plan, family, config, s, kinds)
    _check_result(plan, family, config, s)


def load_plan_for(path: str | Path, family: Family, config) -> Plan:
    plan = Plan.load(path)
    validate_plan(plan, family, config)
    return plan


def summarize(plan: Plan) -> dict:
    """Sizes before and after, for reports."""
    return {"before": plan.source["sizes"], "after": plan.result_sizes(),
            "blocks_before": len(plan.layers), "blocks_after": len(plan.kept_blocks()),
            "drop_blocks": plan.drop_blocks}


def plan_to_json(plan: Plan) -> str:
    return json.dumps(plan.model_dump(exclude_none=True), indent=1)
