#!/usr/bin/env python
"""Do two versions of hyprune write the same plans and weights? (issue 12: the redesign changes no behaviour)

Runs the same CLI commands with this checkout and with a reference commit (checked out into a
temporary git worktree), on the reference teacher (`../shared/models/tiny-nemotron-h`) and windows of
`train.txt.gz`, each command in its own process with one thread, and compares what they wrote:

* ``plan.json``: byte for byte;
* every ``*.safetensors``: tensor by tensor, names, dtypes, shapes and bytes (the file's metadata too);
* ``scores.safetensors`` of ``score``: the same way.

Covered: ``score``; ``plan``; ``prune`` with a width target (group-aware and ``--method group-blind``),
every registered ``--method`` (structured SSM methods and sparsity), depth pruning by every
``--depth-method``, width + depth in one plan, ``--plan``; and ``search`` (zero-shot ranking).

    python benchmarks/check_identical.py --ref 1a2b3c4   # prints a table; exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "models" / "tiny-nemotron-h"
TRAIN = SHARED / "data" / "pystdlib" / "train.txt.gz"

CALIB = ["--data", "{data}", "--seq-len", "64", "--num-samples", "8", "--batch-size", "4"]
WIDTH = "hidden_size=144,intermediate_size=384,mamba_num_heads=8,mamba_head_dim=16"
# name -> CLI arguments after `hyprune`; {model}, {data}, {out}, {work} are filled in per version
CASES: dict[str, list[str]] = {
    "score": ["score", "{model}", *CALIB, "--out", "{out}"],
    "plan": ["plan", "{model}", "--scores", "{work}/score", "--target", WIDTH, "--out", "{out}/plan.json"],
    "prune --plan": ["prune", "{model}", "--plan", "{work}/plan/plan.json", "--out", "{out}"],
    "prune width": ["prune", "{model}", *CALIB, "--target", WIDTH, "--out", "{out}"],
    "prune group-blind": ["prune", "{model}", *CALIB, "--method", "group-blind",
                          "--target", "mamba_num_heads=8", "--out", "{out}"],
    "prune width+depth": ["prune", "{model}", *CALIB, "--target", "mamba_head_dim=16", "--drop-blocks", "2",
                          "--out", "{out}"],
    **{f"prune depth {m}": ["prune", "{model}", *CALIB, "--drop-blocks", "3", "--depth-method", m, "--out", "{out}"]
       for m in ("block_influence", "angular", "kl", "lm_loss")},
    "prune depth contiguous": ["prune", "{model}", *CALIB, "--drop-blocks", "2", "--depth-mode", "contiguous",
                               "--out", "{out}"],
    **{f"prune {m}": ["prune", "{model}", *CALIB, "--method", m, "--ratio", "0.5", "--out", "{out}"]
       for m in ("state-taylor2", "state-taylor1", "state-magnitude", "state-random", "headdim-taylor",
                 "head-merge", "ssm-flap")},
    **{f"prune {m}": ["prune", "{model}", *CALIB, "--method", m, "--sparsity", "0.5", "--out", "{out}"]
       for m in ("magnitude", "wanda", "sparsegpt")},
    "prune wanda 2:4": ["prune", "{model}", *CALIB, "--method", "wanda", "--nm", "2:4", "--out", "{out}"],
    "search": ["search", "{model}", *CALIB, "--target-ratio", "0.5", "--max-candidates", "6", "--top-k", "2",
               "--eval-windows", "4", "--out", "{out}"],
}


def run_case(src: Path, name: str, args: list[str], work: Path) -> Path:
    """Run one case with the hyprune in ``src``; returns its output path."""
    out = work / name.replace(" ", "_").replace(":", "-")
    filled = [a.format(model=TEACHER, data=TRAIN, out=out, work=work) for a in args]
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    quiet = [] if args[0] == "plan" else ["--quiet"]  # plan prints one line and has no --quiet
    threads = ["--threads", "1"] if _has_threads(src) else []
    cmd = [sys.executable, "-m", "hyprune", *threads, *filled, *quiet]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed with {src}:\n{done.stderr[-3000:]}")
    return out


def _has_threads(src: Path) -> bool:
    return "--threads" in (src / "src" / "hyprune" / "cli.py").read_text()


def _tensors(path: Path) -> dict[str, str]:
    """name -> dtype, shape and sha256 of the bytes, plus the file's metadata."""
    from safetensors import safe_open

    digest = {}
    with safe_open(str(path), "pt") as f:
        digest["__metadata__"] = json.dumps(f.metadata(), sort_keys=True)
        for key in f.keys():
            t = f.get_tensor(key).contiguous()
            raw = t.view(-1).view(dtype=__import__("torch").uint8) if t.numel() else t
            digest[key] = f"{t.dtype} {tuple(t.shape)} {hashlib.sha256(raw.numpy().tobytes()).hexdigest()}"
    return digest


def compare(a: Path, b: Path) -> list[str]:
    """Differences between two outputs: plan.json bytes and safetensors contents."""
    problems = []
    files_a = {p.relative_to(a) for p in (a.rglob("*") if a.is_dir() else [a])}
    for rel in sorted(files_a, key=str):
        pa, pb = (a / rel, b / rel) if a.is_dir() else (a, b)
        if pa.name == "plan.json" or pa.suffix == ".safetensors":
            if not pb.is_file():
                problems.append(f"{rel}: missing")
            elif pa.name == "plan.json" and pa.read_bytes() != pb.read_bytes():
                problems.append(f"{rel}: bytes differ")
            elif pa.suffix == ".safetensors":
                ta, tb = _tensors(pa), _tensors(pb)
                diff = sorted(k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k))
                if diff:
                    problems.append(f"{rel}: {len(diff)} tensors differ ({', '.join(diff[:3])})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="The commit to compare with (e.g. the last one before a redesign).")
    parser.add_argument("--only", help="Run only cases whose name contains one of these comma-separated texts.")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "check_identical.json"))
    args = parser.parse_args()
    if not TEACHER.is_dir():
        raise SystemExit(f"{TEACHER} is missing: this check needs ../shared beside the repository.")
    tmp = Path(tempfile.mkdtemp(prefix="hyprune-identical-"))
    ref_tree = tmp / "ref"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(ref_tree), args.ref], check=True)
    rows = []
    try:
        for name, case in CASES.items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            outputs = [run_case(src, name, case, tmp / label) for src, label in ((ref_tree, "a"), (ROOT, "b"))]
            problems = compare(*outputs)
            n_files = sum(1 for p in (outputs[0].rglob("*") if outputs[0].is_dir() else [outputs[0]])
                          if p.name == "plan.json" or p.suffix == ".safetensors")
            rows.append({"case": name, "files": n_files, "identical": not problems, "problems": problems})
            print(f"{'same' if not problems else 'DIFF'}  {name:28s} {n_files} files  {'; '.join(problems)}",
                  flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ref": args.ref, "head": head, "rows": rows}, indent=1) + "\n")
    same = sum(r["identical"] for r in rows)
    print(f"\n{same} of {len(rows)} cases identical ({args.ref} vs {head}, working tree included); {args.out}")
    sys.exit(0 if same == len(rows) else 1)


if __name__ == "__main__":
    main()
