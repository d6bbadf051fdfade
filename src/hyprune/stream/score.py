"""Scores of a model read block by block (`hyprune.stream.blocks`): the same hooks, the same sums.

`stream_activation_scores` attaches the importance sweep's hooks (`hyprune.importance.register_hooks`)
to the skeleton and runs the windows block by block; `stream_block_scores` does the same with the depth
sweep's recorder (block influence, angular distance). Each running sum sees its batches in the same
order as the in-memory sweep, so in float32 the scores are equal bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from hyprune.depth import BlockScores, RemovalSums, SweepRecorder
from hyprune.importance import ChannelStat, collect_scores, register_hooks
from hyprune.stream.blocks import BlockSweep, BlockwiseModel, head_logits, run_blocks


def stream_activation_scores(model: str | Path, windows: torch.Tensor, *, batch_size: int = 8, device: str = "cpu",
                             dtype=None, spill_dir: str | Path | None = None,
                             progress: bool = True) -> dict[str, torch.Tensor]:
    """`hyprune.importance.activation_scores` of the checkpoint folder ``model``, one block in memory at a time.

    ``dtype`` is the compute dtype (default: the checkpoint's), ``device`` where each block runs.
    """
    bm = BlockwiseModel(model, device, dtype)
    kinds = bm.family.block_kinds(bm.config)
    stats: dict[str, ChannelStat] = {}
    handles = register_hooks(bm.model, bm.family, kinds, lambda key: stats.setdefault(key, ChannelStat()))
    try:
        run_blocks(bm, windows, batch_size, spill_dir=spill_dir, progress=progress)
    finally:
        for h in handles:
            h.remove()
    return collect_scores(bm.model, bm.family, kinds, stats)


def stream_block_scores(model: str | Path, windows: torch.Tensor, *, window: int = 1, batch_size: int = 8,
                        device: str = "cpu", dtype=None, spill_dir: str | Path | None = None,
                        progress: bool = True) -> dict[str, BlockScores]:
    """`hyprune.depth.stream_sweep` (block influence and angular distance) one block in memory at a time."""
    bm = BlockwiseModel(model, device, dtype)
    recorder = SweepRecorder(bm.family, bm.config, window)
    handles = recorder.attach(bm.layers)
    try:
        run_blocks(bm, windows, batch_size, spill_dir=spill_dir, progress=progress,
                   on_block=lambda i, b: recorder.at_batch(b))
    finally:
        for h in handles:
            h.remove()
    return recorder.result()


@torch.inference_mode()
def stream_removal_scores(model: str | Path, windows: torch.Tensor, *, batch_size: int = 8, device: str = "cpu",
                          dtype=None, spill_dir: str | Path | None = None,
                          progress: bool = True) -> dict[str, BlockScores]:
    """`hyprune.depth.removal_sweep` (KL and LM-loss increase with each block removed), block by block.

    Removing block i leaves its input as the input of block i + 1, so every candidate is a stream of its
    own from block i on: when block j is loaded it runs the full model's stream and every candidate
    stream i < j, and each block is still read once. What it costs: L(L + 1)/2 block passes over the
    windows instead of the L of a sweep (the in-memory method runs L + 1 full forwards: the same
    compute), and L + 1 activation buffers of [windows, seq, hidden] at the end (on disk when they would
    not fit); the head then runs L + 1 times per batch.
    """
    bm = BlockwiseModel(model, device, dtype)
    L = len(bm.layers)
    sweep = BlockSweep(bm, windows, batch_size, buffers=L + 2, spill_dir=spill_dir, progress=progress)
    try:
        main, spare, candidates = sweep.embedded(), sweep.new_store(), []
        bar = tqdm(total=L * (L + 1) // 2, desc="block removal", unit="pass", disable=not progress)
        for i, path in enumerate(bm.block_paths):
            with bm.loaded(path) as block:
                for stream in candidates:
                    sweep.forward(i, block, stream, stream)
                removed = sweep.new_store()  # without block i: its input goes on
                removed.data.copy_(main.data)
                sweep.forward(i, block, main, spare)
                main, spare = spare, main
            candidates.append(removed)
            bar.update(i + 1)
        bar.close()
        sums = RemovalSums(bm.family, bm.config)
        with bm.loaded(bm.final_norm), bm.loaded("lm_head"):
            for b, ids in enumerate(sweep.batches):
                rows = sweep.rows(b)
                sums.full(head_logits(bm, main.data[rows]), ids.to(bm.device))
                for i, stream in enumerate(candidates):
                    sums.removed(i, head_logits(bm, stream.data[rows]))
        return sums.result()
    finally:
        sweep.close()


__all__ = ["stream_activation_scores", "stream_block_scores", "stream_removal_scores"]
