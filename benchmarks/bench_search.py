#!/usr/bin/env python
"""Benchmark of the architecture search (issue 7) on the reference teacher, in one process run.

What it measures (shared/README.md conventions: calibration and distillation text = train.txt.gz,
256-token windows, seed 0; held-out test perplexity = first 128 consecutive 256-token windows of
test.txt.gz):

1. the search space at ~50% of the parameters: shapes enumerated, how many are within +-5%, how many
   are evaluated (a seeded sample of ``--max-candidates``, the uniform baseline always included);
2. zero-shot ranking (LM loss on ``--eval-windows`` windows of val.txt.gz) against the ranking after
   a short distillation of the top ``--top-k`` (``--distill-tokens`` each, same data and settings):
   Spearman correlation over the distilled candidates;
3. how the ranking moves with the distillation budget: the held-out loss of every distilled candidate
   is logged at 1/4, 1/2, 3/4 and all of the budget (one run per candidate with a cosine schedule over
   the whole budget, as Minitron's "rankings settle early" curves); Spearman of the ranking at each
   point against the final one, and whether the leader is already the final leader;
4. the search winner against the hand-picked uniform candidate (every searched axis cut by the same
   fraction, no blocks dropped), after the same distillation: held-out test perplexity of both;
5. the latency model: decode ms/token of ``--latency-shapes`` shapes measured with ``bench`` on this
   machine, per-component costs fitted, error on the held-out third.

The search runs through ``hyprune.search.search`` exactly as ``hyprune search`` runs it; its folder
(default ``benchmarks/out/search``, git-ignored) keeps the state, so a rerun with ``--resume``
continues. Results: ``benchmarks/out/bench_search.json``, the plot copied to
``benchmarks/search_ranking.png``, a Markdown summary on stdout.

    python benchmarks/bench_search.py                         # ~20 min on 2 busy CPU cores
    python benchmarks/bench_search.py --distill-tokens 32768  # a smaller budget
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(SHARED / "models" / "tiny-nemotron-h"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "search"))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-candidates", type=int, default=32)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--distill-tokens", type=int, default=65536)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--latency-shapes", type=int, default=12)
    p.add_argument("--test-windows", type=int, default=128, help="test perplexity windows (convention: 128)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue the search in --out")
    return p.parse_args()


def test_perplexity(path: Path, tokenizer, windows) -> float:
    from hyprune.evaluate import perplexity
    from hyprune.models import load_model

    model, _ = load_model(path)
    return perplexity(model, windows, batch_size=8)["perplexity"]


def spearman(a, b):
    from hyprune.search.run import spearman as rho

    return rho(a, b)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hyprune.data import heldout_windows
    from hyprune.models import load_tokenizer
    from hyprune.search import search

    data = Path(args.data_dir)
    out = Path(args.out)
    started = time.perf_counter()
    report = search(args.teacher, str(data / "train.txt.gz"), str(out), target_ratio=args.ratio,
                    max_candidates=args.max_candidates, top_k=args.top_k, distill_tokens=args.distill_tokens,
                    distill_uniform=True, distill_batch=args.distill_batch, distill_lr=args.lr,
                    eval_data=str(data / "val.txt.gz"), eval_windows=args.eval_windows, num_samples=args.num_samples,
                    latency=True, latency_shapes=args.latency_shapes, resume=args.resume and out.exists(),
                    overwrite=not args.resume, progress=True)
    search_s = time.perf_counter() - started
    rows = json.loads((out / "candidates.json").read_text())["candidates"]
    top = sorted([r for r in rows if "distilled" in r and r["zero_shot_rank"] <= args.top_k],
                 key=lambda r: r["zero_shot_rank"])
    final = [r["distilled"] for r in top]
    points = [p["tokens"] for p in top[0]["curve"]]
    by_budget = []
    for j, tokens in enumerate(points):
        losses = [r["curve"][j]["loss"] for r in top]
        leader = top[min(range(len(top)), key=lambda i: losses[i])]["id"]
        by_budget.append({"tokens": tokens, "spearman_vs_final": spearman(losses, final),
                          "leader_is_final_leader": leader == min(top, key=lambda r: r["distilled"])["id"],
                          "losses": losses})
    winner, uniform = rows[0], next(r for r in rows if r["uniform"])

    # held-out test perplexity (convention) of the teacher, the distilled winner and the distilled uniform
    tokenizer = load_tokenizer(args.teacher)
    test = heldout_windows(tokenizer, data / "test.txt.gz", 256, args.test_windows)
    ppl = {"teacher": test_perplexity(Path(args.teacher), tokenizer, test)}
    for name, row in (("winner", winner), ("uniform", uniform)):
        ppl[name] = test_perplexity(out / row["distill_dir"] / "final", tokenizer, test)
    total_s = time.perf_counter() - started

    result = {
        "teacher": args.teacher, "ratio": args.ratio, "settings": vars(args),
        "shapes": report["shapes"], "within_budget": report["within_budget"], "evaluated": report["evaluated"],
        "distilled_top_k": len(top), "distill_tokens": args.distill_tokens,
        "spearman_zero_shot_vs_distilled": spearman([r["zero_shot"] for r in top], final),
        "by_budget": by_budget,
        "top_k": [{k: r[k] for k in ("id", "parameters", "ratio", "zero_shot", "zero_shot_rank", "distilled",
                                      "distilled_rank", "uniform")} for r in top],
        "winner": {k: winner[k] for k in ("id", "parameters", "ratio", "zero_shot", "zero_shot_rank", "distilled")},
        "uniform": {k: uniform[k] for k in ("id", "parameters", "ratio", "zero_shot", "zero_shot_rank", "distilled")},
        "test_perplexity": ppl, "test_windows": len(test),
        "latency_model": report["latency_model"],
        "seconds": {"search": search_s, "total": total_s},
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    (ROOT / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "out" / "bench_search.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copy(out / "ranking.png", ROOT / "benchmarks" / "search_ranking.png")
    print(markdown(result))


def markdown(r: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"shapes {r['shapes']:,}; within +-5% of {r['ratio']:.0%}: {r['within_budget']:,}; evaluated "
             f"{r['evaluated']}; distilled top-{r['distilled_top_k']} x {r['distill_tokens']:,} tokens",
             f"Spearman(zero-shot, after distillation) over the top-{r['distilled_top_k']}: "
             f"{f(r['spearman_zero_shot_vs_distilled'])}", "",
             "| distillation tokens | Spearman vs final ranking | leader = final leader |", "|---:|---:|:---:|"]
    for b in r["by_budget"]:
        leader = "yes" if b["leader_is_final_leader"] else "no"
        lines.append(f"| {b['tokens']:,} | {f(b['spearman_vs_final'])} | {leader} |")
    lines += ["", "| zero-shot rank | candidate | params | zero-shot loss | distilled loss | distilled rank |",
              "|---:|---|---:|---:|---:|---:|"]
    for t in r["top_k"]:
        lines.append(f"| {t['zero_shot_rank']} | `{t['id']}`{' (uniform)' if t['uniform'] else ''} | "
                     f"{t['parameters']:,} | {t['zero_shot']:.4f} | {t['distilled']:.4f} | {t['distilled_rank']} |")
    w, u, p = r["winner"], r["uniform"], r["test_perplexity"]
    lines += ["", f"| model | params | zero-shot loss (val) | distilled loss (val) | test ppl after distillation "
              f"({r['test_windows']} windows) |",
              "|---|---:|---:|---:|---:|",
              f"| teacher | - | - | - | {p['teacher']:.3f} |",
              f"| search winner `{w['id']}` | {w['parameters']:,} | {w['zero_shot']:.4f} | {w['distilled']:.4f} | "
              f"{p['winner']:.3f} |",
              f"| uniform `{u['id']}` | {u['parameters']:,} | {u['zero_shot']:.4f} | {u['distilled']:.4f} | "
              f"{p['uniform']:.3f} |"]
    lat = r["latency_model"]
    if lat:
        e = lat["held_out_error"]
        lines += ["", f"latency model ({lat['metric']} ms/token, batch {lat['batch']}, context {lat['context']}, "
                  f"{lat['device']}): held-out mean abs rel error {f(e.get('mean_abs_rel_error'))}, max "
                  f"{f(e.get('max_abs_rel_error'))} over {e.get('shapes')} shapes (fit on {e.get('fitted_on')}); "
                  "costs " + ", ".join(f"{k} {v:.4g}" for k, v in lat["costs_ms"].items())]
    lines.append(f"\nwall time: search {r['seconds']['search']:.0f} s, total {r['seconds']['total']:.0f} s "
                 f"({r['machine']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
