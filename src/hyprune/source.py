"""Where a workflow's source model lives while it is scored: loaded whole, or read block by block.

`open_source` picks one (`hyprune.stream.choice.should_stream`: ``--stream``, ``--no-stream``, or by
whether the weights fit in the free memory of the device). Both answer the same questions with the
same numbers (`tests/test_stream_score.py`): activation scores, and block scores for depth pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hyprune.config import LoadConfig
from hyprune.depth import REMOVAL_METHODS, SWEEP_METHODS, BlockScores, block_importance_all
from hyprune.importance import activation_scores
from hyprune.models import load_config, load_model
from hyprune.stream.choice import should_stream
from hyprune.stream.score import stream_activation_scores, stream_block_scores, stream_removal_scores


@dataclass
class InMemory:
    """The whole model, loaded with `hyprune.models.load_model`."""

    load: LoadConfig
    batch_size: int
    progress: bool
    streamed = False

    def __post_init__(self):
        self.model, self.family = load_model(self.load.model, **self.load.load_kwargs())

    @property
    def config(self):
        return self.model.config

    def activation_scores(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        return activation_scores(self.model, windows, self.family, batch_size=self.batch_size, progress=self.progress)

    def block_scores(self, windows: torch.Tensor, method: str, window: int = 1) -> BlockScores:
        return block_importance_all(self.model, windows, [method], self.family, window, self.batch_size,
                                    self.progress)[method]


@dataclass
class Streamed:
    """The checkpoint folder, read one block at a time (`hyprune.stream`) on ``load.device``."""

    load: LoadConfig
    batch_size: int
    progress: bool
    streamed = True

    def __post_init__(self):
        self.config, self.family = load_config(self.load.model, **self.load.source())

    def _kwargs(self) -> dict:
        return dict(batch_size=self.batch_size, device=self.load.device or "cpu", dtype=self.load.dtype,
                    progress=self.progress)

    def activation_scores(self, windows: torch.Tensor) -> dict[str, torch.Tensor]:
        return stream_activation_scores(self.load.model, windows, **self._kwargs())

    def block_scores(self, windows: torch.Tensor, method: str, window: int = 1) -> BlockScores:
        if method in SWEEP_METHODS:
            return stream_block_scores(self.load.model, windows, window=window, **self._kwargs())[method]
        assert method in REMOVAL_METHODS, method
        return stream_removal_scores(self.load.model, windows, **self._kwargs())[method]


def open_source(load: LoadConfig, batch_size: int = 8, progress: bool = True,
                streamed: bool | None = None) -> InMemory | Streamed:
    """The model of ``load``, whole or streamed (``streamed``: decided already, else `should_stream`)."""
    streamed = should_stream(load) if streamed is None else streamed
    return (Streamed if streamed else InMemory)(load, batch_size, progress)


__all__ = ["InMemory", "Streamed", "open_source"]
