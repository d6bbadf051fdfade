"""Training data order: which windows make up the global batch of step k.

The training windows are read in epochs; every epoch is a fresh permutation drawn from
``numpy.random.default_rng([seed, epoch])``. Sample ``i`` of the endless stream is window
``perm(i // n)[i % n]`` and step ``k`` takes samples ``k * batch .. (k + 1) * batch - 1``. The batch
of a step therefore depends on ``(seed, k)`` (and the data size) only: a resumed run, or a run with
more processes, sees exactly the same windows, without any saved sampler state.

Under torch.distributed, rank ``r`` of ``W`` takes the ``r``-th contiguous slice of the global batch,
and splits it into micro-batches for gradient accumulation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from hyprune.errors import HypruneError


@lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """The order of the windows in one epoch: a seeded permutation of ``range(num_windows)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def batch_indices(step: int, batch: int, num_windows: int, seed: int) -> list[int]:
    """Window indices of the global batch of ``step`` (0-based), in order."""
    if num_windows < 1:
        raise HypruneError("There are no training windows: pass more data or a shorter --seq-len.")
    out = []
    for sample in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(sample, num_windows)
        out.append(int(epoch_permutation(seed, epoch, num_windows)[pos]))
    return out


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """The contiguous share of rank ``rank`` (the global batch must divide evenly)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def micro_batches(indices: list[int], micro_batch: int) -> list[list[int]]:
    return [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]


def as_windows(data, seq_len: int) -> torch.Tensor:
    """Training data as ``[num_windows, seq_len]`` token ids.

    Accepts windows (a 2-D tensor; re-cut when its width is not ``seq_len``) or one token stream
    (a 1-D tensor or a list of ints), which is cut into consecutive windows.
    """
    if isinstance(data, (list, tuple)):
        data = torch.as_tensor(data, dtype=torch.long)
    if not isinstance(data, torch.Tensor):
        raise HypruneError(
            f"Training data must be token windows (a tensor), a token list or a teacher top-k cache; got "
            f"{type(data).__name__}."
        )
    if data.dim() == 2 and data.shape[1] == seq_len:
        windows = data.long()
    elif data.dim() in (1, 2):
        flat = data.reshape(-1).long()
        n = flat.numel() // seq_len
        windows = flat[: n * seq_len].view(n, seq_len)
    else:
        raise HypruneError(f"Training data must be 1-D (a token stream) or 2-D (windows); got shape "
                           f"{tuple(data.shape)}.")
    if len(windows) == 0:
        raise HypruneError(
            f"The training data holds {data.numel()} tokens, fewer than one window of seq_len {seq_len}. "
            "Pass more data or a shorter seq_len."
        )
    return windows
