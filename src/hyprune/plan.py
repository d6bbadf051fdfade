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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hyprune.arch.family import ATTENTION, MAMBA, MAMBA1, MLP, MOE, Family, expert_groups
from hyprune.errors import HypruneError, validation_message

PLAN_FORMAT = "hyprune-plan/1"


class LayerPlan(BaseModel):
    """What one source block keeps. Which fields are set depends on ``kind``."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key would silently keep everything

    # transformer = attention + MLP (dense); "mamba+mlp" / "attention+mlp" = one hybrid decoder layer (Bamba);
    # parallel = attention and Mamba side by side, then MLP (FalconH1); moe = routed experts (+ a shared expert);
    # "mamba+moe" / "attention+moe" = a Granite layer whose shared MLP runs beside routed experts
    # hybrid = a Mamba layer that first runs a shared transformer block (Zamba2)
    kind: Literal["mamba", "attention", "mlp", "moe", "transformer", "mamba+mlp", "attention+mlp", "mamba+moe",
                  "attention+moe", "parallel", "hybrid"]
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
    inner: list[int] | None = None  # Mamba-1 inner channels (Jamba); ``state`` holds its SSM states


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
        from hyprune.io import atomic_write_text

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
        mamba = next((lp for lp in kept if lp.groups is not None), None)
        attention = next((lp for lp in kept if lp.kv_heads is not None), None)
        mlp = next((lp for lp in kept if lp.ffn is not None), None)
        moe = next((lp for lp in kept if lp.experts is not None), None)
        mamba1 = next((lp for lp in kept if lp.inner is not None), None)
        if mamba1 is not None:  # inner = mamba_expand * hidden (validation checked the multiple)
            sizes.update(mamba_expand=len(mamba1.inner) // len(self.hidden), ssm_state=len(mamba1.state))
        if mamba is not None:
            sizes.update(mamba_heads=len(mamba.heads), mamba_head_dim=len(mamba.head_dim),
                         ssm_state=len(mamba.state), mamba_groups=len(mamba.groups))
        if attention is not None:
            sizes.update(attention_heads=len(attention.query_heads), kv_heads=len(attention.kv_heads))
        if mlp is not None:
            sizes["ffn"] = len(mlp.ffn)
        if moe is not None:
            sizes.update(experts=len(moe.experts), expert_ffn=len(moe.expert_ffn[0]))
            if moe.shared_ffn is not None:
                sizes["shared_expert_ffn"] = len(moe.shared_ffn)
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
    if MAMBA in kinds:
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
        if family.mamba_width_coupled_to_hidden:
            width = sizes["mamba_heads"] * sizes["mamba_head_dim"]
            expand = family.expand(config)
            if width != expand * sizes["hidden"]:
                raise HypruneError(
                    f"In {family.name} the Mamba width is tied to the hidden size: "
                    f"{f_heads} * {family.fields['mamba_head_dim']} must equal expand ({expand}) * hidden_size, "
                    f"but the target gives {width} vs {expand * sizes['hidden']}. "
                    "Change the heads, head_dim and hidden_size together."
                )
    if MOE in kinds:
        check_router(family, config, sizes["experts"])
        check_expert_alignment(family, config, sizes)
    if family.check_sizes is not None:
        family.check_sizes(config, sizes)
    if ATTENTION in kinds:
        _check_hidden_multiple_of_heads(family, sizes)
        q, kv = sizes["attention_heads"], sizes["kv_heads"]
        if q % kv:
            raise HypruneError(
                f"num_attention_heads={q} is not divisible by num_key_value_heads={kv}: every KV group "
                "must keep the same number of query heads."
            )
        if q // kv > source["attention_heads"] // source["kv_heads"]:
            raise HypruneError(
                f"num_attention_heads={q} with num_key_value_heads={kv} needs {q // kv} query heads per KV "
                f"group, more than the source has ({source['attention_heads'] // source['kv_heads']})."
            )
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


def check_router(family: Family, config, experts: int) -> None:
    """Can the router still route with ``experts`` routed experts? Raises `HypruneError` if not.

    Every token takes ``num_experts_per_tok`` experts, so at least that many must stay. A grouped router
    (NemotronH ``n_group`` > 1) keeps its group count: experts go evenly from every group, each group
    keeps two (it is ranked by the sum of its two best scores) and the ``topk_group`` groups it picks
    must together hold ``num_experts_per_tok`` experts.
    """
    field = family.fields["experts"]
    top_k = int(config.num_experts_per_tok)
    if experts < top_k:
        raise HypruneError(
            f"{field}={experts} is below num_experts_per_tok={top_k}: every token is routed to {top_k} experts. "
            f"Keep at least {top_k} experts."
        )
    if not hasattr(config, "n_group"):
        return
    groups, topk_group = expert_groups(config), int(getattr(config, "topk_group", None) or 1)
    if experts % groups:
        raise HypruneError(
            f"{field}={experts} is not divisible by n_group={groups}: the router splits the experts into {groups} "
            f"equal groups. Pick a multiple of {groups}."
        )
    per_group = experts // groups
    if per_group < 2:
        raise HypruneError(
            f"{field}={experts} leaves {per_group} expert per router group; the {family.name} router ranks a group "
            f"by its two best experts, so keep at least {2 * groups}."
        )
    if topk_group * per_group < top_k:
        raise HypruneError(
            f"{field}={experts} leaves {per_group} experts per group; the router picks topk_group={topk_group} "
            f"groups and needs {top_k} experts among them. Keep at least {-(-top_k // topk_group) * groups}."
        )


EXPERT_ALIGNMENT = 8  # values; 16 bytes in bfloat16/float16


def check_expert_alignment(family: Family, config, sizes: dict[str, int]) -> None:
    """The widths the routed experts multiply over must be multiples of 8. Raises `HypruneError` if not.

    transformers runs routed experts with ``torch.nn.functional.grouped_mm``, which needs every row of its
    operands to start on a 16-byte boundary (8 values in bfloat16/float16, 4 in float32); a pruned model
    that breaks this loads but fails at its first forward pass.
    """
    widths = {family.fields["expert_ffn"]: sizes["expert_ffn"]}
    if getattr(config, "moe_latent_size", None) is None:  # else the experts see the fixed latent width
        widths[family.fields["hidden"]] = sizes["hidden"]
    bad = {name: value for name, value in widths.items() if value % EXPERT_ALIGNMENT}
    if bad:
        raise HypruneError(
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}: in a model with routed experts these widths must "
            f"be multiples of {EXPERT_ALIGNMENT}, because transformers runs the experts with grouped_mm, which "
            "needs 16-byte aligned rows. Round the target to a multiple of 8."
        )


def _check_hidden_multiple_of_heads(family: Family, sizes: dict[str, int]) -> None:
    if family.hidden_multiple_of_heads and sizes["hidden"] % sizes["attention_heads"]:
        raise HypruneError(
            f"{family.name} configs require hidden_size to be a multiple of num_attention_heads; "
            f"{sizes['hidden']} is not a multiple of {sizes['attention_heads']}. Pick hidden_size as a multiple "
            f"of {sizes['attention_heads']} (or change the head count)."
        )


# ---------------------------------------------------------------------------------------------
# Scores -> plan
# ---------------------------------------------------------------------------------------------
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


def plan_mamba_layer(x_score: torch.Tensor, bc_score: torch.Tensor, sizes: dict[str, int],
                     group_aware: bool = True) -> LayerPlan:
    """Group-aware Minitron-SSM ranking for one Mamba layer.

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
    return LayerPlan(kind=MAMBA, heads=kept_heads, head_dim=kept_channels, state=kept_state, groups=kept_groups)


def plan_attention_layer(head_channel_score: torch.Tensor, num_kv: int, sizes: dict[str, int]) -> LayerPlan:
    """Attention heads ranked inside each KV group; whole KV groups by the L2 of their heads.

    Args:
        head_channel_score: [heads, head_dim] activation score of the o_proj input.
    """
    heads = head_channel_score.shape[0]
    per_kv = heads // num_kv
    head_score = head_channel_score.norm(dim=1)
    kept_kv = top_k(head_score.view(num_kv, per_kv).norm(dim=1), sizes["kv_heads"])
    kept = top_k_within_groups(head_score, kept_kv, per_kv, sizes["attention_heads"] // sizes["kv_heads"])
    return LayerPlan(kind=ATTENTION, query_heads=kept, kv_heads=kept_kv)


def plan_mamba1_layer(scores: dict[str, torch.Tensor], i: int, sizes: dict[str, int]) -> dict:
    """Mamba-1 inner channels by their score (``mamba_expand * hidden`` kept); states by the L2 of B and C.

    Scores: ``layers.i.mamba1_inner`` [inner], ``layers.i.mamba1_bc`` [2, state].
    """
    inner = top_k(scores[f"layers.{i}.mamba1_inner"], sizes["mamba_expand"] * sizes["hidden"])
    return {"inner": inner, "state": top_k(scores[f"layers.{i}.mamba1_bc"].norm(dim=0), sizes["ssm_state"])}


def plan_moe_layer(scores: dict[str, torch.Tensor], i: int, sizes: dict[str, int], groups: int,
                   shared: bool) -> dict:
    """Experts of MoE block i by their routing-weighted output score, evenly inside each router group;
    then, per kept expert, its own best ``expert_ffn`` neurons; the shared expert's neurons if ``shared``.

    Scores (`hyprune.importance`): ``layers.i.experts`` [experts], ``layers.i.expert_ffn`` [experts, ffn],
    ``layers.i.shared_ffn`` [shared ffn].
    """
    expert_score, ffn_score = scores[f"layers.{i}.experts"], scores[f"layers.{i}.expert_ffn"]
    per_group = len(expert_score) // groups
    experts = top_k_within_groups(expert_score, list(range(groups)), per_group, sizes["experts"] // groups)
    out = {"experts": experts, "expert_ffn": [top_k(ffn_score[e], sizes["expert_ffn"]) for e in experts]}
    if shared:
        out["shared_ffn"] = top_k(scores[f"layers.{i}.shared_ffn"], sizes["shared_expert_ffn"])
    return out


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
    source = family.sizes(config)
    uses = {i: group for group in (family.tied_mlps(config) if family.tied_mlps else []) for i in group}
    layers = []
    for i, kind in enumerate(family.block_kinds(config)):
        fields = {}
        for part in family.parts(kind):
            if part.kind == MAMBA:
                part_plan = plan_mamba_layer(scores[f"layers.{i}.mamba_x"], scores[f"layers.{i}.mamba_bc"], sizes,
                                             group_aware)
                fields.update(part_plan.model_dump(exclude={"kind"}, exclude_none=True))
            elif part.kind == ATTENTION:
                part_plan = plan_attention_layer(scores[f"layers.{i}.attention"], source["kv_heads"], sizes)
                fields.update(part_plan.model_dump(exclude={"kind"}, exclude_none=True))
            elif part.kind == MAMBA1:
                fields.update(plan_mamba1_layer(scores, i, sizes))
            elif part.kind == MOE:
                fields.update(plan_moe_layer(scores, i, sizes, expert_groups(config),
                                             shared="shared_expert_ffn" in family.fields))
            else:  # an MLP shared by several blocks is ranked once, over all of its uses
                ffn_score = sum(scores[f"layers.{j}.ffn"] for j in uses.get(i, [i]))
                fields["ffn"] = top_k(ffn_score, sizes["ffn"])
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
    full = lambda n: list(range(n))  # noqa: E731
    layers = []
    for kind in family.block_kinds(config):
        fields = {}
        for part in family.parts(kind):
            if part.kind == MAMBA:
                fields.update(heads=full(s["mamba_heads"]), head_dim=full(s["mamba_head_dim"]),
                              state=full(s["ssm_state"]), groups=full(s["mamba_groups"]))
            elif part.kind == ATTENTION:
                fields.update(query_heads=full(s["attention_heads"]), kv_heads=full(s["kv_heads"]))
            elif part.kind == MAMBA1:
                fields.update(inner=full(s["mamba_expand"] * s["hidden"]), state=full(s["ssm_state"]))
            elif part.kind == MOE:
                fields.update(experts=full(s["experts"]), expert_ffn=[full(s["expert_ffn"])] * s["experts"])
                if "shared_expert_ffn" in family.fields:
                    fields["shared_ffn"] = full(s["shared_expert_ffn"])
            else:
                fields["ffn"] = full(s["ffn"])
        layers.append(LayerPlan(kind=kind, **fields))
    return Plan(family=family.name, method="identity", source=fingerprint(family, config),
                hidden=full(s["hidden"]), layers=layers)


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


def _check_indices(where: str, values: list[int] | None, bound: int) -> list[int]:
    if values is None:
        raise HypruneError(f"Plan {where}: missing.")
    if not values:
        raise HypruneError(f"Plan {where}: keeps nothing; keep at least one.")
    if values != sorted(set(values)):
        raise HypruneError(f"Plan {where}: indices must be sorted and unique.")
    if values[0] < 0 or values[-1] >= bound:
        raise HypruneError(f"Plan {where}: indices must lie in [0, {bound}); got {values[0]}..{values[-1]}.")
    return values


def _check_grouped(where: str, members: list[int], groups: list[int], per_group: int, what: str) -> None:
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


def _check_moe(where: str, lp: LayerPlan, s: dict[str, int], family: Family, config) -> tuple:
    experts = _check_indices(f"{where} experts", lp.experts, s["experts"])
    _check_grouped(where, experts, list(range(expert_groups(config))), s["experts"] // expert_groups(config),
                   "expert")
    if lp.expert_ffn is None or len(lp.expert_ffn) != len(experts):
        raise HypruneError(f"Plan {where}: expert_ffn must hold one list of neurons per kept expert "
                           f"({len(experts)}).")
    widths = {len(_check_indices(f"{where} expert_ffn of expert {e}", ffn, s["expert_ffn"]))
              for e, ffn in zip(experts, lp.expert_ffn)}
    if len(widths) != 1:
        raise HypruneError(f"Plan {where}: every expert must keep the same number of FFN neurons (the config has "
                           f"one {family.fields['expert_ffn']}); got {sorted(widths)}.")
    check_router(family, config, len(experts))
    shape = (len(experts), widths.pop())
    if "shared_expert_ffn" in family.fields:
        shape += (len(_check_indices(f"{where} shared_ffn", lp.shared_ffn, s["shared_expert_ffn"])),)
    return shape


def validate_plan(plan: Plan, family: Family, config) -> None:
    """Check a plan against a model config before any heavy work. Raises `HypruneError`."""
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
    s = expected["sizes"]
    kinds = expected["block_kinds"]
    if len(plan.layers) != len(kinds):
        raise HypruneError(f"The plan lists {len(plan.layers)} layers; the model has {len(kinds)}.")
    _check_indices("hidden", plan.hidden, s["hidden"])
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
    seen: dict[str, tuple] = {}
    kept = set(plan.kept_blocks())
    for i, (lp, kind) in enumerate(zip(plan.layers, kinds)):
        where = f"layer {i} ({kind})"
        if lp.kind != kind:
            raise HypruneError(f"Plan {where}: the plan says '{lp.kind}'.")
        shape = ()
        for part in family.parts(kind):
            if part.kind == MAMBA:
                groups = _check_indices(f"{where} groups", lp.groups, s["mamba_groups"])
                heads = _check_indices(f"{where} heads", lp.heads, s["mamba_heads"])
                _check_indices(f"{where} head_dim", lp.head_dim, s["mamba_head_dim"])
                _check_indices(f"{where} state", lp.state, s["ssm_state"])
                if not plan.heads_regrouped:
                    _check_grouped(where, heads, groups, s["mamba_heads"] // s["mamba_groups"], "head")
                elif len(heads) % len(groups):
                    raise HypruneError(f"Plan {where}: {len(heads)} regrouped heads do not split evenly "
                                       f"into {len(groups)} groups.")
                shape += (len(lp.heads), len(lp.head_dim), len(lp.state), len(lp.groups))
            elif part.kind == ATTENTION:
                kv = _check_indices(f"{where} kv_heads", lp.kv_heads, s["kv_heads"])
                query = _check_indices(f"{where} query_heads", lp.query_heads, s["attention_heads"])
                _check_grouped(where, query, kv, s["attention_heads"] // s["kv_heads"], "query head")
                shape += (len(lp.query_heads), len(lp.kv_heads))
            elif part.kind == MAMBA1:
                inner = _check_indices(f"{where} inner", lp.inner, s["mamba_expand"] * s["hidden"])
                if len(inner) % len(plan.hidden):
                    raise HypruneError(
                        f"Plan {where}: {family.name} ties the Mamba inner width to mamba_expand * hidden_size with a "
                        f"whole-number mamba_expand; {len(inner)} inner channels is not a multiple of the "
                        f"{len(plan.hidden)} kept hidden channels."
                    )
                shape += (len(inner), len(_check_indices(f"{where} state", lp.state, s["ssm_state"])))
            elif part.kind == MOE:
                shape += _check_moe(where, lp, s, family, config)
            else:
                shape += (len(_check_indices(f"{where} ffn", lp.ffn, s["ffn"])),)
        if i not in kept:
            continue
        if kind in seen and seen[kind][1] != shape:
            raise HypruneError(
                f"Plan {where} keeps sizes {shape} but layer {seen[kind][0]} keeps {seen[kind][1]}: "
                "an HF config holds one size per field, so every layer of a kind must keep the same counts."
            )
        seen.setdefault(kind, (i, shape))
    if ATTENTION in family.part_kinds(config):
        _check_hidden_multiple_of_heads(family, plan.result_sizes())
    if MOE in family.part_kinds(config):
        check_expert_alignment(family, config, plan.result_sizes())
    result = plan.result_sizes()
    _check_target(plan, family, result)
    _check_shared_fields(family, result)
    for axis, reason in family.fixed_axes.items():
        if result[axis] != s[axis]:
            raise HypruneError(f"Plan: {family.fields[axis]} cannot be pruned in {family.name}: {reason}")
    if family.check_sizes is not None:
        family.check_sizes(config, result)
    for group in family.tied_mlps(config) if family.tied_mlps else []:
        uses = [i for i in group if i in kept]
        if any(plan.layers[i].ffn != plan.layers[uses[0]].ffn for i in uses):
            raise HypruneError(f"Plan: blocks {uses} share one MLP, so they must keep the same FFN neurons.")
    if family.mamba_width_coupled_to_hidden and MAMBA in family.part_kinds(config):
        result = plan.result_sizes()
        width = result["mamba_heads"] * result["mamba_head_dim"]
        if width != family.expand(config) * result["hidden"]:
            raise HypruneError(
                f"Plan: {family.name} ties the Mamba width to expand * hidden_size; the plan keeps {width} "
                f"Mamba channels and {result['hidden']} hidden channels (expand {family.expand(config)})."
            )


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
