"""FalconH1 (attention and Mamba-2 in parallel in every layer, mup multipliers) against references.

The reference is the original HF model with what the plan removes masked: removed hidden channels
zero in the embeddings and in every block's output rows, hidden RMSNorms and the gated Mamba norm
taking their statistic over kept channels, removed heads / head channels masked in the gated norm
(or zeroed in out_proj when the model has no Mamba norm), removed states and groups zeroed in B/C and
their conv channels, removed attention heads and FFN neurons zeroed in their output projection.
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

from masking import (assert_roundtrip_generates, inner_mask, masked_gated_norm, masked_rmsnorm, random_plan, randomized,
                     rel_err, skip_block, zero_removed_bc, zero_removed_query_heads)


def falcon(rms_norm=True, before_gate=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.FalconH1Config(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=32, mamba_n_heads=8, mamba_d_head=4, mamba_n_groups=2, mamba_d_state=6,
        mamba_chunk_size=4, mamba_rms_norm=rms_norm, mamba_norm_before_gate=before_gate,
        ssm_multipliers=[1.5, 0.5, 2.0, 0.7, 1.2], mlp_multipliers=[0.8, 1.3], key_multiplier=0.9,
        attention_in_multiplier=1.1, attention_out_multiplier=0.6, ssm_in_multiplier=1.4, ssm_out_multiplier=0.8,
        embedding_multiplier=2.0, lm_head_multiplier=0.5, use_cache=False, pad_token_id=0, bos_token_id=0,
        eos_token_id=0)
    return randomized(AutoModelForCausalLM.from_config(config))


def masked_reference(model, plan):
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
            for norm in (layer.input_layernorm, layer.pre_ff_layernorm):
                norm.forward = masked_rmsnorm(norm, hidden)
            down = layer.feed_forward.down_proj
            down.weight[:, [f for f in range(c.intermediate_size) if f not in lp.ffn]] = 0
            down.weight[gone] = 0
            attn = layer.self_attn
            zero_removed_query_heads(attn, lp.query_heads, c.num_attention_heads, d)
            attn.o_proj.weight[gone] = 0
            mixer = layer.mamba
            inner = inner_mask(lp, sizes)
            if c.mamba_rms_norm:
                mixer.norm.forward = masked_gated_norm(mixer.norm, inner, sizes["mamba_groups"])
            else:  # no norm after the scan: a removed channel is a zero out_proj column
                mixer.out_proj.weight[:, inner == 0] = 0
            zero_removed_bc(mixer, lp, sizes)
            mixer.out_proj.weight[gone] = 0
        final = ref.model.final_layernorm
        final.forward = masked_rmsnorm(final, hidden)
    for i in plan.drop_blocks:
        ref.model.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


@pytest.fixture
def ids():
    return torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))


NORMS = [(True, True), (True, False), (False, True)]  # (mamba_rms_norm, norm_before_gate)


@pytest.mark.parametrize("rms_norm,before_gate", NORMS)
def test_identity_is_exact(rms_norm, before_gate, ids):
    model = falcon(rms_norm, before_gate)
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


@pytest.mark.parametrize("rms_norm,before_gate", NORMS)
@pytest.mark.parametrize("what", [
    dict(state=3), dict(keep_groups=1), dict(heads_per_group=2), dict(head_dim=3), dict(hidden=10),
    dict(ffn=10, attn_per_kv=1), dict(drop=[1]),
    dict(hidden=12, heads_per_group=3, head_dim=2, state=4, ffn=12, attn_per_kv=1, keep_groups=1, drop=[0]),
])
def test_falcon_pruning_matches_masked_reference(rms_norm, before_gate, what, ids):
    model = falcon(rms_norm, before_gate, seed=len(what))
    plan = random_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert pruned.config.mamba_d_ssm == len(plan.layers[0].heads) * len(plan.layers[0].head_dim)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_falcon_minitron_plan_roundtrips_and_generates(tmp_path):
    model = falcon()
    family = family_for_config(model.config)
    windows = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    plan = make_plan(family, model.config, scores, {"hidden_size": 12, "mamba_n_heads": 4, "mamba_d_head": 3,
                                                    "intermediate_size": 16, "num_attention_heads": 2},
                     drop_blocks=[1])
    pruned = apply_plan(model, plan)
    loaded = assert_roundtrip_generates(pruned, tmp_path)
    c = loaded.config
    assert (c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_d_ssm, c.num_hidden_layers) == (12, 4, 3, 12, 2)
    assert loaded.model.layers[0].mamba.mup_vector.shape[-1] == 2 * 12 + 2 * 2 * 6 + 4  # rebuilt from the config
