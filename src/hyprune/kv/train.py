"""The compression objective of DMC / DMS training: the share of tokens the cache keeps, its target as
it ramps from 1x to the final ratio, and the penalty that holds every head's decisions at it.

The penalty is the mean over attention layers and KV heads of ``|kept_head - 1 / ratio|``: an L1 distance
as DMC's, but per head. On one global mean, a head whose decisions saturate at 1 (everything dropped)
pays for one that never moves (its sigmoid is flat far below the offset), and training stalls at
half the target with the model's worst head fully compressed; a one-sided penalty lets the optimizer's
momentum overshoot the target.

A head that decides alpha for a token keeps ``1 - alpha`` of a slot for it (DMC: it opens a slot; DMS: it
stays after the window), so the cache holds ``mean(1 - alpha)`` of the tokens and compresses by
``1 / mean(1 - alpha)`` (DMS's window adds ``window + 1`` tokens per head on top: negligible at long
context, counted exactly by the cache itself).
"""

from __future__ import annotations

import torch

from hyprune.errors import HypruneError
from hyprune.kv.model import attention_mixers


def target_ratio(step: int, total: int, ratio: float, ramp: float = 1.0) -> float:
    """The compression target at ``step`` of ``total``: linear from 1x to ``ratio`` over the first ``ramp``
    share of training, then held."""
    if ratio < 1:
        raise HypruneError(f"a compression ratio is >= 1 (2 keeps half the cache); got {ratio}")
    span = max(1, round(ramp * total))
    return 1.0 + (ratio - 1.0) * min(1.0, step / span)


def kept_share(model) -> torch.Tensor:
    """Mean ``1 - alpha`` over every attention layer, head and token of the last forward (with gradients)."""
    return kept_by_head(model).mean()


def kept_by_head(model) -> torch.Tensor:
    """``[layers, kv_heads]``: each head's mean ``1 - alpha`` over the tokens of the last forward."""
    shares = []
    for mixer in attention_mixers(model):
        at = getattr(mixer, "_hyprune_kv", None)
        if at is None or "alpha" not in at.stats:
            raise HypruneError("no KV decisions recorded: call hyprune.kv.attach(model, spec) and run a forward first")
        alpha = at.stats["alpha"]
        shares.append(1 - alpha.mean(dim=(0, 2)))
    return torch.stack(shares)


def ratio_loss(model, ratio: float) -> torch.Tensor:
    """Mean over heads of ``|kept_head - 1 / ratio|``: zero when every head keeps its target share."""
    return _penalty(kept_by_head(model), ratio)


def _penalty(kept: torch.Tensor, ratio: float) -> torch.Tensor:
    return (kept - 1.0 / ratio).abs().mean()


class RatioTerm:
    """The `hyprune.distill.distill` ``aux`` term of KV-compression training: ``weight * ratio_loss`` at
    the ramped target of each step; logs the target and the share of the cache kept."""

    def __init__(self, ratio: float, weight: float = 1.0, ramp: float = 0.5) -> None:
        target_ratio(0, 1, ratio)  # checks the ratio
        self.ratio, self.weight, self.ramp = ratio, weight, ramp
        self.kept: float | None = None

    def __call__(self, student, step: int, total: int) -> torch.Tensor:
        kept = kept_by_head(student)
        self.kept = float(kept.detach().mean())
        return self.weight * _penalty(kept, target_ratio(step, total, self.ratio, self.ramp))

    def log(self, step: int, total: int) -> dict:
        return {"kv_target_ratio": target_ratio(step, total, self.ratio, self.ramp),
                "kv_kept_share": self.kept}
__all__ = ["RatioTerm", "kept_by_head", "kept_share", "ratio_loss", "target_ratio"]
