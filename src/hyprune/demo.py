"""`hyprune demo`: the whole pipeline, offline, on a model small enough for a laptop CPU.

1. Corpus: the ``.py`` files of the running Python's standard library (no download). Files are
   split into train / held-out test by a hash of their relative path, so the split is the same on
   every machine with the same Python, and written to ``OUT/data/{train,test}.txt`` with documents
   joined by ``<|endoftext|>``.
2. Teacher: a byte-level BPE tokenizer (2048 tokens) and a small NemotronH (pattern ``M-M*-M-``:
   Mamba-2, MLP and attention blocks) trained from a seeded random init for a fixed number of
   tokens (``--train-tokens``) through `hyprune.distill.finetune`, the loop distillation uses, so
   its weights, and every perplexity after it, are the same on every machine; only the time differs.
   It is cached in ``OUT/teacher`` and reused by later runs.
3. The tiny recipe (`demo_recipe`, shipped as ``recipes/demo.yaml``) through `hyprune.recipe`, the
   code path of ``hyprune run``, in ``OUT/run``: prune to about half the parameters (group-aware
   Minitron-SSM), distill briefly from the teacher (forward KL), evaluate teacher, pruned and
   distilled model on the held-out files, benchmark their speed, and write ``OUT/run/report.md``.
4. A table of the three models and the path of the report (its decode column is a rough speed).

A rerun reuses the corpus, the teacher and every finished stage; ``--overwrite`` starts from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, NemotronHConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from hyprune.distill import finetune, make_config
from hyprune.errors import HypruneError
from hyprune.io import atomic_dir, check_output
from hyprune.recipe import Recipe, model_rows, parse_recipe, run_recipe

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
DEMO_ENTRIES = {"data", "teacher", "run"}
TEST_SHARE = 10  # one file in TEST_SHARE goes to the held-out set
# Budgets in tokens, so the demo's result is the same on every machine (see README, "Demo timing").
TRAIN_TOKENS = 2_457_600  # 1,200 teacher steps of 16 x 128 tokens
PEAK_LR = 3e-3  # the teacher's
LOSS_TAIL = 50  # the teacher's "final train loss" is the mean over its last steps
DISTILL_TOKENS = 600_000


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


def teacher_training_config(tokens: int, seq_len: int, batch_size: int, seed: int, progress: bool = True):
    """The teacher's settings for `hyprune.distill.finetune` (plain LM loss, the loop distillation uses).

    AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr 3e-3 with a linear warmup over the
    first 5% of the steps, cosine down to 10% of the peak, gradient clipping at 1.0; no checkpoints and
    no held-out checks during training (the recipe's eval stage measures the teacher). Two differences
    from the demo's earlier hand-written loop: the loop decays every matrix, the embedding table too
    (the old loop left it out), and it samples whole consecutive windows of the stream in a seeded
    epoch order (`distill.batches`) instead of windows at random offsets.
    """
    steps = max(1, math.ceil(tokens / (batch_size * seq_len)))
    return make_config(tokens=tokens, seq_len=seq_len, batch=batch_size, lr=PEAK_LR, min_lr=PEAK_LR * 0.1,
                       warmup_steps=max(1, round(0.05 * steps)), weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
                       checkpoint_every=0, eval_every=0, log_every=1, seed=seed, precision="fp32", progress=progress)


def train_teacher(model, stream: torch.Tensor, tokens: int, seq_len: int, batch_size: int, seed: int, work_dir: Path,
                  progress: bool = True) -> dict:
    """Train ``model`` (in place) on ``tokens`` tokens of ``stream`` through `hyprune.distill.finetune`.

    The run's folder (``log.jsonl``, the loop's own final copy) is ``work_dir``; the record returned
    holds the steps, tokens and the mean training loss of the last steps, all machine-independent,
    and the seconds it took.
    """
    if len(stream) <= seq_len + 1:
        raise HypruneError(f"The demo training text holds only {len(stream)} tokens; it needs more than {seq_len}.")
    cfg = teacher_training_config(tokens, seq_len, batch_size, seed, progress)
    summary = finetune(model, stream, cfg, work_dir)
    losses = [json.loads(line)["loss"] for line in (work_dir / "log.jsonl").read_text().splitlines()]
    tail = losses[-LOSS_TAIL:]
    return {"steps": summary["steps"], "tokens_seen": summary["tokens"], "seconds": round(summary["elapsed_s"], 1),
            "final_loss": round(sum(tail) / len(tail), 4), "batch_size": batch_size, "seq_len": seq_len,
            "peak_lr": PEAK_LR, "train_tokens": len(stream)}


def _teacher_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file()


@contextmanager
def _quiet_transformers():
    """Hide transformers' loading bars and its notes on missing CUDA kernels (the PyTorch path is intended)."""
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
@dataclass(frozen=True)
class DemoSizes:
    """The demo's sizes; `run_demo` takes them as keyword arguments (tests and experiments shrink them)."""

    max_train_bytes: int = 6_000_000
    max_test_bytes: int = 600_000
    vocab_size: int = 2048
    seq_len: int = 128
    batch_size: int = 16
    calib_windows: int = 64
    eval_windows: int = 128
    seed: int = 0
    bench: bool = True


def run_demo(out: str, train_tokens: int = TRAIN_TOKENS, overwrite: bool = False,
             distill_tokens: int = DISTILL_TOKENS, *, progress: bool = True, console=None, **sizes) -> dict:
    """Train (or reuse) a small NemotronH teacher on the stdlib source, then run the tiny recipe on it.

    Returns the teacher's training record, a row per model (parameters, held-out perplexity, speed),
    the sizes before and after pruning, the stage timings and the report path. The keyword-only
    arguments (the fields of `DemoSizes`) exist for tests and experiments (a smaller corpus, fewer
    windows); the defaults are the demo.
    Everything but the timings (and the decode column, a speed) is the same on every run with the same
    arguments: the teacher trains for ``train_tokens`` tokens, not for a length of time.
    """
    size = DemoSizes(**sizes)
    if train_tokens < 1:
        raise HypruneError(f"--train-tokens must be positive, got {train_tokens}.")
    if distill_tokens < 1:
        raise HypruneError(f"--distill-tokens must be positive, got {distill_tokens}.")
    console = console or Console()
    status = Console(stderr=True)
    out = Path(out).expanduser()
    check_output(out, "dir", reuse=True)  # a file, or a place that cannot be written: before anything is deleted
    _prepare_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    torch.manual_seed(size.seed)
    random.seed(size.seed)
    with _quiet_transformers():
        corpus = _corpus(out / "data", size.max_train_bytes, size.max_test_bytes, console)
        teacher = _teacher(out, train_tokens, size, progress, console)
        recipe = demo_recipe(out, seq_len=size.seq_len, calib_windows=size.calib_windows,
                             eval_windows=size.eval_windows, distill_tokens=distill_tokens,
                             batch_size=size.batch_size, bench=size.bench)
        record = run_recipe(recipe, restart=True, progress=progress, console=status)
    results = _results(out, recipe, record, corpus, teacher, wall)
    _print_summary(console, recipe, results)
    return results


def _corpus(data_dir: Path, max_train_bytes: int, max_test_bytes: int, console) -> dict:
    """Step 1: the train / held-out text files (reused when present)."""
    train_txt, test_txt = data_dir / "train.txt", data_dir / "test.txt"
    if train_txt.is_file() and test_txt.is_file():
        console.print(f"corpus: reusing {data_dir}")
        return {s: {"files": None, "chars": len(p.read_text(encoding="utf-8"))}
                for s, p in (("train", train_txt), ("test", test_txt))}
    corpus = build_corpus(data_dir, max_train_bytes, max_test_bytes)
    console.print(f"corpus: {corpus['train']['files']} stdlib files for training "
                  f"({corpus['train']['chars'] / 1e6:.1f} M chars), {corpus['test']['files']} held out "
                  f"({corpus['test']['chars'] / 1e6:.2f} M chars) -> {data_dir}")
    return corpus


def _teacher(out: Path, train_tokens: int, size: DemoSizes, progress: bool, console) -> dict:
    """Step 2: the tokenizer and the teacher in ``out/teacher`` (reused when present); its record."""
    seq_len, batch_size, seed = size.seq_len, size.batch_size, size.seed
    teacher_dir = out / "teacher"
    if _teacher_ready(teacher_dir):
        info_file = teacher_dir / "demo_training.json"
        training = json.loads(info_file.read_text()) if info_file.is_file() else {}
        console.print(f"teacher: reusing the model trained earlier in {teacher_dir} "
                      "(pass --overwrite to train a new one)")
        if training.get("tokens") not in (None, train_tokens):
            console.print(f"teacher: it was trained on {training['tokens']:,} tokens, not the {train_tokens:,} "
                          "asked for now; --overwrite trains a new one")
        return {"path": str(teacher_dir), "reused": True, "training": training}
    train_docs = _read_docs(out / "data" / "train.txt")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_docs, size.vocab_size)
    stream = _token_tensor(tokenizer, train_docs)
    console.print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; {len(stream):,} training tokens "
                  f"({time.perf_counter() - t0:.0f} s)")
    config = teacher_config(len(tokenizer), seq_len)
    torch.manual_seed(seed)  # the same initial weights on every run
    model = AutoModelForCausalLM.from_config(config)
    steps = teacher_training_config(train_tokens, seq_len, batch_size, seed).total_steps()
    console.print(f"teacher: NemotronH, pattern {config.hybrid_override_pattern}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters; training on {train_tokens:,} tokens "
                  f"({steps:,} steps of {batch_size} x {seq_len}) on {torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory(prefix=".teacher-training-", dir=out) as work:
        training = train_teacher(model, stream, train_tokens, seq_len, batch_size, seed, Path(work),
                                 progress=progress)
        training["tokens"] = train_tokens
        with atomic_dir(teacher_dir) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "demo_training.json").write_text(json.dumps(training, indent=1) + "\n")
            shutil.copyfile(Path(work) / "log.jsonl", tmp / "training_log.jsonl")
    console.print(f"teacher: {training['steps']} steps, {training['tokens_seen']:,} tokens in "
                  f"{training['seconds']:.0f} s, train loss {training['final_loss']:.3f} (mean of the last "
                  f"{min(LOSS_TAIL, training['steps'])} steps) -> {teacher_dir}")
    return {"path": str(teacher_dir), "reused": False, "training": training}


def _results(out: Path, recipe: Recipe, record, corpus: dict, teacher: dict, wall: float) -> dict:
    """Step 4: what `run_demo` returns (and prints)."""
    run_dir = Path(recipe.output)
    summary = json.loads((run_dir / "pruned" / "hyprune_summary.json").read_text())
    return {"teacher": teacher,
            "corpus": {"train": str(out / "data" / "train.txt"), "test": str(out / "data" / "test.txt"), **corpus},
            "models": model_rows(recipe, run_dir, record),
            "sizes": {"before": summary["before"], "after": summary["after"]},
            "stages": {k: {"status": v["status"], "seconds": v["seconds"]} for k, v in record.stages.items()},
            "report": str(run_dir / "report.md"), "seconds": round(time.perf_counter() - wall, 1)}


def demo_recipe(out: str | Path = "hyprune-demo", *, seq_len: int = 128, calib_windows: int = 64,
                eval_windows: int = 128, distill_tokens: int = DISTILL_TOKENS, batch_size: int = 16,
                bench: bool = True) -> Recipe:
    """The tiny recipe the demo runs on its teacher in ``out``; ``recipes/demo.yaml`` is this with the defaults."""
    out = Path(out)
    data = {
        "name": "demo",
        "description": "The offline demo: a small NemotronH trained on the Python standard library's source, "
                       "pruned to about half its parameters, distilled briefly from the teacher (forward KL), "
                       "evaluated on held-out stdlib files. Run `hyprune demo` once to make the teacher and the data.",
        "model": str(out / "teacher"),
        "output": str(out / "run"),
        "prune": {"data": str(out / "data" / "train.txt"), "target": dict(TARGET), "seq_len": seq_len,
                  "num_samples": calib_windows},
        "distill": {"data": str(out / "data" / "train.txt"), "tokens": distill_tokens, "seq_len": seq_len,
                    "batch": batch_size, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "eval_every": 50,
                    "eval_windows": 32, "checkpoint_every": 100, "keep_last": 1},
        "eval": {"data": str(out / "data" / "test.txt"), "seq_len": seq_len, "num_windows": eval_windows},
    }
    if bench:
        data["eval"]["bench"] = {"context_lengths": [seq_len], "decode_tokens": 32, "repeats": 3}
    return parse_recipe(data, "the demo recipe")


def _print_summary(console, recipe: Recipe, results: dict) -> None:
    rows, sizes = results["models"], results["sizes"]
    table = Table(title="hyprune demo: NemotronH on the stdlib source, pruned to ~50%, distilled")
    for name, justify in (("model", "left"), ("parameters", "right"), ("kept", "right"),
                          ("held-out perplexity", "right"), ("decode tokens/s (rough)", "right")):
        table.add_column(name, justify=justify)
    teacher_params = rows[0]["parameters"]
    for r in rows:
        table.add_row(r["label"], f"{r['parameters']:,}", f"{100 * r['parameters'] / teacher_params:.0f}%",
                      f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "-",
                      f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] is not None else "-")
    console.print(table)
    changed = [f"{axis} {sizes['before'][axis]}->{sizes['after'][axis]}" for axis in sizes["before"]
               if sizes["before"][axis] != sizes["after"][axis]]
    console.print("pruned: " + ", ".join(changed))
    console.print(f"held-out perplexity: {recipe.eval.num_windows} windows x {recipe.eval.seq_len} tokens of "
                  f"{recipe.eval.data}; distilled on {recipe.distill.tokens:,} tokens of {recipe.distill.data}. "
                  f"Stages: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in results["stages"].items()) + ".")
    if any(r["tokens_per_s"] is not None for r in rows):
        console.print("decode tokens/s: median of a few short runs at this machine's current load (the pruned "
                      "and the distilled model share one architecture, so one figure); a rough speed, unlike "
                      "the perplexities, which are the same on every machine. `hyprune bench` measures properly.")
    console.print(f"report: {results['report']}")
