#!/usr/bin/env python
"""GPU check of issue 13 item 5 (not run by CI): does hyprune give the same answers on a GPU in bf16 as on the
CPU in float32, and how do streamed and in-memory scoring compare there (time, peak GPU memory)?

One command on a fresh GPU machine, from the repository root (about 5-8 minutes; the whole run keeps to
``--budget-s``, 480 s by default, skipping what would not fit and saying so):

    pip install torch==2.13.0 -e . -c constraints.txt && python benchmarks/gpu_check.py

What it does:

0. ``mamba_ssm`` / ``causal_conv1d`` (the fused Mamba-2 kernels transformers uses on CUDA): imported, else
   pip-installed with ``--no-deps``, so torch is never replaced (``--install-timeout``; ``--no-install`` skips
   it); if they still do not import, the run goes on with transformers' torch path and says so.
1. The reference teacher (``../shared/models/tiny-nemotron-h``) twice, on the GPU (weights bf16; distillation
   with fp32 weights under bf16 autocast) and on the CPU (float32): activation scores on calibration windows
   (``hyprune.score``), pruned to the ~50% width target (``hyprune.prune``, the ``bench_prune.py`` target),
   distilled briefly (``hyprune.run_distill``, forward KL from the teacher), and the held-out perplexity
   (shared/README.md convention) of the pruned and of the distilled student. Reported: per score key the
   largest difference relative to the key's largest CPU score (max |gpu - cpu| / max |cpu|), the Spearman
   correlation of the two rankings, whether the two plans keep the same channels, and the perplexities.
2. A ~1B random NemotronH (``make_nemotron_8b.py --preset 1b``: the 8B pattern, hidden 1536, 1.07B
   parameters, bf16): ``hyprune.stream.score.stream_activation_scores`` against ``load_model`` +
   ``activation_scores`` on the GPU, alternating, with wall time and ``torch.cuda.max_memory_allocated``
   of each run, and how far the scores differ. Skipped (with a note) while ``hyprune.stream`` lacks it.

``--cpu-only`` does the CPU half only (part 1 on the CPU; part 2 on the CPU in float32); ``--quick`` shrinks
every budget (calibration, distillation tokens, held-out windows, and a tiny model in place of the 1B one), to
check the script itself in about a minute on 2 cores:

    python benchmarks/gpu_check.py --cpu-only --quick

Prints one table and writes ``benchmarks/out/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import MAIN_TARGET
from make_nemotron_8b import generate, shape_fields

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
OUT = REPO / "benchmarks" / "out"
KERNELS = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d"}  # import name -> pip name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu-only", action="store_true", help="the CPU half only (no CUDA needed)")
    p.add_argument("--quick", action="store_true", help="tiny budgets, to check the script (see the docstring)")
    p.add_argument("--teacher", default=str(SHARED / "models" / "tiny-nemotron-h"))
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"))
    p.add_argument("--work", default=str(OUT / "gpu_check_work"), help="pruned / distilled / generated models")
    p.add_argument("--out", default=str(OUT / "gpu_check.json"))
    p.add_argument("--target", default=MAIN_TARGET, help="the ~50%% width target of the teacher")
    p.add_argument("--calib-windows", type=int, help="calibration windows (default 64; --quick 8)")
    p.add_argument("--tokens", type=int, help="distillation tokens (default 131072; --quick 4096)")
    p.add_argument("--heldout-windows", type=int, help="held-out windows (default 128, the convention; --quick 8)")
    p.add_argument("--stream-windows", type=int, help="windows of part 2 (default 16; --quick 4)")
    p.add_argument("--stream-reps", type=int, help="repetitions of part 2 (default 2; --quick 1)")
    p.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time limit")
    p.add_argument("--no-install", action="store_true", help="never pip-install the kernels")
    p.add_argument("--install-timeout", type=float, default=150.0)
    p.add_argument("--threads", type=int, help="torch threads on the CPU (default: torch's)")
    args = p.parse_args(argv)
    quick = {"calib_windows": 8, "tokens": 4096, "heldout_windows": 8, "stream_windows": 4, "stream_reps": 1}
    full = {"calib_windows": 64, "tokens": 131072, "heldout_windows": 128, "stream_windows": 16, "stream_reps": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Deadline:
    """The run's time limit: sections ask whether their estimate still fits, and record what was skipped."""

    def __init__(self, seconds: float):
        self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, what: str, estimate_s: float) -> bool:
        if self.left() >= estimate_s:
            return True
        self.skipped.append(f"{what} (needs ~{estimate_s:.0f} s, {self.left():.0f} s left)")
        print(f"skipped: {self.skipped[-1]}", file=sys.stderr, flush=True)
        return False


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 0. kernels
# ---------------------------------------------------------------------------------------------
def _importable(name: str) -> str | None:
    """None if ``name`` imports, else the error (a kernel built for another torch fails here, not at pip)."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or an OSError / undefined symbol from a mismatched build
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def ensure_kernels(args, deadline: Deadline) -> dict:
    """Import the fused Mamba kernels, pip-installing the missing ones first (within ``--install-timeout``)."""
    status = {name: _importable(name) for name in KERNELS}
    missing = [name for name, err in status.items() if err]
    installed = None
    if missing and not args.no_install and deadline.fits("kernel install", args.install_timeout + 60):
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *(KERNELS[m] for m in missing)]
        say(f"installing {' '.join(KERNELS[m] for m in missing)} (at most {args.install_timeout:.0f} s) ...")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.install_timeout)
            installed = {"rc": proc.returncode, "tail": proc.stderr[-1500:] or proc.stdout[-1500:]}
        except subprocess.TimeoutExpired:
            installed = {"rc": None, "tail": f"timed out after {args.install_timeout:.0f} s"}
        importlib.invalidate_caches()
        status.update({name: _importable(name) for name in missing})
    ok = not any(status.values())
    note = ("fused kernels in use" if ok else "mamba_ssm / causal_conv1d unavailable: the Mamba-2 mixers run on "
            "transformers' torch path (correct, slower)")
    say(note)
    return {"import_errors": {k: v for k, v in status.items() if v}, "install": installed, "fused": ok, "note": note}


# ---------------------------------------------------------------------------------------------
# 1. the teacher pruned and distilled, GPU bf16 vs CPU float32
# ---------------------------------------------------------------------------------------------
def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two score vectors (Pearson of their ranks; ties broken by position)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() < 2:
        return 1.0
    ra = torch.empty_like(a).scatter_(0, a.argsort(), torch.arange(a.numel(), dtype=torch.double))
    rb = torch.empty_like(b).scatter_(0, b.argsort(), torch.arange(b.numel(), dtype=torch.double))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def score_differences(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Per key: max |a - ref| / max |ref| and the Spearman of the rankings; the worst key of each."""
    per_key = {}
    for key in sorted(set(a) & set(ref)):
        x, y = a[key].double(), ref[key].double()
        scale = float(y.abs().max()) or 1.0
        per_key[key] = {"max_rel_diff": float((x - y).abs().max()) / scale, "spearman": spearman(x, y),
                        "equal": bool(torch.equal(a[key], ref[key]))}
    worst_rel = max(per_key, key=lambda k: per_key[k]["max_rel_diff"])
    worst_rank = min(per_key, key=lambda k: per_key[k]["spearman"])
    return {"per_key": per_key, "keys": len(per_key), "missing": sorted(set(a) ^ set(ref)),
            "worst_rel_key": worst_rel, "max_rel_diff": per_key[worst_rel]["max_rel_diff"],
            "worst_rank_key": worst_rank, "min_spearman": per_key[worst_rank]["spearman"],
            "equal_keys": sum(v["equal"] for v in per_key.values())}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def heldout_ppl(path: str | Path, windows: torch.Tensor, device: str, dtype: str) -> float:
    """Held-out perplexity of the checkpoint at ``path``, loaded in ``dtype`` on ``device``."""
    from hyprune.evaluate import perplexity
    from hyprune.models import load_model

    model, _ = load_model(str(path), dtype=dtype, device=device)
    with torch.inference_mode():
        ppl = perplexity(model, windows, batch_size=8)["perplexity"]
    del model
    gc.collect()
    return ppl


def run_teacher(args, device: str, work: Path, heldout: torch.Tensor) -> dict:
    """Score, prune (~50%), distill briefly and evaluate the teacher on one device; timings per step."""
    import hyprune
    from hyprune.plan import Plan, parse_target

    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    data = Path(args.data_dir) / "train.txt.gz"
    calib = dict(seq_len=256, num_samples=args.calib_windows, batch_size=8, seed=0, dtype=dtype, device=device)
    times, out = {}, {"device": device, "weights_dtype": dtype}
    t0 = time.perf_counter()
    out["scores"] = hyprune.score(args.teacher, str(data), progress=False, **calib)
    sync(device)
    times["score_s"] = time.perf_counter() - t0
    pruned, distilled = work / f"pruned-{device.split(':')[0]}", work / f"distilled-{device.split(':')[0]}"
    t0 = time.perf_counter()
    hyprune.prune(args.teacher, str(pruned), data=str(data), target=parse_target(args.target), overwrite=True,
                  progress=False,
                  **calib)
    times["prune_s"] = time.perf_counter() - t0
    out["plan"] = Plan.load(pruned / "plan.json").model_dump(mode="json") if (pruned / "plan.json").is_file() else None
    out["ppl_pruned"] = heldout_ppl(pruned, heldout, device, dtype)
    t0 = time.perf_counter()
    batch = 8
    steps = max(1, args.tokens // (batch * 256))
    hyprune.run_distill(args.teacher, str(pruned), str(data), tokens=args.tokens, seq_len=256, batch=batch,
                        out=str(distilled), overwrite=True, heldout=False, dtype="float32", device=device,
                        precision="bf16" if gpu else "fp32", lr=2e-3, min_lr=2e-4,
                        warmup_steps=min(20, steps // 4), checkpoint_every=0, eval_every=0, progress=False)
    sync(device)
    times["distill_s"] = time.perf_counter() - t0
    out["ppl_distilled"] = heldout_ppl(distilled / "final", heldout, device, dtype)
    out["distill"] = {"tokens": args.tokens, "steps": steps, "batch": batch,
                      "precision": "bf16 autocast, fp32 weights" if gpu else "fp32"}
    out["times"] = times
    say(f"  {device}: ppl pruned {out['ppl_pruned']:.3f}, distilled {out['ppl_distilled']:.3f}; {times}")
    return out


def plans_agree(a: dict | None, b: dict | None) -> dict:
    """Which kept-index lists of two plans differ (hidden, and per layer field)."""
    if a is None or b is None:
        return {"compared": False}
    differ = [] if a["hidden"] == b["hidden"] else ["hidden"]
    for i, (la, lb) in enumerate(zip(a["layers"], b["layers"])):
        differ += [f"layers.{i}.{k}" for k in la if la[k] != lb.get(k)]
    return {"compared": True, "identical": not differ, "differing": differ}


# ---------------------------------------------------------------------------------------------
# 2. streamed vs in-memory scoring of a ~1B random NemotronH
# ---------------------------------------------------------------------------------------------
def random_model(args, work: Path) -> tuple[Path, dict]:
    """The 1b preset (or, with --quick, a tiny cut of it), written once under ``work``."""
    fields = shape_fields("1b", hidden=256, layers=8, vocab=8192) if args.quick else shape_fields("1b")
    path = work / ("random-1b-quick" if args.quick else "random-1b")
    marker = path / "gpu_check_fields.json"
    if not marker.is_file() or json.loads(marker.read_text()) != fields:
        say(f"writing the random model to {path} ...")
        generate(path, fields, seed=0, shard_gb=1.0, overwrite=True, progress=False)
        marker.write_text(json.dumps(fields))
    return path, fields


def timed_scoring(fn, device: str) -> tuple[dict, float, int | None]:
    """(scores, wall seconds, peak GPU bytes allocated during the call or None on the CPU)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    scores = fn()
    sync(device)
    wall = time.perf_counter() - t0
    return scores, wall, torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def stream_vs_memory(args, device: str, work: Path) -> dict:
    """Streamed and in-memory scoring of the random model on ``device``, alternating, ``--stream-reps`` each."""
    from hyprune.data import calibration_windows
    from hyprune.importance import activation_scores
    from hyprune.models import load_model, load_tokenizer

    try:
        stream = importlib.import_module("hyprune.stream.score").stream_activation_scores
    except (ImportError, AttributeError):
        return {"skipped": "hyprune.stream.score.stream_activation_scores does not exist yet"}
    path, fields = random_model(args, work)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    windows = calibration_windows(load_tokenizer(path), Path(args.data_dir) / "train.txt.gz", 256,
                                  args.stream_windows, seed=0)

    def in_memory():
        model, family = load_model(path, dtype=dtype, device=device)
        scores = activation_scores(model, windows, family, batch_size=8, progress=False)
        del model
        return scores

    def streamed():
        return stream(path, windows, batch_size=8, device=device, dtype=dtype, progress=False)

    runs = {"in_memory": [], "streamed": []}
    last = {}
    for rep in range(args.stream_reps):
        for name in (("in_memory", "streamed") if rep % 2 == 0 else ("streamed", "in_memory")):
            last[name], wall, peak = timed_scoring(in_memory if name == "in_memory" else streamed, device)
            runs[name].append({"wall_s": wall, "peak_gpu_bytes": peak})
            say(f"  {name}: {wall:.2f} s" + (f", peak GPU {peak / 2**30:.2f} GiB" if peak else ""))
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return {"model": str(path), "fields": fields, "parameters": index["metadata"]["total_parameters"], "device": device,
            "dtype": str(dtype).removeprefix("torch."), "windows": list(windows.shape), "runs": runs,
            "median_s": med, "ratio": med["streamed"] / med["in_memory"],
            "scores": score_differences(last["streamed"], last["in_memory"])}


# ---------------------------------------------------------------------------------------------
# Report and main
# ---------------------------------------------------------------------------------------------
def teacher_rows(r: dict) -> list[str]:
    """Table rows of part 1: per device (``-`` where a device did not run), then their difference."""
    gpu, cpu, d = r.get("gpu"), r.get("cpu"), r.get("difference")
    rows = []
    for label, key in (("held-out ppl, pruned (no training)", "ppl_pruned"), ("held-out ppl, distilled", "ppl_distilled")):
        g, c = (f"{side[key]:.3f}" if side else "-" for side in (gpu, cpu))
        diff = f"{gpu[key] / cpu[key] - 1:+.2%}" if gpu and cpu else ""
        rows.append(f"| teacher: {label} | {g} | {c} | {diff} |")
    for step in ("score_s", "prune_s", "distill_s"):
        g, c = (f"{side['times'][step]:.1f} s" if side else "-" for side in (gpu, cpu))
        rows.append(f"| teacher: {step[:-2]} wall time | {g} | {c} | |")
    if d:
        s = d["scores"]
        rows.append(f"| scores: max rel. diff (worst key `{s['worst_rel_key']}`) | | | {s['max_rel_diff']:.2e} |")
        rows.append(f"| scores: min Spearman (worst key `{s['worst_rank_key']}`) | | | {s['min_spearman']:.5f} |")
        rows.append(f"| plans identical | | | {d['plans']['identical']} ({len(d['plans']['differing'])} fields differ) |")
    return rows


def stream_rows(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"| streamed vs in-memory scoring | skipped: {r['skipped']} | | |"]
    col = 1 if r["device"].startswith("cuda") else 2
    rows = []
    for name in ("in_memory", "streamed"):
        peaks = [x["peak_gpu_bytes"] for x in r["runs"][name] if x["peak_gpu_bytes"]]
        text = f"{r['median_s'][name]:.2f} s" + (f", peak {max(peaks) / 2**30:.2f} GiB" if peaks else "")
        cells = ["", ""]
        cells[col - 1] = text
        rows.append(f"| {r['parameters'] / 1e9:.2f}B random ({r['dtype']}): {name} scoring | {cells[0]} | {cells[1]} | |")
    s = r["scores"]
    rows.append(f"| streamed / in-memory time; scores max rel. diff, min Spearman, equal keys | | | {r['ratio']:.3f}x; "
                f"{s['max_rel_diff']:.1e}, {s['min_spearman']:.5f}, {s['equal_keys']}/{s['keys']} |")
    return rows


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"GPU: {m['gpu'] or 'none'}; CPU: {m['cpu_count']} cores, {m['torch_threads']} torch threads; torch "
             f"{m['torch']}, transformers {m['transformers']}; kernels: {results['kernels']['note']}"
             + ("; QUICK budgets (not the convention)" if results["quick"] else ""), "",
             "| check | GPU (bf16) | CPU (float32) | GPU vs CPU |", "| --- | --- | --- | --- |"]
    if "teacher" in results:
        lines += teacher_rows(results["teacher"])
    if "stream" in results:
        lines += stream_rows(results["stream"])
    if results["skipped"]:
        lines += ["", "Skipped to stay within the time budget: " + "; ".join(results["skipped"])]
    return "\n".join(lines)


def machine(args) -> dict:
    import transformers

    return {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_only else None,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__}


def run_part1(args, use_gpu: bool, work: Path, deadline: Deadline) -> dict:
    """The teacher on the GPU (if any) and on the CPU, and how the two differ."""
    from hyprune.data import heldout_windows
    from hyprune.models import load_tokenizer

    heldout = heldout_windows(load_tokenizer(args.teacher), Path(args.data_dir) / "test.txt.gz", 256,
                              args.heldout_windows)
    result: dict = {"target": args.target, "calib_windows": args.calib_windows, "heldout_windows": len(heldout)}
    if use_gpu and deadline.fits("teacher on the GPU", 90):
        result["gpu"] = run_teacher(args, "cuda", work, heldout)
    if deadline.fits("teacher on the CPU", 40 + args.tokens / 2000):
        result["cpu"] = run_teacher(args, "cpu", work, heldout)
    if "gpu" in result and "cpu" in result:
        result["difference"] = {"scores": score_differences(result["gpu"]["scores"], result["cpu"]["scores"]),
                                "plans": plans_agree(result["gpu"]["plan"], result["cpu"]["plan"])}
    for side in ("gpu", "cpu"):
        if side in result:  # tensors stay out of the JSON: their differences are above
            result[side]["score_keys"] = len(result[side].pop("scores"))
            result[side].pop("plan")
    return result


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = Deadline(args.budget_s)
    use_gpu = torch.cuda.is_available() and not args.cpu_only
    if not use_gpu and not args.cpu_only:
        say("no CUDA device: running the CPU half only (as --cpu-only)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"quick": args.quick, "cpu_only": not use_gpu, "machine": machine(args),
                     "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": vars(args)}
    results["kernels"] = ensure_kernels(args, deadline) if use_gpu else {"note": "not used (CPU only)"}
    results["teacher"] = run_part1(args, use_gpu, work, deadline)
    if deadline.fits("streamed vs in-memory scoring", 30 if args.quick else 150):
        results["stream"] = stream_vs_memory(args, "cuda" if use_gpu else "cpu", work)
    results["skipped"] = deadline.skipped
    results["total_runtime_s"] = time.perf_counter() - deadline.start
    return results


if __name__ == "__main__":
    arguments = parse_args()
    out = main(arguments)
    path = Path(arguments.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(table(out))
    print(f"\nwrote {path}; total {out['total_runtime_s']:.0f} s", file=sys.stderr)
