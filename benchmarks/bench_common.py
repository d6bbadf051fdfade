"""Pieces shared by the training benchmarks (bench_distill.py, bench_quality.py).

They live here so that both scripts train, log and plot the same way: the same optimizer settings
object, the same reading of ``distill``'s ``log.jsonl``, the same perplexity axis on the plots.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# the ~50%-parameter width target of the reference teacher (bench_prune.py's "width ~50%" row)
MAIN_TARGET = "hidden_size=144,intermediate_size=384,mamba_num_heads=8,mamba_head_dim=16"


def say(msg: str) -> None:
    """Progress goes to stderr so that stdout stays the Markdown summary."""
    print(msg, file=sys.stderr, flush=True)


def budget_steps(tokens: int, batch: int, seq_len: int, multiple: int = 1) -> int:
    """Optimizer steps for a token budget, rounded up to a whole number of steps and of steps to ``multiple``
    (so that a curve evaluated every ``steps // multiple`` steps ends exactly at the budget)."""
    return max(1, math.ceil(tokens / (batch * seq_len * multiple))) * multiple


def train_config(args, tokens: int, batch: int, **more):
    """The `DistillConfig` every benchmark run shares (lr, schedule, weight decay, clipping, seed from ``args``);
    ``more`` overrides fields (loss, eval_every, ...)."""
    from hyprune.distill import DistillConfig

    cfg = dict(tokens=tokens, seq_len=args.seq_len, batch=batch, lr=args.lr, min_lr=args.lr * args.min_lr_ratio,
               warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=1.0, loss="forward_kl",
               ce_weight=0.0, checkpoint_every=0, eval_every=0, seed=args.seed, progress=False)
    cfg.update(more)
    return DistillConfig(**cfg)


def read_log(out_dir: Path) -> list[dict]:
    """The records of a ``distill`` run's ``log.jsonl``."""
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines() if line.strip()]


def val_curve(log: list[dict], start_ppl: float) -> list[dict]:
    """Perplexity against training tokens: the value before training, then every evaluation in the log."""
    return [{"tokens": 0, "val_ppl": start_ppl}] + [
        {"tokens": r["tokens"], "val_ppl": r["eval_ppl"]} for r in log if "eval_ppl" in r]


def perplexity_axis(ax, values) -> None:
    """A log y axis with plain-number ticks (1.5, 2, 3, 5, 7 x powers of ten) around ``values``."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    lo, hi = min(values), max(values)
    ax.set_yscale("log")
    ticks = [t for m in (1, 10, 100, 1000, 10000) for t in (m, 1.5 * m, 2 * m, 3 * m, 5 * m, 7 * m)
             if lo / 1.6 <= t <= hi * 1.6]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(ScalarFormatter())
