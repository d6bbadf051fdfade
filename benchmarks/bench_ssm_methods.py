#!/usr/bin/env python
"""The structured SSM methods of Ghattas et al. on the reference teacher, without retraining (issue 6).

For every method and ratio (fraction removed from every Mamba layer) the script builds the pruned
model with the same functions ``hyprune prune --method NAME`` runs, and measures held-out perplexity
by the shared convention (first 128 consecutive 256-token windows of test.txt.gz); calibration = 64
windows of 256 tokens of train.txt.gz, seed 0 (as ``hyprune prune`` draws them). To fit the shared
2-core machine, each calibration sweep runs once and serves every ratio: one gradient sweep for the
three Taylor scores (state-taylor1/2, headdim-taylor), one fluctuation sweep for ssm-flap, one
activation sweep for the head-pruning baselines. Each row names the CLI command that builds the same
model (the CLI path is covered end to end by tests/test_ssm_methods.py).

Methods: state-taylor2, state-taylor1, state-magnitude, state-random, headdim-taylor, head-merge,
ssm-flap (``--ratio R``), and Mamba head pruning by the activation scores, group-aware
(``--method activation``) and group-blind (``--method group-blind``), with
``--target mamba_num_heads=round(16 * (1 - R))``. A ratio a method cannot express (head-merge needs
the groups left to divide the 4 groups) gets the refusal message in its row.

    python benchmarks/bench_ssm_methods.py                 # all methods at 0.25 0.5 0.75
    python benchmarks/bench_ssm_methods.py --methods state-taylor2 --ratios 0.5 --no-teacher
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
RATIO_METHODS = ["state-taylor2", "state-taylor1", "state-magnitude", "state-random", "headdim-taylor", "head-merge",
                 "ssm-flap"]
HEAD_METHODS = ["activation", "group-blind"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "tiny-nemotron-h"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_ssm_methods.json"))
    p.add_argument("--methods", nargs="+", default=RATIO_METHODS + HEAD_METHODS)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--heldout-windows", type=int, default=128)
    p.add_argument("--no-teacher", dest="teacher", action="store_false", help="skip the teacher's perplexity")
    return p.parse_args(argv)


def command(args, method: str, ratio: float, heads: int) -> str:
    how = f"--ratio {ratio}" if method in RATIO_METHODS else f"--target mamba_num_heads={heads}"
    return (f"hyprune prune {args.model} --data {Path(args.data_dir) / 'train.txt.gz'} --method {method} {how} "
            f"--num-samples {args.num_samples} --seq-len {args.seq_len} --out OUT")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import copy

    import torch

    torch.set_num_threads(args.threads)
    from hyprune.apply import apply_plan
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.errors import HypruneError
    from hyprune.evaluate.perplexity import perplexity
    from hyprune.importance import activation_scores
    from hyprune.methods import MethodOptions, get_method
    from hyprune.methods import ssm
    from hyprune.models import count_parameters, load_model, load_tokenizer
    from hyprune.plan import make_plan

    data = Path(args.data_dir)
    tokenizer = load_tokenizer(args.model)
    heldout = heldout_windows(tokenizer, data / "test.txt.gz", args.seq_len, args.heldout_windows)
    windows = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, args.num_samples, seed=0)
    teacher, family = load_model(args.model)
    before = count_parameters(teacher, family)["total"]
    result = {"threads": args.threads, "cpu_count": os.cpu_count(), "heldout_windows": args.heldout_windows,
              "calibration_windows": len(windows), "sweep_seconds": {}, "rows": []}
    if args.teacher:
        result["teacher_perplexity"] = perplexity(teacher, heldout, batch_size=args.batch_size)["perplexity"]
        print(f"teacher held-out ppl {result['teacher_perplexity']:.3f}", flush=True)

    sweeps = {}

    def sweep(name, fn):
        """Run one calibration sweep the first time a method needs it."""
        if name not in sweeps:
            start = time.perf_counter()
            sweeps[name] = fn(teacher, family, windows, batch_size=args.batch_size, progress=True)
            result["sweep_seconds"][name] = time.perf_counter() - start
        return sweeps[name]

    def build(method, ratio, heads):
        if method in HEAD_METHODS:
            scores = sweep("activation", lambda m, f, w, **kw: activation_scores(m, w, f, **kw))
            plan = make_plan(family, teacher.config, scores, {"mamba_num_heads": heads}, method=method,
                             group_aware=method == "activation")
            return apply_plan(teacher, plan, family)
        options = MethodOptions(ratio=ratio)
        get_method(method).check(family, teacher.config, options)
        if method.startswith("state-"):
            taylor = sweep("taylor", ssm.in_proj_taylor) if "taylor" in method else None
            scores = ssm.state_scores(method, teacher, family, windows, options, taylor=taylor)
            return ssm.prune_states(teacher, family, method, scores, ratio).model
        if method == "headdim-taylor":
            scores = ssm.headdim_scores(teacher, family, windows, taylor=sweep("taylor", ssm.in_proj_taylor))
            return ssm.prune_head_channels(teacher, family, scores, ratio).model
        if method == "head-merge":
            return ssm.merge_groups(copy.deepcopy(teacher), family, ratio).model  # pools its input in place
        return ssm.prune_heads_flap(teacher, family, sweep("flap", ssm.out_proj_input_moments), ratio).model

    for method in args.methods:
        for ratio in args.ratios:
            heads = round(teacher.config.mamba_num_heads * (1 - ratio))
            row = {"method": method, "ratio": ratio, "command": command(args, method, ratio, heads)}
            try:
                pruned = build(method, ratio, heads)
            except HypruneError as e:
                row["refused"] = str(e)
                print(f"{method:16s} {ratio:.2f}  refused: {e}", flush=True)
                result["rows"].append(row)
                continue
            row["perplexity"] = perplexity(pruned, heldout, batch_size=args.batch_size)["perplexity"]
            row["parameters"], row["parameters_before"] = count_parameters(pruned, family)["total"], before
            print(f"{method:16s} {ratio:.2f}  ppl {row['perplexity']:8.3f}  params {row['parameters']:,}", flush=True)
            result["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """Perplexity table: one row per method, one column per ratio."""
    ratios = sorted({r["ratio"] for r in result["rows"]})
    lines = [f"| method | {' | '.join(f'{int(r * 100)}% removed' for r in ratios)} |",
             "| --- |" + " --- |" * len(ratios)]
    by = {(r["method"], r["ratio"]): r for r in result["rows"]}
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        cells = []
        for ratio in ratios:
            row = by.get((method, ratio))
            cells.append("" if row is None else "n/a" if "refused" in row else
                         f"{row['perplexity']:.2f} ({row['parameters'] / row['parameters_before']:.0%} params)")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    if "teacher_perplexity" in result:
        lines.insert(0, f"teacher: {result['teacher_perplexity']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
