#!/usr/bin/env python
"""Quality benchmark (issue 5): do the Minitron-SSM claims hold on the reference teacher?

Six ~50%-parameter students of ``../shared/models/tiny-nemotron-h``, each trained on the same
``--tokens`` of ``train.txt.gz`` (the 10x row on ten times as many), compared on held-out perplexity
and on speed against the teacher:

    width       group-aware width pruning (Mamba heads + head channels, FFN, hidden; ``make_plan``
                with method "activation") + forward-KL KD
    blind       the same target, Mamba heads ranked ignoring their B/C groups and regrouped
                (method "group-blind") + KD
    depth       depth only: drop whole blocks (``--depth-method``, default kl = Minitron-SSM's
                KL with the block removed) until the size is closest to ``width``'s + KD
    nossm       width without the SSM axes: FFN as in ``--target``, hidden size lowered (multiples of
                ``--hidden-multiple``) until the size is closest to ``width``'s; Mamba untouched + KD
    scratch     ``width``'s architecture from random init, cross-entropy, same tokens
    scratch10x  the same on ``--scratch-multiple`` x the tokens

Conventions (../shared/README.md): scores and training windows from ``train.txt.gz`` (shuffled
documents, seed 0, 256 tokens); held-out perplexity on the first 128 consecutive 256-token windows of
``test.txt.gz``; the training curve on the first ``--eval-windows`` windows of ``val.txt.gz``. Every
run uses one optimizer setting (bench_common.train_config) and sees the training windows in the loop's
seeded order, so the KD rows and ``scratch`` get identical batches.

Speed: ``hyprune.evaluate.bench`` on the teacher and every distinct student architecture in one call
(models interleaved, ratios within the run): prefill and decode tokens/s, cache bytes per sequence.
``blind`` and the scratch rows have ``width``'s exact config (checked), so they share its speed.

Resumable: results go to ``--out`` (JSON, rewritten after every finished piece) and models to
``--work-dir``; a rerun skips finished rows and continues an interrupted training from its last
checkpoint. ``--fresh`` starts over.

    python benchmarks/bench_quality.py                           # the full run (defaults below)
    python benchmarks/bench_quality.py --tokens 16384 --scratch-multiple 2 --out /tmp/q.json \
        --work-dir /tmp/q --plot /tmp/q.png                      # a smoke test (minutes)
    python benchmarks/bench_quality.py --replot                  # redraw the PNG from --out
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"  # the project's ../shared
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (MAIN_TARGET, budget_steps, perplexity_axis, read_log, say,  # noqa: E402
                          train_config, val_curve)
from bench_prune import git_state, machine_info  # noqa: E402

ROWS = ("width", "blind", "depth", "nossm", "scratch", "scratch10x")  # training order
KD_ROWS = ("width", "blind", "depth", "nossm")
LABELS = {
    "width": "width, group-aware (Mamba heads + head channels, FFN, hidden) + KD",
    "blind": "width, group-blind Mamba heads (regrouped) + KD",
    "depth": "depth only + KD",
    "nossm": "width without SSM axes (FFN + hidden) + KD",
    "scratch": "width's architecture, random init, cross-entropy, same tokens",
    "scratch10x": "width's architecture, random init, cross-entropy, {m}x tokens",
}
# settings that change the numbers: a rerun with other values must not mix its rows with the saved ones
RESULT_SETTINGS = ("model", "data_dir", "seq_len", "seed", "target", "calib_windows", "depth_method", "depth_windows",
                   "hidden_multiple", "nossm_target", "tokens", "batch", "lr", "min_lr_ratio", "warmup_steps",
                   "weight_decay", "scratch_multiple", "evals", "eval_windows", "heldout_windows")


def parse_args(argv=None):
    from hyprune.depth import METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models" / "tiny-nemotron-h"), help="teacher folder")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"), help="folder of {train,val,test}.txt.gz")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_quality.json"), help="JSON results")
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "out" / "bench_quality"),
                   help="students, training runs and checkpoints (kept, for resuming)")
    p.add_argument("--plot", default=str(REPO / "benchmarks" / "quality_curve.png"), help="PNG of the curves")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    # the students
    p.add_argument("--target", default=MAIN_TARGET, help="the group-aware ~50%% width target (rows width, blind)")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (width and depth scores)")
    p.add_argument("--depth-method", default="kl", choices=METHODS, help="block scores of the depth row")
    p.add_argument("--depth-windows", type=int, default=32,
                   help="the first N calibration windows score the blocks (kl / lm_loss run one forward per block)")
    p.add_argument("--hidden-multiple", type=int, default=8, help="nossm: hidden sizes tried are multiples of this")
    p.add_argument("--nossm-target", help="nossm: an explicit target instead of the size-matching search")
    # training (one setting for every run)
    p.add_argument("--tokens", type=int, default=131_072,
                   help="training budget per student, in train.txt.gz tokens (rounded up to whole steps, and the "
                        "steps to a multiple of --evals)")
    p.add_argument("--scratch-multiple", type=int, default=10, help="the scratch10x row trains on this x --tokens")
    p.add_argument("--batch", type=int, default=16, help="windows per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine ends at lr x this")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--evals", type=int, default=8, help="curve points per --tokens of training")
    p.add_argument("--eval-windows", type=int, default=32, help="first N windows of val.txt.gz for the curve")
    p.add_argument("--heldout-windows", type=int, default=128)
    p.add_argument("--rows", default=",".join(ROWS), help="which rows to train, comma-separated")
    # speed
    p.add_argument("--bench-batch-sizes", default="1,8")
    p.add_argument("--bench-context", type=int, default=256, help="prefill length")
    p.add_argument("--bench-decode-tokens", type=int, default=16)
    p.add_argument("--bench-repeats", type=int, default=5)
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--fresh", action="store_true", help="discard --out and --work-dir and start over")
    p.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --out, run nothing")
    args = p.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown} (use {','.join(ROWS)})")
    return args


# ---------------------------------------------------------------------------------------------
# Results file: written after every finished piece, so a crash loses at most the piece under way
# ---------------------------------------------------------------------------------------------
def load_results(args) -> dict:
    path = Path(args.out)
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS}
    if args.fresh:
        path.unlink(missing_ok=True)
        shutil.rmtree(args.work_dir, ignore_errors=True)
    if path.exists():
        results = json.loads(path.read_text())
        changed = {k: (results["settings"].get(k), v) for k, v in settings.items() if results["settings"].get(k) != v}
        if changed:
            raise SystemExit(f"{path} was made with other settings ({changed}: saved, now). Pass --fresh to start "
                             "over, or another --out and --work-dir.")
        say(f"resuming {path}: students {sorted(results.get('students', {}))}, runs {sorted(results.get('runs', {}))}")
        return results
    return {"settings": settings, "students": {}, "runs": {}, "section_runtime_s": {}}


def save_results(results: dict, args) -> None:
    """Write ``results`` atomically, keeping rows another process of the same run has written meanwhile
    (rows can be split across processes with ``--rows``; each then runs ``--threads`` threads)."""
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        on_disk = json.loads(path.read_text())
        for key in ("students", "runs", "section_runtime_s"):
            results[key] = {**on_disk.get(key, {}), **results[key]}
        results["commands"] = list(dict.fromkeys(on_disk.get("commands", []) + results.get("commands", [])))
        if "speed" in on_disk:
            results.setdefault("speed", on_disk["speed"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The students (deterministic: rebuilt only when their folder or record is missing)
# ---------------------------------------------------------------------------------------------
def save_model(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def sizes_of(model, family) -> dict:
    """The prunable config fields and the layer pattern of ``model``."""
    config = model.config
    return {"pattern": "".join({"mamba": "M", "attention": "*", "mlp": "-"}[k] for k in family.block_kinds(config)),
            **{field: getattr(config, field) for field in family.fields.values() if hasattr(config, field)}}


class StudentBuilder:
    """Makes each pruned student from one activation sweep / one depth scoring of the teacher (lazily)."""

    def __init__(self, args, teacher, family, calib):
        self.args, self.teacher, self.family, self.calib = args, teacher, family, calib
        self._scores = self._block_scores = None

    @property
    def scores(self):
        from hyprune.importance import activation_scores

        if self._scores is None:
            self._scores = activation_scores(self.teacher, self.calib, self.family, batch_size=8, progress=False)
        return self._scores

    def width_plan(self, target, group_aware=True):
        from hyprune.plan import make_plan, parse_target

        return make_plan(self.family, self.teacher.config, self.scores, parse_target(target),
                         method="activation" if group_aware else "group-blind", group_aware=group_aware)

    def params(self, plan) -> int:
        from hyprune.apply import apply_plan
        from hyprune.models import count_parameters

        return count_parameters(apply_plan(self.teacher, plan, self.family), self.family)["total"]

    def depth_plan(self, goal: int):
        """The depth-only plan whose size is closest to ``goal`` parameters (drop 1, 2, ... blocks)."""
        from hyprune.depth import block_importance, depth_plan
        from hyprune.errors import HypruneError

        if self._block_scores is None:
            self._block_scores = block_importance(self.teacher, self.calib[: self.args.depth_windows],
                                                  self.args.depth_method, self.family, batch_size=8, progress=False)
        n_blocks = len(self.family.block_kinds(self.teacher.config))
        candidates = []
        for n in range(1, n_blocks - 1):
            try:
                plan, _ = depth_plan(self.teacher, n, scores=self._block_scores, progress=False)
            except HypruneError:  # keeping the protected attention block makes larger counts impossible
                break
            candidates.append((abs(self.params(plan) - goal), n, plan))
        _, n, plan = min(candidates, key=lambda c: c[:2])
        return plan, {"method": self.args.depth_method, "windows": len(self.calib[: self.args.depth_windows]),
                      "drop_blocks": n, "dropped": plan.drop_blocks,
                      "block_scores": self._block_scores.scores}

    def nossm_plan(self, goal: int):
        """FFN + hidden only: FFN from ``--target``, the hidden size (a multiple of --hidden-multiple) whose
        parameter count is closest to ``goal``; Mamba heads, head channels, states and attention untouched."""
        from hyprune.plan import parse_target

        if self.args.nossm_target:
            return self.width_plan(self.args.nossm_target), {"target": self.args.nossm_target, "search": None}
        ffn = parse_target(self.args.target)["intermediate_size"]
        hidden = self.teacher.config.hidden_size
        tried = []
        for h in range(self.args.hidden_multiple, hidden + 1, self.args.hidden_multiple):
            plan = self.width_plan(f"hidden_size={h},intermediate_size={ffn}")
            tried.append((abs(self.params(plan) - goal), h, plan))
        _, h, plan = min(tried, key=lambda c: c[:2])
        return plan, {"target": f"hidden_size={h},intermediate_size={ffn}",
                      "search": f"intermediate_size={ffn} fixed; hidden_size in multiples of "
                                f"{self.args.hidden_multiple}, closest parameter count to the width row"}


def build_students(args, results, teacher, family, tokenizer, calib, test, val, work: Path) -> dict[str, Path]:
    """Folder of every student's starting point; records params, sizes and perplexity before training."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hyprune.apply import apply_plan
    from hyprune.evaluate import perplexity
    from hyprune.models import count_parameters, load_model
    from hyprune.plan import summarize

    builder = StudentBuilder(args, teacher, family, calib)
    teacher_params = results["teacher"]["parameters"]
    folders = {row: work / "students" / ("scratch-init" if row.startswith("scratch") else row) for row in ROWS}
    for row in ROWS:
        folder, record = folders[row], results["students"].get(row)
        if record is not None and (folder / "config.json").exists():
            continue
        t0 = time.perf_counter()
        how: dict = {}
        if row == "scratch10x" and (folders["scratch"] / "config.json").exists() and "scratch" in results["students"]:
            results["students"][row] = dict(results["students"]["scratch"])
            continue
        if row in ("width", "blind"):
            plan = builder.width_plan(args.target, group_aware=row == "width")
            how = {"target": args.target, "method": plan.method}
        elif row == "depth":
            plan, how = builder.depth_plan(results["students"]["width"]["parameters"])
        elif row == "nossm":
            plan, how = builder.nossm_plan(results["students"]["width"]["parameters"])
        if row in KD_ROWS:
            model = apply_plan(teacher, plan, family)
            how["plan"] = summarize(plan)
        else:  # random init of width's architecture, seeded
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folders["width"]))
            how = {"init": f"AutoModelForCausalLM.from_config(width's config) after torch.manual_seed({args.seed})"}
        model.eval()
        save_model(model, tokenizer, folder)
        params = count_parameters(model, family)
        results["students"][row] = {
            "label": LABELS[row].format(m=args.scratch_multiple), "folder": str(folder), "how": how,
            "sizes": sizes_of(model, family), "parameters": params["total"], "parameters_by_component": params,
            "fraction": params["total"] / teacher_params,
            "start_test_ppl": perplexity(model, test)["perplexity"],
            "start_val_ppl": perplexity(model, val)["perplexity"],
            "build_s": time.perf_counter() - t0,
        }
        save_results(results, args)
        r = results["students"][row]
        say(f"student {row}: {r['parameters']:,} parameters ({100 * r['fraction']:.1f}%), {r['sizes']}; "
            f"test ppl before training {r['start_test_ppl']:.2f}")
        del model
        gc.collect()
    # the scratch rows and blind must be width's architecture exactly (that is what they compare)
    width_config = load_model(folders["width"])[0].config.to_dict()
    for row in ("blind", "scratch", "scratch10x"):
        other = AutoConfig.from_pretrained(folders[row]).to_dict()
        same = {k: v for k, v in other.items() if k != "_name_or_path"} == \
               {k: v for k, v in width_config.items() if k != "_name_or_path"}
        results["students"][row]["same_config_as_width"] = same
        if not same:
            say(f"warning: {row}'s config differs from width's")
    return folders


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train_row(args, results, row, folder: Path, teacher, tokenizer, train, val, test, work: Path, steps: int) -> None:
    """Train one student (KD or CE) from its starting folder; resumes from the run's last checkpoint."""
    from hyprune.distill import distill
    from hyprune.evaluate import perplexity
    from hyprune.models import load_model

    multiple = args.scratch_multiple if row == "scratch10x" else 1
    run_steps = steps * multiple
    eval_every = steps // args.evals * (4 if multiple > 1 else 1)  # the long run: a point every 4 short-run points
    kd = row in KD_ROWS
    cfg = train_config(args, run_steps * args.batch * args.seq_len, args.batch, eval_every=eval_every,
                       eval_windows=args.eval_windows, checkpoint_every=eval_every, keep_last=1,
                       **({} if kd else {"loss": "ce", "ce_weight": 1.0}))
    student, _ = load_model(folder)
    out_dir = work / "runs" / row
    t0 = time.perf_counter()
    summary = distill(teacher if kd else None, student, train[: run_steps * args.batch], cfg, out_dir,
                      eval_windows=val, tokenizer=tokenizer, resume=True)
    log = read_log(out_dir)
    start = results["students"][row]
    results["runs"][row] = {
        "label": start["label"],
        "loss": "forward_kl from the teacher" if kd else "cross-entropy",
        "config": cfg.model_dump(mode="json"),
        "steps": run_steps, "tokens": run_steps * args.batch * args.seq_len, "windows": run_steps * args.batch,
        "test_ppl": perplexity(student, test)["perplexity"],
        "curve": val_curve(log, start["start_val_ppl"]),
        "final_loss": summary["loss"],
        "train_s": summary["elapsed_s"],
        "wall_s": time.perf_counter() - t0,
        "resumed_from": summary.get("resumed_from"),
        "tokens_per_s_median": statistics.median([r["tokens_per_s"] for r in log if "tokens_per_s" in r]),
    }
    save_results(results, args)
    r = results["runs"][row]
    say(f"  {row}: test ppl {r['test_ppl']:.3f} after {r['tokens']:,} tokens, train {r['train_s']:.0f} s "
        f"({r['tokens_per_s_median']:.0f} tok/s)")


# ---------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------
def measure_speed(args, results, folders: dict[str, Path]) -> None:
    """`hyprune.evaluate.bench` on the teacher and each distinct architecture, interleaved in one call."""
    from hyprune.evaluate import bench

    distinct = ["width", "depth", "nossm"]
    models = [args.model] + [str(folders[r]) for r in distinct]
    t0 = time.perf_counter()
    raw = bench(models, batch_sizes=[int(b) for b in args.bench_batch_sizes.split(",")],
                context_lengths=[args.bench_context],
                decode_tokens=args.bench_decode_tokens, repeats=args.bench_repeats, progress=False)
    teacher_runs = raw["models"][0]["runs"]
    speed = {"device": raw["device"], "device_name": raw["device_name"], "threads": raw["threads"],
             "dtype": raw["dtype"], "context": args.bench_context, "decode_tokens": raw["decode_tokens"],
             "repeats": raw["repeats"], "schedule": raw["schedule"],
             "teacher": [{k: r[k] for k in ("batch_size", "prefill_tokens_per_s", "decode_tokens_per_s")}
                         for r in teacher_runs],
             "rows": {}, "bench_s": time.perf_counter() - t0}
    for row, ratio, entry in zip(distinct, raw["ratios"], raw["models"][1:]):
        speed["rows"][row] = {
            "architecture_of": row,
            "cache_bytes_per_sequence": ratio["cache_bytes_per_sequence"][0]["total"],
            "runs": [{"batch_size": q["batch_size"], "prefill": q["prefill_tokens_per_s"],
                      "decode": q["decode_tokens_per_s"], "prefill_tokens_per_s": r["prefill_tokens_per_s"],
                      "decode_tokens_per_s": r["decode_tokens_per_s"]} for q, r in zip(ratio["runs"], entry["runs"])],
        }
    for row in ("blind", "scratch", "scratch10x"):
        if results["students"][row].get("same_config_as_width"):
            speed["rows"][row] = {**speed["rows"]["width"], "architecture_of": "width"}
    speed["raw"] = raw
    results["speed"] = speed
    save_results(results, args)


# ---------------------------------------------------------------------------------------------
# Main run
# ---------------------------------------------------------------------------------------------
def main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)

    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.models import count_parameters, load_model, load_tokenizer

    started = time.perf_counter()
    results = load_results(args)
    sections = results["section_runtime_s"]
    results["machine"] = machine_info()
    results["git"] = git_state()
    results.setdefault("commands", []).append(" ".join([Path(sys.executable).name, *sys.argv]))
    work = Path(args.work_dir)
    data = Path(args.data_dir)

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    teacher, family = load_model(args.model)
    teacher.eval()
    calib = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, args.calib_windows, seed=args.seed)
    test = heldout_windows(tokenizer, data / "test.txt.gz", args.seq_len, args.heldout_windows)
    val = heldout_windows(tokenizer, data / "val.txt.gz", args.seq_len, args.eval_windows)
    if "teacher" not in results:
        results["teacher"] = {"parameters": count_parameters(teacher, family)["total"],
                              "sizes": sizes_of(teacher, family),
                              "test_ppl": perplexity(teacher, test)["perplexity"],
                              "val_ppl": perplexity(teacher, val)["perplexity"]}
        save_results(results, args)
    folders = build_students(args, results, teacher, family, tokenizer, calib, test, val, work)
    sections["setup"] = sections.get("setup", 0) + time.perf_counter() - t0

    # training windows: shuffled documents of train.txt.gz (seed 0); the KD rows and scratch take the
    # first steps x batch, scratch10x the first multiple x as many (one epoch each)
    steps = budget_steps(args.tokens, args.batch, args.seq_len, args.evals)
    todo = [r for r in args.rows if r not in results["runs"]]
    results["budget"] = {
        "tokens_asked": args.tokens, "steps": steps, "batch": args.batch, "seq_len": args.seq_len,
        "tokens": steps * args.batch * args.seq_len, "scratch_multiple": args.scratch_multiple,
        "teacher_training_tokens": 5_734_400,
        "data": "train.txt.gz, documents shuffled with seed 0 (hyprune.data.calibration_windows); the first "
                "steps x batch windows (x multiple for scratch10x), one epoch in the loop's seeded order",
        "curve": f"first {len(val)} windows of val.txt.gz every {steps // args.evals} steps "
                 f"(every {4 * (steps // args.evals)} for scratch10x)",
        "heldout": f"first {len(test)} windows of test.txt.gz"}
    if todo:
        t0 = time.perf_counter()
        n_train = steps * args.batch * (args.scratch_multiple if "scratch10x" in todo else 1)
        train = calibration_windows(tokenizer, data / "train.txt.gz", args.seq_len, n_train, seed=args.seed)
        if len(train) < n_train:
            raise SystemExit(f"train.txt.gz holds only {len(train)} windows; lower --tokens or --scratch-multiple")
        sections["tokenize"] = time.perf_counter() - t0
        say(f"training: {steps} steps x {args.batch} x {args.seq_len} = {results['budget']['tokens']:,} tokens per "
            f"student ({args.scratch_multiple}x for scratch10x); rows to do: {','.join(todo)}")
        for row in todo:
            t0 = time.perf_counter()
            train_row(args, results, row, folders[row], teacher, tokenizer, train, val, test, work, steps)
            sections[f"train_{row}"] = time.perf_counter() - t0
            save_results(results, args)
            gc.collect()

    if not args.skip_bench and "speed" not in results:
        say("speed: hyprune.evaluate.bench, teacher and students interleaved ...")
        t0 = time.perf_counter()
        measure_speed(args, results, folders)
        sections["bench"] = time.perf_counter() - t0

    results["unfinished"] = unfinished_runs(results, work)
    if "width" in results["runs"]:
        t0 = time.perf_counter()
        results["paired"] = paired_comparisons(results, work, test)
        sections["paired"] = time.perf_counter() - t0
    if args.plot and results["runs"]:
        plot_curves(results, Path(args.plot))
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["last_invocation_s"] = time.perf_counter() - started
    save_results(results, args)
    return results


PAIRS = (("width", "blind"), ("width", "depth"), ("width", "nossm"), ("width", "scratch"), ("width", "scratch10x"))


def paired_comparisons(results: dict, work: Path, test, resamples: int = 2000) -> dict:
    """How sure the test-set comparisons with ``width`` are, given only 128 test windows.

    Each finished student's mean loss on every test window (cached in the run's record), then per pair:
    the perplexity ratio, on how many windows ``width`` has the lower loss, and a 95% paired bootstrap
    interval of the ratio (windows resampled with replacement, seed 0). This is the noise of the test
    sample only; training noise (another seed, another data order) is not measured here.
    """
    import torch

    from hyprune.evaluate import perplexity
    from hyprune.models import load_model

    for row, run in results["runs"].items():
        if "test_window_losses" not in run:
            model, _ = load_model(work / "runs" / row / "final")
            run["test_window_losses"] = [perplexity(model, window[None])["loss"] for window in test]
    out = {}
    gen = torch.Generator().manual_seed(0)
    for a, b in PAIRS:
        if a not in results["runs"] or b not in results["runs"]:
            continue
        la = torch.tensor(results["runs"][a]["test_window_losses"], dtype=torch.float64)
        lb = torch.tensor(results["runs"][b]["test_window_losses"], dtype=torch.float64)
        idx = torch.randint(0, len(la), (resamples, len(la)), generator=gen)
        ratios = torch.exp(la[idx].mean(1) - lb[idx].mean(1))  # every window has the same token count
        lo, hi = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out[f"{a}/{b}"] = {"ppl_ratio": math.exp(float(la.mean() - lb.mean())), "ci95": [lo, hi],
                           "windows_a_lower": int((la < lb).sum()), "windows": len(la)}
    return out


def unfinished_runs(results: dict, work: Path) -> dict:
    """Curves of started but unfinished trainings (from their log.jsonl), so that a run stopped for lack of
    time still shows how far it got; they carry no test perplexity."""
    out = {}
    for row in ROWS:
        log_file = work / "runs" / row / "log.jsonl"
        if row in results["runs"] or row not in results["students"] or not log_file.exists():
            continue
        log = read_log(log_file.parent)
        if log:
            out[row] = {"curve": val_curve(log, results["students"][row]["start_val_ppl"]),
                        "tokens": log[-1]["tokens"], "last_loss": log[-1]["loss"]}
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
STYLES = {"width": ("C0", "o", "-"), "blind": ("C1", "s", "--"), "depth": ("C2", "D", "-"),
          "nossm": ("C4", "v", "-."), "scratch": ("C3", "^", ":"), "scratch10x": ("C3", "^", "-")}
SHORT = {"width": "width, group-aware + KD", "blind": "width, group-blind + KD", "depth": "depth + KD",
         "nossm": "width w/o SSM axes + KD", "scratch": "scratch, CE", "scratch10x": "scratch, CE, {m}x tokens"}


def plot_curves(results: dict, path: Path) -> None:
    """Val perplexity against training tokens (log-log: the 10x run spans a decade more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["settings"]["scratch_multiple"]
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=100)
    values = [results["teacher"]["val_ppl"]]
    curves = [(row, run, f"test {run['test_ppl']:.2f}") for row, run in results["runs"].items()]
    curves += [(row, run, f"unfinished at {run['tokens'] / 1e6:.2f}M tokens")
               for row, run in results.get("unfinished", {}).items()]
    for row, run, note in curves:
        color, marker, ls = STYLES[row]
        points = [p for p in run["curve"] if p["tokens"] > 0]
        values += [p["val_ppl"] for p in points]
        ax.plot([p["tokens"] / 1e6 for p in points], [p["val_ppl"] for p in points], color=color, marker=marker,
                ls=ls, ms=4, lw=1.5, label=f"{SHORT[row].format(m=m)} ({note})")
    ax.axhline(results["teacher"]["val_ppl"], color="0.4", ls=":", lw=1.2,
               label=f"teacher (test {results['teacher']['test_ppl']:.2f})")
    budget = results["budget"]["tokens"] / 1e6
    ax.axvline(budget, color="0.7", lw=1, ls="--")
    perplexity_axis(ax, values)
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training tokens of train.txt.gz (millions, log scale); dashed: the per-student budget")
    ax.set_ylabel(f"perplexity, first {results['settings']['eval_windows']} windows of val.txt.gz")
    ax.set_title(f"~50% students of tiny NemotronH, batch {results['budget']['batch']}x{results['budget']['seq_len']}, "
                 f"lr {results['settings']['lr']:g}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict) -> str:
    m = results["settings"]["scratch_multiple"]
    speed = results.get("speed", {})
    batches = [r["batch_size"] for r in speed.get("teacher", [])]
    t = results["teacher"]
    head = ["student", "sizes", "parameters (of teacher)", "test ppl after pruning", "test ppl after training",
            *(f"prefill / decode tok/s vs teacher, batch {b}" for b in batches), "cache / sequence vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    t_speed = [f"{r['prefill_tokens_per_s']:.0f} / {r['decode_tokens_per_s']:.0f} tok/s"
               for r in speed.get("teacher", [])]
    lines.append(f"| teacher | {fmt_sizes(t['sizes'])} | {t['parameters']:,} (100%) | {t['test_ppl']:.3f} | | "
                 + "".join(f"{s} | " for s in t_speed) + "1 |")
    for row in ROWS:
        s = results["students"].get(row)
        if s is None:
            continue
        run = results["runs"].get(row, {})
        sp = speed.get("rows", {}).get(row)
        cells = [f"{r['prefill']:.2f}x / {r['decode']:.2f}x" for r in sp["runs"]] if sp else ["-"] * len(batches)
        trained = f"{run['test_ppl']:.3f} ({run['tokens'] / 1e3:,.0f}k tokens)" if run else "-"
        if row in results.get("unfinished", {}):
            u = results["unfinished"][row]
            trained = (f"unfinished (stopped at {u['tokens'] / 1e3:,.0f}k tokens): val ppl "
                       f"{u['curve'][-1]['val_ppl']:.2f} at {u['curve'][-1]['tokens'] / 1e3:,.0f}k")
        cache = f"{sp['cache_bytes_per_sequence']:.3f}" if sp else "-"
        lines.append(f"| {row}: {SHORT[row].format(m=m)} | {fmt_sizes(s['sizes'])} | {s['parameters']:,} "
                     f"({100 * s['fraction']:.1f}%) | {s['start_test_ppl']:.1f} | {trained} | "
                     + " | ".join([*cells, cache]) + " |")
    if results.get("paired"):
        lines += ["", "Test-set comparisons with width (paired over the held-out windows; test-sample noise only):", "",
                  "| pair | test ppl ratio | 95% bootstrap interval | windows where width is lower |",
                  "| --- | --- | --- | --- |"]
        for pair, c in results["paired"].items():
            lines.append(f"| {pair} | {c['ppl_ratio']:.3f} | {c['ci95'][0]:.3f} - {c['ci95'][1]:.3f} | "
                         f"{c['windows_a_lower']} of {c['windows']} |")
    runs = {**results["runs"], **{f"{row} (unfinished)": r for row, r in results.get("unfinished", {}).items()}}
    if runs:
        lines += ["", "Val perplexity (curve set) against tokens:", "",
                  "| tokens | " + " | ".join(runs) + " |", "| --- |" + " --- |" * len(runs)]
        points = sorted({p["tokens"] for r in runs.values() for p in r["curve"]})
        for tok in points:
            vals = [next((f"{p['val_ppl']:.2f}" for p in r["curve"] if p["tokens"] == tok), "") for r in runs.values()]
            lines.append(f"| {tok:,} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def fmt_sizes(s: dict) -> str:
    return (f"{s['pattern']}, hidden {s['hidden_size']}, FFN {s['intermediate_size']}, "
            f"Mamba {s['mamba_num_heads']}x{s['mamba_head_dim']}")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.replot:
        plot_curves(json.loads(Path(arguments.out).read_text()), Path(arguments.plot))
        sys.exit(0)
    out = main(arguments)
    print(markdown(out))
    say(f"\nwrote {arguments.out}; this invocation {out['last_invocation_s']:.0f} s")
