"""Bridge to EleutherAI's lm-evaluation-harness (optional extra: ``pip install 'hyprune[eval]'``).

Tasks run on the model already in memory (``HFLM(pretrained=model, tokenizer=tokenizer)``), so a
pruned model that was just built or loaded is evaluated as is, with no second load. We report, per
task, ``acc`` and ``acc_norm`` (with their standard errors where lm-eval computes them) and the
shot count actually used, next to every other numeric metric the task defines.

Most tasks download their dataset from the Hugging Face hub. A task of your own can read local
files: put a YAML (``dataset_path: json`` + ``dataset_kwargs: {data_files: ...}``) in a folder and
pass that folder as ``task_paths``.
"""

from __future__ import annotations

import difflib
import os
from types import SimpleNamespace
from typing import Sequence

from hyprune.errors import HypruneError

INSTALL_HINT = "pip install 'hyprune[eval]'"
HEADLINE = ("acc", "acc_norm")


def _lm_eval() -> SimpleNamespace:
    """The parts of lm-eval we use, or a `HypruneError` saying how to install it."""
    try:
        import lm_eval  # optional (hyprune[eval]) and slow to import; only --tasks needs it
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise HypruneError(
            f"--tasks needs lm-evaluation-harness, which is not installed or failed to import ({e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return SimpleNamespace(simple_evaluate=lm_eval.simple_evaluate, HFLM=HFLM, TaskManager=TaskManager,
                           version=getattr(lm_eval, "__version__", "unknown"))


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"piqa,arc_easy"`` or a list -> a list of names, in order, without blanks or repeats."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise HypruneError("--tasks is empty. Pass names such as --tasks piqa,arc_easy.")
    return names


def check_task_args(shots: int | None, limit: int | float | None, batch_size: int | str) -> None:
    if shots is not None and shots < 0:
        raise HypruneError(f"--shots must be 0 or more, got {shots}.")
    if limit is not None and limit <= 0:
        raise HypruneError(f"--limit must be positive (a count, or a fraction below 1), got {limit}.")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise HypruneError(f"--batch-size must be a positive integer or 'auto', got {batch_size}.")


def task_manager(tasks: Sequence[str], task_paths: str | os.PathLike | Sequence | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``tasks``; unknown names fail here, cheaply.

    With ``task_paths`` the built-in task index (slow to build) is consulted only when a name is not
    found in those folders.
    """
    lm = _lm_eval()
    paths = None
    if task_paths is not None:
        paths = [str(task_paths)] if isinstance(task_paths, (str, os.PathLike)) else [str(p) for p in task_paths]
        for p in paths:
            if not os.path.exists(p):
                raise HypruneError(f"Task folder {p} does not exist.")
        manager = lm.TaskManager(include_path=paths, include_defaults=False)
        if not _unknown(manager, tasks):
            return manager
    manager = lm.TaskManager(include_path=paths)
    unknown = _unknown(manager, tasks)
    if unknown:
        known = list(manager.all_tasks)
        hints = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
        detail = "; ".join(f"'{n}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise HypruneError(f"Unknown lm-eval task {detail}. List the tasks with `lm-eval ls tasks`, or pass a "
                           "folder of task YAMLs.")
    return manager


def _unknown(manager, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known]


def run_tasks(model, tokenizer, tasks: Sequence[str], shots: int | None = None, limit: int | float | None = None,
              batch_size: int | str = 8, manager=None, max_length: int | None = None,
              bootstrap_iters: int = 100000, seed: int = 0) -> dict:
    """Run lm-eval ``tasks`` on an in-memory ``model``; returns `parse_results` of the harness output.

    ``shots=None`` keeps each task's own default; ``limit`` caps the examples per task (a count, or a
    fraction below 1) and is meant for quick checks only: state it next to any number you quote.
    """
    lm = _lm_eval()
    tasks = parse_tasks(tasks)
    check_task_args(shots, limit, batch_size)
    manager = manager if manager is not None else task_manager(tasks)
    extra = {} if max_length is None else {"max_length": max_length}
    wrapped = lm.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **extra)
    raw = lm.simple_evaluate(model=wrapped, tasks=list(tasks), num_fewshot=shots, limit=limit, task_manager=manager,
                             log_samples=False, bootstrap_iters=bootstrap_iters, random_seed=seed,
                             numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    result = parse_results(raw)
    result.update(shots=shots, limit=limit, lm_eval_version=lm.version)
    return result


def parse_results(raw: dict) -> dict:
    """lm-eval's ``simple_evaluate`` output -> ``{"tasks": {name: {...}}}``.

    Each task (and group) entry holds ``acc``/``acc_norm`` with ``acc_stderr``/``acc_norm_stderr`` when
    the task reports them (``None`` where lm-eval wrote ``"N/A"``), ``shots`` (the shot count actually
    used), ``samples`` (examples evaluated), and ``metrics``: every numeric metric under its lm-eval
    name, with the filter appended only when it is not ``none`` (``exact_match,strict-match``).
    """
    if not raw or "results" not in raw:
        raise HypruneError("lm-eval returned no results (was this a non-zero rank of a distributed run?).")
    n_shot, n_samples = raw.get("n-shot", {}), raw.get("n-samples", {})
    out = {}
    for task, values in raw["results"].items():
        metrics = {}
        for key, value in values.items():
            if "," not in key:
                continue  # alias, name, sample_len, ...
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = _number(value)
        entry = {m: metrics.get(m) for m in HEADLINE if m in metrics}
        entry.update({f"{m}_stderr": metrics.get(f"{m}_stderr") for m in HEADLINE if m in metrics})
        samples = n_samples.get(task, {})
        entry.update(shots=n_shot.get(task), samples=samples.get("effective") if isinstance(samples, dict) else None,
                     metrics={k: v for k, v in metrics.items() if v is not None})
        out[task] = entry
    return {"tasks": out}


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" when a standard error cannot be computed
    return float(value)
