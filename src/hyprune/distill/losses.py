"""Distillation losses: logit divergences, top-k divergences, cross-entropy, intermediate states.

Every divergence works on logits of shape ``[..., vocab]`` and returns the *token mean* of a
per-token divergence summed over the vocabulary. Logits are upcast to float32 first (a bf16
softmax over a large vocabulary loses most of the small probabilities).

Temperature ``T`` softens both distributions; the result is multiplied by ``T**2`` so gradients keep
the same scale as at ``T = 1`` (Hinton et al.). Minitron uses forward KL at ``T = 1`` (methods.md
section 2), which is the default.

Intermediate-state loss (Minitron, when depth is cut a lot): the residual stream after matched
blocks, student block ``s`` against teacher block ``block_map[s]``, compared on the teacher channels
the student kept (``plan.hidden`` after width pruning). Combined as
``L = L_logits + alpha * L_is`` with ``alpha = L_logits / L_is`` (detached) when ``alpha="auto"``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from hyprune.arch import family_for_config
from hyprune.errors import HypruneError

LogitLoss = Literal["forward_kl", "reverse_kl", "jsd"]
LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    if temperature != 1.0:  # skip a [tokens, vocab] temporary in the common case
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens; ``mask`` ([...], bool or 0/1) keeps only some positions."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class _ForwardKLPerToken(torch.autograd.Function):
    """``KL(p || q)`` per token with ``p = softmax(t / T)`` fixed and ``q = softmax(s / T)``.

    The gradient is simply ``(q - p) / T``. Autograd through ``log_softmax`` and the product keeps
    more ``[tokens, vocab]`` float32 tensors alive and makes several extra passes over them, which at
    a large vocabulary made the KD step 0.83x of the teacher + student bound (benchmarks/RESULTS.md);
    this keeps two (``log q`` and ``p``) and computes the gradient in one pass.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        log_q = _log_probs(student_logits, temperature)
        log_p = _log_probs(teacher_logits, temperature)
        p = log_p.exp()
        per_token = log_p.sub_(log_q).mul_(p).sum(-1)  # in place: log_p is not needed again
        ctx.save_for_backward(log_q, p)
        ctx.temperature, ctx.dtype = temperature, student_logits.dtype
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token):
        log_q, p = ctx.saved_tensors
        grad = torch.exp(log_q).sub_(p).mul_(grad_per_token.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.dtype), None, None


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL(teacher || student): mean-seeking, the Minitron default. Shapes ``[..., vocab]``.

    The teacher is a fixed target (no gradient flows to it), which the fused per-token KL relies on;
    a teacher that requires grad takes the plain autograd path.
    """
    if teacher_logits.requires_grad:
        per_token = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    else:
        per_token = _ForwardKLPerToken.apply(student_logits, teacher_logits, temperature)
    return _token_mean(per_token, mask) * temperature**2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL(student || teacher): mode-seeking."""
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return _token_mean(_kl(log_q, log_p), mask) * temperature**2


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0,
                    mask=None) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024).

    ``JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta * P + (1 - beta) * Q``,
    ``P`` the teacher and ``Q`` the student. It lies in ``[0, H(beta)]`` (binary entropy, at most
    ``ln 2``); ``beta = 0.5`` is the symmetric JSD.
    """
    if not 0.0 < beta < 1.0:
        raise HypruneError(f"JSD beta must lie strictly between 0 and 1, got {beta}.")
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    # log M = logsumexp(log beta + log P, log(1 - beta) + log Q), stable for tiny probabilities
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    per_token = beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    return _token_mean(per_token, mask) * temperature**2


def logit_loss(kind: str, student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5,
               mask=None) -> torch.Tensor:
    """Dispatch on ``kind`` (``forward_kl``, ``reverse_kl``, ``jsd``)."""
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature, mask)
    raise HypruneError(f"Unknown logit loss '{kind}'. Use one of: {', '.join(LOGIT_LOSSES)}.")


_MASKED = -1e9  # a finite "minus infinity": its probability is exactly 0 and 0 * log-prob stays 0 (no NaN)


def topk_buckets(student_logits, teacher_values, teacher_indices, valid: torch.Tensor | None = None):
    """Teacher and student as distributions over ``k + 1`` buckets: the teacher's top-k ids, and the
    rest of the vocabulary as one bucket. Returns log-probabilities ``[..., k + 1]`` for both.

    The student's probabilities come from its *full* softmax (gathered at the ids; the rest bucket is
    a logsumexp over the other ids), so the loss pulls down its mass outside the teacher's top-k
    instead of only matching ratios inside it. The teacher's rest is ``1 - sum(top-k)``.

    Args:
        student_logits: ``[..., vocab]``.
        teacher_values: ``[..., k]`` teacher log-probabilities at temperature 1 (full-vocabulary softmax).
        teacher_indices: ``[..., k]`` vocabulary ids of those entries.
        valid: ``[..., k]`` bool; False drops an entry (e.g. a teacher id in padding rows the student
            does not have; its index must still be in range, clamp it to 0). Its mass joins the rest.
    """
    s = student_logits.float()
    index = teacher_indices.long()
    keep = torch.ones_like(index, dtype=torch.bool) if valid is None else valid
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)
    in_top = torch.zeros_like(s).scatter_add_(-1, index, keep.float()) > 0  # scatter_add: ids repeat when clamped
    s_rest = torch.logsumexp(s.masked_fill(in_top, _MASKED), dim=-1, keepdim=True) - log_z
    s_top = (s.gather(-1, index) - log_z).masked_fill(~keep, _MASKED)
    t_top = teacher_values.float().masked_fill(~keep, _MASKED)
    t_rest = torch.log((1.0 - t_top.exp().sum(-1, keepdim=True)).clamp_min(0.0)).clamp_min(_MASKED)
    # top-k covering the whole vocabulary: no rest on either side (the teacher's is rounding error)
    empty = in_top.all(dim=-1, keepdim=True)
    s_rest, t_rest = s_rest.masked_fill(empty, _MASKED), t_rest.masked_fill(empty, _MASKED)
    return torch.cat([s_top, s_rest], dim=-1), torch.cat([t_top, t_rest], dim=-1)


def topk_loss(kind: str, student_logits, teacher_values, teacher_indices, temperature: float = 1.0,
              beta: float = 0.5, mask=None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Any logit loss between the ``k + 1``-bucket distributions of `topk_buckets`.

    Exact at temperature 1 (the default) for what the cache holds. A temperature softens the buckets,
    not the full distributions, because the teacher's tail is not in the cache; with the top-k
    covering the vocabulary the two agree.
    """
    student, teacher = topk_buckets(student_logits, teacher_values, teacher_indices, valid)
    return logit_loss(kind, student, teacher, temperature, beta, mask)


def topk_forward_kl(student_logits, teacher_values, teacher_indices, temperature: float = 1.0,
                    mask=None) -> torch.Tensor:
    """Forward KL from a top-k teacher (see `topk_buckets`)."""
    return topk_loss("forward_kl", student_logits, teacher_values, teacher_indices, temperature, mask=mask)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token-mean next-token cross-entropy: position t predicts ``input_ids[t + 1]``. ``[b, s, v]``."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


# ---------------------------------------------------------------------------------------------
# Intermediate states
# ---------------------------------------------------------------------------------------------
def hidden_state_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      kind: Literal["cosine", "mse"] = "cosine",
                      teacher_channels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over matched pairs of a per-token distance between residual streams.

    Args:
        student_states: ``[batch, seq, hidden_student]`` per matched block.
        teacher_states: ``[batch, seq, hidden_teacher]``, same order.
        kind: ``cosine`` (1 - cosine similarity, token mean) or ``mse`` (element mean).
        teacher_channels: ``[hidden_student]`` teacher channels the student kept (``plan.hidden``);
            ``None`` when the widths are equal.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise HypruneError("hidden_state_loss needs the same, non-zero number of student and teacher states.")
    total = 0.0
    for s, t in zip(student_states, teacher_states):
        s, t = s.float(), t.float()
        if teacher_channels is not None:
            t = t.index_select(-1, teacher_channels.to(t.device))
        if s.shape != t.shape:
            raise HypruneError(
                f"Intermediate states differ in shape: student {tuple(s.shape)} vs teacher {tuple(t.shape)}. "
                "After width pruning pass teacher_channels (plan.hidden) so the teacher is compared on the "
                "channels the student kept."
            )
        if kind == "cosine":
            total = total + (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
        elif kind == "mse":
            total = total + F.mse_loss(s, t)
        else:
            raise HypruneError(f"Unknown hidden-state loss '{kind}'. Use 'cosine' or 'mse'.")
    return total / len(student_states)


def combine_with_hidden(logit: torch.Tensor, hidden: torch.Tensor, alpha: float | str = "auto") -> torch.Tensor:
    """``L_logits + alpha * L_is``; ``alpha="auto"`` is ``L_logits / L_is`` with both detached (Minitron)."""
    if alpha == "auto":
        alpha = (logit.detach() / hidden.detach().clamp_min(1e-12))
    return logit + alpha * hidden


def block_map_from_plan(plan, student_blocks: Sequence[int] | None = None) -> dict[int, int]:
    """Student block -> teacher block, from a hyprune plan: student block ``i`` is ``kept_blocks()[i]``.

    ``student_blocks`` restricts the map (e.g. only the last few blocks); default all of them.
    """
    kept = plan.kept_blocks()
    chosen = range(len(kept)) if student_blocks is None else student_blocks
    out = {}
    for s in chosen:
        if not 0 <= s < len(kept):
            raise HypruneError(f"Student block {s} does not exist: the plan keeps {len(kept)} blocks.")
        out[int(s)] = int(kept[s])
    return out


def teacher_channels_from_plan(plan) -> list[int]:
    """The teacher's residual-stream channels the student kept (``plan.hidden``)."""
    return list(plan.hidden)


# ---------------------------------------------------------------------------------------------
# Capturing block outputs
# ---------------------------------------------------------------------------------------------
def block_list(model) -> torch.nn.ModuleList:
    """The list of residual blocks of a causal LM, as its family names it (`hyprune.arch.family.Family.layers`)."""
    inner = getattr(model, "module", model)  # DDP
    return family_for_config(inner.config).layers(inner)


@contextmanager
def capture_block_outputs(model, blocks: Sequence[int]):
    """Collect the output (residual stream) of the listed blocks during a forward pass.

    Yields a dict block -> tensor ``[batch, seq, hidden]``, refilled by every forward (activation
    checkpointing re-runs blocks in the backward pass; the dict then holds the recomputed copy,
    which is harmless because the loss was already built from the first one).
    """
    layers = block_list(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    for b in blocks:
        if not 0 <= b < len(layers):
            raise HypruneError(f"Block {b} does not exist; the model has {len(layers)} blocks.")

        def hook(_module, _inputs, output, b=b):
            out[b] = output[0] if isinstance(output, tuple) else output

        handles.append(layers[b].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
