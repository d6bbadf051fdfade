"""Knowledge distillation that recovers pruned models (Minitron): losses, the loop, checkpoints, cache.

    from hyprune.distill import DistillConfig, distill
    cfg = DistillConfig(tokens=2_000_000, seq_len=256, batch=32, lr=2e-4, checkpoint_every=200)
    summary = distill(teacher, student, train_windows, cfg, "runs/kd", eval_windows=heldout)

``run_distill`` / ``run_finetune`` / ``cache_teacher`` take paths (the CLI commands are thin shells
over them): they check every input before loading weights, read and pack the data, and run the loop.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from hyprune.config import CacheConfig, LoadConfig, TrainData, resolve
from hyprune.data import check_source, heldout_windows, pack_windows, read_documents, token_stream
from hyprune.distill.cache import TopKCache, cache_teacher_topk
from hyprune.distill.checkpoints import list_checkpoints
from hyprune.distill.distributed import setup
from hyprune.distill.losses import (
    block_map_from_plan,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    logit_loss,
    reverse_kl,
    teacher_channels_from_plan,
    topk_forward_kl,
    topk_loss,
)
from hyprune.distill.train import (
    CHECKPOINTS,
    FINAL,
    LOG_FILE,
    DistillConfig,
    check_vocab,
    distill,
    finetune,
    make_config,
)
from hyprune.errors import HypruneError
from hyprune.io import check_output
from hyprune.models import load_config, load_model, load_tokenizer
from hyprune.report import write_run_report
from hyprune.resume import file_fingerprint, model_fingerprint

__all__ = ["DistillConfig", "TopKCache", "block_map_from_plan", "cache_teacher", "cache_teacher_topk",
           "check_vocab", "distill", "finetune", "forward_kl", "generalized_jsd", "run_distill", "run_finetune",
           "hidden_state_loss", "logit_loss", "make_config", "reverse_kl", "teacher_channels_from_plan",
           "topk_forward_kl", "topk_loss"]


def _check_out(out: Path, inputs: tuple, resume: bool, overwrite: bool) -> None:
    for src in inputs:
        if src and Path(src).exists() and Path(src).resolve() == out.resolve():
            raise HypruneError(f"The output folder {out} is an input model; pick another --out.")
    if out.exists() and not out.is_dir():
        raise HypruneError(f"--out {out} is a file; pass a folder.")
    previous = list_checkpoints(out / CHECKPOINTS) or (out / LOG_FILE).exists() or (out / FINAL).exists()
    if previous and not resume and not overwrite:
        raise HypruneError(f"{out} holds a previous run. Pass --resume to continue it, --overwrite to start over, "
                           "or pick a new folder.")


def _windows(tokenizer, data: str, seq_len: int, max_tokens: int | None, text_field: str, split: str) -> torch.Tensor:
    docs = read_documents(data, text_field, split, separator=tokenizer.eos_token)
    ids = token_stream(tokenizer, docs, max_tokens=max_tokens)
    windows = pack_windows(ids, seq_len)
    if len(windows) == 0:
        raise HypruneError(f"{data} holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}.")
    return windows


def _train_and_eval_windows(tokenizer, data, cfg: DistillConfig, eval_data, heldout, text_field, split):
    """Training windows (enough for ``tokens``; re-read in epochs if the file is smaller) and held-out ones.

    Without ``eval_data`` the held-out windows are the last ``min(eval_windows, max(1, n // 10))``
    windows of ``data``, which are then left out of training.
    """
    want_eval = heldout and eval_data is None
    budget = cfg.tokens + (cfg.eval_windows * cfg.seq_len if want_eval else 0)
    windows = _windows(tokenizer, data, cfg.seq_len, budget, text_field, split)
    eval_windows = None
    if heldout and eval_data is not None:
        eval_windows = heldout_windows(tokenizer, eval_data, cfg.seq_len, cfg.eval_windows, text_field=text_field,
                                       split=split)
    elif want_eval:
        n = min(cfg.eval_windows, max(1, len(windows) // 10)) if len(windows) > 1 else 0
        if n == 0:
            warnings.warn(f"{data} holds only {len(windows)} windows: too few to hold some out for perplexity; "
                          "pass --eval-data for held-out evaluation.", stacklevel=3)
        else:
            windows, eval_windows = windows[:-n], windows[-n:]
    return windows, eval_windows


def _load(model_id: str, dtype, device, allow_pickle, trust_remote_code):
    if device is None and torch.cuda.is_available():
        # under torchrun every process loads onto its own GPU, not all onto cuda:0
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    model, _ = load_model(model_id, dtype=dtype, device=device, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    return model


def run_distill(teacher: str | None, student: str, data: str, tokens: int, seq_len: int, batch: int, out: str,
                resume: bool = False, *, heldout: bool = True, overwrite: bool = False, allow_changed: bool = False,
                prepare=None, **fields) -> dict:
    """``hyprune distill``: load teacher and student, read ``data``, distill, write ``out/final``.

    ``data`` is a text file (.txt/.jsonl/.parquet or a datasets name), tokenized with the student's
    tokenizer and packed into ``seq_len`` windows, or a teacher top-k cache folder (then ``teacher``
    may be None: it is not loaded). ``fields`` are `TrainData` fields (``eval_data``, ``text_field``,
    ``split``), `LoadConfig` fields (``dtype``, ``device``, ``allow_pickle``, ``trust_remote_code``) and
    further `DistillConfig` fields (``lr``, ``micro_batch``, ``loss``, ``checkpoint_every``, ``plan``,
    ...). Writes ``out/final`` (HF checkpoint + tokenizer), ``out/checkpoints/step-XXXXXXXX/``,
    ``out/log.jsonl`` and the run's report (``out/report.md``, ``out/report.json``,
    ``out/training_curves.png``).

    ``resume`` continues ``out``'s newest checkpoint; it is refused when the settings that shape the
    result or the teacher, student (the path given, not the checkpoint) or data differ from the saved
    run's, unless ``allow_changed`` (``--resume-changed``), which logs the changes.

    ``prepare(student_model) -> (aux, settings)``, when given, changes the loaded student before training
    (`hyprune.kv.compress` switches its attention to DMC / DMS) and returns the extra loss term for
    `distill`'s ``aux`` and the settings it depends on (compared on resume like the others).
    """
    text_keys, load_keys = set(TrainData.model_fields), set(LoadConfig.model_fields) - {"model"}
    text, load = resolve("distill", {"data": data, **{k: v for k, v in fields.items() if k in text_keys | load_keys}},
                         (TrainData, None), (LoadConfig, None))
    cfg = make_config({k: v for k, v in fields.items() if k not in text_keys | load_keys}, tokens=tokens,
                      seq_len=seq_len, batch=batch)
    out_path = Path(out).expanduser()
    from_cache = Path(data).is_dir() and (Path(data) / "manifest.json").is_file()
    # the inputs, a file or an unwritable place first; then a previous run (--resume / --overwrite); then any
    # other non-empty folder
    check_output(out_path, "dir", inputs=(teacher, student, data, text.eval_data, cfg.plan), reuse=True)
    _check_out(out_path, (teacher, student), resume, overwrite)
    check_output(out_path, "dir", overwrite, reuse=resume)
    uses_teacher = teacher is not None and not from_cache and cfg.loss != "ce"
    tokenizer, teacher_tokenizer = _check_inputs(teacher, student, text, cfg, load, from_cache)
    if from_cache:
        train_data = TopKCache(data)
        eval_windows = (None if not heldout or text.eval_data is None else
                        _heldout(tokenizer, text.eval_data, cfg, text.text_field, text.split))
    else:
        train_data, eval_windows = _train_and_eval_windows(tokenizer, data, cfg, text.eval_data, heldout,
                                                           text.text_field, text.split)
    weights = dict(dtype=load.dtype, device=load.device, allow_pickle=load.allow_pickle,
                   trust_remote_code=load.trust_remote_code)
    teacher_model = _load(teacher, **weights) if uses_teacher else None
    student_model = _load(student, **weights)
    aux, prepared = prepare(student_model) if prepare is not None else (None, {})
    fingerprints = {**_fingerprints(teacher if uses_teacher else None, student, text, cfg, load),
                    **{f"prepare.{k}": v for k, v in prepared.items()}}
    summary = distill(teacher_model, student_model, train_data, cfg, out_path, eval_windows=eval_windows,
                      resume=resume, tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer, overwrite=overwrite,
                      allow_changed=allow_changed, fingerprints=fingerprints, aux=aux)
    _write_report(out_path)
    return summary


def _check_inputs(teacher, student, text: TrainData, cfg: DistillConfig, load: LoadConfig, from_cache: bool):
    """Configs, vocabularies and data files, before any weights: (student tokenizer, teacher tokenizer or None)."""
    s_config, _ = load_config(student, load.trust_remote_code)
    tokenizer = load_tokenizer(student, load.trust_remote_code)
    if from_cache:
        cache = TopKCache(text.data)
        check_vocab(cache.vocab_size if cfg.loss != "ce" else None, int(s_config.vocab_size), tokenizer)
    else:
        check_source(text.data)
        if text.eval_data is not None:
            check_source(text.eval_data)
        if teacher is None and cfg.loss != "ce":
            raise HypruneError("--teacher is required unless --data is a teacher top-k cache.")
    teacher_tokenizer = None
    if teacher is not None and not from_cache and cfg.loss != "ce":
        t_config, _ = load_config(teacher, load.trust_remote_code)
        try:
            teacher_tokenizer = load_tokenizer(teacher, load.trust_remote_code)
        except HypruneError:
            teacher_tokenizer = None  # assume the student's (a pruned student copies the teacher's)
        check_vocab(int(t_config.vocab_size), int(s_config.vocab_size), tokenizer, teacher_tokenizer)
    return tokenizer, teacher_tokenizer


def _fingerprints(teacher, student, text: TrainData, cfg: DistillConfig, load: LoadConfig) -> dict:
    """The inputs a resumed run must share with the saved one (``teacher`` None when it is not used)."""
    fingerprints = {"student": model_fingerprint(student), "data": file_fingerprint(text.data),
                    "text_field": text.text_field, "split": text.split, "dtype": load.dtype}
    if cfg.plan is not None:
        fingerprints["plan_file"] = file_fingerprint(cfg.plan)
    if teacher is not None:
        fingerprints["teacher"] = model_fingerprint(teacher)
    return fingerprints


def _write_report(out: Path) -> None:
    """report.md / report.json / curves in the run folder, written once (by rank 0 under torchrun)."""
    if setup().is_main:
        write_run_report(out)


def _heldout(tokenizer, eval_data, cfg, text_field, split):
    return heldout_windows(tokenizer, eval_data, cfg.seq_len, cfg.eval_windows, text_field=text_field, split=split)


def run_finetune(model: str, data: str, tokens: int, seq_len: int, batch: int, out: str, resume: bool = False,
                 **more) -> dict:
    """``hyprune finetune`` (teacher correction): the plain LM loss on ``data``, same loop and outputs."""
    more = {k: v for k, v in more.items() if k not in ("loss", "ce_weight", "hidden_loss")}
    return run_distill(None, model, data, tokens, seq_len, batch, out, resume, loss="ce", ce_weight=1.0, **more)


def cache_teacher(teacher: str, config: CacheConfig | None = None, *, out: str, load: LoadConfig | None = None,
                  overwrite: bool = False, progress: bool = True, **fields) -> Path:
    """``hyprune cache-teacher``: the teacher's top-``k`` log-probs over ``data`` (its own tokenizer) into ``out``.

    ``fields`` are `CacheConfig` fields (data, seq_len, k, tokens, batch_size, ...) and `LoadConfig`
    fields (dtype, device, allow_pickle, trust_remote_code), or pass the configs.
    """
    c, load = resolve("cache-teacher", {**fields, "model": teacher}, (CacheConfig, config), (LoadConfig, load))
    load_config(teacher, load.trust_remote_code)
    check_source(c.data)
    check_output(out, "dir", overwrite, inputs=(teacher, c.data))
    tokenizer = load_tokenizer(teacher, load.trust_remote_code)
    windows = _windows(tokenizer, c.data, c.seq_len, c.tokens, c.text_field, c.split)
    model = _load(teacher, load.dtype, load.device, load.allow_pickle, load.trust_remote_code)
    return cache_teacher_topk(model, windows, c.k, out, batch_size=c.batch_size, shard_windows=c.shard_windows,
                              dtype=c.cache_dtype, overwrite=overwrite, progress=progress)
