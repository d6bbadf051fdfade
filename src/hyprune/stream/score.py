"""Scores of a model read block by block (`hyprune.stream.blocks`): the same hooks, the same sums.

`stream_activation_scores` attaches the importance sweep's hooks (`hyprune.importance.register_hooks`)
to the skeleton and runs the windows block by block; `stream_block_scores` does the same with the depth
sweep's recorder (block influence, angular distance). Each running sum sees its batches in the same
order as the in-memory sweep, so in float32 the scores are equal bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hyprune.depth import BlockScores, SweepRecorder
from hyprune.importance import ChannelStat, collect_scores, register_hooks
from hyprune.stream.blocks import BlockwiseModel, run_blocks


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


__all__ = ["stream_activation_scores", "stream_block_scores"]
