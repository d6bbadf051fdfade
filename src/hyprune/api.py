"""The public workflow: score -> write_plan -> prune, and inspect.

Each function checks everything it can (paths, config, target, plan, data file) before it loads
weights or runs a forward pass, so a mistake costs seconds, not a sweep over a large model.
The CLI (`hyprune.cli`) is a thin shell over these functions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM

from hyprune import depth
from hyprune.apply import apply_plan
from hyprune.checkpoint import save_pruned
from hyprune.compat import probe_generate
from hyprune.config import DataConfig, LoadConfig, PruneConfig, resolve
from hyprune.data import calibration_windows, check_source
from hyprune.errors import HypruneError
from hyprune.importance import load_scores, save_scores, summarize_scores
from hyprune.io import atomic_dir, check_output
from hyprune.methods import Method, get_method
from hyprune.models import count_parameters, load_config, load_model, load_tokenizer, savable
from hyprune.plan import Plan, load_plan_for, make_plan, parse_target, resolve_target, summarize
from hyprune.report import write_run_report
from hyprune.source import open_source
from hyprune.stream.apply import stream_apply
from hyprune.stream.choice import should_stream
from hyprune.stream.sparsify import STREAMED_METHODS, stream_sparsify


def score(model: str, data: str, out: str | None = None, *, calibration: DataConfig | None = None,
          load: LoadConfig | None = None, overwrite: bool = False, progress: bool = True,
          **fields) -> dict[str, torch.Tensor]:
    """Activation importance of every prunable structure of ``model`` on ``data``; saved to ``out`` if given.

    ``fields`` are `DataConfig` (seq_len, num_samples, batch_size, seed, ...) and `LoadConfig` (dtype,
    device, stream, ...) fields, or pass ``calibration`` / ``load`` configs. With ``stream`` (or when the
    weights would not fit in memory) the model is read block by block (`hyprune.stream`).
    """
    calibration, load = resolve("score", {**fields, "data": data, "model": model}, (DataConfig, calibration),
                                (LoadConfig, load))
    config, family = load_config(model, **load.source())
    streamed = should_stream(load)
    windows = _scoring_windows(model, data, out, overwrite, calibration, load)
    source = open_source(load, calibration.batch_size, progress, streamed)
    scores = source.activation_scores(windows)
    if out is not None:
        summary = summarize_scores(scores, family, source.config)
        summary["calibration"] = {"data": str(data), "seq_len": calibration.seq_len, "windows": len(windows),
                                  "seed": calibration.seed, "streamed": streamed}
        with atomic_dir(out) as tmp:
            save_scores(scores, tmp, summary)
    return scores


def score_depth(model: str, data: str, method: str = "block_influence", out: str | None = None, *, window: int = 1,
                calibration: DataConfig | None = None, load: LoadConfig | None = None, overwrite: bool = False,
                progress: bool = True, **fields) -> depth.BlockScores:
    """Score every block of ``model`` on ``data`` with ``method``; write the ranking to ``out`` if given.

    ``out`` receives ``block_scores.json`` and ``block_scores.png`` (written to a temporary folder and
    renamed into place). ``fields`` are `DataConfig` (seq_len, num_samples, batch_size, seed, ...) and
    `LoadConfig` (dtype, device, stream, ...) fields, or pass ``calibration`` / ``load`` configs. Everything
    cheap is checked before the weights are read.
    """
    calibration, load = resolve("score --depth", {**fields, "data": data, "model": model},
                                (DataConfig, calibration), (LoadConfig, load))
    depth.check_method(method)
    if window != 1 and method != "angular":
        raise HypruneError(f"--window applies to the angular method only, not '{method}'.")
    config, family = load_config(model, **load.source())
    num_blocks = len(family.block_kinds(config))
    if not 1 <= window <= num_blocks:
        raise HypruneError(f"--window must be between 1 and the number of blocks ({num_blocks}); got {window}.")
    streamed = should_stream(load)
    windows = _scoring_windows(model, data, out, overwrite, calibration, load)
    result = open_source(load, calibration.batch_size, progress, streamed).block_scores(windows, method, window)
    result.calibration = {"model": str(model), "data": str(data), "seq_len": calibration.seq_len,
                          "windows": len(windows), "seed": calibration.seed}
    if out is not None:
        with atomic_dir(out) as tmp:
            depth.save_block_scores(result, tmp)
    return result


def _scoring_windows(model: str, data: str, out: str | None, overwrite: bool, calibration: DataConfig,
                     load: LoadConfig) -> torch.Tensor:
    """The data and the output checked, then the calibration windows: all before any weights are read."""
    check_source(data)
    if out is not None:
        check_output(out, "dir", overwrite, inputs=(model, data))
    tokenizer = load_tokenizer(model, **load.source())
    return calibration_windows(tokenizer, data, **calibration.window_kwargs())


def write_plan(model: str, scores: str, target: dict[str, int], out: str | None = None,
               drop_blocks: list[int] | None = None, trust_remote_code: bool = False, gguf_file: str | None = None,
               overwrite: bool = False) -> Plan:
    """A plan from saved scores and a ``target`` (``{"hidden_size": 128, "mamba_num_heads": 8}``), written to ``out``.

    ``out`` (a JSON file) must not exist unless ``overwrite``, and is never the model or the scores.
    """
    config, family = load_config(model, trust_remote_code, gguf_file)
    if out is not None:
        check_output(out, "file", overwrite, inputs=(model, scores))
    target = parse_target(target)  # checks a dict's values are whole numbers
    resolve_target(family, config, target)
    result = make_plan(family, config, load_scores(scores, family, config), target, drop_blocks=drop_blocks)
    if out is not None:
        result.save(out)
    return result


@dataclass
class _PruneJob:
    """One `prune` call, its three configs resolved and the source config read."""

    out: str
    prune: PruneConfig
    calibration: DataConfig
    load: LoadConfig
    overwrite: bool
    progress: bool
    config: object = None
    family: object = None
    streamed: bool = False

    @property
    def model(self) -> str:
        return self.load.model


def prune(model: str, out: str, config: PruneConfig | None = None, *, calibration: DataConfig | None = None,
          load: LoadConfig | None = None, overwrite: bool = False, progress: bool = True, **fields) -> dict:
    """Plan (width from ``target``, depth from ``drop_blocks``/``drop_block_list``) or take ``plan_file``,
    apply it and save the pruned checkpoint at ``out``.

    Width scores come from ``scores`` or a sweep over ``data``; depth scores (``depth_method``, on the
    unpruned model) from ``data``. ``method`` picks how (see `hyprune.methods`); the registered methods
    take their settings from the `PruneConfig` fields sparsity, nm, targets and ratio. ``fields`` are
    fields of `PruneConfig`, `DataConfig` and `LoadConfig` (or pass the configs). Returns the summary
    written to ``out/hyprune_summary.json``.
    """
    config, calibration, load = resolve("prune", {**fields, "model": model}, (PruneConfig, config),
                                        (DataConfig, calibration), (LoadConfig, load))
    job = _PruneJob(str(out) if not isinstance(out, str) else out, config, calibration, load, overwrite, progress)
    job.config, job.family = load_config(model, **load.source())
    check_output(out, "dir", overwrite, inputs=(model, calibration.data, config.scores, config.plan_file))
    job.streamed = should_stream(load)
    registered = get_method(config.method)
    if registered is not None:
        if job.streamed and registered.name not in STREAMED_METHODS:
            raise HypruneError(
                f"--method {registered.name} needs the whole model in memory (the structured SSM methods take "
                "gradients or statistics across the network). Prune in memory (--no-stream), or with --stream use "
                f"the activation method, depth pruning, --plan, or --method {'/'.join(STREAMED_METHODS)}.")
        return _prune_with_method(registered, job)
    return _prune_with_plan(job)


def _check_plan_request(job: _PruneJob) -> None:
    """The combinations `prune` refuses, and the target and depth request checked against the config."""
    p, family, config = job.prune, job.family, job.config
    if p.method == "group-blind" and not p.target:
        raise HypruneError("--method group-blind ranks Mamba heads for a width --target; pass one.")
    if p.plan_file is not None:
        if p.target or p.drop_blocks or p.drop_block_list:
            raise HypruneError("--plan already says what to cut; do not combine it with --target or --drop-blocks.")
    elif not (p.target or p.drop_blocks or p.drop_block_list):
        raise HypruneError("Nothing to prune: pass --target KEY=VALUE[,...], --drop-blocks N or --plan PLAN.json.")
    if p.drop_blocks and p.drop_block_list:
        raise HypruneError("Pass either --drop-blocks N (scored) or --drop-block-list I,J,... (explicit), not both.")
    if p.target:
        resolve_target(family, config, parse_target(p.target))
    if p.drop_blocks:
        depth.check_depth_request(family, config, p.drop_blocks, p.depth_method, p.depth_mode)


def _prune_with_plan(job: _PruneJob) -> dict:
    """`prune` by a plan: loaded (``plan_file``) or made from width scores and/or depth scores, on the model
    loaded whole or read block by block (`hyprune.source`)."""
    _check_plan_request(job)
    p, family = job.prune, job.family
    target = parse_target(p.target)
    drop_list = (depth.drop_blocks_from_list(p.drop_block_list, len(family.block_kinds(job.config)))
                 if p.drop_block_list else None)
    the_plan = load_plan_for(p.plan_file, family, job.config) if p.plan_file is not None else None
    width_sweep = bool(target) and p.scores is None
    saved = load_scores(p.scores, family, job.config) if target and p.scores is not None else None
    if width_sweep or p.drop_blocks:
        tokenizer, windows = _calibration(job, "Scoring needs calibration text: pass --data FILE "
                                               "(or --scores / --plan).")
    else:
        tokenizer, windows = _optional_tokenizer(job), None
    source = open_source(job.load, job.calibration.batch_size, job.progress, job.streamed)
    block_scores = None
    if the_plan is None:
        if target:
            saved = source.activation_scores(windows) if width_sweep else saved
            the_plan = make_plan(family, source.config, saved, target, method=p.method,
                                 group_aware=p.method != "group-blind")
        if p.drop_blocks:
            block_scores = source.block_scores(windows, p.depth_method,
                                               depth.depth_window(p.depth_method, p.depth_mode, p.drop_blocks))
            the_plan = depth.plan_from_block_scores(family, source.config, block_scores, p.drop_blocks, p.depth_mode,
                                                    the_plan)
        elif drop_list:
            the_plan = depth.with_dropped_blocks(the_plan, drop_list, family, source.config)
    importance = summarize_scores(saved, family, source.config) if target else None
    summary = (_stream_and_save(job, the_plan, importance) if source.streamed else
               _apply_and_save(job, source.model, family, the_plan, tokenizer, importance))
    if block_scores is not None:
        depth.save_block_scores(block_scores, job.out)
    write_run_report(job.out)
    return summary


def _apply_and_save(job: _PruneJob, loaded, family, the_plan: Plan, tokenizer, importance: dict | None) -> dict:
    before = count_parameters(loaded, family)
    pruned = apply_plan(loaded, the_plan, family)
    after = count_parameters(pruned, family)
    summary = {"source": str(job.model), "method": {"name": job.prune.method},
               "parameters": {"before": before, "after": after}, **summarize(the_plan),
               "generate": generate_check(pruned)}
    if importance is not None:
        summary["importance"] = importance
    save_pruned(pruned, tokenizer, job.out, {"plan.json": the_plan.model_dump(exclude_none=True),
                                             "hyprune_summary.json": summary}, overwrite=job.overwrite)
    return summary


def _stream_and_save(job: _PruneJob, the_plan: Plan, importance: dict | None) -> dict:
    """The plan applied shard to shard (`hyprune.stream.apply`); the summary says generate was not probed
    (that would load the pruned model whole)."""
    extra = {"method": {"name": job.prune.method}, "generate": generate_check(None)}
    if importance is not None:
        extra["importance"] = importance
    return stream_apply(job.model, the_plan, job.out, overwrite=job.overwrite, progress=job.progress, summary=extra)


def _prune_with_method(method: Method, job: _PruneJob) -> dict:
    """`prune` for a registered method: check, (calibrate,) run, save."""
    p = job.prune
    if p.target or p.scores or p.plan_file or p.drop_blocks or p.drop_block_list:
        raise HypruneError(f"--method {method.name} decides what to cut itself; do not combine it with "
                           "--target, --scores, --plan or --drop-blocks.")
    options = p.method_options(seed=job.calibration.seed)
    method.check(job.family, job.config, options)
    if method.needs_data:
        tokenizer, windows = _calibration(job, f"--method {method.name} needs calibration text: pass --data FILE.")
    else:
        tokenizer, windows = _optional_tokenizer(job), None
    if job.streamed:
        return _sparsify_streamed(method, job, options, windows)
    loaded, family = load_model(job.model, **job.load.load_kwargs())
    before = count_parameters(loaded, family)
    result = method.run(loaded, family, windows, options, batch_size=job.calibration.batch_size,
                        progress=job.progress)
    summary = {"source": str(job.model), "method": {"name": method.name, **result.report},
               "parameters": {"before": before, "after": count_parameters(result.model, family)},
               "generate": generate_check(result.model)}
    extra = {"hyprune_summary.json": summary}
    if result.plan is not None:
        extra["plan.json"] = result.plan.model_dump(exclude_none=True)
        summary.update(summarize(result.plan))
    save_pruned(savable(result.model), tokenizer, job.out, extra, overwrite=job.overwrite)
    write_run_report(job.out)
    return summary


def _sparsify_streamed(method: Method, job: _PruneJob, options, windows) -> dict:
    """A sparsity method block by block (`hyprune.stream.sparsify`): the same tensors as in memory."""
    with torch.device("meta"):  # the architecture does not change: one count, from the config
        parameters = count_parameters(AutoModelForCausalLM.from_config(job.config), job.family)
    summary = {"parameters": {"before": parameters, "after": parameters}, "generate": generate_check(None)}
    report = stream_sparsify(job.model, job.out, method.name, options, windows, batch_size=job.calibration.batch_size,
                             device=job.load.device or "cpu", dtype=job.load.dtype, overwrite=job.overwrite,
                             progress=job.progress, summary=summary)
    summary = {"source": str(job.model), "streamed": True, "method": {"name": method.name, **report}, **summary}
    write_run_report(job.out)
    return summary


def generate_check(model) -> dict:
    """Whether stock ``generate()`` runs on the pruned model under the installed transformers.

    hyprune's own decoding works around known upstream bugs (`hyprune.compat`); a user's serving stack
    does not, so the summary says so (and the CLI prints it) rather than letting them find out later.
    ``model`` None (a streamed prune, whose result is never loaded whole): not probed, and said so.
    """
    if model is None:
        return {"transformers": transformers.__version__, "stock_generate_error": None, "probed": False}
    return {"transformers": transformers.__version__, "stock_generate_error": probe_generate(model)}


def _calibration(job: _PruneJob, missing: str):
    """The model's tokenizer and the calibration windows of the job's data; ``missing`` is the error without data."""
    data = job.calibration.data
    if data is None:
        raise HypruneError(missing)
    check_source(data)
    tokenizer = load_tokenizer(job.model, **job.load.source())
    return tokenizer, calibration_windows(tokenizer, data, **job.calibration.window_kwargs())


def _optional_tokenizer(job: _PruneJob):
    """The tokenizer to copy into the output, or None (with a warning) when the source has none."""
    try:
        return load_tokenizer(job.model, **job.load.source())
    except HypruneError as e:
        warnings.warn(f"No tokenizer copied to the output: {e}", stacklevel=4)
        return None


def inspect_model(model: str, scores: str | None = None, trust_remote_code: bool = False,
                  gguf_file: str | None = None) -> dict:
    """Family, layer pattern, parameters per component (counted on the meta device: no weights read)."""
    config, family = load_config(model, trust_remote_code, gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    kinds = family.block_kinds(config)
    info = {
        "family": family.name,
        "pattern": "".join(family.letter(k) for k in kinds),
        "blocks": len(kinds),
        "sizes": {family.fields[a]: v for a, v in family.sizes(config).items()},
        "parameters": count_parameters(skeleton, family),
        "notes": list(family.notes),
    }
    if scores is not None:
        info["importance"] = summarize_scores(load_scores(scores, family, config), family, config)
    return info
