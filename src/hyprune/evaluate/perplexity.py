"""Token-level perplexity: exp(mean next-token loss) over fixed windows, optionally strided.

The text is read as documents, each followed by the EOS token, joined into one token stream and
cut into consecutive windows of ``seq_len`` tokens (`hyprune.data`). The window length is always the
user's; it is never taken from ``max_position_embeddings``.

Two conventions, both over the same tokens (the stream cut to whole windows):

* ``stride=None`` (default): non-overlapping windows; inside each window every token but the first
  is predicted and counts, so ``tokens = windows * (seq_len - 1)``. Tokens near a window start see
  little context, which makes the number pessimistic for short windows.
* ``stride=S`` (1 <= S <= seq_len): sliding windows of ``seq_len`` tokens that start ``S`` tokens
  apart; each window counts only the predictions of tokens that no earlier window counted (its last
  ``S``, the first window all of its ``seq_len - 1``; a last window aligned to the end of the stream
  picks up the remainder). Every token of the stream but the first is counted exactly once
  (``tokens = stream tokens - 1`` for ``S < seq_len``) and, outside the first window, sees at
  least ``seq_len - S`` tokens of context. ``S = seq_len`` gives exactly the non-overlapping result;
  smaller strides cost ``seq_len / S`` times more compute. This is the sliding-window evaluation of
  the Hugging Face "perplexity of fixed-length models" guide, with full-length windows throughout.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hyprune.data import pack_windows, read_documents, token_stream
from hyprune.errors import HypruneError


def strided_windows(ids: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sliding windows over a 1-D token stream: ``([m, seq_len] ids, [m] counted)``.

    ``counted[k]`` is how many of window ``k``'s last predictions count (see the module docstring).
    Targets counted by window ``k`` are its positions ``seq_len - counted[k] .. seq_len - 1``.
    """
    check_window_args(seq_len, stride)
    ids = torch.as_tensor(ids).reshape(-1)
    total = len(ids)
    if total < seq_len:
        raise HypruneError(f"The token stream holds {total} tokens, fewer than one window of {seq_len}.")
    starts = list(range(0, total - seq_len + 1, stride))
    if starts[-1] + seq_len < total:  # a last window, aligned to the end, for the tokens not yet reached
        starts.append(total - seq_len)
    counted, scored_until = [], 0  # scored_until: absolute position of the last target counted so far
    for start in starts:
        end = start + seq_len - 1  # last target of this window
        first = max(start + 1, scored_until + 1)
        counted.append(end - first + 1)
        scored_until = end
    windows = torch.stack([ids[s : s + seq_len] for s in starts])
    return windows, torch.tensor(counted, dtype=torch.long)


def check_window_args(seq_len: int, stride: int | None = None) -> None:
    if seq_len < 2:
        raise HypruneError(f"--seq-len must be at least 2 (one token of context, one to predict), got {seq_len}.")
    if stride is not None and not 1 <= stride <= seq_len:
        raise HypruneError(
            f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}: a larger stride would skip tokens."
        )


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False,
               stride: int | None = None) -> dict:
    """Token-level perplexity of ``model`` on ``windows`` ([n, seq_len] consecutive windows of one stream).

    ``stride=None``: every window counts fully (``seq_len - 1`` predictions each). ``stride=S``: the
    windows are joined back into their stream (``windows.reshape(-1)``) and re-cut as sliding windows
    ``S`` tokens apart, counting only new tokens (module docstring).

    Returns ``{"perplexity", "loss", "tokens", "windows", "seq_len", "stride"}``; ``loss`` is the mean
    next-token cross-entropy in nats, ``windows`` the number of forward windows.
    """
    seq_len = windows.shape[1]
    check_window_args(seq_len, stride)
    if stride is None:
        counted = torch.full((len(windows),), seq_len - 1, dtype=torch.long)
    else:
        windows, counted = strided_windows(windows.reshape(-1), seq_len, stride)
    device = next(model.parameters()).device
    positions = torch.arange(1, seq_len, device=device)  # target position of each prediction
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()  # [b, seq_len, vocab]
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [b, seq_len-1]
        keep = positions[None, :] >= seq_len - counted[start : start + batch_size].to(device)[:, None]
        total += loss[keep].sum().item()
        count += int(keep.sum())
    mean = total / count
    return {"perplexity": math.exp(mean), "loss": mean, "tokens": count, "windows": len(windows),
            "seq_len": seq_len, "stride": stride}


def perplexity_windows(tokenizer, data: str | os.PathLike, seq_len: int, num_windows: int | None = None,
                       text_field: str = "text", split: str = "train") -> torch.Tensor:
    """Consecutive ``[n, seq_len]`` windows from the start of ``data`` (all of it unless ``num_windows``)."""
    docs = read_documents(data, text_field, split, separator=tokenizer.eos_token)
    max_tokens = None if num_windows is None else num_windows * seq_len
    ids = token_stream(tokenizer, docs, max_tokens=max_tokens)
    if len(ids) < seq_len:
        raise HypruneError(
            f"{data} holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}. "
            "Pass more text or a shorter --seq-len."
        )
    return pack_windows(ids, seq_len, num_windows)
