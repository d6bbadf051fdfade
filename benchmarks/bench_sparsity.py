#!/usr/bin/env python
"""Unstructured and 2:4 sparsity on the reference teacher (issue 6), no retraining.

Magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, on the Mamba in_proj only, out_proj only and
both; held-out perplexity by the shared/README.md convention
(first 128 consecutive 256-token windows of test.txt.gz; calibration: train.txt.gz windows of 256
tokens, seed 0). Every configuration starts from a fresh copy of the teacher and runs through the
same `hyprune.methods` entry points as ``hyprune prune --method ...``; the pruning time of each
(calibration included) is reported as a ratio to the magnitude run of the same targets.

Results go to ``benchmarks/out/bench_sparsity.json`` (git-ignored) and a Markdown table to stdout.

    python benchmarks/bench_sparsity.py --num-samples 16 --heldout-windows 32   # ~25 min on 2 busy CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
TARGETS = {"in_proj": "in_proj", "out_proj": "out_proj", "in+out_proj": "in_proj,out_proj"}
PATTERNS = {"50%": dict(sparsity=0.5), "2:4": dict(nm=(2, 4))}


def main() -> None:
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.methods import MethodOptions, get_method
    from hyprune.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "tiny-nemotron-h"))
    parser.add_argument("--data", default=str(SHARED / "data" / "pystdlib"))
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--heldout-windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_sparsity.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, family = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    data = Path(args.data)
    calib = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, args.num_samples, seed=0)
    heldout = heldout_windows(tokenizer, data / "test.txt.gz", args.seq_len, args.heldout_windows)
    started = time.perf_counter()
    base = perplexity(teacher, heldout)["perplexity"]
    print(f"teacher: held-out ppl {base:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    rows = []
    for target_label, targets in TARGETS.items():
        for pattern_label, pattern in PATTERNS.items():
            seconds = {}
            for method in ("magnitude", "wanda", "sparsegpt"):
                options = MethodOptions(targets=targets, **pattern)
                registered = get_method(method)
                registered.check(family, teacher.config, options)
                model = copy.deepcopy(teacher)
                started = time.perf_counter()
                result = registered.run(model, family, calib, options, batch_size=8, progress=False)
                seconds[method] = time.perf_counter() - started
                ppl = perplexity(model, heldout)["perplexity"]
                total = result.report["total"]
                rows.append({"targets": target_label, "pattern": pattern_label, "method": method, "perplexity": ppl,
                             "zeros": total["zeros"], "weights": total["weights"], "sparsity": total["sparsity"],
                             "seconds": seconds[method]})
                print(f"{target_label:12s} {pattern_label:4s} {method:10s} ppl {ppl:9.3f}  "
                      f"({total['zeros']:,} of {total['weights']:,} weights zero)", flush=True)
            for row in rows[-3:]:
                row["time_vs_magnitude"] = row["seconds"] / seconds["magnitude"]
    result = {"model": args.model, "teacher_perplexity": base, "heldout_windows": list(heldout.shape),
              "calibration_windows": list(calib.shape), "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\nteacher held-out perplexity {base:.3f}\n")
    print("| targets | weights zeroed | pattern | magnitude | Wanda | SparseGPT |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for i in range(0, len(rows), 3):
        group = rows[i : i + 3]
        ppl = " | ".join(f"{r['perplexity']:.3f}" for r in group)
        print(f"| {group[0]['targets']} | {group[0]['zeros']:,} of {group[0]['weights']:,} | {group[0]['pattern']} "
              f"| {ppl} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
