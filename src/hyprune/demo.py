"""`hyprune demo`: an offline, end-to-end run on a model small enough for a laptop CPU.

1. Corpus: the ``.py`` files of the running Python's standard library (no download). Files are
   split into train / held-out test by a hash of their relative path, so the split is the same on
   every machine with the same Python, and written to ``OUT/data/{train,test}.txt`` with documents
   joined by ``<|endoftext|>``.
2. Teacher: a byte-level BPE tokenizer (2048 tokens) and a small NemotronH (pattern ``M-M*-M-``:
   Mamba-2, MLP and attention blocks) trained from scratch for a few minutes of wall time. It is
   cached in ``OUT/teacher`` and reused by later runs.
3. Prune: activation importance on calibration windows, a group-aware Minitron-SSM plan for a
   target of about half the parameters, the plan applied, the result saved to ``OUT/pruned``
   (an ordinary HF checkpoint, with ``plan.json``).
4. Report: parameters per component and held-out perplexity, before and after, as a table and in
   ``OUT/demo_results.json``.

The pruned model is *not* retrained here; Minitron-SSM recovers its accuracy with distillation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from hyprune.checkpoint import atomic_dir, save_pruned
from hyprune.errors import HypruneError

EOS = "<|endoftext|>"
# Block pattern M-M*-M-: Mamba-2, MLP, Mamba-2, attention, MLP, Mamba-2, MLP.
PATTERN = ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp", "linear_attention", "mlp"]
TEACHER = dict(
    hidden_size=128,
    intermediate_size=512,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
# About half of the teacher's parameters (51.6%): every width axis but the SSM state shrinks, the
# layer pattern stays. Mamba keeps 3 of the 4 heads in each of its 2 groups (group-aware ranking).
TARGET = dict(
    hidden_size=88,
    intermediate_size=256,
    mamba_num_heads=6,
    mamba_head_dim=12,
    num_attention_heads=2,
    num_key_value_heads=1,
)
# Standard-library folders that are not ordinary library code (tests, generated tables, tools).
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "encodings",
             "pydoc_data", "__pycache__", "ensurepip", "venv"}
DEMO_ENTRIES = {"data", "teacher", "pruned", "demo_results.json"}
TEST_SHARE = 10  # one file in TEST_SHARE goes to the held-out set


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------
def _key(rel: str) -> str:
    return hashlib.sha1(rel.encode()).hexdigest()


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, in a fixed hash order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise HypruneError(f"The Python standard library is not at {root}; the demo trains on its source.")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found, key=lambda item: _key(item[0]))


def build_corpus(data_dir: Path, max_train_bytes: int, max_test_bytes: int) -> dict:
    """Write ``train.txt`` and ``test.txt`` (documents joined by EOS); returns counts."""
    counts = {"train": [0, 0], "test": [0, 0]}  # files, characters
    caps = {"train": max_train_bytes, "test": max_test_bytes}
    parts: dict[str, list[str]] = {"train": [], "test": []}
    for rel, path in stdlib_files():
        split = "test" if int(_key(rel), 16) % TEST_SHARE == 0 else "train"
        if counts[split][1] >= caps[split]:
            if all(counts[s][1] >= caps[s] for s in counts):
                break
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        text = text.replace(EOS, "")
        if not text.strip() or "\x00" in text:
            continue
        parts[split].append(text)
        counts[split][0] += 1
        counts[split][1] += len(text)
    if not parts["train"] or not parts["test"]:
        raise HypruneError("Found too few .py files in the Python standard library to build the demo corpus.")
    with atomic_dir(data_dir) as tmp:
        for split, docs in parts.items():
            (tmp / f"{split}.txt").write_text(EOS.join(docs), encoding="utf-8")
    return {s: {"files": f, "chars": c} for s, (f, c) in counts.items()}


def _read_docs(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").split(EOS) if d.strip()]


# ---------------------------------------------------------------------------------------------
# Tokenizer and teacher
# ---------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with ``<|endoftext|>`` as id 0 (EOS, BOS, PAD and UNK)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.token_to_id(EOS) != 0:  # pragma: no cover - the trainer puts special tokens first
        raise HypruneError("The demo tokenizer did not give <|endoftext|> id 0.")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def teacher_config(vocab_size: int, seq_len: int):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab_size,
        layers_block_type=list(PATTERN),
        chunk_size=64,
        max_position_embeddings=max(512, seq_len),
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
        use_cache=False,
        **TEACHER,
    )


def _token_tensor(tokenizer, docs: list[str]) -> torch.Tensor:
    backend = tokenizer.backend_tokenizer
    ids: list[int] = []
    for enc in backend.encode_batch(docs, add_special_tokens=False):
        ids += enc.ids
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _lr(frac: float, peak: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warmup over the first ``warmup`` of the time budget, then cosine down to ``floor * peak``."""
    if frac < warmup:
        return peak * max(frac / warmup, 0.02)
    t = min(1.0, (frac - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train_teacher(model, stream: torch.Tensor, minutes: float, seq_len: int, batch_size: int, seed: int,
                  peak_lr: float = 3e-3, progress: bool = True, console=None) -> dict:
    """AdamW on random packed windows of ``stream`` for ``minutes`` of wall time (at least one step)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if len(stream) <= seq_len + 1:
        raise HypruneError(f"The demo training text holds only {len(stream)} tokens; it needs more than {seq_len}.")
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=peak_lr, betas=(0.9, 0.95))
    budget = max(1e-3, minutes * 60.0)
    offsets = torch.arange(seq_len)
    model.train()
    step, tokens, smooth = 0, 0, None
    start = time.perf_counter()
    columns = [TextColumn("training teacher"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("/"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=budget, info="")
        while True:
            elapsed = time.perf_counter() - start
            if step > 0 and elapsed >= budget:
                break
            for group in opt.param_groups:
                group["lr"] = _lr(elapsed / budget, peak_lr)
            starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
            batch = stream[starts[:, None] + offsets]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += batch.numel()
            value = loss.item()
            smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
            bar.update(task, completed=min(budget, time.perf_counter() - start),
                       info=f"step {step}  loss {smooth:.3f}")
    model.eval()
    seconds = time.perf_counter() - start
    return {"steps": step, "tokens_seen": tokens, "seconds": round(seconds, 1), "final_loss": round(smooth, 4),
            "batch_size": batch_size, "seq_len": seq_len, "peak_lr": peak_lr, "train_tokens": len(stream)}


def _teacher_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()


@contextmanager
def _quiet_transformers():
    """Hide transformers' loading bars and its notes on missing CUDA kernels (the PyTorch path is intended)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HypruneError(f"--out {out} is a file; pass a folder path.")
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise HypruneError(
            f"{out} is not empty and does not look like a hyprune demo folder (it holds {', '.join(foreign[:5])}). "
            "Pick a new --out folder; the demo only deletes or reuses folders it wrote itself."
        )
    if overwrite:
        shutil.rmtree(out)


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------
def run_demo(
    out: str,
    train_minutes: float = 3.0,
    overwrite: bool = False,
    *,
    max_train_bytes: int = 6_000_000,
    max_test_bytes: int = 600_000,
    vocab_size: int = 2048,
    seq_len: int = 128,
    batch_size: int = 16,
    calib_windows: int = 64,
    eval_windows: int = 128,
    seed: int = 0,
    progress: bool = True,
    console=None,
) -> dict:
    """Train (or reuse) a small NemotronH teacher on the stdlib source, prune it to ~50%, report.

    Returns the dict written to ``OUT/demo_results.json``. The keyword-only arguments exist for
    tests and experiments (a smaller corpus, fewer windows); the defaults are the demo.
    """
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from hyprune.apply import apply_plan
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.importance import activation_scores
    from hyprune.models import count_parameters, load_model, load_tokenizer
    from hyprune.plan import make_plan, summarize

    if train_minutes <= 0:
        raise HypruneError(f"--train-minutes must be positive, got {train_minutes}.")
    console = console or Console()
    status = Console(stderr=True)
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, teacher_dir, pruned_dir = out / "data", out / "teacher", out / "pruned"
    train_txt, test_txt = data_dir / "train.txt", data_dir / "test.txt"
    wall = time.perf_counter()
    torch.manual_seed(seed)
    random.seed(seed)

    with _quiet_transformers():
        # 1. corpus --------------------------------------------------------------------------
        if train_txt.is_file() and test_txt.is_file():
            corpus = {s: {"files": None, "chars": len(p.read_text(encoding="utf-8"))}
                      for s, p in (("train", train_txt), ("test", test_txt))}
            console.print(f"corpus: reusing {data_dir}")
        else:
            corpus = build_corpus(data_dir, max_train_bytes, max_test_bytes)
            console.print(f"corpus: {corpus['train']['files']} stdlib files for training "
                          f"({corpus['train']['chars'] / 1e6:.1f} M chars), {corpus['test']['files']} held out "
                          f"({corpus['test']['chars'] / 1e6:.2f} M chars) -> {data_dir}")

        # 2. teacher -------------------------------------------------------------------------
        reused = _teacher_ready(teacher_dir)
        if reused:
            console.print(f"teacher: reusing the model trained earlier in {teacher_dir} "
                          "(pass --overwrite to train a new one)")
            info_file = teacher_dir / "demo_training.json"
            training = json.loads(info_file.read_text()) if info_file.is_file() else {}
        else:
            train_docs = _read_docs(train_txt)
            t0 = time.perf_counter()
            tokenizer = train_tokenizer(train_docs, vocab_size)
            stream = _token_tensor(tokenizer, train_docs)
            console.print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; {len(stream):,} training tokens "
                          f"({time.perf_counter() - t0:.0f} s)")
            config = teacher_config(len(tokenizer), seq_len)
            model = AutoModelForCausalLM.from_config(config)
            console.print(f"teacher: NemotronH, pattern {config.hybrid_override_pattern}, "
                          f"{sum(p.numel() for p in model.parameters()):,} parameters; "
                          f"training for {train_minutes:g} min on {torch.get_num_threads()} CPU threads")
            training = train_teacher(model, stream, train_minutes, seq_len, batch_size, seed,
                                     progress=progress, console=status)
            training["minutes"] = train_minutes
            with atomic_dir(teacher_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                (tmp / "demo_training.json").write_text(json.dumps(training, indent=1) + "\n")
            console.print(f"teacher: {training['steps']} steps, {training['tokens_seen']:,} tokens, "
                          f"final train loss {training['final_loss']:.3f} -> {teacher_dir}")
            del model

        # 3. prune ---------------------------------------------------------------------------
        tokenizer = load_tokenizer(teacher_dir)
        teacher, family = load_model(teacher_dir)
        calib = calibration_windows(tokenizer, train_txt, seq_len, calib_windows, seed=seed)
        scores = activation_scores(teacher, calib, family, batch_size=8, progress=progress)
        plan = make_plan(family, teacher.config, scores, dict(TARGET))
        pruned = apply_plan(teacher, plan, family)
        before, after = count_parameters(teacher, family), count_parameters(pruned, family)
        summary = {"source": str(teacher_dir), "parameters": {"before": before, "after": after}, **summarize(plan)}
        save_pruned(pruned, tokenizer, pruned_dir, {"plan.json": plan.model_dump(exclude_none=True),
                                                    "hyprune_summary.json": summary}, overwrite=True)

        # 4. evaluate ------------------------------------------------------------------------
        test = heldout_windows(tokenizer, test_txt, seq_len=seq_len, num_windows=eval_windows)
        ppl_teacher = perplexity(teacher, test, batch_size=8, progress=progress)
        ppl_pruned = perplexity(pruned, test, batch_size=8, progress=progress)
        torch.manual_seed(seed)
        untrained = AutoModelForCausalLM.from_config(teacher.config).eval()
        ppl_untrained = perplexity(untrained, test, batch_size=8)

    results = {
        "teacher": {"path": str(teacher_dir), "reused": reused, "parameters": before, "heldout": ppl_teacher,
                    "config": {k: getattr(teacher.config, k) for k in TEACHER},
                    "pattern": teacher.config.hybrid_override_pattern, "training": training},
        "pruned": {"path": str(pruned_dir), "parameters": after, "heldout": ppl_pruned,
                   "config": {k: getattr(pruned.config, k) for k in TEACHER}},
        "untrained_teacher_heldout": ppl_untrained,
        "target": dict(TARGET),
        "plan": summarize(plan),
        "kept_share": after["total"] / before["total"],
        "corpus": {"train": str(train_txt), "test": str(test_txt), **corpus},
        "calibration": {"data": str(train_txt), "seq_len": seq_len, "windows": len(calib), "seed": seed},
        "seconds": round(time.perf_counter() - wall, 1),
    }
    tmp = out / ".demo_results.json.tmp"  # write, then rename: never a half-written file
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out / "demo_results.json")

    table = Table(title="hyprune demo: NemotronH trained on the stdlib source, pruned to ~50%")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("pruned", justify="right")
    table.add_column("kept", justify="right")
    for key in before:
        share = f"{100 * after[key] / before[key]:.0f}%" if before[key] else ""
        table.add_row(key, f"{before[key]:,}", f"{after[key]:,}", share, end_section=key == "total")
    table.add_row("held-out perplexity", f"{ppl_teacher['perplexity']:.2f}", f"{ppl_pruned['perplexity']:.2f}", "")
    console.print(table)
    sizes_before, sizes_after = plan.source["sizes"], plan.result_sizes()
    changed = [f"{family.fields[a]} {sizes_before[a]}->{sizes_after[a]}" for a in sizes_before
               if sizes_before[a] != sizes_after[a]]
    console.print("pruned: " + ", ".join(changed))
    console.print(f"held-out: {ppl_teacher['windows']} windows x {ppl_teacher['seq_len']} tokens of {test_txt}; "
                  f"an untrained model of the teacher's shape scores {ppl_untrained['perplexity']:.0f}. "
                  "The pruned model is not retrained (Minitron-SSM recovers accuracy with distillation).")
    console.print(f"saved: teacher {teacher_dir}, pruned {pruned_dir} (with plan.json), "
                  f"results {out / 'demo_results.json'}")
    return results
