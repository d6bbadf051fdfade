#!/usr/bin/env python
"""Benchmark of distillation (issue 3) on the reference teacher, in one process run.

What it measures (shared/README.md conventions: calibration/training data = train.txt.gz, 256-token
windows, seed 0; held-out = first 128 consecutive 256-token windows of test.txt.gz):

1. throughput -- one KD step of ``hyprune.distill.distill`` (forward KL, teacher in memory; the step
             time comes from the loop's own ``log.jsonl`` ``tokens_per_s``: fetch, student forward,
             teacher forward, loss, backward, grad clip, AdamW and LR step) against
             ``t_teacher_forward`` (``torch.inference_mode()`` forward of the teacher on the same batch
             size) + ``t_student_forward_backward`` (student forward + next-token CE backward, no
             optimizer). Repetitions interleaved in alternating order, medians compared
             (goal: KD throughput >= 0.85 x 1 / (t_teacher + t_student)). Timed repetitions wait for /
             re-run around other processes' CPU bursts (``--quiet-budget``), as in bench_prune.py.
2. memory -- peak RSS of a short KD run vs the same number of teacher forward + student
             forward/backward passes, each in a fresh child process (``--memory-child``; VmHWM after
             resetting it with ``/proc/self/clear_refs``, as in bench_prune.py).
3. quality -- the ~50% width-pruned student (activation scores on 64 calibration windows, make_plan,
             apply_plan), trained on the same ``--tokens`` of train.txt.gz (shuffled documents, seed 0,
             one epoch, identical batches in every run) three ways: forward-KL KD from the teacher,
             forward-KL KD from a teacher top-k cache (``cache_teacher_topk``), and plain cross-entropy
             (``loss="ce"``). Held-out test perplexity before/after; the perplexity curve on the first
             ``--eval-windows`` windows of val.txt.gz every 1/``--evals`` of the budget, plotted to
             ``benchmarks/distill_curve.png``.

Results go to ``benchmarks/out/bench_distill.json`` (git-ignored) and a Markdown summary to stdout.

    python benchmarks/bench_distill.py                    # defaults: ../shared from the repo root, 2 threads
    python benchmarks/bench_distill.py --tokens 200000    # a smaller budget (about 1/5 of the time)
    python benchmarks/bench_distill.py --replot           # redraw the PNG from benchmarks/out/bench_distill.json
    python benchmarks/bench_distill.py --help
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"  # the project's ../shared
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (MAIN_TARGET, budget_steps, perplexity_axis, read_log, say,  # noqa: E402
                          train_config, val_curve)
from bench_prune import QuietGate, git_state, machine_info, maxrss_kb, mib, proc_status_kb, reset_peak_rss  # noqa: E402

RUNS = ("kd", "topk", "ce")  # training order
LABELS = {"kd": "forward-KL KD (teacher in memory)", "topk": "forward-KL KD from the top-k cache",
          "ce": "cross-entropy only (no teacher)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "tiny-nemotron-h"), help="teacher folder")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"), help="folder of {train,val,test}.txt.gz")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_distill.json"), help="JSON results")
    p.add_argument("--plot", default=str(REPO / "benchmarks" / "distill_curve.png"), help="PNG of the curves")
    p.add_argument("--work-dir", help="where runs and the top-k cache go (kept); default: a temporary folder, removed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default=MAIN_TARGET, help="the ~50%%-parameter plan")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows for the importance scores")
    # training (one setting for every run)
    p.add_argument("--tokens", type=int, default=1_500_000,
                   help="training budget per run, in train.txt.gz tokens (rounded up to a whole number of steps, "
                        "and of steps to a multiple of --evals)")
    p.add_argument("--batch", type=int, default=16, help="windows per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine ends at lr x this")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--topk", type=int, default=32, help="k of the teacher top-k cache")
    p.add_argument("--evals", type=int, default=8, help="points of the perplexity curve (every 1/evals of the budget)")
    p.add_argument("--eval-windows", type=int, default=128, help="first N windows of val.txt.gz for the curve")
    p.add_argument("--heldout-windows", type=int, default=128)
    p.add_argument("--runs", default=",".join(RUNS), help="which trainings, comma-separated: kd,topk,ce")
    # throughput / memory
    p.add_argument("--tp-batch", type=int, default=8, help="windows per step in the throughput/memory measurement")
    p.add_argument("--tp-steps", type=int, default=4,
                   help="KD steps per repetition (the first is a warm-up: AdamW state is allocated there)")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions (interleaved)")
    p.add_argument("--quiet-budget", type=float, default=300.0,
                   help="seconds the run may spend, in total, waiting for other processes to go idle and re-running "
                        "repetitions they disturbed (0 = keep every repetition)")
    p.add_argument("--quiet-cores", type=float, default=0.25,
                   help="'undisturbed' = other processes used at most this many cores")
    p.add_argument("--wait-bench-prune", type=float, default=1800.0,
                   help="before timing, wait up to this many seconds while a bench_prune.py process runs")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --out, run nothing")
    # internal: one memory measurement in a fresh process
    p.add_argument("--memory-child", choices=["kd", "fwd_bwd"], help=argparse.SUPPRESS)
    p.add_argument("--student-dir", help=argparse.SUPPRESS)
    p.add_argument("--windows-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def median(xs):
    return statistics.median(xs)


def wait_for_bench_prune(limit_s: float) -> float:
    """Seconds spent waiting while another benchmark (bench_prune.py) runs on this machine."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        found = subprocess.run(["pgrep", "-f", "bench_prune.py"], capture_output=True, text=True).stdout.split()
        if not [pid for pid in found if int(pid) != os.getpid()]:
            break
        say("  waiting: bench_prune.py is running ...")
        time.sleep(10)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The workloads being compared
# ---------------------------------------------------------------------------------------------
def teacher_forward(teacher, ids):
    import torch

    with torch.inference_mode():
        teacher(input_ids=ids, use_cache=False)


def student_forward_backward(student, ids):
    from hyprune.distill.losses import next_token_ce

    student.train()
    student.zero_grad(set_to_none=True)
    next_token_ce(student(input_ids=ids, use_cache=False).logits, ids).backward()


def kd_steps(args, teacher, student, windows, out_dir: Path) -> list[float]:
    """Run ``--tp-steps`` KD steps of hyprune's loop; per-step seconds from its log.jsonl ``tokens_per_s``."""
    from hyprune.distill import distill

    cfg = train_config(args, args.tp_batch * args.seq_len * args.tp_steps, args.tp_batch, warmup_steps=1)
    distill(teacher, student, windows, cfg, out_dir, overwrite=True)
    tokens_per_step = args.tp_batch * args.seq_len
    return [tokens_per_step / r["tokens_per_s"] for r in read_log(out_dir)]


# ---------------------------------------------------------------------------------------------
# Memory: one measurement in a fresh process
# ---------------------------------------------------------------------------------------------
def memory_child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from hyprune.models import load_model

    windows = torch.load(args.windows_file)
    teacher, _ = load_model(args.model)
    student, _ = load_model(args.student_dir)
    gc.collect()
    base = proc_status_kb().get("VmRSS", 0)
    reset = reset_peak_rss()
    with tempfile.TemporaryDirectory() as tmp:
        if args.memory_child == "kd":
            kd_steps(args, teacher, student, windows, Path(tmp) / "kd")
        else:
            for step in range(args.tp_steps):
                ids = windows[step * args.tp_batch : (step + 1) * args.tp_batch]
                teacher_forward(teacher, ids)
                student_forward_backward(student, ids)
        status = proc_status_kb()
    peak = status.get("VmHWM", maxrss_kb()) if reset else maxrss_kb()
    result = {"what": args.memory_child, "hwm_reset": reset, "rss_after_load_mib": mib(base),
              "peak_rss_mib": mib(peak), "increment_mib": mib(peak - base), "ru_maxrss_mib": mib(maxrss_kb())}
    print("MEMORY_RESULT " + json.dumps(result), flush=True)


def run_memory_child(args, what: str, student_dir: Path, windows_file: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", what, "--student-dir", str(student_dir),
           "--windows-file", str(windows_file), "--model", args.model, "--threads", str(args.threads),
           "--tp-batch", str(args.tp_batch), "--tp-steps", str(args.tp_steps), "--seq-len", str(args.seq_len),
           "--seed", str(args.seed), "--lr", str(args.lr), "--min-lr-ratio", str(args.min_lr_ratio),
           "--weight-decay", str(args.weight_decay)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            return json.loads(line[len("MEMORY_RESULT "):])
    raise RuntimeError(f"memory child '{what}' failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------
# Main run
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)

    from hyprune.apply import apply_plan
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.distill import TopKCache, cache_teacher_topk, distill
    from hyprune.evaluate import perplexity
    from hyprune.importance import activation_scores
    from hyprune.models import count_parameters, load_model, load_tokenizer
    from hyprune.plan import make_plan, parse_target

    started = time.perf_counter()
    sections: dict[str, float] = {}
    data = Path(args.data_dir)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"--runs: unknown run '{r}' (use {','.join(RUNS)})")
    results: dict = {
        "machine": machine_info(),
        "git": git_state(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("memory_child", "student_dir", "windows_file")},
    }
    work_tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work_tmp = tempfile.TemporaryDirectory(prefix="bench_distill-")
        work = Path(work_tmp.name)

    # ---- teacher, calibration, plan, the pruned student --------------------------------------
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    teacher, family = load_model(args.model)
    calib = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, args.calib_windows, seed=args.seed)
    scores = activation_scores(teacher, calib, family, batch_size=8, progress=False)
    plan = make_plan(family, teacher.config, scores, parse_target(args.target))

    def fresh_student():
        return apply_plan(teacher, plan, family)

    student0 = fresh_student()
    teacher_params = count_parameters(teacher, family)["total"]
    student_params = count_parameters(student0, family)["total"]
    results["student"] = {"target": args.target, "parameters": student_params, "teacher_parameters": teacher_params,
                          "fraction": student_params / teacher_params,
                          "calibration": {"windows": list(calib.shape), "seed": args.seed, "file": "train.txt.gz"}}
    student_dir = work / "student0"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    student0.save_pretrained(student_dir, safe_serialization=True)
    tokenizer.save_pretrained(student_dir)
    sections["setup"] = time.perf_counter() - t0
    say(f"student: {student_params:,} of {teacher_params:,} parameters ({100 * student_params / teacher_params:.1f}%)")

    # training windows: shuffled documents of train.txt.gz (seed 0), exactly one epoch of the budget
    steps = budget_steps(args.tokens, args.batch, args.seq_len, args.evals)
    n_train = steps * args.batch
    t0 = time.perf_counter()
    train = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, n_train, seed=args.seed)
    if len(train) < n_train:
        raise SystemExit(f"train.txt.gz holds only {len(train)} windows; lower --tokens")
    sections["tokenize"] = time.perf_counter() - t0
    tp_windows = train[: args.tp_batch * args.tp_steps]

    # ---- 1. throughput ----------------------------------------------------------------------
    if not (args.skip_throughput and args.skip_memory):
        waited = wait_for_bench_prune(args.wait_bench_prune)
        results["waited_for_bench_prune_s"] = waited
    if not args.skip_memory:
        say("memory: fresh child processes ...")
        t0 = time.perf_counter()
        wfile = work / "tp_windows.pt"
        torch.save(tp_windows.clone(), wfile)
        mem = {}
        for what in ("fwd_bwd", "kd"):
            mem[what] = run_memory_child(args, what, student_dir, wfile)
            say(f"  {what}: {mem[what]}")
        mem["increment_ratio"] = mem["kd"]["increment_mib"] / mem["fwd_bwd"]["increment_mib"]
        mem["peak_ratio"] = mem["kd"]["peak_rss_mib"] / mem["fwd_bwd"]["peak_rss_mib"]
        mem["method"] = (
            "each number from a fresh child process (this script --memory-child): load teacher, pruned student and "
            f"{len(tp_windows)} windows, gc, read VmRSS, reset the RSS high-water mark (/proc/self/clear_refs=5), run "
            f"{args.tp_steps} steps of batch {args.tp_batch} x {args.seq_len}, read VmHWM; 'kd' = hyprune.distill.distill "
            "(forward KL, AdamW; also writes log.jsonl and the final student), 'fwd_bwd' = per step an "
            "inference_mode teacher forward, then student forward + CE backward (no optimizer); "
            "increment = VmHWM - RSS after loading")
        results["memory"] = mem
        sections["memory"] = time.perf_counter() - t0

    if not args.skip_throughput:
        say("throughput: KD step vs teacher forward + student forward/backward ...")
        t0 = time.perf_counter()
        ids = tp_windows[: args.tp_batch]
        student = fresh_student()
        n_calls = args.tp_steps - 1  # as many timed calls as timed KD steps

        def time_calls(fn):
            out = []
            for _ in range(n_calls):
                c = time.perf_counter()
                fn()
                out.append(time.perf_counter() - c)
            return out

        tp_dir = work / "tp"
        teacher_forward(teacher, ids)  # warm-up
        student_forward_backward(student, ids)
        kd_steps(args, teacher, fresh_student(), tp_windows, tp_dir)
        load_before = os.getloadavg()
        gate = QuietGate(args.quiet_budget, args.quiet_cores)
        kept = gate.run(args.reps, [
            ("teacher_forward", lambda: time_calls(lambda: teacher_forward(teacher, ids))),
            ("student_fwd_bwd", lambda: time_calls(lambda: student_forward_backward(student, ids))),
            ("kd", lambda: kd_steps(args, teacher, fresh_student(), tp_windows, tp_dir)),
        ])
        reps = []
        for rec in kept:
            t_t = median(rec["teacher_forward"]["out"])
            t_s = median(rec["student_fwd_bwd"]["out"])
            kd_all = rec["kd"]["out"]
            t_kd = median(kd_all[1:])  # step 1 allocates the AdamW state
            reps.append({"teacher_forward_s": t_t, "student_fwd_bwd_s": t_s, "kd_step_s": t_kd,
                         "kd_steps_s": kd_all, "teacher_calls_s": rec["teacher_forward"]["out"],
                         "student_calls_s": rec["student_fwd_bwd"]["out"], "contended": rec["contended"],
                         "other_cores": max(rec[k]["other_cores"] for k in ("teacher_forward", "student_fwd_bwd", "kd")),
                         "ratio": (t_t + t_s) / t_kd})
            say(f"  rep: teacher {t_t * 1e3:.0f} ms + student f/b {t_s * 1e3:.0f} ms vs KD step {t_kd * 1e3:.0f} ms "
                f"-> {reps[-1]['ratio']:.3f} (other processes <= {reps[-1]['other_cores']:.2f} cores)")
        t_t = median([r["teacher_forward_s"] for r in reps])
        t_s = median([r["student_fwd_bwd_s"] for r in reps])
        t_kd = median([r["kd_step_s"] for r in reps])
        tokens = args.tp_batch * args.seq_len
        results["throughput"] = {
            "batch": [args.tp_batch, args.seq_len],
            "teacher_forward_median_s": t_t,
            "student_fwd_bwd_median_s": t_s,
            "kd_step_median_s": t_kd,
            "bound_tokens_per_s": tokens / (t_t + t_s),
            "kd_tokens_per_s": tokens / t_kd,
            "ratio": (t_t + t_s) / t_kd,
            "paired_ratio_median": median([r["ratio"] for r in reps]),
            "reps": reps,
            "contended_reps": sum(r["contended"] for r in reps),
            "quiet_gate": gate.report(),
            "loadavg_before_after": [load_before, os.getloadavg()],
            "pass": (t_t + t_s) / t_kd >= 0.85,
            "method": (
                f"per repetition: {n_calls} timed calls each of the teacher forward (inference_mode) and of student "
                f"forward + next-token CE backward (zero_grad, no optimizer) on one batch of {args.tp_batch} x "
                f"{args.seq_len}, and one hyprune.distill.distill run of {args.tp_steps} steps of the same batch size "
                "on a fresh pruned student; KD step time = tokens per step / tokens_per_s of log.jsonl (the loop's own "
                "per-step timer: fetch, both forwards, forward KL, backward, grad clip, AdamW and LR step; not the "
                "final save), step 1 dropped (AdamW state allocation); per-repetition medians, then medians over "
                "repetitions; the three alternate order between repetitions"),
        }
        sections["throughput"] = time.perf_counter() - t0
        del student
        gc.collect()

    # ---- 3. quality ---------------------------------------------------------------------------
    if not args.skip_quality:
        t0 = time.perf_counter()
        val = heldout_windows(tokenizer, data / "val.txt.gz", args.seq_len, args.eval_windows)
        test = heldout_windows(tokenizer, data / "test.txt.gz", args.seq_len, args.heldout_windows)
        eval_every = steps // args.evals
        budget = steps * args.batch * args.seq_len
        quality = {
            "budget": {"tokens_asked": args.tokens, "steps": steps, "batch": args.batch, "seq_len": args.seq_len,
                       "tokens": steps * args.batch * args.seq_len, "train_windows": len(train), "epochs": 1,
                       "data": "train.txt.gz, documents shuffled with seed 0 (hyprune.data.calibration_windows), "
                               "the first steps x batch windows; the loop's seeded order, identical in every run"},
            "optimizer": {"lr": args.lr, "min_lr": args.lr * args.min_lr_ratio, "warmup_steps": args.warmup_steps,
                          "schedule": "linear warmup, cosine to min_lr", "weight_decay": args.weight_decay,
                          "betas": [0.9, 0.95], "grad_clip": 1.0, "precision": "fp32"},
            "curve_eval": {"file": "val.txt.gz", "windows": list(val.shape), "every_steps": eval_every},
            "heldout": {"file": "test.txt.gz", "windows": list(test.shape)},
        }
        teacher_test = perplexity(teacher, test)["perplexity"]
        teacher_val = perplexity(teacher, val)["perplexity"]
        before_test = perplexity(student0, test)["perplexity"]
        before_val = perplexity(student0, val)["perplexity"]
        quality["teacher"] = {"test_ppl": teacher_test, "val_ppl": teacher_val}
        quality["before"] = {"test_ppl": before_test, "val_ppl": before_val}
        say(f"quality: teacher test ppl {teacher_test:.3f}; pruned student before training {before_test:.3f}; "
            f"{steps} steps x {args.batch} x {args.seq_len} = {steps * args.batch * args.seq_len:,} tokens per run")
        quality["runs"] = {}
        for name in runs:
            r0 = time.perf_counter()
            out_dir = work / "runs" / name
            student = fresh_student()
            record: dict = {"label": LABELS[name]}
            if name == "kd":
                cfg = train_config(args, budget, args.batch, eval_every=eval_every, eval_windows=args.eval_windows)
                summary = distill(teacher, student, train, cfg, out_dir, eval_windows=val, tokenizer=tokenizer,
                                  overwrite=True)
            elif name == "ce":
                cfg = train_config(args, budget, args.batch, eval_every=eval_every, eval_windows=args.eval_windows,
                                   loss="ce", ce_weight=1.0)
                summary = distill(None, student, train, cfg, out_dir, eval_windows=val, tokenizer=tokenizer,
                                  overwrite=True)
            else:
                cache_dir = work / f"topk{args.topk}-cache"
                c0 = time.perf_counter()
                cache_teacher_topk(teacher, train, args.topk, cache_dir, batch_size=8, overwrite=True, progress=False)
                record["cache"] = {"k": args.topk, "dtype": "float16", "build_s": time.perf_counter() - c0,
                                   "bytes": sum(f.stat().st_size for f in cache_dir.iterdir()),
                                   "windows": len(train)}
                say(f"  top-k cache: k={args.topk}, {record['cache']['bytes'] / 2**20:.0f} MiB, "
                    f"{record['cache']['build_s']:.0f} s")
                cfg = train_config(args, budget, args.batch, eval_every=eval_every, eval_windows=args.eval_windows)
                summary = distill(None, student, TopKCache(cache_dir), cfg, out_dir, eval_windows=val,
                                  tokenizer=tokenizer, overwrite=True)
            log = read_log(out_dir)
            curve = val_curve(log, before_val)
            test_ppl = perplexity(student, test)["perplexity"]
            record.update({
                "config": cfg.model_dump(mode="json"),
                "test_ppl": test_ppl,
                "val_ppl": curve[-1]["val_ppl"],
                "final_loss": summary["loss"],
                "curve": curve,
                "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in log],
                "train_s": summary["elapsed_s"],
                "tokens_per_s_median": median([r["tokens_per_s"] for r in log[1:]] or [log[0]["tokens_per_s"]]),
                "wall_s": time.perf_counter() - r0,
            })
            quality["runs"][name] = record
            say(f"  {name}: test ppl {test_ppl:.3f} (val {record['val_ppl']:.3f}), train {summary['elapsed_s']:.0f} s, "
                f"median {record['tokens_per_s_median']:.0f} tok/s")
            del student
            gc.collect()
        results["quality"] = quality
        sections["quality"] = time.perf_counter() - t0
        if args.plot and quality["runs"]:
            plot_curves(quality, Path(args.plot))
            results["plot"] = str(Path(args.plot).resolve().relative_to(REPO)
                                  if Path(args.plot).resolve().is_relative_to(REPO) else args.plot)

    if work_tmp is not None:
        work_tmp.cleanup()
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["section_runtime_s"] = sections
    results["total_runtime_s"] = time.perf_counter() - started
    return results


def plot_curves(quality: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"kd": ("C0", "o", "-"), "topk": ("C2", "s", "--"), "ce": ("C3", "^", "-")}
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, run in quality["runs"].items():
        color, marker, ls = styles[name]
        xs = [p["tokens"] / 1e6 for p in run["curve"]]
        ys = [p["val_ppl"] for p in run["curve"]]
        label = {"kd": "KD, forward KL", "topk": f"KD, top-{run.get('cache', {}).get('k', '')} cache",
                 "ce": "cross-entropy only"}[name]
        ax.plot(xs, ys, color=color, marker=marker, ls=ls, ms=4, lw=1.5, label=f"{label} (test {run['test_ppl']:.2f})")
    ax.axhline(quality["teacher"]["val_ppl"], color="0.4", ls=":", lw=1.2,
               label=f"teacher (test {quality['teacher']['test_ppl']:.2f})")
    perplexity_axis(ax, [p["val_ppl"] for r in quality["runs"].values() for p in r["curve"]]
                    + [quality["teacher"]["val_ppl"]])
    ax.set_xlabel("training tokens of train.txt.gz (millions)")
    ax.set_ylabel(f"perplexity, first {quality['curve_eval']['windows'][0]} windows of val.txt.gz")
    b = quality["budget"]
    ax.set_title(f"~50% width-pruned tiny NemotronH: recovery, batch {b['batch']}x{b['seq_len']}, "
                 f"lr {quality['optimizer']['lr']:g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = []
    if "throughput" in results:
        t = results["throughput"]
        b = "x".join(str(x) for x in t["batch"])
        lines += ["| measurement | baseline | hyprune | ratio | goal |", "| --- | --- | --- | --- | --- |"]
        lines.append(f"| KD step throughput (batch {b}; median of {len(t['reps'])}) | 1 / (teacher fwd "
                     f"{t['teacher_forward_median_s'] * 1e3:.0f} ms + student fwd/bwd {t['student_fwd_bwd_median_s'] * 1e3:.0f}"
                     f" ms) = {t['bound_tokens_per_s']:.0f} tok/s | KD step {t['kd_step_median_s'] * 1e3:.0f} ms = "
                     f"{t['kd_tokens_per_s']:.0f} tok/s | {t['ratio']:.3f}x | >= 0.85x |")
    if "memory" in results:
        m = results["memory"]
        lines.append(f"| peak RSS increment over loaded models | fwd+fwd/bwd {m['fwd_bwd']['increment_mib']:.1f} MiB | "
                     f"KD {m['kd']['increment_mib']:.1f} MiB | {m['increment_ratio']:.3f}x | |")
        lines.append(f"| absolute peak RSS | fwd+fwd/bwd {m['fwd_bwd']['peak_rss_mib']:.1f} MiB | "
                     f"KD {m['kd']['peak_rss_mib']:.1f} MiB | {m['peak_ratio']:.3f}x | |")
    if "quality" in results:
        q = results["quality"]
        lines += ["", "| model | training | test ppl | val ppl (curve set) | train time | median tok/s |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| teacher | | {q['teacher']['test_ppl']:.3f} | {q['teacher']['val_ppl']:.3f} | | |",
                  f"| pruned student | none | {q['before']['test_ppl']:.3f} | {q['before']['val_ppl']:.3f} | | |"]
        for name, r in q["runs"].items():
            extra = f" (cache {r['cache']['build_s']:.0f} s)" if "cache" in r else ""
            lines.append(f"| pruned student | {r['label']} | {r['test_ppl']:.3f} | {r['val_ppl']:.3f} | "
                         f"{r['train_s']:.0f} s{extra} | {r['tokens_per_s_median']:.0f} |")
        lines += ["", "| tokens | " + " | ".join(q["runs"]) + " |", "| --- |" + " --- |" * len(q["runs"])]
        curves = [r["curve"] for r in q["runs"].values()]
        for i, point in enumerate(curves[0]):
            lines.append(f"| {point['tokens']:,} | " + " | ".join(f"{c[i]['val_ppl']:.3f}" for c in curves) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.replot:
        plot_curves(json.loads(Path(arguments.out).read_text())["quality"], Path(arguments.plot))
        sys.exit(0)
    if arguments.memory_child:
        memory_child(arguments)
        sys.exit(0)
    out = main(arguments)
    path = Path(arguments.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
    say(f"\nwrote {path}; total {out['total_runtime_s']:.0f} s")
