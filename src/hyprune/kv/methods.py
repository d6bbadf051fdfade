"""DMC and DMS: what each head does with a token's (k, v), in training (masks, running sums) and in a cache.

Shapes: ``k``, ``v`` [batch, kv_heads, seq, head_dim]; decisions ``alpha`` and DMC's importances ``omega``
[batch, kv_heads, seq], alpha in [0, 1] (soft in training, exactly 0 or 1 at inference).

**DMS** (Łańcucki et al., 2025, delayed eviction): token j stays visible to the ``window`` queries after it;
a query i further on sees it only if it was not evicted: additive bias ``log(1 - alpha_j)`` where
``i - j > window``. In a cache: the last ``window + 1`` tokens in a ring; a token leaving the ring is kept
(alpha 0) or dropped (alpha 1).

**DMC** (Nawrot et al., 2024, merging): alpha_t = 1 merges token t into the head's last slot, which becomes
the omega-weighted average of its tokens' keys and values; alpha_t = 0 opens a slot. Training keeps every
position's *partial accumulation* (the average of its run so far) and masks key j for later queries by
``log(1 - alpha_{j+1})`` (its slot went on to take token j + 1), so that with hard decisions the training
forward sees what the cache holds. The average is written as ``k_t + (M - S k_t) / (S + w_t)`` (M, S the
weighted sum and weight of the run before t), which is exactly ``k_t`` when t opens a slot: with every
decision 0, keys, values and masks are the original ones bit for bit.
"""

from __future__ import annotations

import torch

from hyprune.errors import HypruneError
from hyprune.kv.store import PagedRows

HARD = 0.5  # a decision above this is 1 at inference


def segment_sums(x: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T, T]``: entry (i, j) is ``sum_{l=j+1..i} x_l`` for j <= i (0 on the diagonal),
    -inf above it. Built with a masked cumulative sum (no differences of sums: -inf entries stay exact)."""
    T = x.shape[-1]
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)  # l > j
    spread = x[..., :, None].expand(*x.shape, T).masked_fill(~lower, 0.0)  # [..., l, j] = x_l where l > j
    sums = torch.cumsum(spread, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~causal, float("-inf"))


def log_keep(alpha: torch.Tensor) -> torch.Tensor:
    """``log(1 - alpha)``: 0 for a kept token (bit for bit), -inf for a dropped one (with a zero gradient
    there instead of a NaN)."""
    inside = torch.log1p(-alpha.clamp(max=1.0 - torch.finfo(alpha.dtype).eps))
    return torch.where(alpha < 1, inside, torch.full_like(alpha, float("-inf")))


def log_carry(alpha: torch.Tensor) -> torch.Tensor:
    """``log(alpha)``, -inf at 0 with a zero gradient there."""
    inside = torch.log(alpha.clamp(min=torch.finfo(alpha.dtype).tiny))
    return torch.where(alpha > 0, inside, torch.full_like(alpha, float("-inf")))


# ---- DMS ---------------------------------------------------------------------------------------------
def dms_bias(alpha: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, T, T] additive bias of delayed eviction (causality not included)."""
    T = alpha.shape[-1]
    pos = torch.arange(T, device=alpha.device)
    far = (pos[:, None] - pos[None, :]) > window  # query i, key j
    bias = log_keep(alpha)[..., None, :].expand(*alpha.shape[:-1], T, T)
    return torch.where(far, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))


# ---- DMC ---------------------------------------------------------------------------------------------
def dmc_bias(alpha: torch.Tensor) -> torch.Tensor:
    """[B, H, T, T] additive bias of merging: key j hidden from queries after j + 1 merged into its slot."""
    T = alpha.shape[-1]
    superseded = torch.cat([log_keep(alpha[..., 1:]), alpha.new_zeros(*alpha.shape[:-1], 1)], dim=-1)
    pos = torch.arange(T, device=alpha.device)
    later = pos[:, None] > pos[None, :]
    bias = superseded[..., None, :].expand(*alpha.shape[:-1], T, T)
    return torch.where(later, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))


def first_opens(alpha: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The decisions with the first token's set to 0 (there is no slot to merge it into); with ``valid``
    ([B, T], False on padding), also every token that follows padding: a left-padded row's first token
    merged would average the padding into its key."""
    if valid is None:
        return torch.cat([torch.zeros_like(alpha[..., :1]), alpha[..., 1:]], dim=-1)
    follows = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
    return alpha * follows[:, None, :].to(alpha.dtype)


def dmc_accumulate(k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor):
    """(keys, values, weights): every position's partial accumulation, and its slot's running weight z."""
    alpha = first_opens(alpha)
    carry = torch.exp(segment_sums(log_carry(alpha.float())))  # (i, j): prod alpha_{j+1..i}; 1 on the diagonal
    strict = torch.tril(torch.ones_like(carry[0, 0], dtype=torch.bool), diagonal=-1)
    weights = (carry * omega.float()[..., None, :]).masked_fill(~strict, 0.0)  # (i, j < i): A_ij w_j
    before = weights.sum(dim=-1)  # S_i
    z = before + omega.float()

    def average(x):
        run = torch.matmul(weights.to(x.dtype), x)  # M_i
        return x + (run - before[..., None].to(x.dtype) * x) / z[..., None].to(x.dtype)

    return average(k), average(v), z


# ---- attention ---------------------------------------------------------------------------------------
def expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """KV heads to query heads, as transformers' ``repeat_kv`` orders them (dim 1)."""
    return x if groups == 1 else torch.repeat_interleave(x, groups, dim=1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eager attention with an additive bias per KV head ([B, H, Tq, Tk]); output [B, Hq, Tq, D]."""
    groups = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, expand_heads(k, groups).transpose(2, 3)) * scaling
    scores = scores + expand_heads(bias, groups).to(scores.dtype)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, expand_heads(v, groups))


def causal_bias(T: int, like: torch.Tensor) -> torch.Tensor:
    return torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float32, device=like.device), diagonal=1)


# ---- the inference state of one layer -----------------------------------------------------------------
class DMSState:
    """One layer's DMS cache: evicted-or-kept tokens in pages, the last ``window + 1`` in a ring."""

    def __init__(self, batch: int, heads: int, head_dim: int, window: int, *, page: int = 16,
                 dtype=torch.float32, device="cpu") -> None:
        self.shape, self.window = (batch, heads), window
        lanes = batch * heads
        self.kept = PagedRows(lanes, head_dim, page=page, dtype=dtype, device=device)
        self.ring_k = torch.empty(lanes, 0, head_dim, dtype=dtype, device=device)
        self.ring_v = torch.empty_like(self.ring_k)
        self.ring_alpha = torch.empty(lanes, 0, dtype=torch.float32, device=device)
        self.ring_valid = torch.empty(lanes, 0, dtype=torch.bool, device=device)
        self.evicted = torch.zeros(lanes, dtype=torch.long, device=device)

    def add(self, k, v, alpha, valid) -> None:
        """Tokens [B, H, n, D] (decisions and validity [B, H, n]) after the ones held."""
        flat = _lanes
        self.ring_k = torch.cat([self.ring_k, flat(k).to(self.ring_k.dtype)], dim=1)
        self.ring_v = torch.cat([self.ring_v, flat(v).to(self.ring_v.dtype)], dim=1)
        self.ring_alpha = torch.cat([self.ring_alpha, flat(alpha).float()], dim=1)
        self.ring_valid = torch.cat([self.ring_valid, flat(valid)], dim=1)
        leaving = self.ring_k.shape[1] - (self.window + 1)
        if leaving > 0:
            keep = self.ring_valid[:, :leaving] & (self.ring_alpha[:, :leaving] <= HARD)
            self.evicted += (self.ring_valid[:, :leaving] & ~keep).sum(dim=1)
            self.kept.extend(keep, self.ring_k[:, :leaving], self.ring_v[:, :leaving])
            self.ring_k, self.ring_v = self.ring_k[:, leaving:], self.ring_v[:, leaving:]
            self.ring_alpha, self.ring_valid = self.ring_alpha[:, leaving:], self.ring_valid[:, leaving:]

    def keys(self):
        """(k, v, bias): what a new query sees, [B, H, L, D] and an additive [B, H, 1, L] bias."""
        k, v, valid = self.kept.gather()
        k, v = torch.cat([k, self.ring_k], dim=1), torch.cat([v, self.ring_v], dim=1)
        valid = torch.cat([valid, self.ring_valid], dim=1)
        return _unlanes(k, self.shape), _unlanes(v, self.shape), _visible(valid, self.shape)

    def _ring_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ring_k, self.ring_v, self.ring_alpha, self.ring_valid))

    def bytes_used(self) -> int:
        return self.kept.bytes_used() + self._ring_bytes()

    def bytes_allocated(self) -> int:
        return self.kept.bytes_allocated() + self._ring_bytes()


class DMCState:
    """One layer's DMC cache: slots (average key, average value, running weight z) in pages."""

    def __init__(self, batch: int, heads: int, head_dim: int, *, page: int = 16, dtype=torch.float32,
                 device="cpu") -> None:
        self.shape = (batch, heads)
        self.slots = PagedRows(batch * heads, head_dim, page=page, dtype=dtype, device=device, extra=1)
        self.merged = torch.zeros(batch * heads, dtype=torch.long, device=device)

    def prefill(self, keys, values, z, alpha, valid) -> None:
        """The partial accumulations of a prefill ([B, H, T, D], `dmc_accumulate`): each slot's last one."""
        if int(self.slots.lengths.max()):
            raise HypruneError("a DMC prefill goes into an empty cache; feed later tokens one at a time")
        alpha, valid = _lanes(first_opens(alpha)), _lanes(valid)
        ends = torch.cat([alpha[:, 1:] <= HARD, torch.ones_like(valid[:, :1])], dim=1) & valid
        self.merged += (valid & ~ends).sum(dim=1)
        self.slots.extend(ends, _lanes(keys), _lanes(values), _lanes(z)[..., None])

    def step(self, k, v, alpha, omega, valid) -> None:
        """One token per sequence ([B, H, 1, D]; decisions [B, H, 1]): merged into the last slot or appended."""
        k, v = _lanes(k)[:, 0], _lanes(v)[:, 0]
        alpha, omega, valid = _lanes(alpha)[:, 0], _lanes(omega)[:, 0].float(), _lanes(valid)[:, 0]
        merge = valid & (alpha > HARD) & (self.slots.lengths > 0)
        last_k, last_v, last_z = self.slots.last()
        z = last_z[:, 0]
        lanes = merge.nonzero(as_tuple=True)[0]
        if lanes.numel():
            zs, w = z[lanes, None], omega[lanes, None]

            def blend(new, old):
                new = new[lanes].float()
                return new + (zs * old[lanes].float() - zs * new) / (zs + w)

            self.slots.overwrite_last(lanes, blend(k, last_k), blend(v, last_v), (zs + w))
            self.merged[lanes] += 1
        opens = valid & ~merge
        self.slots.extend(opens[:, None], k[:, None], v[:, None], omega[:, None, None])

    def keys(self):
        k, v, valid = self.slots.gather()
        return _unlanes(k, self.shape), _unlanes(v, self.shape), _visible(valid, self.shape)

    def bytes_used(self) -> int:
        return self.slots.bytes_used()

    def bytes_allocated(self) -> int:
        return self.slots.bytes_allocated()


def _lanes(x: torch.Tensor) -> torch.Tensor:
    """[B, H, ...] -> [B * H, ...]."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _unlanes(x: torch.Tensor, shape) -> torch.Tensor:
    return x.reshape(*shape, *x.shape[1:])


def _visible(valid: torch.Tensor, shape) -> torch.Tensor:
    """A [lanes, L] mask of stored rows as a [B, H, 1, L] additive bias."""
    bias = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill(~valid, float("-inf"))
    return _unlanes(bias, shape)[:, :, None, :]


__all__ = ["DMCState", "DMSState", "attend", "causal_bias", "dmc_accumulate", "dmc_bias", "dms_bias",
           "segment_sums"]
