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

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import torch

from hyprune.arch.family import ATTENTION, MAMBA, MAMBA1, MLP, MOE, Family, attention_head_dim
from hyprune.errors import HypruneError


@dataclass(frozen=True)
class Layout:
    """Per-family facts the counts need beyond the axis sizes: bias flags (a config field name, or a
    constant), the gated norm's presence, the MLP's and the routed experts' matrix counts, and whether
    the lm_head can be tied."""

    mamba_in_bias: str | bool = False
    mamba_out_bias: str | bool = False
    conv_bias: str | bool = True
    mamba_norm: str | bool = True
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    qk_norm: bool = False
    mlp_bias: str | bool = False
    mlp_matrices: int = 3
    expert_matrices: int = 3  # gated experts (gate_up fused + down); NemotronH's relu2 experts: 2
    can_tie: bool = True

    def flag(self, config, value: str | bool) -> bool:
        return bool(getattr(config, value, False)) if isinstance(value, str) else value


_MAMBA_N = dict(mamba_in_bias="mamba_proj_bias", mamba_out_bias="mamba_proj_bias", conv_bias="mamba_conv_bias")
_LLAMA = Layout(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias")
LAYOUTS: dict[str, Layout] = {
    # NemotronH never ties (its _tied_weights_keys is empty) and has bias-free attention
    "nemotron_h": Layout(mamba_in_bias="use_bias", mamba_out_bias="use_bias", conv_bias="use_conv_bias",
                         mlp_bias="mlp_bias", mlp_matrices=2, expert_matrices=2, can_tie=False),
    "mamba2": Layout(mamba_in_bias="use_bias", mamba_out_bias="use_bias", conv_bias="use_conv_bias"),
    "bamba": Layout(**_MAMBA_N, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "granitemoehybrid": Layout(**_MAMBA_N, qkv_bias="attention_bias", o_bias="attention_bias"),
    "falcon_h1": Layout(**{**_MAMBA_N, "mamba_out_bias": "projectors_bias"}, mamba_norm="mamba_rms_norm",
                        qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    # Zamba2: add_bias_linear on the Mamba and MLP projections, the conv always with a bias
    "zamba2": Layout(mamba_in_bias="add_bias_linear", mamba_out_bias="add_bias_linear", mlp_bias="add_bias_linear"),
    "jamba": Layout(**_MAMBA_N),
    "llama": _LLAMA,
    "mistral": Layout(),
    "qwen2": Layout(qkv_bias=True),
    "qwen3": Layout(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True),
}


def layout(family: Family) -> Layout:
    if family.name not in LAYOUTS:
        raise HypruneError(f"hyprune has no parameter formula for the {family.name} family yet, so it cannot search "
                           f"its architectures. Known: {', '.join(sorted(LAYOUTS))}.")
    return LAYOUTS[family.name]


def _conv_kernel(config) -> int:
    from hyprune.evaluate.bench import _conv_kernel as kernel

    return kernel(config)


def mamba_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    d = sizes["hidden"]
    H, P, G, N = sizes["mamba_heads"], sizes["mamba_head_dim"], sizes["mamba_groups"], sizes["ssm_state"]
    inner, conv = H * P, H * P + 2 * G * N
    rows = 2 * inner + 2 * G * N + H
    count = rows * d + rows * lay.flag(config, lay.mamba_in_bias)
    count += conv * _conv_kernel(config) + conv * lay.flag(config, lay.conv_bias)
    count += 3 * H + inner * lay.flag(config, lay.mamba_norm)
    count += d * inner + d * lay.flag(config, lay.mamba_out_bias)
    return count


def mamba1_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    d, N, R = sizes["hidden"], sizes["ssm_state"], int(config.mamba_dt_rank)
    inner = sizes["mamba_expand"] * d
    count = 2 * inner * d + 2 * inner * lay.flag(config, lay.mamba_in_bias)
    count += inner * _conv_kernel(config) + inner * lay.flag(config, lay.conv_bias)
    count += (R + 2 * N) * inner + inner * R + inner  # x_proj, dt_proj with its bias
    count += inner * N + inner + R + 2 * N  # A_log, D, the dt/B/C norms
    return count + d * inner + d * lay.flag(config, lay.mamba_out_bias)


def attention_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    d, D = sizes["hidden"], attention_head_dim(config)
    q, kv = sizes["attention_heads"] * D, sizes["kv_heads"] * D
    count = 2 * q * d + 2 * kv * d
    count += (q + 2 * kv) * lay.flag(config, lay.qkv_bias) + d * lay.flag(config, lay.o_bias)
    return count + 2 * D * lay.qk_norm


def mlp_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    d, F = sizes["hidden"], sizes["ffn"]
    bias = lay.flag(config, lay.mlp_bias) * ((lay.mlp_matrices - 1) * F + d)
    return lay.mlp_matrices * F * d + bias


def routed_expert_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    """One routed expert: its matrices over the latent width (NemotronH ``moe_latent_size``) or hidden."""
    latent = getattr(config, "moe_latent_size", None) or sizes["hidden"]
    return lay.expert_matrices * sizes["expert_ffn"] * latent


def moe_parameters(config, lay: Layout, sizes: dict[str, int]) -> int:
    """A whole MoE block: router, routed experts, shared expert and latent projections (NemotronH)."""
    d, bias = sizes["hidden"], lay.flag(config, lay.mlp_bias)
    count = sizes["experts"] * (d + routed_expert_parameters(config, lay, sizes))  # router rows + experts
    if "shared_expert_ffn" in sizes:  # NemotronH's shared expert (up, down); Granite's is its own MLP part
        shared = sizes["shared_expert_ffn"]
        count += 2 * shared * d + bias * (shared + d)
    latent = getattr(config, "moe_latent_size", None)
    if latent:
        count += 2 * latent * d + bias * (latent + d)
    return count


_PART_COUNT = {MAMBA: mamba_parameters, MAMBA1: mamba1_parameters, ATTENTION: attention_parameters,
               MLP: mlp_parameters, MOE: moe_parameters}


def zamba2_shared_blocks(config, lay: Layout, sizes: dict[str, int], kinds: Sequence[str]) -> dict[str, int]:
    """Zamba2's shared transformer blocks, once per block however many hybrid layers use them, plus what
    every use owns (LoRA adapters, the ``linear`` into its Mamba); keys as the built-model counter."""
    uses = sum(1 for kind in kinds if kind == "hybrid")
    blocks = min(int(config.num_mem_blocks), uses)  # hybrid layer j uses block j % num_mem_blocks
    d, ffn, rank = sizes["hidden"], sizes["ffn"], int(config.adapter_rank)
    width, head_dim = 2 * d, attention_head_dim(config)  # attention reads [hidden, embeddings]
    q, kv = int(config.num_attention_heads) * head_dim, int(config.num_key_value_heads) * head_dim
    attention = width * (q + 2 * kv) + d * q + width  # q, k, v, o and the 2d input_layernorm
    attention_adapters = 3 * 2 * width * rank if config.use_shared_attention_adapter else 0
    return {MLP: blocks * mlp_parameters(config, lay, sizes) + uses * (rank * d + 2 * ffn * rank),
            "norms": blocks * d,  # pre_ff_layernorm
            "other": blocks * attention + uses * (attention_adapters + d * d)}


# family -> (part kinds whose weights are shared between blocks, the function that counts them once)
SHARED_BLOCKS = {"zamba2": ((MLP,), zamba2_shared_blocks)}


def check_countable(family: Family, config) -> None:
    """Refuse, with a clear message, a model whose blocks the formulas do not cover."""
    layout(family)
    parts = {part.kind for kind in family.block_kinds(config) for part in family.parts(kind)}
    missing = sorted(parts - set(_PART_COUNT))
    if missing:
        raise HypruneError(f"hyprune cannot count the parameters of {', '.join(missing)} blocks yet, so it cannot "
                           f"search the architectures of this {family.name} model (only "
                           f"{', '.join(sorted(_PART_COUNT))} blocks).")


def is_tied(family: Family, config) -> bool:
    return layout(family).can_tie and bool(getattr(config, "tie_word_embeddings", False))


def _component(part_kind: str) -> str:
    """The key a part's parameters go under (the built-model counter files Mamba-1 under ``mamba``)."""
    return MAMBA if part_kind == MAMBA1 else part_kind


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
    shared_parts, count_shared = SHARED_BLOCKS.get(family.name, ((), None))
    d, vocab = sizes["hidden"], int(config.vocab_size)
    out = {"embeddings": vocab * d, MAMBA: 0, ATTENTION: 0, MLP: 0, MOE: 0, "norms": d, "lm_head": 0, "other": 0}
    per_kind: dict[str, list[tuple[str, int]]] = {}
    for kind in set(kinds):
        parts = [part for part in family.parts(kind) if part.kind not in shared_parts]
        per_kind[kind] = [(_component(part.kind), _PART_COUNT[part.kind](config, lay, sizes)) for part in parts]
        per_kind[kind].append(("norms", d * len({part.norm for part in parts})))
    for kind in kinds:
        for key, count in per_kind[kind]:
            out[key] += count
    if count_shared is not None:
        for key, count in count_shared(config, lay, sizes, kinds).items():
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
    moe_blocks = sum(1 for kind in kinds for part in family.parts(kind) if part.kind == MOE)
    if not moe_blocks:
        return total
    skipped = sizes["experts"] - int(config.num_experts_per_tok)
    return total - moe_blocks * skipped * routed_expert_parameters(config, layout(family), sizes)


def shaped_config(family: Family, config, sizes: dict[str, int], kept: Sequence[int]):
    """The config a plan with ``sizes`` (canonical axis -> size) keeping source blocks ``kept`` would give:
    `hyprune.apply.pruned_config` reads only the result sizes, the kept blocks and their kinds from a
    plan, so a stand-in with those three builds it for a shape that has no plan (no indices) yet."""
    from hyprune.apply import pruned_config

    kinds = family.block_kinds(config)
    stand_in = SimpleNamespace(result_sizes=lambda: dict(sizes), kept_blocks=lambda: list(kept),
                               layers=[SimpleNamespace(kind=k) for k in kinds])
    return pruned_config(family, config, stand_in)


def weight_bytes(parameters: int, dtype: torch.dtype | str = torch.float32) -> int:
    from hyprune.models import parse_dtype

    return parameters * torch.empty((), dtype=parse_dtype(dtype)).element_size()


def memory_bytes(family: Family, config, context: int, dtype: torch.dtype | str = torch.float32,
                 batch: int = 1) -> dict[str, int]:
    """Inference memory of ``config``'s model at ``context`` tokens: weights + the generation cache of
    ``batch`` sequences (`hyprune.evaluate.cache_bytes`: KV grows with the context, conv and SSM states
    do not). Activations and workspace are left out: they depend on the kernels, not the architecture.
    """
    from hyprune.evaluate.bench import cache_bytes

    weights = weight_bytes(count_parameters(family, config)["total"], dtype)
    cache = cache_bytes(config, family, context, dtype)
    return {"weights": weights, "cache": batch * cache["total"], "total": weights + batch * cache["total"]}
