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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyprune.apply import apply_plan
from hyprune.config import DataConfig, LoadConfig, SearchConfig, resolve
from hyprune.data import calibration_windows, check_source, heldout_windows
from hyprune.depth import METHODS as DEPTH_METHODS
from hyprune.depth import block_importance, load_block_scores, save_block_scores
from hyprune.distill import distill
from hyprune.distill.losses import forward_kl
from hyprune.errors import HypruneError
from hyprune.evaluate import perplexity
from hyprune.importance import activation_scores, load_scores, save_scores, summarize_scores
from hyprune.io import atomic_write_json, check_output
from hyprune.models import load_config, load_model, load_tokenizer
from hyprune.plan import make_plan
from hyprune.resume import check_resume, describe_changes, file_fingerprint, model_fingerprint
from hyprune.search import latency as latency_lib
from hyprune.search.counting import check_countable, count_parameters
from hyprune.search.report import SearchOutcome, spearman, write_outputs  # noqa: F401 (spearman re-exported)
from hyprune.search.space import (
    Candidate,
    add_memory,
    blocks_to_drop,
    drop_options,
    enumerate_shapes,
    make_budget,
    parse_drop,
    parse_space,
    sample,
    uniform_candidate,
    within_budget,
)

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
    if score == "kl":
        return kl_to_teacher(model, teacher_logits, windows, batch_size)
    return perplexity(model, windows, batch_size=batch_size)["loss"]


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
@dataclass
class _Search:
    """One search: its configs, the source model's config and family, and what the steps hand on."""

    model: str
    data: str
    out: Path
    config: SearchConfig
    calibration: DataConfig
    load: LoadConfig
    progress: bool
    model_config: object = None
    family: object = None
    source_params: int = 0
    budget: object = None
    axes: list = field(default_factory=list)
    shapes: list = field(default_factory=list)
    feasible: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def save_state(self) -> None:
        atomic_write_json(self.state_path, self.state)


def search(model: str, data: str, out: str, config: SearchConfig | None = None, *,
           calibration: DataConfig | None = None, load: LoadConfig | None = None, resume: bool = False,
           overwrite: bool = False, progress: bool = True, allow_changed: bool = False, **fields) -> dict:
    """Search the architectures of ``model`` under a budget; write the results to ``out``.

    The settings are a `SearchConfig` (the budget ``target_*``, ``tolerance``, memory at
    ``memory_context`` tokens in ``memory_dtype``; the space: ``space`` ``{field: (min, max[, step]) or
    value}``, ``min_fraction``, ``drop_blocks`` ``(min, max)`` or ``n``; the ranking: ``score`` ``loss``
    or ``kl`` on ``eval_windows`` held-out windows, ``top_k`` candidates distilled for
    ``distill_tokens`` tokens each, the uniform baseline too with ``distill_uniform``; the latency
    model: ``latency`` or ``target_latency``), a `DataConfig` (calibration windows) and a `LoadConfig`,
    or their fields as keyword arguments. ``resume`` continues the search in ``out``; a change of any
    setting or of the model or data is refused unless ``allow_changed``. Returns the summary (also the
    ``data`` of ``out/report.json``).
    """
    config, calibration, load = resolve("search", {**fields, "data": data, "model": model},
                                        (SearchConfig, config), (DataConfig, calibration), (LoadConfig, load))
    run = _Search(model, data, Path(out).expanduser(), config, calibration, load, progress)
    _check_request(run)
    run.settings = _settings(run)
    run.state = _open_run_dir(run.out, run.settings, resume, overwrite, inputs=(model, data, config.eval_data),
                              allow_changed=allow_changed)
    for note in run.state.get("notes", []):
        if note not in run.budget.notes:
            run.budget.notes.append(note)
    run.out.mkdir(parents=True, exist_ok=True)
    run.save_state()
    lat_model = _latency_model(run)
    uniform = uniform_candidate(run.feasible, run.axes, run.family.sizes(run.model_config), run.budget)
    if uniform is not None:
        uniform.uniform = True
    candidates = sample(run.feasible, config.max_candidates, calibration.seed,
                        keep=[uniform] if uniform is not None else [])
    return _rank(run, candidates, uniform, lat_model)


def _check_request(run: _Search) -> None:
    """Everything that can be checked from the config, before any weights: budget, space, shapes within it."""
    c = run.config
    config, family = load_config(run.model, **run.load.source())
    run.model_config, run.family = config, family
    check_countable(family, config)
    if c.score not in SCORES:
        raise HypruneError(f"--score must be one of {', '.join(SCORES)}, got '{c.score}'.")
    if c.depth_method not in DEPTH_METHODS:
        raise HypruneError(f"--depth-method must be one of {', '.join(DEPTH_METHODS)}, got '{c.depth_method}'.")
    check_source(run.data)
    if c.eval_data is not None:
        check_source(c.eval_data)
    run.source_params = count_parameters(family, config)["total"]
    budget = make_budget(family, config, c.target_params, c.target_ratio, c.target_active_params, c.target_memory,
                         c.target_latency, c.tolerance, c.memory_context, c.memory_dtype, c.memory_batch)
    run.axes = parse_space(family, config, c.space, c.min_fraction)
    drops = drop_options(family, config, *parse_drop(c.drop_blocks, family, config))
    run.shapes = enumerate_shapes(family, config, run.axes, drops)
    if budget.memory is not None:
        add_memory(family, config, run.shapes, budget)
    latency_budget = budget.latency
    budget.latency = None  # the latency model is measured only once everything else holds
    run.feasible = within_budget(run.shapes, budget, run.source_params)
    budget.latency = latency_budget
    run.budget = budget


def _settings(run: _Search) -> dict:
    """What the search's result depends on (compared on resume), and how fast it worked."""
    c, d, load = run.config, run.calibration, run.load
    return {"model": str(run.model), "data": str(run.data), "eval_data": c.eval_data, "seq_len": d.seq_len,
            "num_samples": d.num_samples, "eval_windows": c.eval_windows, "seed": d.seed, "score": c.score,
            "depth_method": c.depth_method, "distill_tokens": c.distill_tokens, "distill_batch": c.distill_batch,
            "distill_lr": c.distill_lr, "top_k": c.top_k, "distill_uniform": c.distill_uniform, "space": c.space,
            "drop_blocks": c.drop_blocks, "min_fraction": c.min_fraction, "max_candidates": c.max_candidates,
            "budget": run.budget.describe(), "text_field": d.text_field, "split": d.split,
            "batch_size": d.batch_size,
            "latency": {"on": bool(c.latency or run.budget.latency is not None), "shapes": c.latency_shapes,
                        "metric": c.latency_metric, "context": c.latency_context, "batch": c.latency_batch,
                        "repeats": c.latency_repeats},
            "model_fingerprint": model_fingerprint(run.model), "data_fingerprint": file_fingerprint(run.data),
            "eval_data_fingerprint": file_fingerprint(c.eval_data),
            "load": {"dtype": str(load.dtype), "gguf_file": load.gguf_file,
                     "trust_remote_code": bool(load.trust_remote_code)}}


def _latency_model(run: _Search):
    """The latency model (measured on this device, random weights; reused on resume), or None; the
    feasible shapes re-checked against the whole budget, with their memory."""
    c, family, config = run.config, run.family, run.model_config
    lat_model = None
    if c.latency or run.budget.latency is not None:
        lat_path = run.out / "latency.json"
        if lat_path.is_file():
            lat_model = latency_lib.LatencyModel.from_json(json.loads(lat_path.read_text()))
        else:
            lat_model = latency_lib.build(family, config, run.shapes, c.latency_shapes, c.latency_metric,
                                          c.latency_batch, c.latency_context, progress=run.progress,
                                          workdir=run.out, repeats=c.latency_repeats)
            atomic_write_json(lat_path, lat_model.to_json())
        latency_lib.add_latency(lat_model, family, config, run.shapes)
        run.feasible = within_budget(run.shapes, run.budget, run.source_params)
    if run.budget.memory is None:
        add_memory(family, config, run.feasible, run.budget)
    return lat_model


def _windows(run: _Search, tokenizer, steps: int):
    """(calibration, held-out, distillation) windows: held-out from ``eval_data`` or the text after calibration."""
    c, d = run.config, run.calibration
    kd_windows_count = steps * c.distill_batch
    from_data = d.num_samples + (0 if c.eval_data is not None else c.eval_windows) + kd_windows_count
    windows = calibration_windows(tokenizer, run.data, d.seq_len, from_data, seed=d.seed, text_field=d.text_field,
                                  split=d.split)
    calib = windows[:d.num_samples]
    if c.eval_data is not None:
        held = heldout_windows(tokenizer, c.eval_data, d.seq_len, c.eval_windows, text_field=d.text_field,
                               split=d.split)
        kd_windows = windows[d.num_samples:]
    else:
        held = windows[d.num_samples : d.num_samples + c.eval_windows]
        kd_windows = windows[d.num_samples + c.eval_windows :]
        if len(held) == 0:
            raise HypruneError(f"{run.data} holds too few tokens for {d.num_samples} calibration windows and "
                               f"held-out windows of {d.seq_len} tokens; pass --eval-data or lower --num-samples.")
    if steps and len(kd_windows) == 0:
        raise HypruneError(f"{run.data} holds no text left for distillation after the calibration and held-out "
                           "windows; pass more text or lower --num-samples / --eval-windows.")
    return calib, held, kd_windows


def _rank(run: _Search, candidates: list[Candidate], uniform, lat_model) -> dict:
    """Weights, the one importance sweep and block scores; every candidate's zero-shot score; the short
    distillation of the top-k; the final ranking and the outputs."""
    c, d = run.config, run.calibration
    tokenizer = load_tokenizer(run.model, **run.load.source())
    steps = math.ceil(c.distill_tokens / (c.distill_batch * d.seq_len)) if c.distill_tokens and c.top_k else 0
    calib, held, kd_windows = _windows(run, tokenizer, steps)
    loaded, family = load_model(run.model, **run.load.load_kwargs())
    scores = _importance(loaded, family, calib, run.out, d.batch_size, run.progress)
    kinds = family.block_kinds(run.model_config)
    block_scores = _block_scores(loaded, family, calib, run.out, c.depth_method, d.batch_size, run.progress) \
        if any(cand.drop for cand in candidates) else None
    teacher_logits = _teacher_logits(loaded, held, d.batch_size) if c.score == "kl" else None

    def plan_for(cand: Candidate):
        dropped = blocks_to_drop(kinds, cand.drop, block_scores.scores if block_scores is not None else None)
        return make_plan(family, loaded.config, scores, cand.target, drop_blocks=dropped)

    records = run.state["candidates"]
    todo = [cand for cand in candidates if "zero_shot" not in records.get(cand.id, {})]
    for cand in tqdm(todo, desc="zero-shot candidates", unit="cand", disable=not run.progress, dynamic_ncols=True):
        small = apply_plan(loaded, plan_for(cand), family)
        records[cand.id] = {"zero_shot": zero_shot_score(small, held, c.score, d.batch_size, teacher_logits)}
        del small
        run.save_state()
    ranked = sorted(candidates, key=lambda cand: (records[cand.id]["zero_shot"], cand.id))
    if steps:
        top = ranked[:c.top_k]
        if c.distill_uniform and uniform is not None and uniform not in top:
            top.append(uniform)
        kd = dict(tokens=c.distill_tokens, seq_len=d.seq_len, batch=c.distill_batch, lr=c.distill_lr,
                  min_lr=c.distill_lr / 10, warmup_steps=min(40, max(1, steps // 10)), checkpoint_every=0,
                  eval_every=max(1, steps // 4), eval_windows=len(held), eval_batch=d.batch_size, seed=d.seed,
                  progress=False)
        for i, cand in enumerate(tqdm(top, desc="short distillation", unit="cand", disable=not run.progress,
                                      dynamic_ncols=True)):
            if "distilled" in records[cand.id]:
                continue
            run_dir = run.out / "kd" / _slug(cand.id, i)
            student = apply_plan(loaded, plan_for(cand), family)
            records[cand.id].update(_short_distill(loaded, student, kd_windows, held, kd, run_dir, tokenizer,
                                                   c.score, d.batch_size, teacher_logits,
                                                   records[cand.id]["zero_shot"]))
            records[cand.id]["distill_dir"] = str(run_dir.relative_to(run.out))
            del student
            run.save_state()
    final_order = sorted(candidates, key=lambda cand: (0, records[cand.id]["distilled"], cand.id)
                         if "distilled" in records[cand.id] else (1, records[cand.id]["zero_shot"], cand.id))
    plan = plan_for(final_order[0])
    plan.method = f"{plan.method}+search"
    return write_outputs(run.out, SearchOutcome(
        family, run.source_params, run.budget, run.settings, c.score, len(run.shapes), len(run.feasible),
        candidates, ranked, final_order, records, plan, lat_model))


def _short_distill(teacher, student, kd_windows, held, kd: dict, run_dir: Path, tokenizer, score: str,
                   batch_size: int, teacher_logits, zero_shot: float) -> dict:
    """Distill one candidate with the shared settings ``kd``; its final score and held-out LM-loss curve
    (read from the run's log; the zero-shot loss is the curve's first point when the score is the loss)."""
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
    folder = out / "scores"
    if (folder / "scores.safetensors").is_file():
        return load_scores(folder, family, model.config)
    scores = activation_scores(model, windows, family, batch_size=batch_size, progress=progress)
    save_scores(scores, folder, summarize_scores(scores, family, model.config))
    return scores


def _block_scores(model, family, windows, out: Path, method: str, batch_size: int, progress: bool):
    """Block importance for the depth candidates (which blocks of a kind go), saved and reused on resume."""
    folder = out / "scores"
    if (folder / "block_scores.json").is_file():
        return load_block_scores(folder, family, model.config)
    result = block_importance(model, windows, method, family, batch_size=batch_size, progress=progress)
    save_block_scores(result, folder)
    return result
