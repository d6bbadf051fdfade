"""`hyprune eval`: perplexity on local text and/or lm-eval tasks, one model load, one JSON file.

Everything that can be wrong is checked first, in order of cost: arguments, the model's config,
the data file, the results path, lm-eval and the task names, the tokenizer and the token count of
the data. Only then are the weights read.
"""

from __future__ import annotations

import os
from typing import Sequence

from hyprune.config import EvalConfig, LoadConfig, resolve
from hyprune.data import check_source
from hyprune.errors import HypruneError
from hyprune.evaluate import harness
from hyprune.evaluate.perplexity import check_window_args, perplexity, perplexity_windows
from hyprune.io import atomic_write_json, check_output
from hyprune.kv import enable
from hyprune.models import load_config, load_model, load_tokenizer, parse_dtype
from hyprune.report import eval_report, eval_report_paths


def evaluate(model: str | os.PathLike, config: EvalConfig | None = None, *, out: str | os.PathLike | None = None,
             load: LoadConfig | None = None, overwrite: bool = False, progress: bool = False, **fields) -> dict:
    """Evaluate the checkpoint ``model``; returns the results and writes them as JSON to ``out`` if given.

    Perplexity (``data`` + ``seq_len``, optional ``stride`` and ``num_windows``; see
    `hyprune.evaluate.perplexity`) puts ``perplexity``, ``loss``, ``tokens``, ``windows``, ``seq_len``,
    ``stride`` at the top level. lm-eval ``tasks`` (``["piqa", "arc_easy"]``; ``shots``, ``limit``,
    ``task_paths`` for local task YAMLs) add ``tasks: {name: {acc, acc_norm, ..., shots}}``.
    ``fields`` are `EvalConfig` fields and `LoadConfig` fields (dtype, device, device_map, allow_pickle,
    trust_remote_code, gguf_file), or pass ``config`` / ``load``. With ``out`` a report is written next
    to it: ``<stem>.report.md`` and ``<stem>.report.json`` (`hyprune.report.eval_report`).
    """
    config, load = resolve("eval", {**fields, "model": str(model) if isinstance(model, os.PathLike) else model},
                           (EvalConfig, config), (LoadConfig, load))
    c = config
    _check_arguments(c)
    task_names = harness.parse_tasks(c.tasks) if c.tasks is not None else None
    parse_dtype(load.dtype)
    # config, data, output, tasks: cheap checks before the weights
    load_config(model, **load.source())
    if c.data is not None:
        check_source(c.data)
    if out is not None:
        check_output(out, "file", overwrite, inputs=(model, c.data))
    manager = harness.task_manager(task_names, c.task_paths) if task_names is not None else None
    tokenizer = load_tokenizer(model, **load.source())
    return _measure(model, c, load, tokenizer, task_names, manager, out, progress)


def _check_arguments(c: EvalConfig) -> None:
    if c.data is None and c.tasks is None:
        raise HypruneError("Nothing to evaluate: pass --data FILE --seq-len L (perplexity) and/or --tasks a,b "
                           "(lm-eval).")
    if c.data is not None and c.seq_len is None:
        raise HypruneError("Perplexity needs a window length: pass --seq-len L (hyprune never takes it from "
                           "max_position_embeddings).")
    if c.data is None and (c.seq_len is not None or c.stride is not None or c.num_windows is not None):
        raise HypruneError("--seq-len, --stride and --num-windows set up perplexity: pass --data FILE too.")
    if c.data is not None:
        check_window_args(c.seq_len, c.stride)
    if c.tasks is not None:
        harness.check_task_args(c.shots, _limit(c), c.batch_size)
    elif c.shots is not None or c.limit is not None or c.task_paths is not None:
        raise HypruneError("--shots, --limit and --task-paths apply to lm-eval tasks: pass --tasks too.")


def _limit(c: EvalConfig) -> int | float | None:
    """``limit`` as lm-eval takes it: a count (1 or more) or a fraction below 1."""
    return int(c.limit) if c.limit is not None and c.limit >= 1 else c.limit


def _measure(model, c: EvalConfig, load: LoadConfig, tokenizer, task_names, manager, out, progress: bool) -> dict:
    """Read the weights once; perplexity and tasks; write ``out`` and its report."""
    windows = None
    if c.data is not None:
        windows = perplexity_windows(tokenizer, c.data, c.seq_len, c.num_windows, text_field=c.text_field,
                                     split=c.split)
    loaded, _ = load_model(model, **load.load_kwargs())
    result: dict = {"model": str(model), "dtype": str(load.dtype),
                    "parameters": sum(p.numel() for p in loaded.parameters())}
    if c.kv:
        enable(loaded.eval())  # refuses a model without config.hyprune_kv
        result["kv"] = loaded.config.hyprune_kv
    if windows is not None:
        result["data"] = str(c.data)
        result.update(perplexity(loaded, windows, batch_size=c.batch_size, progress=progress, stride=c.stride))
    if task_names is not None:
        result.update(harness.run_tasks(loaded, tokenizer, task_names, shots=c.shots, limit=_limit(c),
                                        batch_size=c.batch_size, manager=manager))
    if out is not None:
        atomic_write_json(out, result)
        eval_report(out).write(*eval_report_paths(out))
    return result


def eval_perplexity(
    model_id: str | os.PathLike,
    data: str | os.PathLike,
    seq_len: int,
    out: str | os.PathLike | None = None,
    stride: int | None = None,
    num_windows: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = False,
    **load_kwargs,
) -> dict:
    """Perplexity of the checkpoint ``model_id`` on ``data`` (JSON at ``out`` if given).

    ``num_windows`` caps the text read to ``num_windows * seq_len`` tokens (default: all of it); a
    ``stride`` re-cuts those same tokens into overlapping windows. Every input is checked before
    the weights are read. Returns the `perplexity` dict plus ``model``, ``data`` and ``dtype``.
    """
    return evaluate(model_id, data=data, seq_len=seq_len, out=out, stride=stride, num_windows=num_windows,
                    batch_size=batch_size, text_field=text_field, split=split, overwrite=overwrite,
                    progress=progress, **load_kwargs)


def eval_tasks(model_id: str | os.PathLike, tasks: str | Sequence[str], out: str | os.PathLike | None = None,
               shots: int | None = None, limit: int | float | None = None, batch_size: int | str = 8,
               task_paths=None, overwrite: bool = False, **load_kwargs) -> dict:
    """lm-eval ``tasks`` on the checkpoint ``model_id`` (JSON at ``out`` if given); see `run_tasks`."""
    return evaluate(model_id, tasks=tasks, out=out, shots=shots, limit=limit, batch_size=batch_size,
                    task_paths=task_paths, overwrite=overwrite, **load_kwargs)
