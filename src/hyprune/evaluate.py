"""Held-out perplexity: exp(mean next-token loss) over fixed windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> dict:
    """Token-level perplexity of ``model`` on ``windows`` ([n, seq_len] ids); every window counts fully.

    Returns ``{"perplexity", "loss", "tokens", "windows", "seq_len"}``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    mean = total / count
    return {"perplexity": math.exp(mean), "loss": mean, "tokens": count, "windows": len(windows),
            "seq_len": windows.shape[1]}
