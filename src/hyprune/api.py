"""The public workflow: score -> plan -> prune, and inspect.

Each function checks everything it can (paths, config, target, plan, data file) before it loads
weights or runs a forward pass, so a mistake costs seconds, not a sweep over a large model.
The CLI (`hyprune.cli`) is a thin shell over these functions.
"""

from __future__ import annotations

import warnings

import torch
import transformers
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.checkpoint import save_pruned
from hyprune.compat import probe_generate
from hyprune.data import calibration_windows, check_source
from hyprune.errors import HypruneError
from hyprune.io import atomic_dir, check_output
from hyprune.importance import activation_scores, load_scores, save_scores, summarize_scores
from hyprune.methods import Method, MethodOptions, get_method
from hyprune.models import count_parameters, load_config, load_model, load_tokenizer, savable
from hyprune.plan import Plan, load_plan_for, make_plan, parse_target, resolve_target, summarize
from hyprune.report import write_run_report


def _source(load_kwargs: dict) -> dict:
    """The keyword arguments that say where a model's config and tokenizer come from."""
    return {"trust_remote_code": load_kwargs.get("trust_remote_code", False), "gguf_file": load_kwargs.get("gguf_file")}


def score(
    model: str,
    data: str,
    out: str | None = None,
    seq_len: int = 256,
    num_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
    **load_kwargs,
) -> dict[str, torch.Tensor]:
    """Activation importance of every prunable structure of ``model`` on ``data``; saved to ``out`` if given."""
    config, family = load_config(model, **_source(load_kwargs))
    check_source(data)
    if out is not None:
        check_output(out, "dir", overwrite, inputs=(model, data))
    tokenizer = load_tokenizer(model, **_source(load_kwargs))
    windows = calibration_windows(tokenizer, data, seq_len, num_samples, seed=seed, text_field=text_field, split=split)
    loaded, family = load_model(model, **load_kwargs)
    scores = activation_scores(loaded, windows, family, batch_size=batch_size, progress=progress)
    if out is not None:
        summary = summarize_scores(scores, family, loaded.config)
        summary["calibration"] = {"data": str(data), "seq_len": seq_len, "windows": len(windows), "seed": seed}
        with atomic_dir(out) as tmp:
            save_scores(scores, tmp, summary)
    return scores


def plan(model: str, scores: str, target: str | dict, out: str | None = None, drop_blocks: list[int] | None = None,
         trust_remote_code: bool = False, gguf_file: str | None = None, overwrite: bool = False) -> Plan:
    """Write a plan from saved scores and a target (``"hidden_size=128,mamba_num_heads=8"``).

    ``out`` (a JSON file) must not exist unless ``overwrite``, and is never the model or the scores.
    """
    config, family = load_config(model, trust_remote_code, gguf_file)
    if out is not None:
        check_output(out, "file", overwrite, inputs=(model, scores))
    target = parse_target(target)
    resolve_target(family, config, target)
    result = make_plan(family, config, load_scores(scores, family, config), target, drop_blocks=drop_blocks)
    if out is not None:
        result.save(out)
    return result


def prune(
    model: str,
    out: str,
    data: str | None = None,
    target: str | dict | None = None,
    scores: str | None = None,
    plan_file: str | None = None,
    drop_blocks: int | None = None,
    drop_block_list: str | list[int] | None = None,
    depth_method: str = "block_influence",
    depth_mode: str = "lowest",
    method: str = "activation",
    options: MethodOptions | None = None,
    seq_len: int = 256,
    num_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
    **load_kwargs,
) -> dict:
    """Plan (width from ``target``, depth from ``drop_blocks``/``drop_block_list``) or take ``plan_file``,
    apply it and save the pruned checkpoint at ``out``.

    Width scores come from ``scores`` or a sweep over ``data``; depth scores (``depth_method``, on the
    unpruned model) from ``data``. ``method`` picks how (see `hyprune.methods`); the registered methods
    take their settings from ``options``. Returns the summary written to ``out/hyprune_summary.json``.
    """
    from hyprune import depth

    source = _source(load_kwargs)
    config, family = load_config(model, **source)
    check_output(out, "dir", overwrite, inputs=(model, data, scores, plan_file))
    registered = get_method(method)
    if registered is not None:
        if target or scores or plan_file or drop_blocks or drop_block_list:
            raise HypruneError(f"--method {method} decides what to cut itself; do not combine it with "
                               "--target, --scores, --plan or --drop-blocks.")
        return _prune_with_method(registered, model, out, data, options or MethodOptions(), config, family,
                                  dict(seq_len=seq_len, num_samples=num_samples, seed=seed, text_field=text_field,
                                       split=split), batch_size, overwrite, progress, load_kwargs)
    if method == "group-blind" and not target:
        raise HypruneError("--method group-blind ranks Mamba heads for a width --target; pass one.")
    the_plan = None
    target_dict = parse_target(target)
    if plan_file is not None:
        if target_dict or drop_blocks or drop_block_list:
            raise HypruneError("--plan already says what to cut; do not combine it with --target or --drop-blocks.")
        the_plan = load_plan_for(plan_file, family, config)
    elif not (target_dict or drop_blocks or drop_block_list):
        raise HypruneError("Nothing to prune: pass --target KEY=VALUE[,...], --drop-blocks N or --plan PLAN.json.")
    if drop_blocks and drop_block_list:
        raise HypruneError("Pass either --drop-blocks N (scored) or --drop-block-list I,J,... (explicit), not both.")
    if target_dict:
        resolve_target(family, config, target_dict)
    if drop_blocks:
        depth.check_depth_request(family, config, drop_blocks, depth_method, depth_mode)
    if drop_block_list:
        drop_block_list = depth.drop_blocks_from_list(drop_block_list, len(family.block_kinds(config)))
    width_sweep = bool(target_dict) and scores is None
    needs_data = width_sweep or bool(drop_blocks)
    if target_dict and scores is not None:
        saved = load_scores(scores, family, config)
    if needs_data:
        tokenizer, windows = _calibration(
            model, data, source, "Scoring needs calibration text: pass --data FILE (or --scores / --plan).",
            seq_len=seq_len, num_samples=num_samples, seed=seed, text_field=text_field, split=split)
    else:
        tokenizer, windows = _optional_tokenizer(model, source), None
    loaded, family = load_model(model, **load_kwargs)
    if the_plan is None:
        if target_dict:
            if width_sweep:
                saved = activation_scores(loaded, windows, family, batch_size=batch_size, progress=progress)
            the_plan = make_plan(family, loaded.config, saved, target_dict, method=method,
                                 group_aware=method != "group-blind")
        if drop_blocks:
            the_plan, block_scores = depth.depth_plan(loaded, drop_blocks, depth_method, depth_mode,
                                                      windows=windows, plan=the_plan, batch_size=batch_size,
                                                      progress=progress)
        elif drop_block_list:
            the_plan = depth.with_dropped_blocks(the_plan, drop_block_list, family, loaded.config)
    before = count_parameters(loaded, family)
    pruned = apply_plan(loaded, the_plan, family)
    after = count_parameters(pruned, family)
    summary = {"source": str(model), "method": {"name": method}, "parameters": {"before": before, "after": after},
               **summarize(the_plan), "generate": generate_check(pruned)}
    if target_dict:
        summary["importance"] = summarize_scores(saved, family, loaded.config)
    save_pruned(pruned, tokenizer, out, {"plan.json": the_plan.model_dump(exclude_none=True),
                                         "hyprune_summary.json": summary}, overwrite=overwrite)
    if drop_blocks:
        depth.save_block_scores(block_scores, out)
    write_run_report(out)
    return summary


def _prune_with_method(method: Method, model: str, out: str, data: str | None, options: MethodOptions, config,
                       family, window_kwargs: dict, batch_size: int, overwrite: bool, progress: bool,
                       load_kwargs: dict) -> dict:
    """`prune` for a registered method: check, (calibrate,) run, save."""
    method.check(family, config, options)
    source = _source(load_kwargs)
    if method.needs_data:
        tokenizer, windows = _calibration(model, data, source,
                                          f"--method {method.name} needs calibration text: pass --data FILE.",
                                          **window_kwargs)
    else:
        tokenizer, windows = _optional_tokenizer(model, source), None
    loaded, family = load_model(model, **load_kwargs)
    before = count_parameters(loaded, family)
    result = method.run(loaded, family, windows, options, batch_size=batch_size, progress=progress)
    summary = {"source": str(model), "method": {"name": method.name, **result.report},
               "parameters": {"before": before, "after": count_parameters(result.model, family)},
               "generate": generate_check(result.model)}
    extra = {"hyprune_summary.json": summary}
    if result.plan is not None:
        extra["plan.json"] = result.plan.model_dump(exclude_none=True)
        summary.update(summarize(result.plan))
    save_pruned(savable(result.model), tokenizer, out, extra, overwrite=overwrite)
    write_run_report(out)
    return summary


def generate_check(model) -> dict:
    """Whether stock ``generate()`` runs on the pruned model under the installed transformers.

    hyprune's own decoding works around known upstream bugs (`hyprune.compat`); a user's serving stack
    does not, so the summary says so (and the CLI prints it) rather than letting them find out later.
    """
    return {"transformers": transformers.__version__, "stock_generate_error": probe_generate(model)}


def _calibration(model: str, data: str | None, source: dict, missing: str, **window_kwargs):
    """The model's tokenizer and the calibration windows of ``data``; ``missing`` is the error without data."""
    if data is None:
        raise HypruneError(missing)
    check_source(data)
    tokenizer = load_tokenizer(model, **source)
    return tokenizer, calibration_windows(tokenizer, data, **window_kwargs)


def _optional_tokenizer(model: str, source: dict):
    """The tokenizer to copy into the output, or None (with a warning) when the source has none."""
    try:
        return load_tokenizer(model, **source)
    except HypruneError as e:
        warnings.warn(f"No tokenizer copied to the output: {e}", stacklevel=3)
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
