"""Bamba and Granite 4.0-H (Mamba-2 / attention + MLP decoder layers, width tied to expand * hidden),
Granite also with routed experts beside its shared MLP.

The reference is the original HF model with what the plan removes masked instead of sliced:
zero embedding columns and block output rows for removed hidden channels, every hidden-size RMSNorm
and every gated Mamba norm taking its statistic over the kept channels, zero output columns for
removed attention heads and FFN neurons, zero B/C rows and conv channels for removed states and
groups. Removed heads and head channels are zeroed by the masked gated norm. Removed experts get a -inf
router logit before the router's top-k (`masking.mask_moe`).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.importance import activation_scores
from hyprune.plan import identity_plan, make_plan

from masking import (assert_roundtrip_generates, inner_mask, mask_moe, masked_gated_norm, masked_rmsnorm, random_plan,
                     randomized, rel_err, skip_block, zero_removed_bc, zero_removed_query_heads)


MAMBA = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             mamba_n_heads=8, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=6, mamba_expand=2, mamba_chunk_size=4,
             use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)


def bamba(seed=0, family="bamba"):
    torch.manual_seed(seed)
    if family == "bamba":
        config = transformers.BambaConfig(intermediate_size=24, attn_layer_indices=[1], **MAMBA)
    else:  # Granite 4.0-H, with its scalar multipliers; dense, or with 6 routed experts (top-2) of width 16
        experts = dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=16) if family == "granite_moe" \
            else dict(num_local_experts=0)
        config = transformers.GraniteMoeHybridConfig(
            shared_intermediate_size=24, **experts, layer_types=["mamba", "attention", "mamba"],
            embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=1.5, attention_multiplier=0.3,
            position_embedding_type="rope", **MAMBA)
    return randomized(AutoModelForCausalLM.from_config(config))


FAMILIES = ["bamba", "granitemoehybrid", "granite_moe"]
# attribute names that differ: MLP norm, MLP module, its output projection, final norm
NAMES = {"bamba": ("pre_ff_layernorm", "feed_forward", "down_proj", "final_layernorm"),
         "granitemoehybrid": ("post_attention_layernorm", "shared_mlp", "output_linear", "norm")}


def masked_reference(model, plan):
    mlp_norm, mlp_name, down_name, final_norm = NAMES[model.config.model_type]  # granite_moe is granitemoehybrid
    sizes = family_for_config(model.config).sizes(model.config)
    ref = copy.deepcopy(model)
    c = model.config
    d = c.hidden_size // c.num_attention_heads
    hidden = torch.zeros(c.hidden_size)
    hidden[plan.hidden] = 1
    gone = hidden == 0
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, gone] = 0
        for lp, layer in zip(plan.layers, ref.model.layers):
            for norm in (layer.input_layernorm, getattr(layer, mlp_norm)):
                norm.forward = masked_rmsnorm(norm, hidden)
            down = getattr(getattr(layer, mlp_name), down_name)
            down.weight[:, [f for f in range(sizes["ffn"]) if f not in lp.ffn]] = 0
            down.weight[gone] = 0
            if getattr(layer, "block_sparse_moe", None) is not None:
                mask_moe(layer.block_sparse_moe, lp, sizes, gone)
            if lp.kind.startswith("mamba"):
                mixer = layer.mamba
                mixer.norm.forward = masked_gated_norm(mixer.norm, inner_mask(lp, sizes), sizes["mamba_groups"])
                zero_removed_bc(mixer, lp, sizes)
                mixer.out_proj.weight[gone] = 0
            else:
                attn = layer.self_attn
                zero_removed_query_heads(attn, lp.query_heads, c.num_attention_heads, d)
                attn.o_proj.weight[gone] = 0
        final = getattr(ref.model, final_norm)
        final.forward = masked_rmsnorm(final, hidden)
    for i in plan.drop_blocks:
        ref.model.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


@pytest.fixture
def ids():
    return torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_is_exact(family, ids):
    model = bamba(family=family)
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


@pytest.mark.parametrize("what", [
    dict(state=3), dict(keep_groups=1, hidden=8), dict(ffn=10, attn_per_kv=1), dict(drop=[1]),
    # coupled width: 16 -> 12 hidden needs 24 Mamba channels = 6 heads x 4 or 8 heads x 3
    dict(hidden=12, heads_per_group=3), dict(hidden=12, head_dim=3, state=4, ffn=12, attn_per_kv=1, drop=[2]),
])
@pytest.mark.parametrize("family", FAMILIES[:2])
def test_pruning_matches_masked_reference(family, what, ids):
    model = bamba(seed=len(what), family=family)
    plan = random_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


@pytest.mark.parametrize("what", [
    dict(experts=3), dict(experts=4, expert_ffn=8, ffn=10), dict(hidden=8, heads_per_group=2, experts=2, drop=[1]),
    dict(state=3, attn_per_kv=1, expert_ffn=8, drop=[0]),
])
def test_granite_experts_match_masked_reference(what, ids):
    model = bamba(seed=len(what), family="granite_moe")
    plan = random_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES[:2])
def test_minitron_plan_roundtrips_and_generates(family, tmp_path):
    model = bamba(family=family)
    family = family_for_config(model.config)
    windows = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    ffn_field = family.fields["ffn"]
    plan = make_plan(family, model.config, scores, {"hidden_size": 12, "mamba_n_heads": 6, ffn_field: 16,
                                                    "mamba_d_state": 4}, drop_blocks=[2])
    pruned = apply_plan(model, plan)
    assert family.block_kinds(pruned.config) == ["mamba+mlp", "attention+mlp"]
    c = pruned.config
    assert (c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state) == (12, 6, 4, 4)
    assert_roundtrip_generates(pruned, tmp_path)


def test_granite_minitron_experts_roundtrip_and_generate(tmp_path):
    model = bamba(family="granite_moe")
    family = family_for_config(model.config)
    windows = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    assert scores["layers.0.expert_ffn"].shape == (6, 16) and "layers.0.shared_ffn" not in scores
    plan = make_plan(family, model.config, scores, {"num_local_experts": 3, "intermediate_size": 8,
                                                    "shared_intermediate_size": 16, "hidden_size": 8,
                                                    "mamba_n_heads": 4}, drop_blocks=[2])
    assert plan.layers[0].experts == sorted(torch.argsort(scores["layers.0.experts"], descending=True)[:3].tolist())
    pruned = apply_plan(model, plan)
    c = pruned.config
    assert (c.num_local_experts, c.intermediate_size, c.shared_intermediate_size, c.hidden_size) == (3, 8, 16, 8)
    assert_roundtrip_generates(pruned, tmp_path)


def test_granite_expert_targets_are_checked():
    from hyprune.errors import HypruneError
    from hyprune.plan import resolve_target

    model = bamba(family="granite_moe")
    fam = family_for_config(model.config)
    with pytest.raises(HypruneError, match="num_experts_per_tok"):
        resolve_target(fam, model.config, {"num_local_experts": 1})
    with pytest.raises(HypruneError, match="multiples of 8"):
        resolve_target(fam, model.config, {"intermediate_size": 12})
    dense = bamba(family="granitemoehybrid")
    with pytest.raises(HypruneError, match="no MoE blocks"):
        resolve_target(family_for_config(dense.config), dense.config, {"num_local_experts": 2})


@pytest.mark.parametrize("family", FAMILIES[:2])
def test_uncoupled_mamba_width_is_rejected(family):
    from hyprune.errors import HypruneError
    from hyprune.plan import resolve_target, validate_plan

    model = bamba(family=family)
    fam = family_for_config(model.config)
    with pytest.raises(HypruneError, match="tied to the hidden size"):
        resolve_target(fam, model.config, {"mamba_n_heads": 4})
    plan = random_plan(model, random.Random(0), heads_per_group=2)  # half the heads, same hidden size
    with pytest.raises(HypruneError, match="expand"):
        validate_plan(plan, fam, model.config)


