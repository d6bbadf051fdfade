"""Parameter and memory counts from a config alone: no weights, no model built.

The search scores thousands of shapes before it loads anything, so it needs the size of a model that
does not exist yet. Every count here is a closed formula over the family's config fields, written per
family (which projections carry biases, whether the MLP is gated, whether the lm_head is tied), and
the tests hold it equal to ``hyprune.models.count_parameters`` of the built model for every family.

A *shape* is what a candidate changes: the size of every canonical axis (``Family.sizes``) and the
kinds of the blocks it keeps. Everything else (vocabulary, conv kernel, biases, attention head_dim)
comes from the source config, exactly as `hyprune.apply.pruned_config` keeps it.

Mamba-2 mixer (H heads, P head_dim, G groups, N state, K conv kernel, I = H*P, d = hidden)::

    in_proj  (2I + 2GN + H) x d  [+ bias]      conv1d (I + 2GN) x K [+ bias]      A_log, D, dt_bias: 3H
    norm     I (gated RMSNorm; FalconH1 only with mamba_rms_norm)               out_proj d x I [+ bias]

Mamba-1 mixer (Jamba; I = mamba_expand * d inner channels, N state, R dt rank)::

    in_proj 2I x d [+ bias]   conv1d I x K [+ bias]   x_proj (R + 2N) x I   dt_proj I x R + I
    A_log I x N, D I          out_proj d x I [+ bias]  dt/B/C RMSNorms R + 2N

Attention (Q query heads, KV key/value heads, head_dim D): q, o: Q*D x d; k, v: KV*D x d [+ biases]
(+ Qwen3's q_norm and k_norm, D each). MLP: 2 (NemotronH: up, down) or 3 (gated) matrices of F x d.
MoE (E routed experts of width F, router E x d): every expert holds 2 (NemotronH: up, down) or 3 (gated)
matrices of F x L, L = the latent width (NemotronH ``moe_latent_size``, with its two L x d projections)
or d; NemotronH adds a shared expert (up, down: S x d). NemotronH's ``e_score_correction_bias`` is a
buffer, not a parameter. *Active* parameters (what one token runs through) are all of these but the
E - top_k routed experts a token skips.
Norms: one d-vector per pre-norm (FalconH1's attention and Mamba share one) and the final norm.

Zamba2's shared transformer blocks are counted once per shared block, not per use (their weights are
tied): attention over 2d channels, its 2d pre-norm, the gated MLP with its pre-norm; each use (hybrid
layer) adds its own LoRA adapters (rank r: MLP r x d + 2F x r; with ``use_shared_attention_adapter``
q, k, v: 2 x 2d x r each) and its d x d ``linear``. The built-model counter files the attention, its
adapters, its pre-norm and the ``linear`` under ``other``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Sequence

import torch

from hyprune.apply import pruned_config
from hyprune.arch import registered
from hyprune.arch.family import Family, Layout
from hyprune.errors import HypruneError
from hyprune.evaluate.bench import cache_bytes
from hyprune.models import parse_dtype
from hyprune.parts import PARTS, components

# family -> its parameter-count facts (`Family.layout`, written in the family's file)
LAYOUTS: dict[str, Layout] = {family.name: family.layout for family in registered() if family.layout is not None}


def layout(family: Family) -> Layout:
    """The registered family's `Layout` (looked up by name: a family must be registered to be counted)."""
    known = {f.name: f.layout for f in registered() if f.layout is not None}
    if family.name not in known:
        raise HypruneError(f"hyprune has no parameter formula for the {family.name} family yet, so it cannot search "
                           f"its architectures. Known: {', '.join(sorted(known))}.")
    return known[family.name]


def check_countable(family: Family, config) -> None:
    """Refuse, with a clear message, a model whose blocks the formulas do not cover."""
    layout(family)
    parts = {part.kind for kind in family.block_kinds(config) for part in family.parts(kind)}
    missing = sorted(parts - set(PARTS))
    if missing:
        raise HypruneError(f"hyprune cannot count the parameters of {', '.join(missing)} blocks yet, so it cannot "
                           f"search the architectures of this {family.name} model (only "
                           f"{', '.join(sorted(PARTS))} blocks).")


def is_tied(family: Family, config) -> bool:
    return layout(family).can_tie and bool(getattr(config, "tie_word_embeddings", False))


def count_parameters(family: Family, config, sizes: dict[str, int] | None = None,
                     kinds: Sequence[str] | None = None) -> dict[str, int]:
    """Parameters per component of ``config``'s model, or of the shape (``sizes``, kept block ``kinds``).

    Keys as `hyprune.models.count_parameters`: embeddings, mamba, attention, mlp, moe, norms, lm_head,
    other (Zamba2's shared attention), total (a tied lm_head counts 0).
    """
    check_countable(family, config)
    lay = layout(family)
    sizes = family.sizes(config) if sizes is None else sizes
    kinds = family.block_kinds(config) if kinds is None else kinds
    shared_parts, count_shared = family.shared_blocks or ((), None)
    d, vocab = sizes["hidden"], int(config.vocab_size)
    out = {"embeddings": vocab * d, **dict.fromkeys(components(), 0), "norms": d, "lm_head": 0, "other": 0}
    per_kind: dict[str, list[tuple[str, int]]] = {}
    for kind in set(kinds):
        parts = [part for part in family.parts(kind) if part.kind not in shared_parts]
        per_kind[kind] = [(PARTS[part.kind].component, PARTS[part.kind].parameters(config, lay, sizes))
                          for part in parts]
        per_kind[kind].append(("norms", d * len({part.norm for part in parts})))
    for kind in kinds:
        for key, count in per_kind[kind]:
            out[key] += count
    if count_shared is not None:
        for key, count in count_shared(config, lay, sizes, kinds,
                                       lambda part_kind: PARTS[part_kind].parameters(config, lay, sizes)).items():
            out[key] += count
    out["lm_head"] = 0 if is_tied(family, config) else vocab * d
    out["total"] = sum(out.values())
    return out


def active_parameters(family: Family, config, sizes: dict[str, int] | None = None,
                      kinds: Sequence[str] | None = None, total: int | None = None) -> int:
    """Parameters one token runs through: the total less, in every MoE block, the experts its router
    skips (all but ``num_experts_per_tok``; the router itself scores every expert, so it stays). Equal to
    the total in a model without experts. ``total``: the shape's total when already counted."""
    sizes = family.sizes(config) if sizes is None else sizes
    kinds = family.block_kinds(config) if kinds is None else kinds
    if total is None:
        total = count_parameters(family, config, sizes, kinds)["total"]
    lay = layout(family)
    return total - sum(PARTS[part.kind].active_reduction(config, lay, sizes) for kind in kinds
                       for part in family.parts(kind))


def shaped_config(family: Family, config, sizes: dict[str, int], kept: Sequence[int]):
    """The config a plan with ``sizes`` (canonical axis -> size) keeping source blocks ``kept`` would give:
    `hyprune.apply.pruned_config` reads only the result sizes, the kept blocks and their kinds from a
    plan, so a stand-in with those three builds it for a shape that has no plan (no indices) yet."""
    kinds = family.block_kinds(config)
    stand_in = SimpleNamespace(result_sizes=lambda: dict(sizes), kept_blocks=lambda: list(kept),
                               layers=[SimpleNamespace(kind=k) for k in kinds])
    return pruned_config(family, config, stand_in)


def weight_bytes(parameters: int, dtype: torch.dtype | str = torch.float32) -> int:
    return parameters * torch.empty((), dtype=parse_dtype(dtype)).element_size()


def memory_bytes(family: Family, config, context: int, dtype: torch.dtype | str = torch.float32,
                 batch: int = 1) -> dict[str, int]:
    """Inference memory of ``config``'s model at ``context`` tokens: weights + the generation cache of
    ``batch`` sequences (`hyprune.evaluate.cache_bytes`: KV grows with the context, conv and SSM states
    do not). Activations and workspace are left out: they depend on the kernels, not the architecture.
    """
    weights = weight_bytes(count_parameters(family, config)["total"], dtype)
    cache = cache_bytes(config, family, context, dtype)
    return {"weights": weights, "cache": batch * cache["total"], "total": weights + batch * cache["total"]}
