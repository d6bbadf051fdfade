"""The public workflow: score -> plan -> prune, and inspect.

Each function checks everything it can (paths, config, target, plan, data file) before it loads
weights or runs a forward pass, so a mistake costs seconds, not a sweep over a large model.
The CLI (`hyprune.cli`) is a thin shell over these functions.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.checkpoint import check_output_dir, save_pruned
from hyprune.data import calibration_windows, check_source
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores, load_scores, save_scores, summarize_scores
from hyprune.models import count_parameters, load_config, load_model, load_tokenizer
from hyprune.plan import Plan, load_plan_for, make_plan, parse_target, resolve_target, summarize


def _model_kwargs(dtype="float32", device=None, device_map=None, allow_pickle=False, trust_remote_code=False):
    return dict(dtype=dtype, device=device, device_map=device_map, allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code)


def _calibration(model_id, data, seq_len, num_samples, seed, text_field, split, trust_remote_code):
    tokenizer = load_tokenizer(model_id, trust_remote_code)
    windows = calibration_windows(tokenizer, data, seq_len, num_samples, seed=seed, text_field=text_field, split=split)
    return tokenizer, windows


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
    config, family = load_config(model, load_kwargs.get("trust_remote_code", False))
    check_source(data)
    if out is not None:
        check_output_dir(out, overwrite, inputs=(model, data))
    _, windows = _calibration(model, data, seq_len, num_samples, seed, text_field, split,
                              load_kwargs.get("trust_remote_code", False))
    loaded, family = load_model(model, **_model_kwargs(**load_kwargs))
    scores = activation_scores(loaded, windows, family, batch_size=batch_size, progress=progress)
    if out is not None:
        summary = summarize_scores(scores, family, loaded.config)
        summary["calibration"] = {"data": str(data), "seq_len": seq_len, "windows": len(windows), "seed": seed}
        save_scores(scores, out, summary)
    return scores


def plan(model: str, scores: str, target: str | dict, out: str | None = None, drop_blocks: list[int] | None = None,
         trust_remote_code: bool = False) -> Plan:
    """Write a plan from saved scores and a target (``"hidden_size=128,mamba_num_heads=8"``)."""
    config, family = load_config(model, trust_remote_code)
    target = parse_target(target)
    resolve_target(family, config, target)
    result = make_plan(family, config, load_scores(scores, family, config), target, drop_blocks=drop_blocks)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
    return result


def prune(
    model: str,
    out: str,
    data: str | None = None,
    target: str | dict | None = None,
    scores: str | None = None,
    plan_file: str | None = None,
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
    """Score (unless given scores or a plan), plan, apply and save the pruned checkpoint at ``out``.

    Returns the summary written to ``out/hyprune_summary.json``.
    """
    trust = load_kwargs.get("trust_remote_code", False)
    config, family = load_config(model, trust)
    check_output_dir(out, overwrite, inputs=(model, data, scores, plan_file))
    the_plan = None
    if plan_file is not None:
        the_plan = load_plan_for(plan_file, family, config)
    else:
        target_dict = parse_target(target)
        if not target_dict:
            raise HypruneError("Nothing to prune: pass --target KEY=VALUE[,...] or --plan PLAN.json.")
        resolve_target(family, config, target_dict)
        if scores is not None:
            saved = load_scores(scores, family, config)
        elif data is None:
            raise HypruneError("Scoring needs calibration text: pass --data FILE (or --scores / --plan).")
        else:
            check_source(data)
    needs_data = the_plan is None and scores is None
    tokenizer = load_tokenizer(model, trust) if needs_data else _optional_tokenizer(model, trust)
    loaded, family = load_model(model, **_model_kwargs(**load_kwargs))
    if the_plan is None:
        if scores is None:
            _, windows = _calibration(model, data, seq_len, num_samples, seed, text_field, split, trust)
            saved = activation_scores(loaded, windows, family, batch_size=batch_size, progress=progress)
        the_plan = make_plan(family, loaded.config, saved, target_dict)
    before = count_parameters(loaded, family)
    pruned = apply_plan(loaded, the_plan, family)
    after = count_parameters(pruned, family)
    summary = {"source": str(model), "parameters": {"before": before, "after": after}, **summarize(the_plan)}
    save_pruned(pruned, tokenizer, out, {"plan.json": the_plan.model_dump(exclude_none=True),
                                         "hyprune_summary.json": summary}, overwrite=overwrite)
    return summary


def _optional_tokenizer(model: str, trust_remote_code: bool):
    """The tokenizer to copy into the output, or None (with a warning) when the source has none."""
    try:
        return load_tokenizer(model, trust_remote_code)
    except HypruneError as e:
        warnings.warn(f"No tokenizer copied to the output: {e}", stacklevel=3)
        return None


def inspect_model(model: str, scores: str | None = None, trust_remote_code: bool = False) -> dict:
    """Family, layer pattern, parameters per component (counted on the meta device: no weights read)."""
    config, family = load_config(model, trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    kinds = family.block_kinds(config)
    letters = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
    info = {
        "family": family.name,
        "pattern": "".join(letters[k] for k in kinds),
        "blocks": len(kinds),
        "sizes": {family.fields[a]: v for a, v in family.sizes(config).items()},
        "parameters": count_parameters(skeleton, family),
        "notes": list(family.notes),
    }
    if scores is not None:
        info["importance"] = summarize_scores(load_scores(scores, family, config), family, config)
    return info
