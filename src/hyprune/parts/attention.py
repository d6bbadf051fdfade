"""Attention (every family but Mamba2): query heads in key/value groups, ``head_dim`` channels each.

Score: ``layers.i.attention`` [heads, head_dim], the input of o_proj. Heads are ranked inside each KV
group; whole KV groups by the L2 of their heads. ``head_dim`` stays.
"""

from __future__ import annotations

from hyprune.arch.family import ATTENTION, attention_head_dim
from hyprune.errors import HypruneError
from hyprune.parts.base import (BasePart, Context, check_grouped, check_indices, full, idx, input_hook, top_k,
                                top_k_within_groups)

SLIDING = ("sliding_attention", "hybrid_sliding")  # layer_types of sliding-window layers


def rank(head_channel_score, num_kv: int, sizes: dict[str, int]) -> dict:
    """The kept query heads and KV heads of one layer from its o_proj input score [heads, head_dim]."""
    heads = head_channel_score.shape[0]
    per_kv = heads // num_kv
    head_score = head_channel_score.norm(dim=1)
    kept_kv = top_k(head_score.view(num_kv, per_kv).norm(dim=1), sizes["kv_heads"])
    kept = top_k_within_groups(head_score, kept_kv, per_kv, sizes["attention_heads"] // sizes["kv_heads"])
    return {"query_heads": kept, "kv_heads": kept_kv}


def indices(lp, head_dim: int) -> dict:
    def rows(heads):
        return idx(h * head_dim + d for h in heads for d in range(head_dim))

    return {"q": rows(lp.query_heads), "kv": rows(lp.kv_heads)}


def check_hidden_multiple_of_heads(family, sizes: dict[str, int]) -> None:
    if family.hidden_multiple_of_heads and sizes["hidden"] % sizes["attention_heads"]:
        raise HypruneError(
            f"{family.name} configs require hidden_size to be a multiple of num_attention_heads; "
            f"{sizes['hidden']} is not a multiple of {sizes['attention_heads']}. Pick hidden_size as a multiple "
            f"of {sizes['attention_heads']} (or change the head count)."
        )


def kv_cache_bytes(config, family, i: int, context: int, size: int) -> int:
    """K and V of one attention layer for one sequence after ``context`` tokens (sliding windows capped)."""
    kinds = family.block_kinds(config)
    layer_types = getattr(config, "layer_types", None)
    layer_types = layer_types if isinstance(layer_types, list) and len(layer_types) == len(kinds) else None
    window = getattr(config, "sliding_window", None)
    tokens = context
    # as transformers builds its cache: a config without layer_types but with a sliding_window
    # (Mistral) slides in every layer
    sliding = layer_types[i] in SLIDING if layer_types else window is not None
    if sliding and window:
        tokens = min(context, int(window) - 1)
    kv_heads = int(getattr(config, family.fields.get("kv_heads", "num_key_value_heads")))
    return 2 * kv_heads * attention_head_dim(config) * tokens * size


class Attention(BasePart):
    kind = ATTENTION
    component = ATTENTION
    axes = ("attention_heads", "kv_heads")

    # ---- scoring -------------------------------------------------------------------------------
    def hooks(self, mixer, i, stat, names):
        return [mixer.o_proj.register_forward_pre_hook(input_hook(stat(f"layers.{i}.attention")))]

    def scores(self, stat, i, mixer, config):
        heads = config.num_attention_heads
        return {f"layers.{i}.attention": stat(f"layers.{i}.attention").score().view(heads, -1)}

    def score_shapes(self, i, sizes, config):
        return {f"layers.{i}.attention": (sizes["attention_heads"], attention_head_dim(config))}

    def summary(self, scores, i, describe):
        return {"attention_heads": describe(scores[f"layers.{i}.attention"].norm(dim=1))}

    # ---- planning ------------------------------------------------------------------------------
    def check_target(self, family, config, sizes, source):
        check_hidden_multiple_of_heads(family, sizes)
        q, kv = sizes["attention_heads"], sizes["kv_heads"]
        if q % kv:
            raise HypruneError(
                f"num_attention_heads={q} is not divisible by num_key_value_heads={kv}: every KV group "
                "must keep the same number of query heads."
            )
        if q // kv > source["attention_heads"] // source["kv_heads"]:
            raise HypruneError(
                f"num_attention_heads={q} with num_key_value_heads={kv} needs {q // kv} query heads per KV "
                f"group, more than the source has ({source['attention_heads'] // source['kv_heads']})."
            )

    def plan(self, scores, i, sizes, ctx: Context):
        return rank(scores[f"layers.{i}.attention"], ctx.source["kv_heads"], sizes)

    def identity(self, sizes, family):
        return {"query_heads": full(sizes["attention_heads"]), "kv_heads": full(sizes["kv_heads"])}

    def validate(self, where, lp, s, ctx: Context):
        kv = check_indices(f"{where} kv_heads", lp.kv_heads, s["kv_heads"])
        query = check_indices(f"{where} query_heads", lp.query_heads, s["attention_heads"])
        check_grouped(where, query, kv, s["attention_heads"] // s["kv_heads"], "query head")
        return (len(lp.query_heads), len(lp.kv_heads))

    def result_sizes(self, lp, hidden):
        if lp.kv_heads is None:
            return None
        return dict(attention_heads=len(lp.query_heads), kv_heads=len(lp.kv_heads))

    def check_result(self, family, config, result):
        check_hidden_multiple_of_heads(family, result)

    # ---- tensors -------------------------------------------------------------------------------
    def rules(self, lp, sizes, h, config, names):
        ix = indices(lp, attention_head_dim(config))
        return {
            "q_proj.weight": [(0, ix["q"]), (1, h)],
            "k_proj.weight": [(0, ix["kv"]), (1, h)],
            "v_proj.weight": [(0, ix["kv"]), (1, h)],
            "o_proj.weight": [(0, h), (1, ix["q"])],
            "q_proj.bias": [(0, ix["q"])],
            "k_proj.bias": [(0, ix["kv"])],
            "v_proj.bias": [(0, ix["kv"])],
            "o_proj.bias": [(0, h)],
            "q_norm.weight": [],  # Qwen3: per head_dim, shared by all heads
            "k_norm.weight": [],
        }

    def parameters(self, config, lay, sizes):
        d, D = sizes["hidden"], attention_head_dim(config)
        q, kv = sizes["attention_heads"] * D, sizes["kv_heads"] * D
        count = 2 * q * d + 2 * kv * d
        count += (q + 2 * kv) * lay.flag(config, lay.qkv_bias) + d * lay.flag(config, lay.o_bias)
        return count + 2 * D * lay.qk_norm

    def cache_bytes(self, config, family, i, context, size, ssm_size):
        return {"attention": kv_cache_bytes(config, family, i, context, size)}

    def linear_group(self, sub_name):
        return "attention"


PART = Attention()
