"""Unstructured and N:M sparsity (magnitude, Wanda, SparseGPT) block by block, shards to shards.

The methods of `hyprune.methods.sparsity` are already sequential: block i is calibrated on the outputs of
the blocks before it *after* they were pruned. Here each block is read from the shards (`BlockwiseModel`),
its inputs' statistics are collected, its linear layers are pruned in place with the same per-layer
function (`layer_pruner`), it runs once more to make the next block's inputs, and its tensors are written
to the output shards before the next block is read. The architecture does not change, so the output holds
the source's tensors under the source's names and dtypes; tensors outside the blocks are copied as stored.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyprune.errors import HypruneError
from hyprune.io import atomic_dir, check_output
from hyprune.methods import MethodOptions
from hyprune.methods.sparsity import (GRAM, Target, describe_options, input_stats, layer_pruner, report_from_rows,
                                      select_targets, tensor_rows)
from hyprune.stream.apply import write_side_files
from hyprune.stream.blocks import BlockSweep, BlockwiseModel
from hyprune.stream.shards import ShardWriter

STREAMED_METHODS = ("magnitude", "wanda", "sparsegpt")


def _block_files(bm: BlockwiseModel, path: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The file tensors of the block at ``path``, in the order a save of its model tensors writes them."""
    meta = {f"{path}.{n}": torch.empty(t.shape, dtype=t.dtype, device="meta")
            for n, t in bm.module(path).state_dict().items()}
    converted = bm.layout.to_file(meta) if meta else {}
    return [(f, bm.reader.shape(f), bm.reader.dtype(f)) for f in converted]


def _entries(bm: BlockwiseModel, paths: list[str]) -> tuple[list[str], dict[str, list], list]:
    """(file tensors outside the blocks, per block its file tensors, every entry in write order)."""
    blocks = {path: _block_files(bm, path) for path in paths}
    inside = {name for files in blocks.values() for name, _, _ in files}
    outside = [n for n in bm.reader.names() if n not in inside]
    entries = [(n, bm.reader.shape(n), bm.reader.dtype(n)) for n in outside]
    return outside, blocks, entries + [e for path in paths for e in blocks[path]]


@torch.no_grad()
def stream_sparsify(model: str | Path, out: str | Path, method: str, options: MethodOptions,
                    windows: torch.Tensor | None, *, batch_size: int = 8, device: str = "cpu", dtype=None,
                    overwrite: bool = False, progress: bool = True, summary: dict | None = None) -> dict:
    """Prune ``model`` (a checkpoint folder) with ``method`` one block in memory at a time, into ``out``.

    Returns the method's report (what `hyprune.methods.sparsity` reports in memory); ``summary`` entries
    are written to ``hyprune_summary.json`` with it.
    """
    bm = BlockwiseModel(model, device, dtype)
    if bm.shares_weights:
        raise HypruneError(f"{bm.family.name} shares weights between blocks (one copy saved for several blocks), "
                           f"which --method {method} block by block cannot write once; prune it in memory (--no-stream).")
    out = check_output(out, "dir", overwrite, inputs=(model,))
    targets = select_targets(bm.model, bm.family, options.targets)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    paths = bm.block_paths
    outside, blocks, entries = _entries(bm, paths)
    prune_layer, rows = layer_pruner(method, options), []
    sweep = BlockSweep(bm, windows, batch_size, progress=progress) if method in GRAM else None
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, entries, max(bm.reader.shard_sizes().values(), default=1))
        try:
            for name in outside:
                writer.write(name, bm.reader.read(name))
            current, nxt = (sweep.embedded(), sweep.new_store()) if sweep else (None, None)
            for i, path in enumerate(tqdm(paths, desc=f"{method} blocks", unit="block", disable=not progress)):
                with bm.loaded(path) as block:
                    if i in by_block:
                        _prune_block(block, i, by_block[i], sweep, current, prune_layer, method)
                        rows += tensor_rows(by_block[i])
                    if sweep is not None and i < max(by_block):
                        sweep.forward(i, block, current, nxt)
                        current, nxt = nxt, current
                    state = bm.layout.to_file({f"{path}.{n}": t for n, t in block.state_dict().items()})
                    for name, _, stored in blocks[path]:
                        writer.write(name, state[name].to(stored))
            writer.close(total_parameters=sum(math.prod(shape) for _, shape, _ in entries))
        finally:
            writer.abort()
            if sweep is not None:
                sweep.close()
        report = {**describe_options(options), **report_from_rows(rows)}
        if windows is not None:
            report["calibration_windows"] = list(windows.shape)
        write_side_files(Path(model), bm.config, None, tmp, {"source": str(model), "streamed": True,
                                                              "method": {"name": method, **report},
                                                              **(summary or {})})
    return report


def _prune_block(block, i: int, targets: list[Target], sweep: BlockSweep | None, inputs, prune_layer,
                 method: str) -> None:
    """Collect the inputs' statistics of ``targets`` over every batch (data methods), then prune them."""
    if sweep is None:
        for t in targets:
            prune_layer(t, None)
        return
    with input_stats(targets, GRAM[method]) as stats:
        for _ in sweep.outputs(i, block, inputs):  # run for the hooks only
            pass
    for t in targets:
        prune_layer(t, stats[t.name])


__all__ = ["STREAMED_METHODS", "stream_sparsify"]
