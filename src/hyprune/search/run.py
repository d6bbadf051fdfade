"""`hyprune search`: find the best architecture under a budget (Minitron NAS, Minitron-SSM).

    enumerate shapes (config only) -> keep those within the budget -> one importance sweep
    -> for every candidate: plan, cut, zero-shot LM loss (or KL to the teacher) on held-out windows
    -> the top-k by that score: a short distillation each, the same token budget and data for all
    -> final ranking: distilled candidates by their post-distillation score, then the rest

Everything about the request (budget, bounds, output folder) is checked from the config before any
weights are read. The run folder holds the state (``state.json``, rewritten atomically after every
candidate, so an interrupted search resumes where it stopped with ``resume=True``), the scores of the
one sweep, the short-distillation runs (``kd/``), and the results: ``plan.json`` (the winner, for
``hyprune prune MODEL --plan``), ``candidates.json``, ``report.md``, ``report.json``, ``ranking.png``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json, check_output
from hyprune.search import latency as latency_lib
from hyprune.search.counting import check_countable, count_parameters
from hyprune.search.space import (Candidate, add_memory, blocks_to_drop, drop_options, enumerate_shapes,
                                  make_budget, parse_drop, parse_space, sample, uniform_candidate, within_budget)

STATE_FILE = "state.json"
STATE_FORMAT = "hyprune-search-state/1"
SCORES = ("loss", "kl")
# settings that change what a finished candidate's numbers mean (kept for reference; a resumed search
# now compares every setting in its state, see _open_run_dir)
SCORING_SETTINGS = ("model", "data", "eval_data", "seq_len", "num_samples", "eval_windows", "seed", "score",
                    "depth_method", "distill_tokens", "distill_batch", "distill_lr")
# settings that only say how fast or how verbosely to work: a resumed search may change them
NOT_COMPARED_ON_RESUME = ("batch_size",)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _slug(candidate_id: str, index: int) -> str:
    return f"{index:03d}-" + re.sub(r"[^A-Za-z0-9]+", "-", candidate_id).strip("-")[:80]


@torch.inference_mode()
def kl_to_teacher(student, teacher_logits: list[torch.Tensor], windows: torch.Tensor, batch_size: int) -> float:
    """Mean KL(teacher || student) per token on ``windows``, the teacher's logits given per batch."""
    from hyprune.distill.losses import forward_kl

    device = next(student.parameters()).device
    total, count = 0.0, 0
    for t_logits, start in zip(teacher_logits, range(0, len(windows), batch_size)):
        batch = windows[start : start + batch_size].to(device)
        s_logits = student(input_ids=batch, use_cache=False).logits.float()
        total += float(forward_kl(s_logits, t_logits.to(device))) * batch.numel()
        count += batch.numel()
    return total / count


@torch.inference_mode()
def _teacher_logits(model, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=windows[s : s + batch_size].to(device), use_cache=False).logits.float().cpu()
            for s in range(0, len(windows), batch_size)]


def zero_shot_score(model, windows: torch.Tensor, score: str, batch_size: int, teacher_logits=None) -> float:
    """LM loss (nats per token, `hyprune.evaluate.perplexity`) or KL to the teacher; lower is better."""
    from hyprune.evaluate import perplexity

    if score == "kl":
        return kl_to_teacher(model, teacher_logits, windows, batch_size)
    return perplexity(model, windows, batch_size=batch_size)["loss"]


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation of two score lists (None for fewer than 3 pairs)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------------
def _open_run_dir(out: Path, settings: dict, resume: bool, overwrite: bool, inputs: tuple,
                  allow_changed: bool = False) -> dict:
    """The state to continue from (empty for a new run); refuses a used folder unless resume/overwrite.

    A resumed search must have every setting that shapes its result (the budget, the space, the
    scoring, the short distillation, the latency model) and the same model and data (cheap
    fingerprints, `hyprune.resume`) as the saved one; a change is refused with the changed keys unless
    ``allow_changed`` (``--resume-changed``), which records the changes in the state and the notes.
    """
    from hyprune.resume import check_resume, describe_changes

    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        check_output(out, "dir", inputs=inputs, reuse=True)
        state = json.loads(state_path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise HypruneError(f"{state_path} is not a hyprune search state; pick another --out.")
        compared = {k: v for k, v in settings.items() if k not in NOT_COMPARED_ON_RESUME}
        saved = {k: v for k, v in state["settings"].items() if k not in NOT_COMPARED_ON_RESUME}
        saved.update({k: None for k in SCORING_SETTINGS if k not in saved})  # old states: compare these always
        changed = check_resume(f"the search in {out}", saved, compared, allow_changed)
        if changed:
            state.setdefault("changed_on_resume", []).append(changed)
            state.setdefault("notes", []).append(
                f"Resumed with changed settings (--resume-changed): {describe_changes(changed)}; candidates scored "
                "before the change keep their earlier scores.")
        state["settings"] = settings
        return state
    if resume:
        raise HypruneError(f"Nothing to resume: {state_path} does not exist. Drop --resume to start a new search.")
    check_output(out, "dir", overwrite, inputs=inputs)
    if out.exists() and overwrite:
        shutil.rmtree(out)
    return {"format": STATE_FORMAT, "settings": settings, "candidates": {}}


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------
def search(
    model: str,
    data: str,
    out: str,
    target_params: float | None = None,
    target_ratio: float | None = None,
    target_active_params: float | None = None,
    target_memory: float | None = None,
    target_latency: float | None = None,
    tolerance: float = 0.05,
    memory_context: int = 2048,
    memory_dtype: str = "bfloat16",
    memory_batch: int = 1,
    space: str | dict | None = None,
    min_fraction: float = 0.5,
    drop_blocks: str | None = None,
    depth_method: str = "block_influence",
    max_candidates: int = 64,
    score: str = "loss",
    top_k: int = 4,
    distill_tokens: int = 0,
    distill_uniform: bool = False,
    distill_batch: int = 8,
    distill_lr: float = 1e-4,
    eval_data: str | None = None,
    eval_windows: int = 32,
    seq_len: int = 256,
    num_samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    latency: bool = False,
    latency_shapes: int = 12,
    latency_metric: str = "decode",
    latency_context: int = 128,
    latency_batch: int = 1,
    latency_repeats: int = 3,
    text_field: str = "text",
    split: str = "train",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    allow_changed: bool = False,
    **load_kwargs,
) -> dict:
    """Search the architectures of ``model`` under a budget; write the results to ``out``.

    Args mirror ``hyprune search`` (see `hyprune.search` and the CLI help): the budget
    (``target_*``, ``tolerance``; memory at ``memory_context`` tokens in ``memory_dtype``), the space
    (``space``: ``"FIELD=MIN:MAX[:STEP],..."``, ``min_fraction``, ``drop_blocks`` ``"MIN:MAX"``),
    the ranking (``score`` ``loss`` or ``kl`` on ``eval_windows`` held-out windows; ``top_k``
    candidates distilled for ``distill_tokens`` tokens each, plus the uniform baseline with
    ``distill_uniform``) and the latency model (``latency`` or
    ``target_latency``). ``resume`` continues the search in ``out``; a change of any setting or of the
    model or data is refused unless ``allow_changed``. Returns the summary (also the ``data`` of ``out/report.json``).
    """
    from hyprune.data import calibration_windows, check_source, heldout_windows
    from hyprune.depth import METHODS as DEPTH_METHODS
    from hyprune.models import load_config, load_model, load_tokenizer
    from hyprune.resume import file_fingerprint, model_fingerprint

    # 1. everything that can be checked from the config -------------------------------------------
    source_kwargs = {"trust_remote_code": load_kwargs.get("trust_remote_code", False),
                     "gguf_file": load_kwargs.get("gguf_file")}
    config, family = load_config(model, **source_kwargs)
    check_countable(family, config)
    if score not in SCORES:
        raise HypruneError(f"--score must be one of {', '.join(SCORES)}, got '{score}'.")
    if depth_method not in DEPTH_METHODS:
        raise HypruneError(f"--depth-method must be one of {', '.join(DEPTH_METHODS)}, got '{depth_method}'.")
    for name, value in (("top-k", top_k), ("distill-tokens", distill_tokens)):
        if value < 0:
            raise HypruneError(f"--{name} must be 0 or more, got {value}.")
    for name, value in (("eval-windows", eval_windows), ("num-samples", num_samples), ("batch-size", batch_size),
                        ("distill-batch", distill_batch)):
        if value < 1:
            raise HypruneError(f"--{name} must be at least 1, got {value}.")
    check_source(data)
    if eval_data is not None:
        check_source(eval_data)
    source_params = count_parameters(family, config)["total"]
    budget = make_budget(family, config, target_params, target_ratio, target_active_params, target_memory,
                         target_latency, tolerance, memory_context, memory_dtype, memory_batch)
    axes = parse_space(family, config, space, min_fraction)
    drops = drop_options(family, config, *parse_drop(drop_blocks, family, config))
    shapes = enumerate_shapes(family, config, axes, drops)
    if budget.memory is not None:
        add_memory(family, config, shapes, budget)
    latency_budget = budget.latency
    budget.latency = None  # the latency model is measured only once everything else holds
    feasible = within_budget(shapes, budget, source_params)
    budget.latency = latency_budget

    out_path = Path(out).expanduser()
    settings = {"model": str(model), "data": str(data), "eval_data": eval_data, "seq_len": seq_len,
                "num_samples": num_samples, "eval_windows": eval_windows, "seed": seed, "score": score,
                "depth_method": depth_method, "distill_tokens": distill_tokens, "distill_batch": distill_batch,
                "distill_lr": distill_lr, "top_k": top_k, "distill_uniform": distill_uniform, "space": space,
                "drop_blocks": drop_blocks, "min_fraction": min_fraction, "max_candidates": max_candidates,
                "budget": budget.describe(), "text_field": text_field, "split": split, "batch_size": batch_size,
                "latency": {"on": bool(latency or budget.latency is not None), "shapes": latency_shapes,
                            "metric": latency_metric, "context": latency_context, "batch": latency_batch,
                            "repeats": latency_repeats},
                "model_fingerprint": model_fingerprint(model), "data_fingerprint": file_fingerprint(data),
                "eval_data_fingerprint": file_fingerprint(eval_data),
                "load": {"dtype": str(load_kwargs.get("dtype", "float32")), "gguf_file": load_kwargs.get("gguf_file"),
                         "trust_remote_code": bool(load_kwargs.get("trust_remote_code", False))}}
    state = _open_run_dir(out_path, settings, resume, overwrite, inputs=(model, data, eval_data),
                          allow_changed=allow_changed)
    for note in state.get("notes", []):
        if note not in budget.notes:
            budget.notes.append(note)
    out_path.mkdir(parents=True, exist_ok=True)
    state_path = out_path / STATE_FILE
    atomic_write_json(state_path, state)

    # 2. the latency model (measured on this device, random weights) --------------------------------
    lat_model = None
    if latency or budget.latency is not None:
        lat_path = out_path / "latency.json"
        if lat_path.is_file():
            lat_model = latency_lib.LatencyModel.from_json(json.loads(lat_path.read_text()))
        else:
            lat_model = latency_lib.build(family, config, shapes, latency_shapes, latency_metric, latency_batch,
                                          latency_context, progress=progress, workdir=out_path,
                                          repeats=latency_repeats)
            atomic_write_json(lat_path, lat_model.to_json())
        latency_lib.add_latency(lat_model, family, config, shapes)
        feasible = within_budget(shapes, budget, source_params)
    if budget.memory is None:
        add_memory(family, config, feasible, budget)
    uniform = uniform_candidate(feasible, axes, family.sizes(config), budget)
    if uniform is not None:
        uniform.uniform = True
    candidates = sample(feasible, max_candidates, seed, keep=[uniform] if uniform is not None else [])

    # 3. data, weights, the one importance sweep, block scores ----------------------------------------
    tokenizer = load_tokenizer(model, **source_kwargs)
    steps = math.ceil(distill_tokens / (distill_batch * seq_len)) if distill_tokens and top_k else 0
    kd_windows_count = steps * distill_batch
    from_data = num_samples + (0 if eval_data is not None else eval_windows) + kd_windows_count
    windows = calibration_windows(tokenizer, data, seq_len, from_data, seed=seed, text_field=text_field, split=split)
    calib = windows[:num_samples]
    if eval_data is not None:
        held = heldout_windows(tokenizer, eval_data, seq_len, eval_windows, text_field=text_field, split=split)
        kd_windows = windows[num_samples:]
    else:
        held = windows[num_samples : num_samples + eval_windows]
        kd_windows = windows[num_samples + eval_windows :]
        if len(held) == 0:
            raise HypruneError(f"{data} holds too few tokens for {num_samples} calibration windows and held-out "
                               f"windows of {seq_len} tokens; pass --eval-data or lower --num-samples.")
    if steps and len(kd_windows) == 0:
        raise HypruneError(f"{data} holds no text left for distillation after the calibration and held-out windows; "
                           "pass more text or lower --num-samples / --eval-windows.")
    loaded, family = load_model(model, **load_kwargs)
    scores = _importance(loaded, family, calib, out_path, batch_size, progress)
    kinds = family.block_kinds(config)
    block_scores = _block_scores(loaded, family, calib, out_path, depth_method, batch_size, progress) \
        if any(c.drop for c in candidates) else None
    teacher_logits = _teacher_logits(loaded, held, batch_size) if score == "kl" else None

    # 4. zero-shot score of every candidate --------------------------------------------------------
    from hyprune.apply import apply_plan
    from hyprune.plan import make_plan

    def plan_for(c: Candidate):
        dropped = blocks_to_drop(kinds, c.drop, block_scores.scores if block_scores is not None else None)
        return make_plan(family, loaded.config, scores, c.target, drop_blocks=dropped)

    records = state["candidates"]
    todo = [c for c in candidates if "zero_shot" not in records.get(c.id, {})]
    for c in tqdm(todo, desc="zero-shot candidates", unit="cand", disable=not progress, dynamic_ncols=True):
        small = apply_plan(loaded, plan_for(c), family)
        records[c.id] = {"zero_shot": zero_shot_score(small, held, score, batch_size, teacher_logits)}
        del small
        atomic_write_json(state_path, state)
    ranked = sorted(candidates, key=lambda c: (records[c.id]["zero_shot"], c.id))

    # 5. short distillation of the top-k (and of the uniform baseline when asked) ----------------------
    if steps:
        top = ranked[:top_k]
        if distill_uniform and uniform is not None and uniform not in top:
            top.append(uniform)
        kd = dict(tokens=distill_tokens, seq_len=seq_len, batch=distill_batch, lr=distill_lr, min_lr=distill_lr / 10,
                  warmup_steps=min(40, max(1, steps // 10)), checkpoint_every=0, eval_every=max(1, steps // 4),
                  eval_windows=len(held), eval_batch=batch_size, seed=seed, progress=False)
        for i, c in enumerate(tqdm(top, desc="short distillation", unit="cand", disable=not progress,
                                   dynamic_ncols=True)):
            if "distilled" in records[c.id]:
                continue
            run_dir = out_path / "kd" / _slug(c.id, i)
            student = apply_plan(loaded, plan_for(c), family)
            records[c.id].update(_short_distill(loaded, student, kd_windows, held, kd, run_dir, tokenizer, score,
                                                batch_size, teacher_logits, records[c.id]["zero_shot"]))
            records[c.id]["distill_dir"] = str(run_dir.relative_to(out_path))
            del student
            atomic_write_json(state_path, state)

    # 6. ranking, winner, outputs ----------------------------------------------------------------------
    final_order = sorted(candidates, key=lambda c: (0, records[c.id]["distilled"], c.id) if "distilled" in records[c.id]
                         else (1, records[c.id]["zero_shot"], c.id))
    winner = final_order[0]
    plan = plan_for(winner)
    plan.method = f"{plan.method}+search"
    from hyprune.search.report import write_outputs

    return write_outputs(out_path, family, source_params, budget, candidates, ranked, final_order, records, plan,
                         lat_model, settings, score, len(shapes), len(feasible))


def _short_distill(teacher, student, kd_windows, held, kd: dict, run_dir: Path, tokenizer, score: str,
                   batch_size: int, teacher_logits, zero_shot: float) -> dict:
    """Distill one candidate with the shared settings ``kd``; its final score and held-out LM-loss curve
    (read from the run's log; the zero-shot loss is the curve's first point when the score is the loss)."""
    from hyprune.distill import distill

    summary = distill(teacher, student, kd_windows, kd, run_dir, eval_windows=held, overwrite=True,
                      tokenizer=tokenizer)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    curve = ([{"tokens": 0, "loss": zero_shot}] if score == "loss" else []) + [
        {"tokens": r["tokens"], "loss": math.log(r["eval_ppl"])} for r in log if "eval_ppl" in r]
    student.eval()
    return {"distilled": zero_shot_score(student, held, score, batch_size, teacher_logits), "curve": curve,
            "distill_tokens": summary["tokens"]}


def _importance(model, family, windows, out: Path, batch_size: int, progress: bool):
    """The one activation sweep, saved in ``out/scores`` and reused on resume."""
    from hyprune.importance import activation_scores, load_scores, save_scores, summarize_scores

    folder = out / "scores"
    if (folder / "scores.safetensors").is_file():
        return load_scores(folder, family, model.config)
    scores = activation_scores(model, windows, family, batch_size=batch_size, progress=progress)
    save_scores(scores, folder, summarize_scores(scores, family, model.config))
    return scores


def _block_scores(model, family, windows, out: Path, method: str, batch_size: int, progress: bool):
    """Block importance for the depth candidates (which blocks of a kind go), saved and reused on resume."""
    from hyprune.depth import block_importance, load_block_scores, save_block_scores

    folder = out / "scores"
    if (folder / "block_scores.json").is_file():
        return load_block_scores(folder, family, model.config)
    result = block_importance(model, windows, method, family, batch_size=batch_size, progress=progress)
    save_block_scores(result, folder)
    return result
