#!/usr/bin/env python
"""Benchmark of the streamed path (issue 13: models larger than memory): score and prune block by block.

Part (a), the 8B run, on a folder written by ``make_nemotron_8b.py`` (random weights, Nemotron-H-8B-Base shape,
bf16, ~16 GB in 5 GB shards; generate it under ``benchmarks/out/``, which git ignores):

1. ``windows`` -- 16 calibration windows x 256 tokens of ``train.txt.gz`` (``hyprune.data.calibration_windows``,
   seed 0; the shared/README.md convention), with the checkpoint's tokenizer;
2. ``score``   -- ``hyprune.stream.score.stream_activation_scores`` over them;
3. ``plan``    -- ``hyprune.plan.make_plan`` to the width target of ``recipes/nemotron-h-8b-to-4b.yaml``;
4. ``apply``   -- ``hyprune.stream.apply.stream_apply`` to an output folder (shards + index);
5. ``verify``  -- the output config built on the meta device; every output tensor's name and shape compared
   with the meta model's state dict (from the shard headers, no data read); a few blocks' real tensors loaded
   into it with ``safe_open``; ``model.num_parameters()`` against the analytic
   ``hyprune.search.counting.count_parameters``.

Every stage runs in a fresh child process (this script with ``--stage``), so its peak RSS is its own
``/proc/self/status`` VmHWM; the parent's VmHWM and the children's ``RUSAGE_CHILDREN`` maximum are reported
too. Requirement: peak RSS <= 3 GB (3 x 2^30 bytes) in every stage.

Part (b), streamed vs in-memory scoring on the reference teacher and on the ``500m`` preset (generated if
absent): in one process, repetitions alternating the order, ``stream_activation_scores`` (float32) against
``load_model`` + ``hyprune.importance.activation_scores`` (float32) and against the sweep alone; ratio of the
medians, and whether every score tensor is identical (``torch.equal``, same keys).

``--dry-run`` runs part (a) on a tiny generated model (hidden 256, 8 blocks, several shards) to check the
plumbing; a stage whose stream function does not exist yet runs its in-memory equivalent and is labelled so
(those numbers are not streamed results, and go to ``bench_stream.dry-run.json``, not ``bench_stream.json``).
Part (b) needs the stream functions and is skipped without them.

    python benchmarks/make_nemotron_8b.py --out benchmarks/out/nemotron-h-8b-random
    python benchmarks/bench_stream.py benchmarks/out/nemotron-h-8b-random
    python benchmarks/bench_stream.py --dry-run
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import QuietGate, git_state, machine_info, median, mib, proc_status_kb
from make_nemotron_8b import checkpoint_name, generate, shape_fields

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared"
OUT = REPO / "benchmarks" / "out"
RECIPE = REPO / "recipes" / "nemotron-h-8b-to-4b.yaml"
RSS_LIMIT_KB = 3 * 1024 * 1024  # 3 GiB
STAGES = ("windows", "score", "plan", "apply", "verify")
# the --dry-run model (8B pattern cut to 8 blocks, hidden 256, 2 Mamba heads per group) and a target with the
# recipe's proportions (hidden 3/4, FFN ~4/7, fewer heads per group, head_dim kept)
DRY_FIELDS = dict(preset="8b", hidden=256, layers=8, vocab=8192, mamba_heads=16)
DRY_TARGET = {"hidden_size": 192, "intermediate_size": 768, "mamba_num_heads": 8, "mamba_head_dim": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", nargs="?", help="the 8B folder of make_nemotron_8b.py (part a)")
    p.add_argument("--dry-run", action="store_true", help="part (a) on a tiny generated model; see the docstring")
    p.add_argument("--work", help="folder for the stages' files and the pruned output (default benchmarks/out/...)")
    p.add_argument("--data-dir", default=str(SHARED / "data" / "pystdlib"))
    p.add_argument("--teacher", default=str(SHARED / "models" / "tiny-nemotron-h"))
    p.add_argument("--model-500m", default=str(OUT / "nemotron-h-500m-random"), help="generated if absent")
    p.add_argument("--out", help="JSON results (default benchmarks/out/bench_stream.json)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute dtype of the 8B scoring (default: "
                   "stream_activation_scores' own default)")
    p.add_argument("--target", help="width target 'field=size,...' (default: the recipe's; in --dry-run a "
                   "target with the recipe's proportions)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of stream_apply's output")
    p.add_argument("--verify-blocks", type=int, default=3, help="blocks whose real tensors verify loads")
    p.add_argument("--reps", type=int, default=3, help="part (b) repetitions per model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet-budget", type=float, default=60.0, help="see bench_prune.py")
    p.add_argument("--skip-8b", action="store_true", help="part (b) only")
    p.add_argument("--skip-compare", action="store_true", help="part (a) only")
    p.add_argument("--skip-500m", action="store_true", help="part (b) on the teacher only")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage in a child
    p.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)  # child: dry-run fallback
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# What exists
# ---------------------------------------------------------------------------------------------
def stream_function(module: str, name: str):
    """``hyprune.stream.<module>.<name>`` if it is written yet, else None (the benchmark then says so)."""
    try:
        return getattr(importlib.import_module(f"hyprune.stream.{module}"), name)
    except (ImportError, AttributeError):
        return None


def recipe_target(path: Path = RECIPE) -> dict[str, int]:
    """The width target (config field -> size) of the 8B -> 4B recipe."""
    import yaml

    return {k: int(v) for k, v in yaml.safe_load(path.read_text())["prune"]["target"].items()}


def peak_kb() -> dict[str, int]:
    """This process's VmHWM / VmRSS (KiB) and the largest waited-for child's ru_maxrss (KiB)."""
    status = proc_status_kb()
    return {"vmhwm_kb": status.get("VmHWM", 0), "vmrss_kb": status.get("VmRSS", 0),
            "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def work_dir(args) -> Path:
    return Path(args.work) if args.work else OUT / ("bench_stream_dry" if args.dry_run else "bench_stream_work")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------
# Part (a): the stages, each run in a child process
# ---------------------------------------------------------------------------------------------
def stage_windows(args, work: Path) -> dict:
    """Calibration windows with the checkpoint's tokenizer, saved for the next stage."""
    from hyprune.data import calibration_windows
    from hyprune.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    windows = calibration_windows(tokenizer, Path(args.data_dir) / "train.txt.gz", args.seq_len, args.num_samples,
                                  seed=0)
    torch.save(windows, work / "windows.pt")
    return {"impl": "hyprune.data.calibration_windows", "windows": list(windows.shape),
            "max_token_id": int(windows.max())}


def stage_score(args, work: Path) -> dict:
    """Streamed activation scores (or, in a dry run without hyprune.stream.score, the in-memory sweep)."""
    from safetensors.torch import save_file

    windows = torch.load(work / "windows.pt")
    stream = stream_function("score", "stream_activation_scores")
    dtype = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    if stream is not None:
        scores = stream(args.model, windows, batch_size=args.batch_size, progress=False, **dtype)
        impl = "hyprune.stream.score.stream_activation_scores" + (f" (dtype {args.dtype})" if args.dtype else "")
    elif args.in_memory:
        from hyprune.importance import activation_scores
        from hyprune.models import load_model

        model, family = load_model(args.model, dtype=args.dtype or "float32")
        scores = activation_scores(model, windows, family, batch_size=args.batch_size, progress=False)
        impl = "IN-MEMORY load_model + activation_scores (hyprune.stream.score not available)"
    else:
        raise SystemExit("hyprune.stream.score.stream_activation_scores does not exist yet")
    save_file({k: v.contiguous() for k, v in scores.items()}, str(work / "scores.safetensors"))
    return {"impl": impl, "keys": len(scores), "all_finite": all(bool(torch.isfinite(v).all()) for v in scores.values())}


def stage_plan(args, work: Path) -> dict:
    """The plan to the recipe's width target (the dry-run target on the tiny model)."""
    from hyprune.models import load_config
    from hyprune.plan import make_plan, parse_target, summarize
    from hyprune.search.counting import count_parameters

    config, family = load_config(args.model)
    target = parse_target(args.target) if args.target else DRY_TARGET if args.dry_run else recipe_target()
    plan = make_plan(family, config, load_tensors(work / "scores.safetensors"), target)
    plan.save(work / "plan.json")
    return {"impl": "hyprune.plan.make_plan", "target": target, "summary": summarize(plan),
            "source_parameters": count_parameters(family, config)["total"]}


def stage_apply(args, work: Path) -> dict:
    """``stream_apply`` of the plan to ``work/pruned`` (in a dry run without it: apply_plan + save_pretrained)."""
    from hyprune.models import load_config
    from hyprune.plan import load_plan_for

    config, family = load_config(args.model)
    plan = load_plan_for(work / "plan.json", family, config)
    out = work / "pruned"
    stream = stream_function("apply", "stream_apply")
    shard = int(args.max_shard_gb * 1e9)
    if stream is not None:
        result = stream(args.model, plan, out, overwrite=True, progress=False, max_shard_bytes=shard)
        impl = "hyprune.stream.apply.stream_apply"
    elif args.in_memory:
        import shutil

        from hyprune.apply import apply_plan
        from hyprune.models import load_model, load_tokenizer

        model, family = load_model(args.model, dtype="bfloat16")
        shutil.rmtree(out, ignore_errors=True)
        apply_plan(model, plan, family).save_pretrained(out, max_shard_size=shard)
        load_tokenizer(args.model).save_pretrained(out)
        result, impl = {}, "IN-MEMORY load_model + apply_plan + save_pretrained (hyprune.stream.apply not available)"
    else:
        raise SystemExit("hyprune.stream.apply.stream_apply does not exist yet")
    files = [f for f in out.iterdir() if f.is_file()]
    return {"impl": impl, "returned": json.loads(json.dumps(result, default=str)), "files": len(files),
            "shards": sum(f.suffix == ".safetensors" for f in files),
            "bytes_on_disk": sum(f.stat().st_size for f in files)}


def module_name(name: str) -> str:
    """A checkpoint tensor name as the transformers module calls it (``backbone.`` -> ``model.``)."""
    return "model." + name[len("backbone."):] if name.startswith("backbone.") else name


def shard_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's shards, read from the safetensors headers only (names as
    stored: a published NemotronH checkpoint says ``backbone.``)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def verify_blocks(config, family, count: int) -> list[int]:
    """The first block of each kind, then the next ones, ``count`` blocks in all."""
    kinds = family.block_kinds(config)
    firsts = sorted({kinds.index(k) for k in set(kinds)})
    rest = [i for i in range(len(kinds)) if i not in firsts]
    return sorted((firsts + rest)[:count])


def load_block_tensors(model, folder: Path, blocks: list[int]) -> dict:
    """Read the tensors of ``blocks`` from the shards (``safe_open``, one at a time) into the meta ``model``."""
    from safetensors import safe_open

    prefixes = tuple(f"model.layers.{i}." for i in blocks)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({module_name(k): f.get_tensor(k) for k in f.keys() if module_name(k).startswith(prefixes)})
    result = model.load_state_dict(tensors, strict=False, assign=True)
    loaded = {k: p for k, p in model.named_parameters() if k in tensors}
    return {"blocks": blocks, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "unexpected": list(result.unexpected_keys), "on_meta_after": sum(p.is_meta for p in loaded.values()),
            "all_finite": all(bool(torch.isfinite(p.float()).all()) for p in loaded.values()),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in loaded.values()})}


def stage_verify(args, work: Path) -> dict:
    """The pruned folder against its own config: keys and shapes, a few real blocks, parameter counts."""
    from transformers import AutoModelForCausalLM

    from hyprune.models import load_config
    from hyprune.search.counting import count_parameters

    out = work / "pruned"
    config, family = load_config(out)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {checkpoint_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    stored = shard_shapes(out)
    found = {checkpoint_name(module_name(k)): v for k, v in stored.items()}  # either spelling
    names = "backbone." if any(k.startswith("backbone.") for k in stored) else "model."
    analytic = count_parameters(family, config)
    blocks = load_block_tensors(model, out, verify_blocks(config, family, args.verify_blocks))
    sizes = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "mamba_num_heads", "mamba_head_dim",
                                               "n_groups", "ssm_state_size", "num_attention_heads",
                                               "num_key_value_heads", "num_hidden_layers")}
    return {"impl": "meta model + safe_open", "config": sizes, "stored_prefix": names,
            "index_json": (out / "model.safetensors.index.json").is_file(), "shards": len(list(out.glob("*.safetensors"))),
            "missing": sorted(set(expected) - set(found)), "unexpected": sorted(set(found) - set(expected)),
            "shape_mismatches": sorted(k for k in set(expected) & set(found) if expected[k] != found[k]),
            "meta_num_parameters": model.num_parameters(), "analytic_parameters": analytic["total"],
            "analytic_by_part": analytic, "shard_parameters": sum(int(torch.Size(s).numel()) for s in found.values()),
            "loaded": blocks}


def run_stage(args) -> None:
    """Child process: one stage, then its result and this process's peak RSS as one JSON line on stdout."""
    torch.set_num_threads(args.threads)
    work = work_dir(args)
    t0 = time.perf_counter()
    result = {"windows": stage_windows, "score": stage_score, "plan": stage_plan, "apply": stage_apply,
              "verify": stage_verify}[args.stage](args, work)
    result["wall_s"] = time.perf_counter() - t0
    result.update(peak_kb())
    print("STAGE_RESULT " + json.dumps(result), flush=True)


def stage_command(args, stage: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), args.model, "--stage", stage, "--work", str(work_dir(args)),
           "--data-dir", args.data_dir, "--seq-len", str(args.seq_len), "--num-samples", str(args.num_samples),
           "--batch-size", str(args.batch_size), "--max-shard-gb", str(args.max_shard_gb),
           "--verify-blocks", str(args.verify_blocks), "--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.target:
        cmd += ["--target", args.target]
    if args.dry_run:
        cmd += ["--dry-run", "--in-memory"]
    return cmd


def run_stages(args) -> dict:
    """Part (a): every stage in a fresh child; a failed stage ends the part (its stderr tail is recorded)."""
    work_dir(args).mkdir(parents=True, exist_ok=True)
    stages = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        proc = subprocess.run(stage_command(args, stage), capture_output=True, text=True, cwd=REPO)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("STAGE_RESULT ")]
        if proc.returncode != 0 or not lines:
            stages[stage] = {"failed": True, "rc": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
            print(f"  {stage}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            break
        stages[stage] = json.loads(lines[-1][len("STAGE_RESULT "):])
        stages[stage]["process_wall_s"] = time.perf_counter() - t0
        stages[stage]["peak_ok"] = stages[stage]["vmhwm_kb"] <= RSS_LIMIT_KB
        print(f"  {stage}: {stages[stage]['wall_s']:.1f} s, peak RSS {mib(stages[stage]['vmhwm_kb']):.0f} MiB "
              f"({stages[stage]['impl']})", file=sys.stderr, flush=True)
    ok = [s for s in stages.values() if not s.get("failed")]
    whole = peak_kb()
    peak = max([s["vmhwm_kb"] for s in ok] + [whole["vmhwm_kb"]])
    return {"model": args.model, "stages": stages, "parent": whole, "pipeline_peak_kb": peak,
            "rss_limit_kb": RSS_LIMIT_KB, "complete": len(ok) == len(STAGES),
            "streamed": all("IN-MEMORY" not in s.get("impl", "") for s in ok),
            "pass": len(ok) == len(STAGES) and peak <= RSS_LIMIT_KB}


# ---------------------------------------------------------------------------------------------
# Part (b): streamed vs in-memory scoring, one process
# ---------------------------------------------------------------------------------------------
def compare_scores(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Same keys and ``torch.equal`` on each; the largest absolute difference where they differ."""
    common = sorted(set(a) & set(b))
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].shape == b[k].shape else "shape"
              for k in common if not torch.equal(a[k], b[k])}
    return {"keys": len(common), "only_streamed": sorted(set(a) - set(b)), "only_in_memory": sorted(set(b) - set(a)),
            "differing": differ, "identical": not differ and set(a) == set(b)}


def compare_model(path: str, args, gate: QuietGate) -> dict:
    """Streamed vs in-memory (load + sweep) vs sweep alone on ``path``, float32, alternating order."""
    from hyprune.data import calibration_windows
    from hyprune.importance import activation_scores
    from hyprune.models import load_model, load_tokenizer

    stream = stream_function("score", "stream_activation_scores")
    windows = calibration_windows(load_tokenizer(path), Path(args.data_dir) / "train.txt.gz", args.seq_len,
                                  args.num_samples, seed=0)
    loaded, family = load_model(path, dtype="float32")

    def streamed():
        return stream(path, windows, batch_size=args.batch_size, dtype=torch.float32, progress=False)

    def in_memory():
        model, fam = load_model(path, dtype="float32")
        return activation_scores(model, windows, fam, batch_size=args.batch_size, progress=False)

    def sweep_only():
        return activation_scores(loaded, windows, family, batch_size=args.batch_size, progress=False)

    stream(path, windows[:1], batch_size=1, dtype=torch.float32, progress=False)  # warm-up
    sweep_only_first = activation_scores(loaded, windows[:1], family, batch_size=1, progress=False)
    del sweep_only_first
    kept = gate.run(args.reps, [("streamed", streamed), ("in_memory", in_memory), ("sweep_only", sweep_only)])
    walls = {k: [rec[k]["wall_s"] for rec in kept] for k in ("streamed", "in_memory", "sweep_only")}
    med = {k: median(v) for k, v in walls.items()}
    identical = [compare_scores(rec["streamed"]["out"], rec["in_memory"]["out"]) for rec in kept]
    return {"model": path, "parameters": loaded.num_parameters(), "windows": list(windows.shape),
            "batch_size": args.batch_size, "wall_s": walls, "median_s": med,
            "ratio_vs_in_memory": med["streamed"] / med["in_memory"],
            "ratio_vs_sweep": med["streamed"] / med["sweep_only"],
            "contended_reps": sum(rec["contended"] for rec in kept),
            "identical_every_rep": all(c["identical"] for c in identical),
            "identity": identical[-1]}


def ensure_500m(path: Path) -> dict | None:
    """Write the 500m preset (random, bf16) if ``path`` holds no checkpoint yet; its summary, or None."""
    if (path / "model.safetensors.index.json").is_file():
        return None
    print(f"writing the 500m preset to {path} ...", file=sys.stderr, flush=True)
    return generate(path, shape_fields("500m"), seed=0, shard_gb=1.0, overwrite=True, progress=False)


def run_compare(args) -> dict:
    """Part (b) on the teacher and the 500m preset, or a note that it cannot run yet."""
    if stream_function("score", "stream_activation_scores") is None:
        return {"skipped": "hyprune.stream.score.stream_activation_scores does not exist yet"}
    gate = QuietGate(args.quiet_budget)
    models = [args.teacher] + ([] if args.skip_500m else [args.model_500m])
    result = {"models": []}
    if not args.skip_500m:
        result["generated_500m"] = ensure_500m(Path(args.model_500m))
    for path in models:
        print(f"compare: {path} ...", file=sys.stderr, flush=True)
        result["models"].append(compare_model(path, args, gate))
        gc.collect()
    result["quiet_gate"] = gate.report()
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def gib(kb: float) -> str:
    return f"{kb / 1024 / 1024:.2f} GiB"


def stages_table(a: dict) -> list[str]:
    lines = ["| stage | implementation | wall (in stage) | wall (process) | peak RSS (VmHWM) | <= 3 GiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, s in a["stages"].items():
        if s.get("failed"):
            lines.append(f"| {name} | FAILED (rc {s['rc']}) | | | | |")
            continue
        lines.append(f"| {name} | {s['impl']} | {s['wall_s']:.1f} s | {s['process_wall_s']:.1f} s | "
                     f"{gib(s['vmhwm_kb'])} | {'yes' if s['peak_ok'] else '**no**'} |")
    p = a["parent"]
    lines.append(f"| whole run | parent VmHWM {gib(p['vmhwm_kb'])}; largest child ru_maxrss "
                 f"{gib(p['children_maxrss_kb'])} | | | **{gib(a['pipeline_peak_kb'])}** | "
                 f"{'yes' if a['pipeline_peak_kb'] <= a['rss_limit_kb'] else '**no**'} |")
    return lines


def verify_lines(v: dict) -> list[str]:
    same = v["meta_num_parameters"] == v["analytic_parameters"] == v["shard_parameters"]
    loaded = v["loaded"]
    return ["", "| check on the pruned folder | result |", "| --- | --- |",
            f"| config | {', '.join(f'{k} {x}' for k, x in v['config'].items())} |",
            f"| shards / `model.safetensors.index.json` | {v['shards']} / "
            f"{'present' if v['index_json'] else '**absent**'} |",
            f"| keys vs meta model (stored as `{v['stored_prefix']}*`) | {len(v['missing'])} missing, "
            f"{len(v['unexpected'])} unexpected, "
            f"{len(v['shape_mismatches'])} shape mismatches |",
            f"| `num_parameters()` (meta) / analytic `count_parameters` / in the shards | "
            f"{v['meta_num_parameters']:,} / {v['analytic_parameters']:,} / {v['shard_parameters']:,} "
            f"({'equal' if same else '**differ**'}) |",
            f"| real tensors loaded (blocks {loaded['blocks']}) | {loaded['tensors']} tensors, "
            f"{loaded['parameters']:,} parameters, {loaded['dtypes']}, finite: {loaded['all_finite']}, "
            f"left on meta: {loaded['on_meta_after']} |"]


def compare_table(b: dict) -> list[str]:
    if "skipped" in b:
        return [f"Part (b) not run: {b['skipped']}."]
    lines = ["| model | parameters | streamed | in-memory (load + sweep) | sweep only | streamed / in-memory | "
             "streamed / sweep | scores identical |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in b["models"]:
        m = r["median_s"]
        lines.append(f"| `{Path(r['model']).name}` | {r['parameters']:,} | {m['streamed']:.2f} s | "
                     f"{m['in_memory']:.2f} s | {m['sweep_only']:.2f} s | **{r['ratio_vs_in_memory']:.3f}x** | "
                     f"{r['ratio_vs_sweep']:.3f}x | {'yes' if r['identical_every_rep'] else '**no**'} "
                     f"({r['identity']['keys']} keys) |")
    return lines


def markdown(results: dict) -> str:
    m = results["machine"]
    head = ("## Streamed scoring and pruning (issue 13)" + (" -- DRY RUN, not results" if results["dry_run"] else ""),
            "", f"**Machine:** {m['cpu_count']} CPU cores, no GPU, torch {m['torch']} ({m['torch_threads']} threads), "
            f"transformers {m['transformers']}; commit `{results['git']['commit'][:7]}`.", "",
            f"**Command:** `{results['command']}`", "")
    lines = list(head)
    if "stream" in results:
        a = results["stream"]
        lines += [f"Part (a): `{a['model']}`, {results['settings']['num_samples']} windows x "
                  f"{results['settings']['seq_len']} tokens, batch {results['settings']['batch_size']}; each stage a "
                  "fresh process, peak RSS = its /proc VmHWM. Requirement: peak RSS <= 3 GiB: "
                  + (f"**{'met' if a['pass'] else 'not met'}**" if a["complete"] else "**incomplete: a stage failed**")
                  + ("" if a["streamed"] else " (some stages ran IN MEMORY: not a streamed result)") + ".", ""]
        lines += stages_table(a)
        if "verify" in a["stages"] and not a["stages"]["verify"].get("failed"):
            lines += verify_lines(a["stages"]["verify"])
        lines.append("")
    if "compare" in results:
        lines += ["Part (b): streamed vs in-memory scoring, float32, same process, alternating order, medians.", ""]
        lines += compare_table(results["compare"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main run
# ---------------------------------------------------------------------------------------------
def prepare_dry_run(args) -> None:
    """The tiny model of --dry-run (several small shards) under the work folder, rewritten every run."""
    folder = work_dir(args) / "model"
    fields = shape_fields(DRY_FIELDS["preset"], **{k: v for k, v in DRY_FIELDS.items() if k != "preset"})
    generate(folder, fields, seed=0, shard_gb=0.005, overwrite=True, progress=False)
    args.model, args.max_shard_gb = str(folder), 0.005


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.dry_run:
        prepare_dry_run(args)
    elif not args.skip_8b and not args.model:
        raise SystemExit("give the 8B folder (make_nemotron_8b.py --out ...), or --skip-8b, or --dry-run")
    results: dict = {"dry_run": args.dry_run, "machine": machine_info(), "git": git_state(),
                     "command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "settings": {k: v for k, v in vars(args).items() if k not in ("stage", "in_memory")},
                     "stream_functions": {"stream_activation_scores": stream_function("score", "stream_activation_scores")
                                          is not None, "stream_apply": stream_function("apply", "stream_apply") is not None}}
    if not args.skip_8b:
        if not args.dry_run and not all(results["stream_functions"].values()):
            missing = [k for k, v in results["stream_functions"].items() if not v]
            raise SystemExit(f"{', '.join(missing)} not written yet: part (a) would not be a streamed result "
                             "(use --dry-run to check the plumbing)")
        print(f"part (a): {args.model}", file=sys.stderr, flush=True)
        results["stream"] = run_stages(args)
    if not args.skip_compare and not args.dry_run:
        results["compare"] = run_compare(args)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_runtime_s"] = time.perf_counter() - started
    return results


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.stage:
        run_stage(arguments)
        sys.exit(0)
    out = main(arguments)
    path = Path(arguments.out or OUT / ("bench_stream.dry-run.json" if arguments.dry_run else "bench_stream.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(markdown(out))
    print(f"\nwrote {path}; total {out['total_runtime_s']:.0f} s", file=sys.stderr)
