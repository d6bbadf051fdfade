"""Analytic parameter and memory counts (hyprune.search.counting) equal the real counts of built models.

Every family on main, with and without biases, tied and untied, and for shrunken shapes with dropped
blocks (the configs `shaped_config` builds through `hyprune.apply.pruned_config`): the formula must match
`hyprune.models.count_parameters` of the model transformers builds from that config.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import make_llama_config, make_mamba2_config, make_nemotron_config
from hyprune.arch import family_for_config
from hyprune.errors import HypruneError
from hyprune.evaluate import cache_bytes
from hyprune.models import count_parameters
from hyprune.plan import resolve_target
from hyprune.search.counting import LAYOUTS, count_parameters as analytic, memory_bytes, shaped_config

HYBRID = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              mamba_n_heads=8, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=6, mamba_expand=2,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)
DENSE = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=0, eos_token_id=0)

CONFIGS = {
    "nemotron_h": lambda: make_nemotron_config(),
    "nemotron_h-bias": lambda: make_nemotron_config(use_bias=True, mlp_bias=True, use_conv_bias=False,
                                                    tie_word_embeddings=True),
    "mamba2": lambda: make_mamba2_config(),
    "mamba2-tied-bias": lambda: make_mamba2_config(tie_word_embeddings=True, use_bias=True),
    "bamba": lambda: transformers.BambaConfig(intermediate_size=24, attn_layer_indices=[1], **HYBRID),
    "bamba-bias": lambda: transformers.BambaConfig(intermediate_size=24, attn_layer_indices=[1], mamba_proj_bias=True,
                                                   attention_bias=True, mlp_bias=True, mamba_conv_bias=False,
                                                   **HYBRID),
    "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
        shared_intermediate_size=24, num_local_experts=0, layer_types=["mamba", "attention", "mamba"],
        attention_bias=True, **HYBRID),
    "falcon_h1": lambda: transformers.FalconH1Config(**{**HYBRID, "mamba_d_ssm": 32}, intermediate_size=24),
    "falcon_h1-norm-bias": lambda: transformers.FalconH1Config(
        **{**HYBRID, "mamba_d_ssm": 32}, intermediate_size=24, mamba_rms_norm=True, projectors_bias=True,
        mamba_proj_bias=True, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "llama": lambda: make_llama_config(),
    "llama-bias-tied": lambda: transformers.LlamaConfig(**DENSE, attention_bias=True, mlp_bias=True,
                                                        tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**DENSE),
    "qwen3": lambda: transformers.Qwen3Config(**DENSE, attention_bias=True),
    "mistral": lambda: transformers.MistralConfig(**DENSE, sliding_window=8),
}


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    """Components that hold parameters (model counters may list empty ones, e.g. ``moe: 0``)."""
    return {k: v for k, v in counts.items() if v}


def real_count(config) -> dict[str, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return nonzero(count_parameters(model, family_for_config(config)))


def random_shape(family, config, rng: random.Random) -> tuple[dict[str, int], list[int]]:
    """A random valid shrunken shape (sizes the config can express) and random kept blocks."""
    source = family.sizes(config)
    for _ in range(200):
        sizes = {axis: rng.randint(1, n) for axis, n in source.items()}
        if family.mamba_width_coupled_to_hidden and "mamba_heads" in sizes:  # width = expand * hidden
            sizes["hidden"] = rng.randint(1, source["hidden"] // 2) * 2
            width = family.expand(config) * sizes["hidden"]
            heads = [h for h in range(1, source["mamba_heads"] + 1)
                     if width % h == 0 and width // h <= source["mamba_head_dim"]]
            if not heads:
                continue
            sizes["mamba_heads"] = rng.choice(heads)
            sizes["mamba_head_dim"] = width // sizes["mamba_heads"]
        try:
            target = {family.fields[a]: v for a, v in sizes.items()}
            resolve_target(family, config, target)
        except Exception:
            continue
        blocks = len(family.block_kinds(config))
        kept = sorted(rng.sample(range(blocks), rng.randint(1, blocks)))
        return sizes, kept
    raise AssertionError("no valid random shape found")


def test_a_family_without_a_formula_is_refused_clearly():
    config = make_llama_config()
    family = dataclasses.replace(family_for_config(config), name="newfamily")
    with pytest.raises(HypruneError, match="no parameter formula for the newfamily family"):
        analytic(family, config)
    assert {"nemotron_h", "mamba2", "bamba", "granitemoehybrid", "falcon_h1", "llama", "qwen2", "qwen3",
            "mistral"} <= set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_source_counts_equal_the_built_model(name):
    config = CONFIGS[name]()
    assert nonzero(analytic(family_for_config(config), config)) == real_count(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shrunken_shapes_count_like_the_built_model(name):
    """Random sizes and dropped blocks: counting the shape == counting the model built from its config."""
    config = CONFIGS[name]()
    family = family_for_config(config)
    rng = random.Random(name)
    kinds = family.block_kinds(config)
    for _ in range(4):
        sizes, kept = random_shape(family, config, rng)
        shaped = shaped_config(family, config, sizes, kept)
        expected = real_count(shaped)
        assert nonzero(analytic(family, config, sizes, [kinds[i] for i in kept])) == expected
        assert nonzero(analytic(family, shaped)) == expected


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "falcon_h1", "mistral"])
def test_memory_is_weights_plus_cache(name):
    config = CONFIGS[name]()
    family = family_for_config(config)
    memory = memory_bytes(family, config, context=24, dtype="bfloat16", batch=3)
    assert memory["weights"] == 2 * real_count(config)["total"]
    assert memory["cache"] == 3 * cache_bytes(config, family, 24, torch.bfloat16)["total"]
    assert memory["total"] == memory["weights"] + memory["cache"]
