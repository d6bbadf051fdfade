"""Pruning methods, chosen with ``hyprune prune --method NAME``.

Two kinds:

- Plan methods turn one activation sweep and a ``--target`` into a structured `Plan` (and combine
  with depth pruning): ``activation`` (Minitron-SSM, group-aware; the default) and ``group-blind``
  (the same scores, Mamba heads kept wherever they are and regrouped; the baseline the paper beats).
- Registered methods (`Method`) prune a loaded model their own way, e.g. unstructured sparsity or
  the SSM methods of Ghattas et al.; each module calls `register` on import and is listed in
  `_MODULES`.

A registered method is checked against the config before any weights are read (`Method.check`),
then run on the loaded model (`Method.run`); it returns the model to save and a JSON report.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from hyprune.errors import HypruneError

PLAN_METHODS = {"activation": "group-aware activation importance (Minitron-SSM)",
                "group-blind": "activation importance, Mamba heads ranked ignoring their B/C groups"}
_MODULES: tuple[str, ...] = ("sparsity", "ssm")  # modules under hyprune.methods that register methods
_REGISTRY: dict[str, "Method"] = {}


@dataclass(frozen=True)
class MethodOptions:
    """The method flags of ``hyprune prune``; each method says which ones it needs in `Method.check`."""

    sparsity: float | None = None  # unstructured fraction of weights set to zero
    nm: tuple[int, int] | None = None  # N:M semi-structured: at most N non-zeros in every M weights
    targets: str | None = None  # regular expression over parameter names
    ratio: float | None = None  # fraction removed by a structured method
    seed: int = 0


@dataclass
class MethodResult:
    model: torch.nn.Module  # what gets saved
    report: dict = field(default_factory=dict)  # written to hyprune_summary.json under "method"
    plan: object | None = None  # a hyprune Plan when the method made one (written to plan.json)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_data: bool
    check: Callable  # (family, config, options) -> None; raises HypruneError
    run: Callable  # (model, family, windows, options, *, batch_size, progress) -> MethodResult


def register(method: Method) -> Method:
    if method.name in _REGISTRY or method.name in PLAN_METHODS:
        raise ValueError(f"pruning method {method.name!r} registered twice")
    _REGISTRY[method.name] = method
    return method


def _load_modules() -> None:
    for name in _MODULES:
        importlib.import_module(f"hyprune.methods.{name}")


def method_names() -> list[str]:
    _load_modules()
    return [*PLAN_METHODS, *_REGISTRY]


def get_method(name: str) -> Method | None:
    """The registered method ``name``; None for the plan methods. Unknown names are an error."""
    if name in PLAN_METHODS:
        return None
    _load_modules()
    if name not in _REGISTRY:
        raise HypruneError(f"Unknown pruning method '{name}'. Choose one of: {', '.join(method_names())}.")
    return _REGISTRY[name]


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4)."""
    if text is None:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise HypruneError(f"--nm '{text}' is not N:M (for example 2:4).") from None
    if not 0 < n < m:
        raise HypruneError(f"--nm {text}: need 0 < N < M (for example 2:4).")
    return n, m
