"""Analytic parameter and memory counts (hyprune.search.counting) equal the real counts of built models.

Every family on main, with and without biases, tied and untied, with MoE blocks (NemotronH with and
without a latent projection, GraniteMoeHybrid, Jamba), Zamba2's shared blocks, and for shrunken shapes
with dropped blocks (the configs `shaped_config` builds through `hyprune.apply.pruned_config`): the
formula must match `hyprune.models.count_parameters` of the model transformers builds from that config,
and the active count the built model's non-expert parameters plus the top-k share of its routed experts.
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
from hyprune.search.counting import (LAYOUTS, active_parameters, count_parameters as analytic, memory_bytes,
                                     shaped_config)

HYBRID = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              mamba_n_heads=8, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=6, mamba_expand=2,
              pad_token_id=0, bos_token_id=0, eos_token_id=0)
DENSE = dict(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=0, eos_token_id=0)

NEMOTRON_MOE = dict(layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"], hidden_size=24,
                    mamba_num_heads=4, mamba_head_dim=4, n_groups=2, ssm_state_size=4, intermediate_size=20,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=4, n_routed_experts=8,
                    moe_intermediate_size=16, moe_shared_expert_intermediate_size=10, num_experts_per_tok=2,
                    n_group=2, topk_group=1)
ZAMBA2 = dict(vocab_size=64, hidden_size=16, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"],
              num_hidden_layers=5, mamba_d_state=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8,
              intermediate_size=24, num_attention_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True,
              adapter_rank=3, chunk_size=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
JAMBA = dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
             attn_layer_period=4, attn_layer_offset=2, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=2,
             pad_token_id=0, bos_token_id=0, eos_token_id=0)

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
    "nemotron_h-moe": lambda: make_nemotron_config(**NEMOTRON_MOE),
    "nemotron_h-moe-latent-bias": lambda: make_nemotron_config(**NEMOTRON_MOE, moe_latent_size=8, mlp_bias=True),
    "granitemoehybrid-moe": lambda: transformers.GraniteMoeHybridConfig(
        shared_intermediate_size=24, num_local_experts=4, intermediate_size=16, num_experts_per_tok=2,
        layer_types=["mamba", "attention", "mamba"], **HYBRID),
    "zamba2": lambda: transformers.Zamba2Config(**ZAMBA2),
    "zamba2-one-block-bias": lambda: transformers.Zamba2Config(**{**ZAMBA2, "num_mem_blocks": 1,
                                                                  "use_shared_attention_adapter": False},
                                                               add_bias_linear=True),
    "jamba": lambda: transformers.JambaConfig(**JAMBA),
    "jamba-bias-tied": lambda: transformers.JambaConfig(**JAMBA, mamba_proj_bias=True, mamba_conv_bias=False,
                                                        tie_word_embeddings=True),
}
MOE_CONFIGS = sorted(name for name in CONFIGS if "-moe" in name or name.startswith("jamba"))


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    """Components that hold parameters (model counters may list empty ones, e.g. ``moe: 0``)."""
    return {k: v for k, v in counts.items() if v}


def real_count(config) -> dict[str, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return nonzero(count_parameters(model, family_for_config(config)))


def random_shape(family, config, rng: random.Random) -> tuple[dict[str, int], list[int]]:
    """A random valid shrunken shape (sizes the config can express) and random kept blocks.

    Fixed axes keep their size, axes sharing a config field (Jamba's MLP and expert widths) one size,
    the widths routed experts multiply over are multiples of 8, and a periodic layer pattern (Jamba)
    loses only its last layers."""
    source = family.sizes(config)
    moe = "experts" in source
    for _ in range(200):
        sizes = {axis: rng.randint(1, n) for axis, n in source.items()}
        for axis in ("hidden", "expert_ffn") if moe else ():
            sizes[axis] = rng.randrange(8, source[axis] + 1, 8)
        for axis in family.fixed_axes:
            sizes[axis] = source[axis]
        for axis in sizes:
            sizes[axis] = sizes[family.field_to_axes(family.fields[axis])[-1]]
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
        if family.depth_period is not None:
            return sizes, list(range(rng.randint(1, blocks)))
        kept = sorted(rng.sample(range(blocks), rng.randint(1, blocks)))
        return sizes, kept
    raise AssertionError("no valid random shape found")


def test_a_family_without_a_formula_is_refused_clearly():
    config = make_llama_config()
    family = dataclasses.replace(family_for_config(config), name="newfamily")
    with pytest.raises(HypruneError, match="no parameter formula for the newfamily family"):
        analytic(family, config)
    assert {"nemotron_h", "mamba2", "bamba", "granitemoehybrid", "falcon_h1", "llama", "qwen2", "qwen3",
            "mistral", "zamba2", "jamba"} <= set(LAYOUTS)


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


@pytest.mark.parametrize("name", ["nemotron_h", "bamba", "falcon_h1", "mistral", "zamba2", "jamba"])
def test_memory_is_weights_plus_cache(name):
    config = CONFIGS[name]()
    family = family_for_config(config)
    memory = memory_bytes(family, config, context=24, dtype="bfloat16", batch=3)
    assert memory["weights"] == 2 * real_count(config)["total"]
    assert memory["cache"] == 3 * cache_bytes(config, family, 24, torch.bfloat16)["total"]
    assert memory["total"] == memory["weights"] + memory["cache"]


def built_active_count(config) -> int:
    """Independently of the formulas: every parameter of the built model, but of the routed experts
    (the ``experts`` modules; NemotronH's ``shared_experts`` see every token) only the top-k share."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    total = sum(p.numel() for p in model.parameters())
    experts = int(getattr(config, family_for_config(config).fields["experts"]))
    return total - routed + routed * int(config.num_experts_per_tok) // experts


@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_active_parameters_equal_the_built_models_top_k_share(name):
    config = CONFIGS[name]()
    family = family_for_config(config)
    active = active_parameters(family, config)
    assert active == built_active_count(config) < analytic(family, config)["total"]
    rng = random.Random(name)
    kinds = family.block_kinds(config)
    for _ in range(3):
        sizes, kept = random_shape(family, config, rng)
        shaped = shaped_config(family, config, sizes, kept)
        assert active_parameters(family, config, sizes, [kinds[i] for i in kept]) == built_active_count(shaped)


def test_a_model_without_experts_is_all_active():
    config = CONFIGS["zamba2"]()
    family = family_for_config(config)
    assert active_parameters(family, config) == analytic(family, config)["total"]


@pytest.mark.parametrize("name", ["zamba2", "jamba"])
@torch.inference_mode()
def test_cache_bytes_equal_the_real_cache(name):
    """Zamba2's hybrid layers cache the shared attention's K and V; Jamba caches Mamba-1 conv and SSM states."""
    from hyprune.compat import cache_argument, output_cache
    from hyprune.evaluate import measured_cache_bytes

    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    out = model(torch.randint(1, 60, (1, 7)), use_cache=True)
    analytic_cache = cache_bytes(config, family_for_config(config), 7)
    assert analytic_cache["attention"] > 0 and analytic_cache["total"] == measured_cache_bytes(output_cache(out, cache_argument(model)))
