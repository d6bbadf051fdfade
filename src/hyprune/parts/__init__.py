"""Part kinds: one module per kind of mixer, each implementing `PartKind` (see `hyprune.parts.base`).

``PARTS[part.kind]`` is the object that knows how that part is scored, planned, validated, sliced,
counted and cached; the orchestration in `hyprune.importance`, `hyprune.plan`, `hyprune.apply`,
`hyprune.search.counting` and `hyprune.evaluate.bench` loops over a block's parts and calls into it. A new
kind of mixer is one module here plus its row in `PARTS`; a new family reuses these parts and names
its tensor-name variants as data (`hyprune.arch.family.Part.names`).
"""

from __future__ import annotations

from hyprune.errors import HypruneError
from hyprune.parts import attention, mamba1, mamba2, mlp, moe
from hyprune.parts.base import ChannelStat, Context, PartKind

# Order matters where parts share an axis: Mamba-1 and Mamba-2 both size ``ssm_state``, and a plan's
# result sizes take the later one (no family has both).
PARTS: dict[str, PartKind] = {p.kind: p for p in (mamba1.PART, mamba2.PART, attention.PART, mlp.PART, moe.PART)}


def part_kind(kind: str) -> PartKind:
    """The `PartKind` of a `Part.kind`, or a `HypruneError` naming the known ones."""
    if kind not in PARTS:
        raise HypruneError(f"Unknown part kind '{kind}'; hyprune knows {', '.join(PARTS)}.")
    return PARTS[kind]


def names_of(part) -> dict[str, str]:
    """The tensor names of ``part``: its kind's defaults, overridden by the family's `Part.names`."""
    return {**PARTS[part.kind].names, **part.names}


def components() -> list[str]:
    """Parameter-count keys of the part kinds, in order, each once (Mamba-1 and Mamba-2 share ``mamba``)."""
    return list(dict.fromkeys(p.component for p in PARTS.values()))


def kinds_with_axis(axis: str) -> set[str]:
    """The part kinds that size ``axis``."""
    return {p.kind for p in PARTS.values() if axis in p.axes}


__all__ = ["PARTS", "PartKind", "ChannelStat", "Context", "part_kind", "names_of", "components", "kinds_with_axis"]
