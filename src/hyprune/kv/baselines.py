"""Training-free KV-cache baselines at a fixed cache budget, for comparing DMC / DMS against them.

- **StreamingLLM** (Xiao et al., ICLR 2024): the cache keeps the first ``sinks`` tokens (attention sinks)
  and the most recent ``budget - sinks``.
- **TOVA** (Oren et al., 2024): once the cache holds ``budget`` tokens, each new token is attended, then
  the token the current query attends least is dropped (per KV head, the attention weights averaged
  over the group's query heads).

Both are written as the set of keys each query sees over a whole sequence, which is what token-by-token
decoding with such a cache would attend (the cache plus the new token), so perplexity needs one forward
per window. Positions stay the original ones (rotary embeddings as the model computes them: within the
trained context StreamingLLM's re-indexing changes nothing that matters here). For evaluation only:

    hyprune.kv.baselines.use(model, "tova", budget=256)
    perplexity(model, windows)
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from hyprune.errors import HypruneError
from hyprune.kv.methods import expand_heads

NAME = "hyprune_kv_baseline"
BASELINES = ("streaming", "tova")


def streaming_visible(T: int, budget: int, sinks: int = 4, device=None) -> torch.Tensor:
    """[T, T] bool: query i sees key j <= i when j < sinks or j is among the ``budget - sinks`` tokens before
    i (the cache), or j == i (the new token)."""
    if not 0 <= sinks < budget:
        raise HypruneError(f"StreamingLLM needs 0 <= sinks < budget; got sinks={sinks}, budget={budget}")
    pos = torch.arange(T, device=device)
    back = pos[:, None] - pos[None, :]
    return (back >= 0) & ((pos[None, :] < sinks) | (back <= budget - sinks))


def tova_visible(scores: torch.Tensor, budget: int, groups: int = 1) -> torch.Tensor:
    """[B, Hkv, T, T] bool from causal attention scores [B, Hq, T, T] (pre-softmax, scaled): row i is the
    cache before query i's step plus i itself; after the step the least-attended token is dropped whenever
    the cache would hold more than ``budget``."""
    if budget < 1:
        raise HypruneError(f"TOVA needs a budget of at least 1 token, got {budget}")
    B, Hq, T, _ = scores.shape
    H = Hq // groups
    kept = torch.zeros(B, H, T, dtype=torch.bool, device=scores.device)
    rows = torch.zeros(B, H, T, T, dtype=torch.bool, device=scores.device)
    for i in range(T):
        kept[..., i] = True
        rows[:, :, i] = kept
        if i + 1 <= budget:
            continue
        logits = scores[:, :, i, : i + 1].float().masked_fill(~expand_heads(kept[..., : i + 1], groups), float("-inf"))
        weights = torch.softmax(logits, dim=-1).view(B, H, groups, i + 1).mean(dim=2)
        drop = weights.masked_fill(~kept[..., : i + 1], float("inf")).argmin(dim=-1)
        kept.scatter_(-1, drop[..., None], False)
    return rows


def use(model, method: str, budget: int, sinks: int = 4):
    """Switch ``model``'s attention to a training-free baseline (full-sequence forwards only). Returns it."""
    if method not in BASELINES:
        raise HypruneError(f"baseline must be one of {', '.join(BASELINES)}; got '{method}'")
    streaming_visible(1, budget, sinks)  # checks the arguments
    model.config.hyprune_kv_baseline = {"method": method, "budget": int(budget), "sinks": int(sinks)}
    model.set_attn_implementation(NAME)
    return model


def baseline_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over the keys the baseline's cache would hold."""
    settings = module.config.hyprune_kv_baseline
    if kwargs.get("past_key_values") is not None and query.shape[2] != key.shape[2]:
        raise HypruneError("the training-free KV baselines evaluate whole sequences, not cached decoding")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    Hq, T = query.shape[1], query.shape[2]
    groups = Hq // key.shape[1]
    keys, values = expand_heads(key, groups), expand_heads(value, groups)
    scores = torch.matmul(query, keys.transpose(2, 3)) * scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None:
        causal = causal & (attention_mask[..., -T:] if attention_mask.dtype == torch.bool
                           else attention_mask[..., -T:] > torch.finfo(attention_mask.dtype).min / 2)
    scores = scores.masked_fill(~causal, float("-inf"))
    if settings["method"] == "streaming":
        visible = streaming_visible(T, settings["budget"], settings["sinks"], query.device)[None, None]
    else:
        visible = expand_heads(tova_visible(scores, settings["budget"], groups), groups)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32)
    out = torch.matmul(weights.to(query.dtype), values)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, baseline_attention)
AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])

__all__ = ["BASELINES", "baseline_attention", "streaming_visible", "tova_visible", "use"]
