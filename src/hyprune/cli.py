"""Command line: one command per API function; the flags are the function's arguments.

Every `HypruneError` becomes a one-paragraph message on stderr and exit code 2; so does an `OSError`
from the file system (read-only folder, disk full, ...), as one line naming the path.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from hyprune.errors import HypruneError

app = typer.Typer(help="Compress hybrid Mamba-2 / attention language models (Minitron-SSM).", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True)
out_console = Console()


@app.callback()
def _setup(threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch (default: the free cores, one on a busy machine).")):
    """Compress hybrid Mamba-2 / attention language models (Minitron-SSM)."""
    from hyprune.threads import set_threads

    console.print(_run(set_threads, threads), highlight=False, soft_wrap=True)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HypruneError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)
    except OSError as e:  # the file system said no after the checks passed: full disk, a folder gone read-only
        console.print(f"[bold red]error:[/] {_os_error_line(e)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2)


def _os_error_line(e: OSError) -> str:
    """``could not write PATH: reason`` for an `OSError` (a path-less one keeps its own words)."""
    reason = e.strerror or str(e)
    if e.filename is None:
        return f"could not write the output: {reason}. Check the --out location (space, permissions) and retry."
    target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"could not write {target}: {reason}. Check the --out location (space, permissions) and retry."


# Shared options ------------------------------------------------------------------------------
ModelArg = typer.Argument(..., help="A local HF checkpoint folder or a hub id.")
DataOpt = typer.Option(None, "--data", help=".txt(.gz), .jsonl, .parquet file or a datasets name.")
SeqLen = typer.Option(256, "--seq-len", help="Tokens per calibration window.")
NumSamples = typer.Option(64, "--num-samples", help="Number of calibration windows.")
BatchSize = typer.Option(8, "--batch-size", help="Windows per forward pass.")
Seed = typer.Option(0, "--seed", help="Seed for the choice of calibration documents.")
TextField = typer.Option("text", "--text-field", help="Field holding the text in .jsonl/.parquet/datasets.")
Split = typer.Option("train", "--split", help="Split of a datasets dataset.")
Dtype = typer.Option("float32", "--dtype", help="float32, bfloat16, float16 or auto.")
Device = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: where from_pretrained puts it).")
DeviceMap = typer.Option(None, "--device-map", help="'auto' to spread a large model over devices.")
AllowPickle = typer.Option(False, "--allow-pickle", help="Allow loading pickle (.bin) weights.")
TrustRemote = typer.Option(False, "--trust-remote-code", help="Run the checkpoint's own modeling code.")
Overwrite = typer.Option(False, "--overwrite", help="Replace an existing output (file or non-empty folder).")
Quiet = typer.Option(False, "--quiet", help="No progress bars.")
GgufFile = typer.Option(None, "--gguf-file", help="Load this GGUF file from the MODEL folder (needs `gguf`).")


@contextmanager
def _hf_progress(enabled: bool):
    """--quiet also silences transformers' own progress bars (loading and writing weights)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _load_kwargs(dtype, device, device_map, allow_pickle, trust_remote_code, gguf_file=None):
    return dict(dtype=dtype, device=device, device_map=device_map, allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code, gguf_file=gguf_file)


@app.command()
def score(
    model: str = ModelArg,
    data: Optional[str] = DataOpt,
    out: str = typer.Option(..., "--out", help="Folder for scores.safetensors and scores.json."),
    seq_len: int = SeqLen, num_samples: int = NumSamples, batch_size: int = BatchSize, seed: int = Seed,
    text_field: str = TextField, split: str = Split, dtype: str = Dtype, device: Optional[str] = Device,
    device_map: Optional[str] = DeviceMap, allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote,
    overwrite: bool = Overwrite, quiet: bool = Quiet,
    depth: Optional[str] = typer.Option(None, "--depth", help="Score whole blocks instead: block_influence, "
                                        "angular, kl or lm_loss (writes block_scores.json and a plot)."),
    window: int = typer.Option(1, "--window", help="With --depth angular: blocks per scored window."),
    gguf_file: Optional[str] = GgufFile,
):
    """Score every prunable structure from activations (one forward sweep), or whole blocks (--depth)."""
    from hyprune import api, depth as depth_lib

    if data is None:
        _run(_fail, "score needs calibration text: pass --data FILE.")
    common = dict(seq_len=seq_len, num_samples=num_samples, batch_size=batch_size, seed=seed, text_field=text_field,
                  split=split, overwrite=overwrite, progress=not quiet,
                  **_load_kwargs(dtype, device, device_map, allow_pickle, trust_remote_code, gguf_file))
    with _hf_progress(not quiet):
        if depth is None:
            _run(api.score, model, data, out, **common)
        else:
            result = _run(depth_lib.score_depth, model, data, depth, out, window=window, **common)
            out_console.print(depth_lib.format_block_table(result))
    out_console.print(f"scores written to {out}")


@app.command()
def plan(
    model: str = ModelArg,
    scores: str = typer.Option(..., "--scores", help="Folder (or file) written by `hyprune score`."),
    target: str = typer.Option(..., "--target", help="KEY=VALUE[,KEY=VALUE...] with the family's config names."),
    out: str = typer.Option(..., "--out", help="Where to write PLAN.json."),
    trust_remote_code: bool = TrustRemote, gguf_file: Optional[str] = GgufFile,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PLAN.json."),
):
    """Write a pruning plan from saved scores and a target architecture."""
    from hyprune import api

    result = _run(api.plan, model, scores, target, out, trust_remote_code=trust_remote_code, gguf_file=gguf_file,
                  overwrite=overwrite)
    sizes = result.result_sizes()
    out_console.print(f"plan written to {out}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


@app.command()
def prune(
    model: str = ModelArg,
    data: Optional[str] = DataOpt,
    target: Optional[str] = typer.Option(None, "--target", help="KEY=VALUE[,KEY=VALUE...] target sizes."),
    out: str = typer.Option(..., "--out", help="Output folder: the pruned HF checkpoint."),
    scores: Optional[str] = typer.Option(None, "--scores", help="Reuse saved scores instead of a sweep."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="Apply this plan (no scoring)."),
    drop_blocks: Optional[int] = typer.Option(None, "--drop-blocks", help="Drop this many blocks (depth pruning)."),
    drop_block_list: Optional[str] = typer.Option(None, "--drop-block-list", help="Drop these blocks: I,J,..."),
    depth_method: str = typer.Option("block_influence", "--depth-method",
                                     help="block_influence, angular, kl or lm_loss (for --drop-blocks)."),
    depth_mode: str = typer.Option("lowest", "--depth-mode", help="lowest (any blocks) or contiguous (one window)."),
    method: str = typer.Option("activation", "--method", help="activation (default), group-blind, or a registered method; a wrong name lists them all."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Unstructured methods: fraction of zeros."),
    nm: Optional[str] = typer.Option(None, "--nm", help="Unstructured methods: N:M sparsity, e.g. 2:4."),
    targets: Optional[str] = typer.Option(
        None, "--targets", help="Sparsity methods: groups (in_proj,out_proj,mamba,attention,mlp) or a regex over "
                                "parameter names; default every linear layer inside the blocks."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Structured SSM methods: fraction removed."),
    gguf_file: Optional[str] = GgufFile,
    seq_len: int = SeqLen, num_samples: int = NumSamples, batch_size: int = BatchSize, seed: int = Seed,
    text_field: str = TextField, split: str = Split, dtype: str = Dtype, device: Optional[str] = Device,
    device_map: Optional[str] = DeviceMap, allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote,
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Score, plan and apply in one go (or apply --plan) and save an ordinary HF checkpoint."""
    from hyprune import api
    from hyprune.methods import MethodOptions, parse_nm

    options = _run(lambda: MethodOptions(sparsity=sparsity, nm=parse_nm(nm), targets=targets, ratio=ratio, seed=seed))
    with _hf_progress(not quiet):
        summary = _run(api.prune, model, out, data=data, target=target, scores=scores, plan_file=plan_file,
                       drop_blocks=drop_blocks, drop_block_list=drop_block_list, depth_method=depth_method,
                       depth_mode=depth_mode, method=method, options=options,
                       seq_len=seq_len, num_samples=num_samples, batch_size=batch_size, seed=seed,
                       text_field=text_field, split=split, overwrite=overwrite, progress=not quiet,
                       **_load_kwargs(dtype, device, device_map, allow_pickle, trust_remote_code, gguf_file))
    table = Table(title=f"pruned checkpoint: {out}")
    table.add_column("parameters")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = summary["parameters"]["before"], summary["parameters"]["after"]
    for key in before:
        table.add_row(key, f"{before[key]:,}", f"{after[key]:,}")
    out_console.print(table)
    if "tensors" in summary["method"]:
        out_console.print(_sparsity_table(summary["method"]))
    if summary.get("blocks_after") != summary.get("blocks_before"):
        out_console.print(f"blocks: {summary['blocks_before']} -> {summary['blocks_after']} "
                          f"(dropped {summary['drop_blocks']})")
    if summary["generate"]["stock_generate_error"]:
        out_console.print(f"note: stock generate() fails on this checkpoint under transformers "
                          f"{summary['generate']['transformers']}: {summary['generate']['stock_generate_error']} (the checkpoint is valid; hyprune eval and bench "
                          "work around this)",
                          soft_wrap=True)
    out_console.print(f"report: {Path(out) / 'report.md'}", soft_wrap=True)


def _sparsity_table(report: dict) -> Table:
    """Zeros per pruned tensor, as written to hyprune_summary.json by the sparsity methods."""
    pattern = report["nm"] or f"{report['sparsity']:.0%} unstructured"
    table = Table(title=f"{report['name']}: {pattern}, targets: {report['targets']}")
    for column, justify in (("tensor", "left"), ("group", "left"), ("shape", "right"), ("zeros", "right"),
                            ("sparsity", "right")):
        table.add_column(column, justify=justify)
    for row in [*report["tensors"], {"name": "total", "group": "", "shape": [report["total"]["weights"]],
                                     "zeros": report["total"]["zeros"], "sparsity": report["total"]["sparsity"]}]:
        table.add_row(row["name"], row["group"], "x".join(map(str, row["shape"])), f"{row['zeros']:,}",
                      f"{row['sparsity']:.2%}")
    return table


@app.command()
def inspect(
    model: str = ModelArg,
    scores: Optional[str] = typer.Option(None, "--scores", help="Also summarize these saved scores."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    trust_remote_code: bool = TrustRemote, gguf_file: Optional[str] = GgufFile,
):
    """Family, layer pattern, prunable sizes and parameters per component (no weights are read)."""
    from hyprune import api

    info = _run(api.inspect_model, model, scores, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    if as_json:
        out_console.print_json(json.dumps(info))
        return
    out_console.print(f"[bold]{model}[/]: family {info['family']}, {info['blocks']} blocks, pattern {info['pattern']}")
    for note in info["notes"]:
        out_console.print(f"note: {note}")
    sizes = Table(title="prunable sizes (config field)")
    sizes.add_column("field")
    sizes.add_column("size", justify="right")
    for k, v in info["sizes"].items():
        sizes.add_row(k, str(v))
    out_console.print(sizes)
    params = Table(title="parameters")
    params.add_column("component")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    total = info["parameters"]["total"]
    for k, v in info["parameters"].items():
        params.add_row(k, f"{v:,}", f"{100 * v / total:.1f}%")
    out_console.print(params)
    if "importance" in info:
        imp = Table(title="importance (median score per layer and axis)")
        imp.add_column("layer")
        imp.add_column("kind")
        axes = ["hidden", "mamba_heads", "mamba_head_dim", "mamba_inner", "ssm_state", "attention_heads", "ffn",
                "experts", "expert_ffn"]
        for a in axes:
            imp.add_column(a, justify="right")
        for entry in info["importance"]["layers"]:
            imp.add_row(str(entry["layer"]), entry["kind"],
                        *[f"{entry[a]['median']:.3g}" if a in entry else "" for a in axes])
        out_console.print(imp)


# Distillation ---------------------------------------------------------------------------------
Tokens = typer.Option(..., "--tokens", help="Training budget in tokens of --data.")
TrainBatch = typer.Option(8, "--batch", help="Global batch in windows per optimizer step.")
MicroBatch = typer.Option(None, "--micro-batch", help="Windows per forward pass (gradient accumulation).")
Lr = typer.Option(1e-4, "--lr", help="Peak learning rate (cosine with warmup).")
MinLr = typer.Option(1e-5, "--min-lr", help="Learning rate at the end of the cosine.")
Warmup = typer.Option(40, "--warmup-steps")
CkptEvery = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints (0: final only).")
KeepLast = typer.Option(2, "--keep-last", help="Checkpoints kept.")
EvalEvery = typer.Option(200, "--eval-every", help="Steps between held-out perplexity evaluations.")
EvalData = typer.Option(None, "--eval-data", help="Held-out text (default: the tail of --data).")
Resume = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in --out.")
ResumeChanged = typer.Option(False, "--resume-changed", help="--resume even though settings or inputs changed "
                             "since the saved run (the changes are printed and logged).")
ActCkpt = typer.Option(False, "--activation-checkpointing", help="Recompute activations in backward.")
Precision = typer.Option("auto", "--precision", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")


def _train_options(micro_batch, lr, min_lr, warmup_steps, checkpoint_every, keep_last, eval_every,
                   activation_checkpointing, precision, seed, quiet):
    return dict(micro_batch=micro_batch, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                checkpoint_every=checkpoint_every, keep_last=keep_last, eval_every=eval_every,
                activation_checkpointing=activation_checkpointing, precision=precision, seed=seed, progress=not quiet)


def _print_training_summary(summary: dict, out: str) -> None:
    keys = ("steps", "tokens", "loss", "student_perplexity", "teacher_perplexity")
    out_console.print(", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary[k]}"
                                for k in keys if summary.get(k) is not None))
    out_console.print(f"final model: {out}/final   log: {out}/log.jsonl   report: {out}/report.md", soft_wrap=True)


@app.command()
def distill(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint (not needed with a top-k cache)."),
    student: str = typer.Option(..., "--student", help="Student checkpoint, e.g. the output of `hyprune prune`."),
    data: str = typer.Option(..., "--data", help="Training text, or a folder written by `hyprune cache-teacher`."),
    tokens: int = Tokens,
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per training window."),
    batch: int = TrainBatch,
    out: str = typer.Option(..., "--out", help="Run folder: final/, checkpoints/, log.jsonl."),
    resume: bool = Resume, resume_changed: bool = ResumeChanged,
    loss: str = typer.Option("forward_kl", "--loss", help="forward_kl, reverse_kl, jsd or ce."),
    temperature: float = typer.Option(1.0, "--temperature"),
    beta: float = typer.Option(0.5, "--beta", help="JSD mixture weight."),
    ce_weight: float = typer.Option(0.0, "--ce-weight", help="L = (1-w) KD + w CE."),
    hidden_loss: Optional[str] = typer.Option(None, "--hidden-loss", help="cosine or mse on matched blocks."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="Pruning plan: block map and kept channels."),
    eval_data: Optional[str] = EvalData,
    micro_batch: Optional[int] = MicroBatch, lr: float = Lr, min_lr: float = MinLr, warmup_steps: int = Warmup,
    checkpoint_every: int = CkptEvery, keep_last: int = KeepLast, eval_every: int = EvalEvery,
    activation_checkpointing: bool = ActCkpt, precision: str = Precision, fsdp: bool = typer.Option(
        False, "--fsdp", help="Shard the student with FSDP2 under torchrun."),
    seed: int = Seed, text_field: str = TextField, split: str = Split, dtype: str = Dtype,
    device: Optional[str] = Device, allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote,
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Distill a (pruned) student from its teacher with logit KD (forward KL by default)."""
    from hyprune.distill import distill_cli

    if teacher is None and not (data and Path(data).is_dir()):
        _run(_fail, "distill needs --teacher (or --data pointing at a top-k cache from `hyprune cache-teacher`).")
    with _hf_progress(not quiet):
        summary = _run(distill_cli, teacher, student, data, tokens, seq_len, batch, out, resume or resume_changed,
                       allow_changed=resume_changed, eval_data=eval_data,
                       text_field=text_field, split=split, dtype=dtype, device=device, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, overwrite=overwrite, loss=loss, temperature=temperature,
                       beta=beta, ce_weight=ce_weight, hidden_loss=hidden_loss, plan=plan_file, fsdp=fsdp,
                       **_train_options(micro_batch, lr, min_lr, warmup_steps, checkpoint_every, keep_last,
                                        eval_every, activation_checkpointing, precision, seed, quiet))
    _print_training_summary(summary, out)


@app.command()
def finetune(
    model: str = ModelArg,
    data: str = typer.Option(..., "--data", help="Training text."),
    tokens: int = Tokens,
    seq_len: int = typer.Option(..., "--seq-len", help="Tokens per training window."),
    batch: int = TrainBatch,
    out: str = typer.Option(..., "--out", help="Run folder: final/, checkpoints/, log.jsonl."),
    resume: bool = Resume, resume_changed: bool = ResumeChanged, eval_data: Optional[str] = EvalData,
    micro_batch: Optional[int] = MicroBatch, lr: float = Lr, min_lr: float = MinLr, warmup_steps: int = Warmup,
    checkpoint_every: int = CkptEvery, keep_last: int = KeepLast, eval_every: int = EvalEvery,
    activation_checkpointing: bool = ActCkpt, precision: str = Precision,
    seed: int = Seed, text_field: str = TextField, split: str = Split, dtype: str = Dtype,
    device: Optional[str] = Device, allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote,
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Teacher correction: fine-tune a model with the plain LM loss on the distillation data."""
    from hyprune.distill import finetune_cli

    with _hf_progress(not quiet):
        summary = _run(finetune_cli, model, data, tokens, seq_len, batch, out, resume or resume_changed,
                       allow_changed=resume_changed, eval_data=eval_data,
                       text_field=text_field, split=split, dtype=dtype, device=device, allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code, overwrite=overwrite,
                       **_train_options(micro_batch, lr, min_lr, warmup_steps, checkpoint_every, keep_last,
                                        eval_every, activation_checkpointing, precision, seed, quiet))
    _print_training_summary(summary, out)


@app.command("cache-teacher")
def cache_teacher(
    teacher: str = ModelArg,
    data: str = typer.Option(..., "--data", help="Text to run the teacher over."),
    seq_len: int = typer.Option(..., "--seq-len"),
    k: int = typer.Option(100, "--top-k", help="Logits kept per token."),
    out: str = typer.Option(..., "--out", help="Cache folder (sharded safetensors + manifest)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Tokens to cache (default: all of --data)."),
    batch_size: int = BatchSize, text_field: str = TextField, split: str = Split, dtype: str = Dtype,
    device: Optional[str] = Device, allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote,
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Precompute the teacher's top-k log-probabilities, to distill without the teacher in memory."""
    from hyprune.distill import cache_topk_cli

    with _hf_progress(not quiet):
        path = _run(cache_topk_cli, teacher, data, seq_len, k, out, tokens=tokens, batch_size=batch_size,
                    text_field=text_field, split=split, dtype=dtype, device=device, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, overwrite=overwrite, progress=not quiet)
    out_console.print(f"teacher top-{k} cache written to {path}")


# Evaluation ------------------------------------------------------------------------------------
@app.command("eval")
def eval_command(
    model: str = ModelArg,
    data: Optional[str] = typer.Option(None, "--data", help="Text for token-level perplexity."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per perplexity window."),
    out: str = typer.Option(..., "--out", help="RESULTS.json (perplexity, tokens, tasks...)."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Overlapping windows S tokens apart."),
    num_windows: Optional[int] = typer.Option(None, "--num-windows", help="Read at most this many windows."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks: piqa,arc_easy,..."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Few-shot examples (default: each task's)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per task (or a fraction < 1)."),
    task_paths: Optional[str] = typer.Option(None, "--task-paths", help="Folder of local task YAMLs."),
    batch_size: int = BatchSize, text_field: str = TextField, split: str = Split, dtype: str = Dtype,
    device: Optional[str] = Device, device_map: Optional[str] = DeviceMap, allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemote, gguf_file: Optional[str] = GgufFile, overwrite: bool = Overwrite,
    quiet: bool = Quiet,
):
    """Perplexity on local text and/or lm-evaluation-harness tasks, as JSON (and a report next to it)."""
    from hyprune.evaluate import evaluate
    from hyprune.report import eval_report_paths

    if limit is not None and limit >= 1:
        limit = int(limit)
    with _hf_progress(not quiet):
        result = _run(evaluate, model, data=data, seq_len=seq_len, out=out, stride=stride, num_windows=num_windows,
                      tasks=tasks, shots=shots, limit=limit, task_paths=task_paths, batch_size=batch_size,
                      text_field=text_field, split=split, overwrite=overwrite, progress=not quiet,
                      **_load_kwargs(dtype, device, device_map, allow_pickle, trust_remote_code, gguf_file))
    if result.get("perplexity") is not None:
        out_console.print(f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens")
    for name, task in (result.get("tasks") or {}).items():
        scores = ", ".join(f"{k}={task[k]:.4f}" for k in ("acc", "acc_norm") if task.get(k) is not None)
        out_console.print(f"{name} ({task.get('shots')}-shot): {scores}")
    folder, stem = eval_report_paths(out)
    out_console.print(f"results written to {out}   report: {folder / stem}.md", soft_wrap=True)


@app.command()
def bench(
    models: list[str] = typer.Argument(..., help="One model, or two to compare (ratios B / A)."),
    out: str = typer.Option(..., "--out", help="BENCH.json."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma-separated batch sizes."),
    context_lengths: str = typer.Option("128,512", "--context-lengths", help="Comma-separated prompt lengths."),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="Tokens decoded with the cache."),
    repeats: int = typer.Option(3, "--repeats", help="Measurements per setting (medians reported)."),
    dtype: str = Dtype, device: Optional[str] = Device, allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemote, gguf_file: Optional[str] = GgufFile, overwrite: bool = Overwrite,
    quiet: bool = Quiet,
):
    """Prefill and decode speed, latency, peak memory and cache bytes; two models side by side."""
    from hyprune.evaluate import bench as run_bench, format_bench_table

    if len(models) > 2:
        _run(_fail, f"bench compares at most two models; got {len(models)}.")
    with _hf_progress(not quiet):
        result = _run(run_bench, models, batch_sizes=batch_sizes, context_lengths=context_lengths,
                      decode_tokens=decode_tokens, repeats=repeats, device=device, dtype=dtype, out=out,
                      overwrite=overwrite, progress=not quiet, allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    out_console.print(format_bench_table(result))


@app.command("run")
def run_command(
    recipe: str = typer.Argument(..., help="A recipe YAML file (see recipes/)."),
    restart: bool = typer.Option(False, "--restart", help="If the recipe changed, rerun the changed stage and the "
                                 "stages after it (finished earlier stages are kept)."),
    check: bool = typer.Option(False, "--check", help="Only validate the recipe and the files it names, and say "
                               "what a run would do with each stage (run, skip, resume, changed)."),
    quiet: bool = Quiet,
):
    """Run a recipe: prune -> distill -> eval -> report, resumable at stage boundaries."""
    from hyprune import recipe as recipes

    parsed = _run(recipes.load_recipe, recipe)
    if check:
        _run(recipes.check_inputs, parsed)
        status = _run(recipes.run_status, parsed)
        out_console.print(f"{recipe}: valid; output {parsed.output}; stages: "
                          + ", ".join(f"{stage} ({what})" for stage, what in status.items()), soft_wrap=True)
        return
    with _hf_progress(not quiet):
        _run(recipes.run_recipe, parsed, restart=restart, progress=not quiet, console=console)


@app.command("report")
def report_command(
    paths: list[str] = typer.Argument(..., help="Run outputs: prune folders, distill run folders, search folders, "
                                      "eval RESULTS.json, or (with --out) report.json files / folders holding them."),
    out: Optional[str] = typer.Option(None, "--out", help="Compare the runs: a table and a Pareto plot in this "
                                      "folder (report.md, report.json, pareto.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
):
    """(Re)write the report of each run, or compare several runs' reports (--out DIR)."""
    from hyprune import report
    from hyprune.io import check_output, check_writable

    if out is None:
        for path in paths:  # a run's report goes into its own folder (next to an eval RESULTS.json)
            folder = Path(path).expanduser()
            _run(check_writable, (folder if folder.is_dir() else folder.parent) / "report.md", "report")
        for path in paths:
            written = _run(report.write_run_report, path)
            out_console.print(f"report: {written['markdown']}", soft_wrap=True)
        return
    _run(check_output, out, "dir", overwrite, inputs=paths)
    comparison = _run(report.compare_reports, paths)
    written = _run(comparison.write, out)
    out_console.print(report.markdown_table(["run", "model", "parameters", "perplexity", "decode tokens/s"],
                                            [[p["run"], p["label"], p.get("parameters"), p.get("perplexity"),
                                              p.get("tokens_per_s")] for p in comparison.points]))
    out_console.print(f"report: {written['markdown']}", soft_wrap=True)


@app.command()
def demo(
    out: str = typer.Option("hyprune-demo", "--out", help="Folder for the demo's models and results."),
    train_tokens: int = typer.Option(2_457_600, "--train-tokens",
                                     help="Training budget of the small teacher in tokens (steps of 16 x 128)."),
    distill_tokens: int = typer.Option(600_000, "--distill-tokens", help="Distillation budget in tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start from scratch (a new teacher, a new run)."),
    quiet: bool = Quiet,
):
    """Offline end-to-end demo: train a small NemotronH on the stdlib source, prune it to ~50%, distill, evaluate."""
    from hyprune.demo import run_demo

    with _hf_progress(not quiet):
        _run(run_demo, out, train_tokens=train_tokens, overwrite=overwrite, distill_tokens=distill_tokens,
             progress=not quiet)


# Architecture search ---------------------------------------------------------------------------
@app.command()
def search(
    model: str = ModelArg,
    data: Optional[str] = DataOpt,
    out: str = typer.Option(..., "--out", help="Run folder: plan.json, candidates.json, report.md/json, ranking.png."),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="Parameter budget (e.g. 4e9)."),
    target_ratio: Optional[float] = typer.Option(None, "--target-ratio", help="Budget as a fraction of the source."),
    target_active_params: Optional[float] = typer.Option(None, "--target-active-params",
                                                         help="Active-parameter budget (MoE: per token, top-k of "
                                                              "the routed experts; dense: = total)."),
    target_memory: Optional[float] = typer.Option(None, "--target-memory",
                                                  help="Bytes of weights + cache at --memory-context tokens."),
    target_latency: Optional[float] = typer.Option(None, "--target-latency",
                                                   help="Milliseconds, as the fitted latency model predicts."),
    tolerance: float = typer.Option(0.05, "--tolerance", help="Parameters within +-T of the budget; memory and "
                                    "latency within [1-T, 1] of the limit."),
    memory_context: int = typer.Option(2048, "--memory-context", help="Context length of the memory budget."),
    memory_dtype: str = typer.Option("bfloat16", "--memory-dtype", help="Weights and cache dtype of the memory budget."),
    memory_batch: int = typer.Option(1, "--memory-batch", help="Sequences in the cache of the memory budget."),
    space: Optional[str] = typer.Option(None, "--space", help="FIELD=MIN:MAX[:STEP] or FIELD=VALUE, comma-separated "
                                        "(config field names); unlisted axes automatic."),
    min_fraction: float = typer.Option(0.5, "--min-fraction", help="Lower bound of automatic axes, of the source."),
    drop_blocks: Optional[str] = typer.Option(None, "--drop-blocks", help="MIN:MAX blocks dropped (default 0:L/5)."),
    depth_method: str = typer.Option("block_influence", "--depth-method", help="Which blocks of a kind go: "
                                     "block_influence, angular, kl or lm_loss."),
    max_candidates: int = typer.Option(64, "--max-candidates", help="Evaluate at most this many (seeded sample)."),
    score: str = typer.Option("loss", "--score", help="Ranking score: loss (LM loss) or kl (KL to the teacher)."),
    top_k: int = typer.Option(4, "--top-k", help="Candidates given a short distillation."),
    distill_tokens: int = typer.Option(0, "--distill-tokens", help="Tokens of short distillation per top-k "
                                       "candidate (0: rank by the zero-shot score only)."),
    distill_uniform: bool = typer.Option(False, "--distill-uniform", help="Also distill the uniform baseline "
                                         "(every axis cut alike, no blocks dropped), for comparison."),
    distill_batch: int = typer.Option(8, "--distill-batch", help="Windows per distillation step."),
    distill_lr: float = typer.Option(1e-4, "--distill-lr", help="Peak learning rate of the short distillation."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="Held-out text (default: windows of --data "
                                            "not used for calibration or distillation)."),
    eval_windows: int = typer.Option(32, "--eval-windows", help="Held-out windows for the ranking score."),
    latency: bool = typer.Option(False, "--latency", help="Fit the latency model and report every candidate's."),
    latency_shapes: int = typer.Option(12, "--latency-shapes", help="Shapes measured for the latency model."),
    latency_metric: str = typer.Option("decode", "--latency-metric", help="decode (ms per step) or prefill (ms)."),
    latency_context: int = typer.Option(128, "--latency-context", help="Context length of the latency model."),
    latency_batch: int = typer.Option(1, "--latency-batch", help="Batch size of the latency model."),
    latency_repeats: int = typer.Option(3, "--latency-repeats", help="Timings per measured shape (medians)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search in --out; finished candidates are kept."),
    resume_changed: bool = ResumeChanged,
    seq_len: int = SeqLen, num_samples: int = NumSamples, batch_size: int = BatchSize, seed: int = Seed,
    text_field: str = TextField, split: str = Split, dtype: str = Dtype, device: Optional[str] = Device,
    allow_pickle: bool = AllowPickle, trust_remote_code: bool = TrustRemote, overwrite: bool = Overwrite,
    quiet: bool = Quiet,
):
    """Search the best pruned architecture under a budget; the winner's plan goes to --out/plan.json."""
    from hyprune.search import search as run_search

    if data is None:
        _run(_fail, "search needs calibration text: pass --data FILE.")
    with _hf_progress(not quiet):
        report = _run(run_search, model, data, out, target_params=target_params, target_ratio=target_ratio,
                      target_active_params=target_active_params, target_memory=target_memory,
                      target_latency=target_latency, tolerance=tolerance, memory_context=memory_context,
                      memory_dtype=memory_dtype, memory_batch=memory_batch, space=space, min_fraction=min_fraction,
                      drop_blocks=drop_blocks, depth_method=depth_method, max_candidates=max_candidates, score=score,
                      top_k=top_k, distill_tokens=distill_tokens, distill_uniform=distill_uniform,
                      distill_batch=distill_batch, distill_lr=distill_lr,
                      eval_data=eval_data, eval_windows=eval_windows, seq_len=seq_len, num_samples=num_samples,
                      batch_size=batch_size, seed=seed, latency=latency, latency_shapes=latency_shapes,
                      latency_metric=latency_metric, latency_context=latency_context, latency_batch=latency_batch,
                      latency_repeats=latency_repeats, text_field=text_field, split=split,
                      resume=resume or resume_changed, allow_changed=resume_changed,
                      overwrite=overwrite, progress=not quiet,
                      **_load_kwargs(dtype, device, None, allow_pickle, trust_remote_code))
    for note in report["notes"]:
        out_console.print(f"note: {note}")
    winner = report["winner"]
    out_console.print(f"{report['evaluated']} candidates of {report['within_budget']} within the budget "
                      f"({report['shapes']} shapes); winner {winner['id']} with {winner['parameters']:,} parameters")
    out_console.print(f"plan: {out}/plan.json   report: {out}/report.md")


def _fail(message: str):
    raise HypruneError(message)


def main() -> None:  # pragma: no cover - entry point for `python -m hyprune`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
