"""`hyprune eval`: perplexity on local text and/or lm-eval tasks, one model load, one JSON file.

Everything that can be wrong is checked first, in order of cost: arguments, the model's config,
the data file, the results path, lm-eval and the task names, the tokenizer and the token count of
the data. Only then are the weights read.
"""

from __future__ import annotations

import os
from typing import Sequence

from hyprune.errors import HypruneError


def evaluate(
    model: str | os.PathLike,
    data: str | os.PathLike | None = None,
    seq_len: int | None = None,
    out: str | os.PathLike | None = None,
    stride: int | None = None,
    num_windows: int | None = None,
    tasks: str | Sequence[str] | None = None,
    shots: int | None = None,
    limit: int | float | None = None,
    task_paths: str | os.PathLike | Sequence | None = None,
    batch_size: int = 8,
    text_field: str = "text",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = False,
    **load_kwargs,
) -> dict:
    """Evaluate the checkpoint ``model``; returns the results and writes them as JSON to ``out`` if given.

    Perplexity (``data`` + ``seq_len``, optional ``stride`` and ``num_windows``; see
    `hyprune.evaluate.perplexity`) puts ``perplexity``, ``loss``, ``tokens``, ``windows``, ``seq_len``,
    ``stride`` at the top level. lm-eval ``tasks`` (``"piqa,arc_easy"``; ``shots``, ``limit``,
    ``task_paths`` for local task YAMLs) add ``tasks: {name: {acc, acc_norm, ..., shots}}``.
    ``load_kwargs`` go to `hyprune.models.load_model` (dtype, device, device_map, allow_pickle,
    trust_remote_code, gguf_file). With ``out`` a report is written next to it: ``<stem>.report.md``
    and ``<stem>.report.json`` (`hyprune.report.eval_report`).
    """
    from hyprune.data import check_source
    from hyprune.evaluate import harness
    from hyprune.io import atomic_write_json, check_output
    from hyprune.evaluate.perplexity import check_window_args, perplexity, perplexity_windows
    from hyprune.models import load_config, load_model, load_tokenizer, parse_dtype
    from hyprune.report import eval_report, eval_report_paths

    # 1. arguments -------------------------------------------------------------------------------
    if data is None and tasks is None:
        raise HypruneError("Nothing to evaluate: pass --data FILE --seq-len L (perplexity) and/or --tasks a,b "
                           "(lm-eval).")
    if data is not None and seq_len is None:
        raise HypruneError("Perplexity needs a window length: pass --seq-len L (hyprune never takes it from "
                           "max_position_embeddings).")
    if data is None and (seq_len is not None or stride is not None or num_windows is not None):
        raise HypruneError("--seq-len, --stride and --num-windows set up perplexity: pass --data FILE too.")
    if data is not None:
        check_window_args(seq_len, stride)
    if num_windows is not None and num_windows < 1:
        raise HypruneError(f"--num-windows must be at least 1, got {num_windows}.")
    if batch_size < 1:
        raise HypruneError(f"--batch-size must be at least 1, got {batch_size}.")
    task_names = harness.parse_tasks(tasks) if tasks is not None else None
    if task_names is not None:
        harness.check_task_args(shots, limit, batch_size)
    elif shots is not None or limit is not None or task_paths is not None:
        raise HypruneError("--shots, --limit and --task-paths apply to lm-eval tasks: pass --tasks too.")
    parse_dtype(load_kwargs.get("dtype", "float32"))

    # 2. config, data, output, tasks: cheap checks before the weights --------------------------------
    source = {"trust_remote_code": load_kwargs.get("trust_remote_code", False),
              "gguf_file": load_kwargs.get("gguf_file")}
    load_config(model, **source)
    if data is not None:
        check_source(data)
    if out is not None:
        check_output(out, "file", overwrite, inputs=(model, data))
    manager = harness.task_manager(task_names, task_paths) if task_names is not None else None
    tokenizer = load_tokenizer(model, **source)
    windows = None
    if data is not None:
        windows = perplexity_windows(tokenizer, data, seq_len, num_windows, text_field=text_field, split=split)

    # 3. the model, once ------------------------------------------------------------------------------
    loaded, _ = load_model(model, **load_kwargs)
    result: dict = {"model": str(model), "dtype": str(load_kwargs.get("dtype", "float32")),
                    "parameters": sum(p.numel() for p in loaded.parameters())}
    if windows is not None:
        result["data"] = str(data)
        result.update(perplexity(loaded, windows, batch_size=batch_size, progress=progress, stride=stride))
    if task_names is not None:
        result.update(harness.run_tasks(loaded, tokenizer, task_names, shots=shots, limit=limit,
                                        batch_size=batch_size, manager=manager))
    if out is not None:
        atomic_write_json(out, result)
        eval_report(out).write(*eval_report_paths(out))
    return result
