#!/usr/bin/env python
"""The peer side of bench_sparsity_peer.py: llm-compressor's Wanda or SparseGPT one-shot, in its own venv.

Reads the model folder and the calibration windows (token ids, [n, seq_len]) that the hyprune side uses,
runs ``llmcompressor.oneshot`` with the sequential pipeline (each layer calibrated on the outputs of the
already pruned layers, as hyprune does), and writes the pruned linear weights of the decoder layers to
``--out`` (safetensors) plus the seconds spent inside ``oneshot`` to ``--out``.json. Nothing here imports
hyprune: llm-compressor pins its own transformers, so it lives in a separate environment:

    python -m venv --system-site-packages /tmp/venv-llmc && /tmp/venv-llmc/bin/pip install llmcompressor
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="safetensors file with 'input_ids' [n, seq_len]")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask", default="0:0", help="N:M mask structure; 0:0 = unstructured")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    ids = load_file(args.calib)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[args.method]
    recipe = modifier(sparsity=args.sparsity, mask_structure=args.mask, targets=["Linear"], ignore=["re:.*lm_head"])
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential",
            batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    pruned = {name + ".weight": module.weight.detach().contiguous() for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and ".layers." in name}
    save_file(pruned, args.out)
    with open(args.out + ".json", "w") as f:
        json.dump({"seconds": seconds, "torch_threads": torch.get_num_threads()}, f)


if __name__ == "__main__":
    main()
