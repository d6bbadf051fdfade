"""Zamba2: Mamba-2 layers, some of which first run a shared transformer block.

``layers_block_type`` lists ``linear_attention`` (a Mamba layer: ``input_layernorm`` + ``mamba``) and
``hybrid`` layers. A hybrid layer runs ``shared_transformer`` on the concatenation ``[hidden, original
embeddings]`` (width ``attention_hidden_size = 2 * hidden_size``): ``input_layernorm`` over both halves,
attention with LoRA adapters per use, then ``pre_ff_layernorm`` + ``feed_forward`` (fused ``gate_up_proj``
with a LoRA adapter per use); its output goes through the layer's own ``linear`` and is added to the
input of the layer's Mamba (``mamba_decoder``), not to the residual stream. The ``num_mem_blocks``
shared blocks take turns: hybrid layer j (counting hybrid layers only) uses block ``j % num_mem_blocks``
and adapter slot j, and every use of a block shares its weights.

What the config can express, and so what hyprune prunes:

- Mamba heads, head channels, states and groups: yes. The config derives the Mamba width as
  ``mamba_expand * hidden_size`` with an *integer* ``mamba_expand`` and ``mamba_headdim`` from it, so
  ``n_mamba_heads * mamba_headdim`` must stay a multiple of ``hidden_size``; the pruned config states the
  new ``mamba_expand``.
- The shared MLP's neurons (``intermediate_size``): yes, one ranking per shared block over all of its
  uses (the summed scores), the per-use adapters sliced with it.
- ``hidden_size``: no. It also sets the attention width (``2 * hidden_size = heads * head_dim``, derived in
  the config, with the adapters adding into it), so cutting it would need attention head-channel pruning.
- Attention heads: no, for the same reason (the head size is derived from ``hidden_size`` and the heads).
- Depth: Mamba layers, yes. Hybrid layers only with one shared block (``num_mem_blocks=1``, as in
  Zamba2-1.2B): the later hybrid layers move up one adapter slot, so the slots are renumbered and the
  dropped layer's slot goes. With more shared blocks a later hybrid layer would move onto another block's
  weights, so hybrid layers stay.
"""

from __future__ import annotations

import re

from hyprune.arch.family import MAMBA, MLP, Family, Layout, Part, attention_head_dim, register
from hyprune.errors import HypruneError

HYBRID = "hybrid"
_SLOT = re.compile(r"(_adapter_list)\.(\d+)\.")


def _block_kinds(config) -> list[str]:
    return [HYBRID if t == HYBRID else MAMBA for t in config.layers_block_type]


def _set_block_kinds(config_dict: dict, kept: list[int], kinds: list[str]) -> None:
    config_dict["layers_block_type"] = [HYBRID if k == HYBRID else "linear_attention" for k in kinds]
    config_dict["num_hidden_layers"] = len(kinds)
    config_dict.pop("hybrid_layer_ids", None)  # derived from layers_block_type


def _parts(kind: str) -> list[Part]:
    if kind == HYBRID:
        return [Part(MLP, "shared_transformer.pre_ff_layernorm", "shared_transformer.feed_forward"),
                Part(MAMBA, "mamba_decoder.input_layernorm", "mamba_decoder.mamba")]
    return [Part(MAMBA, "input_layernorm", "mamba")]


def _check_sizes(config, sizes: dict[str, int]) -> None:
    width, hidden = sizes["mamba_heads"] * sizes["mamba_head_dim"], sizes["hidden"]
    if width % hidden:
        raise HypruneError(
            f"Zamba2 derives the Mamba width as mamba_expand * hidden_size with a whole-number mamba_expand, so "
            f"n_mamba_heads * mamba_headdim must be a multiple of hidden_size ({hidden}); the target gives "
            f"{sizes['mamba_heads']} * {sizes['mamba_head_dim']} = {width}. For example keep half the heads "
            "(mamba_expand 2 -> 1)."
        )


def _finish_config(config_dict: dict) -> None:
    width = config_dict["n_mamba_heads"] * config_dict["mamba_headdim"]
    config_dict["mamba_expand"] = width // config_dict["hidden_size"]  # the config derives mamba_headdim again


def _undroppable(config) -> dict[str, str]:
    if int(config.num_mem_blocks) == 1:
        return {}
    return {HYBRID: f"with num_mem_blocks={config.num_mem_blocks} shared blocks, hybrid layer j uses block "
                    f"j % {config.num_mem_blocks}, so dropping one moves every later hybrid layer onto another "
                    "block's weights. Drop Mamba layers instead."}


def _renumber(name: str, config, kept: list[int]) -> str | None:
    """Adapter slot j of the shared block (the j-th hybrid layer's) -> its slot among the kept hybrid layers."""
    match = _SLOT.search(name)
    if match is None:
        return name
    hybrid = [i for i, t in enumerate(config.layers_block_type) if t == HYBRID]
    kept_set = set(kept)
    new_slot = {j: n for n, j in enumerate(j for j, i in enumerate(hybrid) if i in kept_set)}
    slot = int(match.group(2))
    if slot not in new_slot:
        return None
    return name[:match.start()] + f"{match.group(1)}.{new_slot[slot]}." + name[match.end():]


def _tied_mlps(config) -> list[list[int]]:
    """Hybrid layers grouped by the shared block they use (hybrid layer j uses block j % num_mem_blocks)."""
    hybrid = [i for i, t in enumerate(config.layers_block_type) if t == HYBRID]
    blocks = int(config.num_mem_blocks)
    return [hybrid[b::blocks] for b in range(blocks) if hybrid[b::blocks]]


def _shared_blocks(config, lay: Layout, sizes: dict[str, int], kinds, count) -> dict[str, int]:
    """Zamba2's shared transformer blocks, once per block however many hybrid layers use them, plus what
    every use owns (LoRA adapters, the ``linear`` into its Mamba); keys as the built-model counter.
    ``count(part kind)``: the parameters of one such part (`hyprune.search.counting`)."""
    uses = sum(1 for kind in kinds if kind == HYBRID)
    blocks = min(int(config.num_mem_blocks), uses)  # hybrid layer j uses block j % num_mem_blocks
    d, ffn, rank = sizes["hidden"], sizes["ffn"], int(config.adapter_rank)
    width, head_dim = 2 * d, attention_head_dim(config)  # attention reads [hidden, embeddings]
    q, kv = int(config.num_attention_heads) * head_dim, int(config.num_key_value_heads) * head_dim
    attention = width * (q + 2 * kv) + d * q + width  # q, k, v, o and the 2d input_layernorm
    attention_adapters = 3 * 2 * width * rank if config.use_shared_attention_adapter else 0
    return {MLP: blocks * count(MLP) + uses * (rank * d + 2 * ffn * rank),
            "norms": blocks * d,  # pre_ff_layernorm
            "other": blocks * attention + uses * (attention_adapters + d * d)}


register(Family(
    name="zamba2", base="model",
    fields={"hidden": "hidden_size", "ffn": "intermediate_size", "mamba_heads": "n_mamba_heads",
            "mamba_head_dim": "mamba_headdim", "ssm_state": "mamba_d_state", "mamba_groups": "mamba_ngroups"},
    block_kinds=_block_kinds, set_block_kinds=_set_block_kinds, parts=_parts, embeddings="embed_tokens",
    final_norm="final_layernorm", finish_config=_finish_config, check_sizes=_check_sizes, tied_mlps=_tied_mlps,
    unsliced=("linear.", "shared_transformer.input_layernorm.", "shared_transformer.self_attn."),
    fixed_axes={"hidden": "it also sets the shared transformer's attention width (2 * hidden_size = heads x head "
                          "size, derived by the config, with the LoRA adapters adding into it), which would need "
                          "attention head-channel pruning."},
    undroppable_kinds=_undroppable, renumber=_renumber, keep_one=(HYBRID,),
    # add_bias_linear on the Mamba and MLP projections, the conv always with a bias
    layout=Layout(mamba_in_bias="add_bias_linear", mamba_out_bias="add_bias_linear", mlp_bias="add_bias_linear"),
    shared_blocks=((MLP,), _shared_blocks),
    shared_attention_kinds=(HYBRID,),  # the shared transformer's attention: weights shared, cache per layer
    letters={HYBRID: "H"},
    notes=("Free: n_mamba_heads, mamba_headdim, mamba_d_state, mamba_ngroups (n_mamba_heads * mamba_headdim must be "
           "a multiple of hidden_size: mamba_expand is a whole number and is rewritten), intermediate_size (the "
           "shared MLP, one ranking per shared block over its uses).",
           "Fixed: hidden_size (it sets the shared attention width 2 * hidden_size with its LoRA adapters) and the "
           "attention heads (head size derived from hidden_size).",
           "Depth: Mamba layers; hybrid layers (shared-block uses) only when num_mem_blocks = 1 (their adapter "
           "slots are renumbered)."),
))
