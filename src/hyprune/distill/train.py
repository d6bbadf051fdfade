"""The distillation loop (and teacher correction, which is the same loop with the plain LM loss).

One optimizer step, on every rank::

    global batch of step k  = batch_indices(k, batch, num_windows, seed)      # depends on (seed, k)
    this rank's share       = contiguous slice of it, split into micro-batches
    for each micro-batch:   student forward (+ teacher forward under no_grad, or the top-k cache)
                            loss * (micro / share) .backward()                # DDP syncs the last one
    mean loss over ranks    -> stop with HypruneError if nan/inf (nothing is stepped or saved)
    clip grad norm, AdamW step, cosine-with-warmup LR step
    rank 0: log.jsonl (+ TensorBoard), held-out perplexity, checkpoint every N steps

Loss of a micro-batch (token means, see ``losses``)::

    L = (1 - ce_weight) * D(teacher || student) + ce_weight * CE        D: forward_kl | reverse_kl | jsd
    L = L + alpha * L_hidden   (optional; alpha = L / L_hidden, detached, when "auto")

Precision: bf16 autocast on GPU, fp32 on CPU (``precision="auto"``); weights and AdamW state stay in
the model's dtype. Everything a resume needs (weights, optimizer, scheduler, RNG states, step) is in
the checkpoint; the data order needs nothing, because it is a function of the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hyprune.distill import checkpoints as ckpt
from hyprune.distill import distributed as dist_utils
from hyprune.distill.batches import as_windows, batch_indices, micro_batches, rank_slice
from hyprune.distill.cache import TopKCache
from hyprune.distill.losses import (
    block_list,
    block_map_from_plan,
    capture_block_outputs,
    combine_with_hidden,
    hidden_state_loss,
    logit_loss,
    next_token_ce,
    topk_loss,
)
from hyprune.errors import HypruneError, validation_message
from hyprune.evaluate import perplexity
from hyprune.io import atomic_dir
from hyprune.plan import Plan
from hyprune.resume import check_resume, describe_changes, tensor_fingerprint

LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"


class DistillConfig(BaseModel):
    """Everything that shapes a distillation (or fine-tuning) run; maps one-to-one onto CLI flags."""

    model_config = ConfigDict(extra="forbid")

    tokens: int = Field(gt=0, description="training budget in tokens; steps = ceil(tokens / (batch * seq_len))")
    seq_len: int = Field(ge=2, description="tokens per training window")
    batch: int = Field(8, ge=1, description="global batch, in windows per optimizer step (all ranks together)")
    micro_batch: int | None = Field(None, ge=1, description="windows per forward pass per rank (accumulation)")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0, description="the cosine schedule ends here")
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.01, ge=0, description="on matrices only; not on norms, biases, SSM scalars")
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, description="max global grad norm; None or 0 = no clipping")
    loss: Literal["forward_kl", "reverse_kl", "jsd", "ce"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, gt=0, lt=1, description="JSD mixture weight of the teacher")
    ce_weight: float = Field(0.0, ge=0, le=1, description="L = (1-w) * KD + w * CE")
    hidden_loss: Literal["cosine", "mse"] | None = None
    hidden_alpha: float | Literal["auto"] = "auto"
    block_map: dict[int, int] | None = Field(None, description="student block -> teacher block")
    teacher_channels: list[int] | None = Field(None, description="teacher hidden channels kept by the student")
    plan: str | None = Field(None, description="plan JSON: block_map and teacher_channels come from it")
    checkpoint_every: int = Field(500, ge=0, description="0 = only the final student")
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(200, ge=0, description="0 = evaluate only at the end")
    eval_windows: int = Field(32, ge=1, description="held-out windows used for perplexity")
    eval_batch: int = Field(8, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 0
    activation_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    fsdp: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        return self

    def total_steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch * self.seq_len)))

    def resume_settings(self) -> dict:
        """The settings a resumed run must share with the run it continues (see `NOT_COMPARED_ON_RESUME`)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in NOT_COMPARED_ON_RESUME}


# Settings that do not shape the trained weights (how often to save, evaluate and log; memory-saving
# switches that compute the same steps), so a resumed run may change them freely. Every other field
# (and every field added later) is compared on resume.
NOT_COMPARED_ON_RESUME = frozenset({"micro_batch", "checkpoint_every", "keep_last", "eval_every", "eval_windows",
                                    "eval_batch", "log_every", "activation_checkpointing", "fsdp", "progress"})


def make_config(config: DistillConfig | dict | None = None, **overrides) -> DistillConfig:
    """A `DistillConfig` from a config, a dict and/or keyword overrides; bad values are a `HypruneError`."""
    data = {} if config is None else (config.model_dump() if isinstance(config, DistillConfig) else dict(config))
    data.update(overrides)
    try:
        return DistillConfig(**data)
    except ValidationError as e:
        raise HypruneError(validation_message("Invalid distillation settings", e)) from None


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------
def distill(teacher, student, data, config: DistillConfig | dict, out_dir: str | Path,
            eval_windows: torch.Tensor | None = None, resume: bool = False, tokenizer=None,
            teacher_tokenizer=None, overwrite: bool = False, allow_changed: bool = False,
            fingerprints: dict | None = None, aux=None) -> dict:
    """Distill ``teacher`` into ``student`` (trained in place) and save it to ``out_dir/final``.

    Args:
        teacher: a causal LM, or ``None`` when ``data`` is a teacher top-k cache or ``loss="ce"``.
        student: a causal LM with the teacher's tokenizer (its weights are updated in place).
        data: training windows ``[n, seq_len]``, one token stream (1-D tensor / list), or a
            `TopKCache` / its folder (then the teacher is not needed).
        config: a `DistillConfig` or a dict of its fields.
        out_dir: receives ``final/``, ``checkpoints/step-XXXXXXXX/``, ``log.jsonl`` (and ``tensorboard/``).
        eval_windows: held-out ``[n, L]`` windows; student perplexity every ``eval_every`` steps and at
            the end, next to the teacher's (computed once).
        resume: continue from the newest valid checkpoint in ``out_dir/checkpoints``; refused when there
            is none, or when the settings that shape the result or the inputs' fingerprints differ from
            the checkpoint's.
        tokenizer: the student's tokenizer; saved with the final student, and its length is the
            common vocabulary when the two models' embedding tables differ only in padding rows.
        teacher_tokenizer: the teacher's, when it may differ (default: the same as ``tokenizer``).
        overwrite: discard a previous run in ``out_dir`` instead of refusing.
        allow_changed: with ``resume``, continue even when settings or inputs changed (``--resume-changed``);
            the changes are printed and recorded in ``log.jsonl`` (an ``"event": "resume_changed"`` line),
            and the new settings (lr schedule, optimizer settings) take effect from the resumed step.
        fingerprints: more fingerprints of the inputs to compare on resume (``run_distill`` passes the
            teacher, student and data paths'; see `hyprune.resume`). The token windows (or the top-k
            cache) are always fingerprinted here.
        aux: an extra loss term, called after each student forward as ``aux(student, step, total_steps)``
            (0-based step) -> a scalar tensor added to the loss and logged as ``aux_loss``; its ``log(step,
            total_steps)`` -> a dict of more values for that step's log record (`hyprune.kv.train.RatioTerm`).

    Returns a summary: steps, tokens, final loss, perplexities, paths.
    """
    cfg = make_config(config)
    info = dist_utils.setup()  # the process group (if any) outlives the run: see distill.distributed
    out = Path(out_dir)
    inputs = _check_inputs(teacher, student, data, cfg, eval_windows, tokenizer, teacher_tokenizer, info)
    _prepare_out_dir(out, resume, overwrite, info)
    run = _setup(teacher, student, cfg, inputs, out, info, resume, allow_changed,
                 {**(fingerprints or {}), **inputs.fingerprints}, aux)
    return _train(run, tokenizer)


def finetune(model, data, config: DistillConfig | dict, out_dir: str | Path, eval_windows: torch.Tensor | None = None,
             resume: bool = False, tokenizer=None, overwrite: bool = False, allow_changed: bool = False,
             fingerprints: dict | None = None) -> dict:
    """Teacher correction: train ``model`` with the plain next-token loss, in the same loop as `distill`."""
    cfg = make_config(config, loss="ce", ce_weight=1.0, hidden_loss=None)
    return distill(None, model, data, cfg, out_dir, eval_windows=eval_windows, resume=resume, tokenizer=tokenizer,
                   overwrite=overwrite, allow_changed=allow_changed, fingerprints=fingerprints)


# ---------------------------------------------------------------------------------------------
# Checks that run before any training
# ---------------------------------------------------------------------------------------------
def check_vocab(teacher_vocab: int | None, student_vocab: int, tokenizer=None, teacher_tokenizer=None) -> int | None:
    """How many logits to compare: ``None`` for all, or the shared tokenizer length when only padding differs.

    Embedding tables are often padded to a multiple of 64 or 128; two models that share a tokenizer
    but were padded differently compare fine on the first ``len(tokenizer)`` logits. Anything else
    means the models index tokens differently, and distillation would be meaningless.
    """
    teacher_tokenizer = teacher_tokenizer if teacher_tokenizer is not None else tokenizer
    if tokenizer is not None and teacher_tokenizer is not tokenizer:
        if len(tokenizer) != len(teacher_tokenizer) or tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise HypruneError(
                f"The teacher and student tokenizers differ ({len(teacher_tokenizer)} vs {len(tokenizer)} tokens): "
                "distillation compares the two distributions token by token, so both must use the same tokenizer. "
                "Prune the student from the teacher, or pick a teacher with the student's tokenizer."
            )
    if teacher_vocab is None or teacher_vocab == student_vocab:
        return None
    common = len(tokenizer) if tokenizer is not None else None
    if common is None or common > min(teacher_vocab, student_vocab):
        hint = ("Pass the shared tokenizer (tokenizer=...) if the tables differ only in padding rows."
                if common is None else
                f"The tokenizer has {common} tokens, more than the smaller table, so they differ in real tokens.")
        raise HypruneError(
            f"The teacher's vocabulary has {teacher_vocab} rows and the student's {student_vocab}: distillation needs "
            f"the same vocabulary in both. {hint}"
        )
    return common


def _hidden_setup(cfg: DistillConfig, teacher, student) -> tuple[dict[int, int], torch.Tensor | None]:
    """Student block -> teacher block, and the teacher channels to compare on (None: all)."""
    block_map, channels = cfg.block_map, cfg.teacher_channels
    if cfg.plan is not None:
        plan = Plan.load(cfg.plan)
        block_map = block_map if block_map is not None else block_map_from_plan(plan)
        channels = channels if channels is not None else list(plan.hidden)
    s_blocks, t_blocks = len(block_list(student)), len(block_list(teacher))
    if block_map is None:
        if s_blocks != t_blocks:
            raise HypruneError(
                f"The student has {s_blocks} blocks and the teacher {t_blocks}: the intermediate-state loss needs "
                "to know which blocks match. Pass plan=PLAN.json (the pruning plan) or block_map={student: teacher}."
            )
        block_map = {i: i for i in range(s_blocks)}
    for s, t in block_map.items():
        if not (0 <= s < s_blocks and 0 <= t < t_blocks):
            raise HypruneError(f"block_map {s}->{t} is out of range: the student has {s_blocks} blocks, "
                               f"the teacher {t_blocks}.")
    s_hidden, t_hidden = int(student.config.hidden_size), int(teacher.config.hidden_size)
    if channels is None and s_hidden != t_hidden:
        raise HypruneError(
            f"The student's hidden size ({s_hidden}) differs from the teacher's ({t_hidden}): pass plan=PLAN.json or "
            "teacher_channels=[...] (the teacher channels the student kept) for the intermediate-state loss."
        )
    if channels is not None:
        if len(channels) != s_hidden or max(channels) >= t_hidden or min(channels) < 0:
            raise HypruneError(
                f"teacher_channels must list {s_hidden} channels of the teacher's {t_hidden}; got {len(channels)} "
                f"in [{min(channels)}, {max(channels)}]."
            )
        return dict(block_map), torch.as_tensor(channels, dtype=torch.long)
    return dict(block_map), None


def _prepare_out_dir(out: Path, resume: bool, overwrite: bool, info) -> None:
    previous = (ckpt.list_checkpoints(out / CHECKPOINTS) or (out / LOG_FILE).exists() or (out / FINAL).exists())
    if out.exists() and not out.is_dir():
        raise HypruneError(f"--out {out} is a file; pass a folder.")
    if previous and not resume:
        if not overwrite:
            raise HypruneError(
                f"{out} holds a previous run (checkpoints, log or final). Pass resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start over, or pick a new folder."
            )
        if info.is_main:
            for name in (CHECKPOINTS, FINAL, "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / LOG_FILE).unlink(missing_ok=True)
    dist_utils.barrier(info)


# ---------------------------------------------------------------------------------------------
# State helpers
# ---------------------------------------------------------------------------------------------
def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias an earlier tensor (tied weights): safetensors stores each tensor once."""
    seen, out = set(), {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _load_weights(model, path: Path) -> None:
    state = load_file(str(path), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    aliased = set(own) - set(_dedupe(own))
    leftover = [k for k in missing if k not in aliased]
    if leftover or unexpected:
        raise HypruneError(
            f"Checkpoint weights {path} do not fit the student (missing {leftover[:5]}, unexpected {unexpected[:5]}). "
            "Resume with the same student model the run started from."
        )


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(cfg: DistillConfig, total: int):
    """Linear warmup to ``lr``, then cosine down to ``min_lr`` at the last step (a factor of ``lr``)."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log lines past ``last_step`` (a resumed run writes them again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _say(info, message: str) -> None:
    if info.is_main:
        print(f"hyprune distill: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """What the checks established about a run, before any heavy work."""

    kd: bool  # a teacher signal (full logits or the top-k cache); False: plain next-token loss
    cache: TopKCache | None
    windows: torch.Tensor | None  # training windows (None with a cache)
    num_windows: int
    common: int | None  # logits to compare when the vocabularies differ only in padding rows
    hidden_map: dict[int, int]  # student block -> teacher block for the intermediate-state loss
    channels: torch.Tensor | None  # teacher channels the student kept
    micro: int  # windows per micro-batch on this rank
    eval_windows: torch.Tensor | None
    fingerprints: dict  # of the inputs, compared on resume (see hyprune.resume)


def _check_inputs(teacher, student, data, cfg: DistillConfig, eval_windows, tokenizer, teacher_tokenizer,
                  info) -> _Inputs:
    cache = data if isinstance(data, TopKCache) else None
    if cache is None and isinstance(data, (str, Path)):
        if not (Path(data) / "manifest.json").is_file():
            raise HypruneError(f"{data} is not a teacher top-k cache folder; pass token windows or a cache.")
        cache = TopKCache(data)
    kd = cfg.loss != "ce"
    if kd and cache is None and teacher is None:
        raise HypruneError("Distillation needs a teacher (or a teacher top-k cache as the data). "
                           "For training without a teacher use finetune() or loss='ce'.")
    if cache is not None:
        if cache.seq_len != cfg.seq_len:
            raise HypruneError(f"The top-k cache holds windows of {cache.seq_len} tokens, but seq_len is "
                               f"{cfg.seq_len}. Use the cache's seq_len or rebuild the cache.")
        if cfg.hidden_loss:
            raise HypruneError("The intermediate-state loss needs the teacher's hidden states; a top-k cache holds "
                               "only logits. Drop hidden_loss, or pass the teacher and token windows.")
        windows, num_windows = None, len(cache)
        teacher_vocab = cache.vocab_size if kd else None
    else:
        windows = as_windows(data, cfg.seq_len)
        num_windows = len(windows)
        teacher_vocab = int(teacher.config.vocab_size) if (kd and teacher is not None) else None
    student_vocab = int(student.config.vocab_size)
    common = check_vocab(teacher_vocab, student_vocab, tokenizer, teacher_tokenizer)
    limit = common or student_vocab
    if windows is not None and int(windows.max()) >= limit:
        raise HypruneError(f"The training data holds token id {int(windows.max())}, but the vocabulary has {limit} "
                           "tokens. Tokenize the data with the student's tokenizer.")
    t_type = getattr(teacher.config, "model_type", None) if teacher is not None else None
    if kd and teacher is not None and t_type != getattr(student.config, "model_type", None):
        warnings.warn(
            f"The student is not derived from the teacher: the teacher is a {teacher.config.model_type} model and "
            f"the student a {student.config.model_type} model. Distillation runs, but a student pruned from the "
            "teacher recovers far better.", stacklevel=4)
    hidden_map, channels = ({}, None)
    if cfg.hidden_loss and kd:
        hidden_map, channels = _hidden_setup(cfg, teacher, student)
    if cfg.batch % info.world_size:
        raise HypruneError(f"The global batch ({cfg.batch}) must be divisible by the number of processes "
                           f"({info.world_size}).")
    per_rank = cfg.batch // info.world_size
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise HypruneError(f"Each process gets {per_rank} windows per step, which micro_batch={micro} does not divide. "
                           "Pick micro_batch as a divisor of batch / processes.")
    if eval_windows is not None:
        eval_windows = as_windows(eval_windows, eval_windows.shape[-1])[: cfg.eval_windows]
    fingerprints = {"data_windows": (tensor_fingerprint(windows) if windows is not None else
                                     _file_sha(Path(cache.path) / "manifest.json"))}
    if teacher is not None and kd:
        fingerprints["teacher_config"] = _config_fingerprint(teacher.config)
    return _Inputs(kd=kd, cache=cache, windows=windows, num_windows=num_windows, common=common,
                   hidden_map=hidden_map, channels=channels, micro=micro, eval_windows=eval_windows,
                   fingerprints=fingerprints)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _config_fingerprint(config) -> str:
    """A hash of a model config (without its bookkeeping: name or path, transformers version)."""
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume_point(root: Path, cfg: DistillConfig, student, info, fingerprints: dict,
                  allow_changed: bool) -> tuple[int, Path, dict, dict]:
    """(first step, checkpoint resumed from, its trainer.json, accepted changes); loads the student's weights.

    Refuses when there is no checkpoint (as `search --resume` does) and when a setting that shapes
    the result or an input's fingerprint differs from the checkpoint's, unless ``allow_changed``.
    """
    found = None
    if info.is_main:
        ckpt.remove_stale(root)
        found = ckpt.newest_valid_checkpoint(root)
    found = dist_utils.broadcast_object(None if found is None else (str(found[0]), found[1]), info)
    if found is None:
        raise HypruneError(f"Nothing to resume: {root} holds no complete checkpoint. Drop --resume to start a new "
                           "run (with --overwrite if the folder holds an earlier one).")
    resumed = Path(found[0])
    saved = json.loads((resumed / ckpt.TRAINER_JSON).read_text())
    was = {**{k: v for k, v in saved["config"].items() if k not in NOT_COMPARED_ON_RESUME}, **saved.get("inputs", {})}
    changed = check_resume(resumed, was, {**cfg.resume_settings(), **fingerprints}, allow_changed)
    _load_weights(student, resumed / ckpt.WEIGHTS)
    _say(info, f"resuming from {resumed} (step {saved['step']}, {saved['tokens']} tokens).")
    if changed:
        _say(info, f"resuming with changed settings (--resume-changed): {describe_changes(changed)}.")
    return int(saved["step"]), resumed, saved, changed


class _Objective:
    """The loss of one micro-batch: student forward, the teacher's signal, the configured mix."""

    def __init__(self, cfg: DistillConfig, inputs: _Inputs, wrapped, student, teacher, device, aux=None):
        self.cfg, self.inputs, self.wrapped, self.student, self.teacher, self.device = (
            cfg, inputs, wrapped, student, teacher, device)
        self.aux = aux

    def fetch(self, indices: list[int]):
        """Token ids of these windows, and the cached teacher top-k (or None)."""
        if self.inputs.cache is not None:
            ids, values, top = self.inputs.cache.rows(indices)
            return ids.to(self.device), (values.to(self.device), top.to(self.device))
        return self.inputs.windows[indices].to(self.device), None

    def __call__(self, ids, cached, step: int) -> dict[str, torch.Tensor]:
        parts = self._main(ids, cached)
        if self.aux is not None:
            parts["aux"] = self.aux(self.student, step, self.cfg.total_steps())
            parts["loss"] = parts["loss"] + parts["aux"]
        return parts

    def _main(self, ids, cached) -> dict[str, torch.Tensor]:
        cfg, inputs, hidden_map = self.cfg, self.inputs, self.inputs.hidden_map
        parts: dict[str, torch.Tensor] = {}
        with _autocast(self.device, cfg.precision):
            s_capture = capture_block_outputs(self.student, list(hidden_map)) if hidden_map else nullcontext()
            with s_capture as s_states:
                s_logits = self.wrapped(input_ids=ids, use_cache=False).logits
            t_logits, t_states = None, None
            if inputs.kd and cached is None:
                t_device = next(self.teacher.parameters()).device
                t_capture = capture_block_outputs(self.teacher, list(hidden_map.values())) if hidden_map else nullcontext()
                with torch.no_grad(), t_capture as t_states:
                    t_logits = self.teacher(input_ids=ids.to(t_device), use_cache=False).logits.to(self.device)
        if inputs.common is not None:
            s_logits = s_logits[..., : inputs.common]
            t_logits = t_logits[..., : inputs.common] if t_logits is not None else None
        if not inputs.kd:
            total = parts["ce"] = next_token_ce(s_logits, ids)
            return {"loss": total, **parts}
        if cached is not None:
            values, top = cached
            valid = None
            if inputs.common is not None and inputs.common < inputs.cache.vocab_size:
                valid = top < inputs.common  # teacher entries in padding rows: drop them
                top = top.masked_fill(~valid, 0)
            total = parts["kd"] = topk_loss(cfg.loss, s_logits, values, top, cfg.temperature, cfg.beta, valid=valid)
        else:
            total = parts["kd"] = logit_loss(cfg.loss, s_logits, t_logits, cfg.temperature, cfg.beta)
        if cfg.ce_weight > 0:
            parts["ce"] = next_token_ce(s_logits, ids)
            total = (1 - cfg.ce_weight) * total + cfg.ce_weight * parts["ce"]
        if hidden_map:
            parts["hidden"] = hidden_state_loss([s_states[s] for s in hidden_map],
                                                [t_states[t].to(self.device) for t in hidden_map.values()],
                                                cfg.hidden_loss, inputs.channels)
            total = combine_with_hidden(total, parts["hidden"], cfg.hidden_alpha)
        return {"loss": total, **parts}


@dataclass
class _Run:
    """What every step of one run shares, set up once by `_setup`."""

    cfg: DistillConfig
    inputs: _Inputs
    info: object  # distill.distributed.DistInfo
    mode: str  # "single", "ddp" or "fsdp"
    out: Path
    student: object
    teacher: object
    wrapped: object  # the student as the optimizer sees it (DDP wrapper, FSDP-sharded, or itself)
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    objective: _Objective
    fingerprints: dict
    start_step: int
    resumed: Path | None
    saved: dict  # the resumed checkpoint's trainer.json ({} for a new run)
    changed: dict  # settings changed on resume (--resume-changed)
    writer: object = None  # TensorBoard (rank 0, when installed)
    teacher_ppl: float | None = None

    @property
    def root(self) -> Path:
        return self.out / CHECKPOINTS

    @property
    def log_path(self) -> Path:
        return self.out / LOG_FILE

    @property
    def total_steps(self) -> int:
        return self.cfg.total_steps()


LOSS_PARTS = ["loss", "kd", "ce", "hidden", "aux"]  # the order of the per-step sums


def _setup(teacher, student, cfg: DistillConfig, inputs: _Inputs, out: Path, info, resume: bool,
           allow_changed: bool, fingerprints: dict, aux=None) -> _Run:
    """Devices, the resumed weights and states (or a fresh seed), wrapping, AdamW and the schedule, the log."""
    mode = "fsdp" if (cfg.fsdp and info.enabled) else ("ddp" if info.enabled else "single")
    if info.device is not None:
        student.to(info.device)
        if teacher is not None:
            teacher.to(info.device)
    device = next(student.parameters()).device
    root = out / CHECKPOINTS
    start_step, resumed, saved, changed = (_resume_point(root, cfg, student, info, fingerprints, allow_changed)
                                           if resume else (0, None, {}, {}))
    if info.is_main and resumed is None:
        ckpt.remove_stale(root)
    if resumed is None:
        _seed_all(cfg.seed)

    student.train()
    if teacher is not None:
        teacher.eval()
    if cfg.activation_checkpointing:
        _set_activation_checkpointing(student, True)
    wrapped = _wrap(student, mode, info)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, cfg.total_steps()))
    if resumed is not None:
        _load_optimizer(wrapped, optimizer, ckpt.load_torch(resumed / ckpt.OPTIMIZER), mode)
        trainer_state = ckpt.load_torch(resumed / ckpt.TRAINER_STATE)
        scheduler.load_state_dict(trainer_state["scheduler"])
        rngs = trainer_state["rng"]
        _set_rng_state(rngs[info.rank] if info.rank < len(rngs) else rngs[0])
        if changed:
            _apply_settings(optimizer, scheduler, cfg, cfg.total_steps())
    run = _Run(cfg, inputs, info, mode, out, student, teacher, wrapped, params, optimizer, scheduler,
               _Objective(cfg, inputs, wrapped, student, teacher, device, aux), fingerprints, start_step, resumed,
               saved, changed)
    _open_log(run)
    return run


def _open_log(run: _Run) -> None:
    """Rank 0: the log (trimmed to the resumed step) and TensorBoard; every rank: the teacher's perplexity."""
    info, eval_windows = run.info, run.inputs.eval_windows
    if info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        _trim_log(run.log_path, run.start_step)
        run.writer = _tensorboard(run.out)
        if run.changed:  # the accepted changes, on record next to the steps they affect
            _log(run.log_path, None, {"event": "resume_changed", "step": run.start_step, "from": str(run.resumed),
                                      "changed": run.changed})
    teacher_ppl = run.saved.get("teacher_ppl")
    if teacher_ppl is None and eval_windows is not None and run.teacher is not None and info.is_main:
        teacher_ppl = perplexity(run.teacher, eval_windows, batch_size=run.cfg.eval_batch)["perplexity"]
    run.teacher_ppl = dist_utils.broadcast_object(teacher_ppl, info)


def _train(run: _Run, tokenizer) -> dict:
    """The loop: one `_step` per optimizer step, then `_after_step` (log, evaluate, checkpoint); `_finish`."""
    cfg, info = run.cfg, run.info
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc="distill" if run.inputs.kd else "finetune",
               unit="step", disable=not (cfg.progress and info.is_main), dynamic_ncols=True)
    last_loss, last_ppl, started = run.saved.get("loss"), None, time.perf_counter()
    try:
        for step in range(run.start_step, run.total_steps):
            t0 = time.perf_counter()
            sums, grad_norm, lr = _step(run, step)
            last_loss = float(sums[0])
            last_ppl = _after_step(run, step + 1, sums, grad_norm, lr, time.perf_counter() - t0, started,
                                   last_ppl, bar)
        return _finish(run, tokenizer, last_loss, last_ppl, started)
    finally:
        bar.close()
        if run.writer is not None:
            run.writer.close()
        if cfg.activation_checkpointing:
            _set_activation_checkpointing(run.student, False)
        run.student.eval()


def _step(run: _Run, step: int) -> tuple[torch.Tensor, float, float]:
    """One optimizer step (0-based ``step``) on every rank: (loss parts averaged over ranks, grad norm, lr)."""
    cfg, info = run.cfg, run.info
    done = step + 1
    share = rank_slice(batch_indices(step, cfg.batch, run.inputs.num_windows, cfg.seed), info.rank, info.world_size)
    chunks = micro_batches(share, run.inputs.micro)
    run.optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(len(LOSS_PARTS), dtype=torch.float64)
    for m, chunk in enumerate(chunks):
        ids, cached = run.objective.fetch(chunk)
        with _grad_sync(run.wrapped, run.mode, sync=m == len(chunks) - 1):
            parts = run.objective(ids, cached, step)
            (parts["loss"] * (len(chunk) / len(share))).backward()
        for i, name in enumerate(LOSS_PARTS):
            if name in parts:
                sums[i] += parts[name].detach().double().cpu() * (len(chunk) / len(share))
    sums = dist_utils.all_reduce_mean(sums, info)
    loss = float(sums[0])
    if not math.isfinite(loss):
        raise HypruneError(_nan_message("loss", loss, done, run.root))
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(grad_norm):
        raise HypruneError(_nan_message("gradient norm", grad_norm, done, run.root))
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    return sums, grad_norm, lr


def _after_step(run: _Run, done: int, sums: torch.Tensor, grad_norm: float, lr: float, seconds: float,
                started: float, last_ppl: float | None, bar) -> float | None:
    """Log step ``done`` (1-based), evaluate and checkpoint when due; returns the latest student perplexity."""
    cfg, inputs = run.cfg, run.inputs
    loss, tokens_per_step = float(sums[0]), cfg.batch * cfg.seq_len
    tokens = done * tokens_per_step
    record = {"step": done, "tokens": tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "tokens_per_s": tokens_per_step / max(seconds, 1e-9)}
    aux = run.objective.aux
    active = {"kd": inputs.kd, "ce": not inputs.kd or cfg.ce_weight > 0, "hidden": bool(inputs.hidden_map),
              "aux": aux is not None}
    for i, name in enumerate(LOSS_PARTS[1:], 1):
        if active[name]:
            record[f"{name}_loss"] = float(sums[i])
    if aux is not None and hasattr(aux, "log"):
        record.update(aux.log(done - 1, run.total_steps))
    is_last = done == run.total_steps
    if inputs.eval_windows is not None and (is_last or (cfg.eval_every and done % cfg.eval_every == 0)):
        last_ppl = _student_ppl(run)
        record["eval_ppl"] = last_ppl
        if run.teacher_ppl is not None:
            record["teacher_ppl"] = run.teacher_ppl
    record["elapsed_s"] = time.perf_counter() - started
    if run.info.is_main and (done % cfg.log_every == 0 or is_last or "eval_ppl" in record):
        _log(run.log_path, run.writer, record)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **({"ppl": f"{last_ppl:.2f}"} if last_ppl else {}))
    if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or is_last):
        _save_checkpoint(run, done, tokens, loss)
    return last_ppl


def _student_ppl(run: _Run) -> float | None:
    """The student's held-out perplexity (None without held-out windows), the same on every rank."""
    if run.inputs.eval_windows is None:
        return None
    value = None
    if run.mode == "fsdp" or run.info.is_main:  # FSDP needs every rank in the forward
        module = run.student if run.mode != "ddp" else run.wrapped.module
        module.eval()
        value = perplexity(module, run.inputs.eval_windows, batch_size=run.cfg.eval_batch)["perplexity"]
        module.train()
    return dist_utils.broadcast_object(value, run.info)


def _finish(run: _Run, tokenizer, last_loss: float | None, last_ppl: float | None, started: float) -> dict:
    """Evaluate the final student if no step did, save it to ``out/final``; the run's summary."""
    cfg, info = run.cfg, run.info
    if run.inputs.eval_windows is not None and last_ppl is None:
        last_ppl = _student_ppl(run)
    summary = {"steps": run.total_steps, "tokens": run.total_steps * cfg.batch * cfg.seq_len, "loss": last_loss,
               "student_ppl": last_ppl, "teacher_ppl": run.teacher_ppl,
               "resumed_from": str(run.resumed) if run.resumed else None, "changed_on_resume": run.changed or None,
               "elapsed_s": time.perf_counter() - started, "world_size": info.world_size,
               "final": str(run.out / FINAL), "log": str(run.log_path), "checkpoints": str(run.root)}
    weights = _full_state_dict(run.wrapped, run.student, run.mode) if run.mode == "fsdp" else None
    if info.is_main:
        with atomic_dir(run.out / FINAL) as tmp:
            run.student.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "hyprune_distill.json").write_text(
                json.dumps({"summary": summary, "config": cfg.model_dump(mode="json")}, indent=1) + "\n")
    dist_utils.barrier(info)
    return summary


def _save_checkpoint(run: _Run, step: int, tokens: int, loss: float) -> None:
    """Write ``root/step-N`` atomically on rank 0 (every rank joins the gathers); keep the last K."""
    cfg, info, root = run.cfg, run.info, run.root
    weights = _full_state_dict(run.wrapped, run.student, run.mode)
    optim_state = _optimizer_state(run.wrapped, run.optimizer, run.mode)
    rngs = dist_utils.gather_objects(_rng_state(), info)
    error = None
    if info.is_main:
        meta = {"step": step, "tokens": tokens}
        state_json = {"step": step, "tokens": tokens, "loss": loss, "world_size": info.world_size,
                      "teacher_ppl": run.teacher_ppl, "config": cfg.model_dump(mode="json"),
                      "inputs": run.fingerprints}
        scheduler = run.scheduler
        writers = {
            ckpt.WEIGHTS: lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
            ckpt.OPTIMIZER: lambda p: ckpt.save_torch(optim_state, p),
            ckpt.TRAINER_STATE: lambda p: ckpt.save_torch({"scheduler": scheduler.state_dict(), "rng": rngs}, p),
            ckpt.TRAINER_JSON: lambda p: p.write_text(json.dumps(state_json, indent=1) + "\n"),
        }
        try:
            ckpt.write_checkpoint(root, step, writers, meta)
            ckpt.prune_checkpoints(root, cfg.keep_last)
        except OSError as e:
            previous = ckpt.list_checkpoints(root)
            kept = (f"The previous checkpoint {previous[-1][1]} is intact" if previous
                    else "No earlier checkpoint exists")
            error = (f"Could not write the checkpoint of step {step} under {root}: {e}. {kept}. Free disk space "
                     "(or pick another --out) and rerun with --resume.")
    error = dist_utils.broadcast_object(error, info)
    dist_utils.barrier(info)
    if error:
        raise HypruneError(error)


def _apply_settings(optimizer, scheduler, cfg: DistillConfig, total_steps: int) -> None:
    """After a resume that accepted changes: the new lr schedule and AdamW settings, from the resumed step.

    The loaded optimizer and scheduler states carry the old run's lr, betas and weight decay; without
    this the changed values would be ignored (or take effect only in part).
    """
    factor = _lr_lambda(cfg, total_steps)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor(scheduler.last_epoch), betas=tuple(cfg.betas),
                     weight_decay=decay)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _log(path: Path, writer, record: dict) -> None:
    """One line of log.jsonl (and the TensorBoard scalars)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key, value in record.items():
            if key not in ("step", "tokens") and value is not None:
                writer.add_scalar(f"train/{key}", value, record["step"])


def _set_activation_checkpointing(model, on: bool) -> None:
    """Recompute block activations in the backward pass (non-reentrant), through the HF switch.

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``;
    both are accepted so older 5.x releases work too.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def _nan_message(what: str, value: float, step: int, root: Path) -> str:
    previous = ckpt.list_checkpoints(root)
    kept = (f"The last good checkpoint is {previous[-1][1]} (step {previous[-1][0]})" if previous
            else "No checkpoint was written before it")
    return (f"The {what} became {value} at step {step}; training stopped before applying that step. {kept}. "
            "Lower the learning rate (or set grad_clip, check the data) and rerun with --resume.")


# ---------------------------------------------------------------------------------------------
# DDP / FSDP2
# ---------------------------------------------------------------------------------------------
def _wrap(student, mode: str, info):
    if mode == "ddp":
        ids = [info.device.index] if info.device is not None and info.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=ids)
    if mode == "fsdp":
        for block in block_list(student):
            fully_shard(block)
        fully_shard(student)
        return student
    return student


def _grad_sync(wrapped, mode: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if mode == "ddp" and not sync:
        return wrapped.no_sync()
    if mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def _full_state_dict(wrapped, student, mode: str) -> dict[str, torch.Tensor]:
    if mode == "fsdp":
        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = student.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in _dedupe(state).items()}


def _optimizer_state(wrapped, optimizer, mode: str) -> dict:
    if mode == "fsdp":
        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optimizer(wrapped, optimizer, state: dict, mode: str) -> None:
    if mode == "fsdp":
        set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
