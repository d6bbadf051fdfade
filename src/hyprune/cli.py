"""Command line: one command per API function; the flags are the function's arguments.

Every `HypruneError` becomes a one-paragraph message on stderr and exit code 2; so does an `OSError`
from the file system (read-only folder, disk full, ...), as one line naming the path.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import json
import os
import sys
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from hyprune import api, report
from hyprune import depth as depth_lib
from hyprune import recipe as recipes
from hyprune.config import (
    BenchConfig,
    CacheConfig,
    DataConfig,
    EvalConfig,
    LoadConfig,
    PruneConfig,
    SearchConfig,
    TrainData,
    build,
    cli_meta,
    flag_of,
)
from hyprune.demo import run_demo
from hyprune.distill import cache_teacher as run_cache
from hyprune.distill import run_distill, run_finetune
from hyprune.distill.train import DistillConfig
from hyprune.errors import HypruneError
from hyprune.evaluate import bench as run_bench
from hyprune.evaluate import evaluate, format_bench_table
from hyprune.io import check_output, check_writable
from hyprune.kv.compress import compress as kv_compress_run
from hyprune.plan import parse_target
from hyprune.report import eval_report_paths
from hyprune.search import search as run_search
from hyprune.threads import set_threads

app = typer.Typer(help="Compress hybrid Mamba-2 / attention language models (Minitron-SSM).", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(stderr=True)
out_console = Console()


@app.callback()
def _setup(threads: Optional[int] = typer.Option(
        None, "--threads", help="CPU threads for torch (default: the free cores, one on a busy machine).")):
    """Compress hybrid Mamba-2 / attention language models (Minitron-SSM)."""
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


# Options from the configs ----------------------------------------------------------------------
# A command's options are the fields of the workflow configs it takes (`hyprune.config`): a parameter
# annotated with a config class stands for all of that class's fields (less `skip`), each an option
# ``--field-name`` (or its `Cli` flag) with the field's default and description. The command receives
# the validated config; a new option is written once, as a field.
ModelArg = typer.Argument(..., help="A local HF checkpoint folder or a hub id.")
Overwrite = typer.Option(False, "--overwrite", help="Replace an existing output (file or non-empty folder).")
Quiet = typer.Option(False, "--quiet", help="No progress bars.")


def _cli_type(annotation):
    """The type typer parses a field as: its own for plain ones, ``str`` for the rest (parsed later)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if len(args) == 1 and typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else annotation
    plain = base in (str, int, float, bool)
    return (base if plain else str), (len(args) < len(typing.get_args(annotation)) or not plain)


def field_option(cls, name: str, default=pyinspect.Parameter.empty) -> pyinspect.Parameter:
    """The typer parameter of field ``name`` of ``cls`` (``default`` overrides the field's)."""
    field, cli = cls.model_fields[name], cli_meta(cls.model_fields[name])
    kind, optional = _cli_type(field.annotation)
    if default is pyinspect.Parameter.empty:
        default = (cli.default if cli and cli.default is not None else None if field.default_factory else
                   ... if field.is_required() else field.default)
    help_text = field.description
    if cli and cli.argument:  # positional arguments are required
        info = typer.Argument(..., help=help_text)
        default = ...
    else:
        info = typer.Option(default, flag_of(cls, name), help=help_text)
    return pyinspect.Parameter(name, pyinspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=Optional[kind] if optional or default is None else kind)


def _field_value(cls, name: str, value):
    cli = cli_meta(cls.model_fields[name])
    return cli.parse(value) if cli and cli.parse and isinstance(value, str) else value


def config_command(name: str | None = None, skip: dict | None = None, defaults: dict | None = None,
                   unvalidated: tuple = ()):
    """`app.command` for a function whose config-annotated parameters become their fields' options.

    ``skip``: per config class, fields it has no option for (each list commented where it is given);
    ``defaults``: CLI defaults that differ from the field's; ``unvalidated``: classes passed on as a
    dict of the given values, for a callee that validates them itself (with its own message).
    """
    skip, defaults = skip or {}, defaults or {}

    def decorate(fn):
        hints = typing.get_type_hints(fn)
        params, sections = [], {}
        for pname, param in pyinspect.signature(fn).parameters.items():
            cls = hints.get(pname)
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                names = [f for f in cls.model_fields if f not in skip.get(cls, ())]
                sections[pname] = (cls, names)
                params += [field_option(cls, f, defaults.get(f, pyinspect.Parameter.empty))
                           for f in names if f not in {p.name for p in params}]
            else:
                params.append(param.replace(annotation=hints.get(pname, param.annotation),
                                            kind=pyinspect.Parameter.KEYWORD_ONLY))
        params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))

        @functools.wraps(fn)
        def command(**kwargs):
            configs = {}
            for pname, (cls, names) in sections.items():
                given = {f: _run(_field_value, cls, f, kwargs[f]) for f in names
                         if not (kwargs[f] is None and cls.model_fields[f].default_factory)}
                configs[pname] = (given if cls in unvalidated else
                                  _run(build, cls, None, f"hyprune {name or fn.__name__}", **given))
            used = {f for _, names in sections.values() for f in names}
            return fn(**configs, **{k: v for k, v in kwargs.items() if k not in used})

        command.__signature__ = pyinspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__wrapped_fields__ = sections  # for the coverage test
        return app.command(name)(command)

    return decorate


TrustRemote = field_option(LoadConfig, "trust_remote_code").default  # for the commands without a LoadConfig
GgufFile = field_option(LoadConfig, "gguf_file").default


def cli_fields(command) -> dict[type, list[str]]:
    """Per config class, the fields ``command`` (a `config_command`) has options for."""
    return {cls: names for cls, names in command.__wrapped_fields__.values()}


@contextmanager
def _hf_progress(enabled: bool):
    """--quiet also silences transformers' own progress bars (loading and writing weights)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


@config_command()
def score(
    load: LoadConfig, calibration: DataConfig,
    out: str = typer.Option(..., "--out", help="Folder for scores.safetensors and scores.json."),
    overwrite: bool = Overwrite, quiet: bool = Quiet,
    depth: Optional[str] = typer.Option(None, "--depth", help="Score whole blocks instead: block_influence, "
                                        "angular, kl or lm_loss (writes block_scores.json and a plot)."),
    window: int = typer.Option(1, "--window", help="With --depth angular: blocks per scored window."),
):
    """Score every prunable structure from activations (one forward sweep), or whole blocks (--depth)."""
    if calibration.data is None:
        _run(_fail, "score needs calibration text: pass --data FILE.")
    with _hf_progress(not quiet):
        if depth is None:
            _run(api.score, load.model, calibration.data, out, calibration=calibration, load=load,
                 overwrite=overwrite, progress=not quiet)
        else:
            result = _run(api.score_depth, load.model, calibration.data, depth, out, window=window,
                          calibration=calibration, load=load, overwrite=overwrite, progress=not quiet)
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
    result = _run(api.write_plan, model, scores, _run(parse_target, target), out, trust_remote_code=trust_remote_code,
                  gguf_file=gguf_file, overwrite=overwrite)
    sizes = result.result_sizes()
    out_console.print(f"plan written to {out}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


@config_command()
def prune(
    load: LoadConfig, calibration: DataConfig, config: PruneConfig,
    out: str = typer.Option(..., "--out", help="Output folder: the pruned HF checkpoint."),
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Score, plan and apply in one go (or apply --plan) and save an ordinary HF checkpoint."""
    with _hf_progress(not quiet):
        summary = _run(api.prune, load.model, out, config, calibration=calibration, load=load, overwrite=overwrite,
                       progress=not quiet)
    _print_prune_summary(summary, out)


def _print_prune_summary(summary: dict, out: str) -> None:
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
ResumeChanged = typer.Option(False, "--resume-changed", help="--resume even though settings or inputs changed "
                             "since the saved run (the changes are printed and logged).")
# DistillConfig fields without an option: set from Python or a recipe only (optimizer details, the block
# map a --plan gives, evaluation batch, log cadence); `progress` is --quiet
DISTILL_NOT_ON_CLI = ("weight_decay", "betas", "grad_clip", "hidden_alpha", "block_map", "teacher_channels",
                      "eval_windows", "eval_batch", "log_every", "progress")
# fine-tuning is the plain LM loss on one model: no loss settings, no teacher plan, no FSDP option
FINETUNE_NOT_ON_CLI = DISTILL_NOT_ON_CLI + ("loss", "temperature", "beta", "ce_weight", "hidden_loss", "plan",
                                            "fsdp")
# the models are --teacher/--student (distill) or the MODEL argument (finetune); one device, no GGUF;
# no --stream anywhere but score and prune: training, evaluation, bench and search hold the whole model
TRAIN_LOAD_NOT_ON_CLI = ("model", "device_map", "gguf_file", "stream")


def _print_training_summary(summary: dict, out: str) -> None:
    keys = ("steps", "tokens", "loss", "student_perplexity", "teacher_perplexity")
    out_console.print(", ".join(f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary[k]}"
                                for k in keys if summary.get(k) is not None))
    out_console.print(f"final model: {out}/final   log: {out}/log.jsonl   report: {out}/report.md", soft_wrap=True)


@config_command(skip={LoadConfig: TRAIN_LOAD_NOT_ON_CLI, DistillConfig: DISTILL_NOT_ON_CLI,
                      }, unvalidated=(DistillConfig,))
def distill(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher checkpoint (not needed with a top-k cache)."),
    student: str = typer.Option(..., "--student", help="Student checkpoint, e.g. the output of `hyprune prune`."),
    load: LoadConfig = None, text: TrainData = None, settings: DistillConfig = None,
    out: str = typer.Option(..., "--out", help="Run folder: final/, checkpoints/, log.jsonl."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in --out."),
    resume_changed: bool = ResumeChanged, overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Distill a (pruned) student from its teacher with logit KD (forward KL by default)."""
    if teacher is None and not (text.data and Path(text.data).is_dir()):
        _run(_fail, "distill needs --teacher (or --data pointing at a top-k cache from `hyprune cache-teacher`).")
    with _hf_progress(not quiet):
        summary = _run(run_distill, teacher, student, text.data, out=out, resume=resume or resume_changed,
                       allow_changed=resume_changed, eval_data=text.eval_data, text_field=text.text_field,
                       split=text.split, overwrite=overwrite, **load.load_kwargs(exclude=TRAIN_LOAD_NOT_ON_CLI),
                       **settings, progress=not quiet)
    _print_training_summary(summary, out)


@config_command(name="kv-compress", skip={LoadConfig: TRAIN_LOAD_NOT_ON_CLI, DistillConfig: DISTILL_NOT_ON_CLI},
                unvalidated=(DistillConfig,))
def kv_compress(
    model: str = ModelArg,
    method: str = typer.Option("dms", "--method", help="dms (delayed eviction) or dmc (merging)."),
    ratio: float = typer.Option(4.0, "--ratio", help="KV-cache compression target (4 keeps a quarter)."),
    window: int = typer.Option(16, "--window", help="DMS: tokens a query always sees before eviction applies."),
    offset: float = typer.Option(3.0, "--offset", help="decision = sigmoid(standardized k_0 - offset); 3 drops ~0.1% of tokens at the start."),
    ratio_weight: float = typer.Option(10.0, "--ratio-weight", help="weight of the ratio term next to the KD loss."),
    ramp: float = typer.Option(0.5, "--ramp", help="share of training over which the target ramps from 1x."),
    decisions_only: bool = typer.Option(False, "--decisions-only", help="train only the key projections."),
    load: LoadConfig = None, text: TrainData = None, settings: DistillConfig = None,
    out: str = typer.Option(..., "--out", help="Run folder: final/ (the checkpoint), checkpoints/, log.jsonl."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in --out."),
    resume_changed: bool = ResumeChanged, overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Retrofit DMC / DMS KV-cache compression by distillation from the uncompressed model (OUT/final; load it
    with from_pretrained, then hyprune.kv.enable(model))."""
    with _hf_progress(not quiet):
        summary = _run(kv_compress_run, model, text.data, out, method=method, ratio=ratio, window=window, offset=offset,
                       ratio_weight=ratio_weight, ramp=ramp, decisions_only=decisions_only,
                       resume=resume or resume_changed, allow_changed=resume_changed, eval_data=text.eval_data,
                       text_field=text.text_field, split=text.split, overwrite=overwrite,
                       **load.load_kwargs(exclude=TRAIN_LOAD_NOT_ON_CLI), **settings, progress=not quiet)
    _print_training_summary(summary, out)
    out_console.print(f"KV cache kept share at the end: {summary['kv_kept_share']:.3f} (target {1 / ratio:.3f})")


@config_command(skip={LoadConfig: TRAIN_LOAD_NOT_ON_CLI, DistillConfig: FINETUNE_NOT_ON_CLI,
                      }, unvalidated=(DistillConfig,))
def finetune(
    model: str = ModelArg,
    load: LoadConfig = None, text: TrainData = None, settings: DistillConfig = None,
    out: str = typer.Option(..., "--out", help="Run folder: final/, checkpoints/, log.jsonl."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest valid checkpoint in --out."),
    resume_changed: bool = ResumeChanged, overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Teacher correction: fine-tune a model with the plain LM loss on the distillation data."""
    with _hf_progress(not quiet):
        summary = _run(run_finetune, model, text.data, out=out, resume=resume or resume_changed,
                       allow_changed=resume_changed, eval_data=text.eval_data, text_field=text.text_field,
                       split=text.split, overwrite=overwrite, **load.load_kwargs(exclude=TRAIN_LOAD_NOT_ON_CLI),
                       **settings, progress=not quiet)
    _print_training_summary(summary, out)


@config_command("cache-teacher", skip={LoadConfig: ("device_map", "gguf_file", "stream")})
def cache_teacher(
    load: LoadConfig, config: CacheConfig,
    out: str = typer.Option(..., "--out", help="Cache folder (sharded safetensors + manifest)."),
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Precompute the teacher's top-k log-probabilities, to distill without the teacher in memory."""
    with _hf_progress(not quiet):
        path = _run(run_cache, load.model, config, out=out, load=load, overwrite=overwrite, progress=not quiet)
    out_console.print(f"teacher top-{config.k} cache written to {path}")


# Evaluation ------------------------------------------------------------------------------------
@config_command("eval", skip={LoadConfig: ("stream",)})
def eval_command(
    load: LoadConfig, config: EvalConfig,
    out: str = typer.Option(..., "--out", help="RESULTS.json (perplexity, tokens, tasks...)."),
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Perplexity on local text and/or lm-evaluation-harness tasks, as JSON (and a report next to it)."""
    with _hf_progress(not quiet):
        result = _run(evaluate, load.model, config, out=out, load=load, overwrite=overwrite, progress=not quiet)
    if result.get("perplexity") is not None:
        out_console.print(f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens")
    for name, task in (result.get("tasks") or {}).items():
        scores = ", ".join(f"{k}={task[k]:.4f}" for k in ("acc", "acc_norm") if task.get(k) is not None)
        out_console.print(f"{name} ({task.get('shots')}-shot): {scores}")
    folder, stem = eval_report_paths(out)
    out_console.print(f"results written to {out}   report: {folder / stem}.md", soft_wrap=True)


# bench loads every model alike: no MODEL argument of the LoadConfig (the models are an argument list),
# and no --device-map (the models are measured on one device), no --stream
@config_command(skip={LoadConfig: ("model", "device_map", "stream")})
def bench(
    models: list[str] = typer.Argument(..., help="One model, or two to compare (ratios B / A)."),
    load: LoadConfig = None, config: BenchConfig = None,
    out: str = typer.Option(..., "--out", help="BENCH.json."),
    overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Prefill and decode speed, latency, peak memory and cache bytes; two models side by side."""
    if len(models) > 2:
        _run(_fail, f"bench compares at most two models; got {len(models)}.")
    with _hf_progress(not quiet):
        result = _run(run_bench, models, config, out=out, load=load, overwrite=overwrite, progress=not quiet)
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
    with _hf_progress(not quiet):
        _run(run_demo, out, train_tokens=train_tokens, overwrite=overwrite, distill_tokens=distill_tokens,
             progress=not quiet)


# Architecture search ---------------------------------------------------------------------------
# search reads one model on one device: no --device-map, no --gguf-file (and no --stream)
@config_command(skip={LoadConfig: ("device_map", "gguf_file", "stream")})
def search(
    load: LoadConfig, calibration: DataConfig, config: SearchConfig,
    out: str = typer.Option(..., "--out", help="Run folder: plan.json, candidates.json, report.md/json, ranking.png."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search in --out; finished candidates are kept."),
    resume_changed: bool = ResumeChanged, overwrite: bool = Overwrite, quiet: bool = Quiet,
):
    """Search the best pruned architecture under a budget; the winner's plan goes to --out/plan.json."""
    if calibration.data is None:
        _run(_fail, "search needs calibration text: pass --data FILE.")
    with _hf_progress(not quiet):
        report = _run(run_search, load.model, calibration.data, out, config, calibration=calibration, load=load,
                      resume=resume or resume_changed, allow_changed=resume_changed, overwrite=overwrite,
                      progress=not quiet)
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
