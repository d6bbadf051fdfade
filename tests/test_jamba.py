"""Jamba (Mamba-1 or attention, then MLP or routed experts; a periodic layer pattern) against masked references.

The tiny model has 8 layers with attention every 4 (offset 2) and experts every 2 (offset 1), so the
pattern repeats every 4 layers and holds all four kinds of layer. The reference is the original HF model
with what the plan removes masked: removed hidden channels zero in the embeddings and in every block's
output rows, hidden RMSNorms over the kept channels; a removed Mamba-1 inner channel zeroed in x_proj's
columns (its share of dt, B, C) and out_proj's columns; a removed state zeroed in x_proj's B and C rows with
the B/C RMSNorms over the kept states; removed attention heads, MLP neurons and expert neurons zeroed in
their output projections; removed experts at -inf in the router's softmax (`masking.mask_moe`).
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
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores
from hyprune.plan import identity_plan, make_plan, resolve_target, validate_plan

from masking import (assert_roundtrip_generates, mask_moe, masked_rmsnorm, random_plan, randomized, rel_err, skip_block,
                     zero_removed_query_heads)

VOCAB = 64


def jamba(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                  expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2, mamba_d_state=4, mamba_expand=2,
                  mamba_dt_rank=2, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    return randomized(AutoModelForCausalLM.from_config(transformers.JambaConfig(**kwargs)), output_scale=0.2)


def masked_reference(model, plan):
    c = model.config
    sizes = family_for_config(c).sizes(c)
    ref = copy.deepcopy(model)
    hidden = torch.zeros(c.hidden_size)
    hidden[plan.hidden] = 1
    gone = hidden == 0
    R, N = c.mamba_dt_rank, c.mamba_d_state
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, gone] = 0
        for lp, layer in zip(plan.layers, ref.model.layers):
            for norm in (layer.input_layernorm, layer.pre_ff_layernorm):
                norm.forward = masked_rmsnorm(norm, hidden)
            if lp.kind.startswith("mamba"):
                mixer = layer.mamba
                removed = [k for k in range(mixer.intermediate_size) if k not in lp.inner]
                mixer.x_proj.weight[:, removed] = 0
                mixer.out_proj.weight[:, removed] = 0
                mixer.out_proj.weight[gone] = 0
                states = torch.zeros(N)
                states[lp.state] = 1
                dropped = [n for n in range(N) if n not in lp.state]
                mixer.x_proj.weight[[R + n for n in dropped] + [R + N + n for n in dropped]] = 0
                for norm in (mixer.b_layernorm, mixer.c_layernorm):
                    norm.forward = masked_rmsnorm(norm, states)
            else:
                zero_removed_query_heads(layer.self_attn, lp.query_heads, c.num_attention_heads,
                                         c.hidden_size // c.num_attention_heads)
                layer.self_attn.o_proj.weight[gone] = 0
            if lp.kind.endswith("moe"):
                mask_moe(layer.feed_forward, lp, sizes, gone)
            else:
                down = layer.feed_forward.down_proj
                down.weight[:, [f for f in range(sizes["ffn"]) if f not in lp.ffn]] = 0
                down.weight[gone] = 0
        ref.model.final_layernorm.forward = masked_rmsnorm(ref.model.final_layernorm, hidden)
    for i in plan.drop_blocks:
        ref.model.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def test_pattern_and_identity_is_exact(ids):
    model = jamba()
    family = family_for_config(model.config)
    assert family.block_kinds(model.config)[:4] == ["mamba+mlp", "mamba+moe", "attention+mlp", "mamba+moe"]
    pruned = apply_plan(model, identity_plan(family, model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


@pytest.mark.parametrize("what", [
    dict(inner=16), dict(state=2), dict(experts=2), dict(ffn=8, expert_ffn=8, attn_per_kv=1),
    dict(hidden=8, inner=16, state=3), dict(hidden=8, inner=8, experts=3, drop=[1, 2, 3, 4]),
    dict(state=3, drop=[7]),
])
def test_pruning_matches_masked_reference(what, ids):
    model = jamba(seed=len(what))
    plan = random_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_minitron_plan_roundtrips_and_generates(tmp_path):
    from hyprune.depth import depth_plan

    model = jamba()
    family = family_for_config(model.config)
    windows = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    assert scores["layers.0.mamba1_inner"].shape == (32,) and scores["layers.0.mamba1_bc"].shape == (2, 4)
    width = make_plan(family, model.config, scores, {"hidden_size": 8, "mamba_expand": 1, "mamba_d_state": 3,
                                                     "num_experts": 3, "intermediate_size": 8})
    assert width.layers[0].inner == sorted(torch.argsort(scores["layers.0.mamba1_inner"], descending=True)[:8].tolist())
    plan, _ = depth_plan(model, 4, "block_influence", "contiguous", windows=windows, plan=width, progress=False)
    assert len(plan.drop_blocks) == 4 and plan.drop_blocks == list(range(plan.drop_blocks[0], plan.drop_blocks[0] + 4))
    pruned = apply_plan(model, plan)
    c = pruned.config
    assert (c.hidden_size, c.mamba_expand, c.mamba_d_state, c.num_experts, c.intermediate_size,
            c.num_hidden_layers, c.mamba_dt_rank) == (8, 1, 3, 3, 8, 4, 2)
    assert family.block_kinds(c) == family.block_kinds(model.config)[:4]
    assert_roundtrip_generates(pruned, tmp_path, vocab=VOCAB)


@pytest.mark.parametrize("target, message", [
    ({"mamba_expand": 3}, "larger than the source"),
    ({"intermediate_size": 12}, "multiples of 8"),
    ({"num_experts": 1}, "below num_experts_per_tok"),
    ({"mamba_dt_rank": 1}, "not a prunable config field"),
])
def test_inexpressible_targets_are_rejected(target, message):
    model = jamba()
    with pytest.raises(HypruneError, match=message):
        resolve_target(family_for_config(model.config), model.config, target)


def test_depth_keeps_the_periodic_pattern():
    from hyprune.depth import check_depth_request

    model = jamba()
    family = family_for_config(model.config)
    for drop in ([1], [0, 2, 3, 4], [2, 3]):
        plan = identity_plan(family, model.config)
        plan.drop_blocks = drop
        with pytest.raises(HypruneError, match="period of 4 layers"):
            validate_plan(plan, family, model.config)
    for drop in ([3, 4, 5, 6], [6, 7], [0, 1, 2, 3]):  # whole periods, or the last layers
        plan = identity_plan(family, model.config)
        plan.drop_blocks = drop
        validate_plan(plan, family, model.config)
    with pytest.raises(HypruneError, match="contiguous"):
        check_depth_request(family, model.config, 4, mode="lowest")
    with pytest.raises(HypruneError, match="multiple of 4"):
        check_depth_request(family, model.config, 2, mode="contiguous")
    check_depth_request(family, model.config, 4, mode="contiguous")


def test_mlp_and_expert_widths_share_one_field():
    model = jamba()
    family = family_for_config(model.config)
    plan = random_plan(model, random.Random(0), ffn=8)  # the experts keep 16
    with pytest.raises(HypruneError, match="one config field, intermediate_size"):
        validate_plan(plan, family, model.config)


def test_inspect_counts_every_parameter(tmp_path):
    from hyprune.api import inspect_model

    model = jamba()
    model.save_pretrained(tmp_path)
    info = inspect_model(str(tmp_path))
    assert info["family"] == "jamba" and info["pattern"] == "MM*MMM*M"
    params = dict(info["parameters"])
    assert params["mamba"] > 0 and params["moe"] > 0 and "other" not in params
    assert params.pop("total") == sum(p.numel() for p in model.parameters()) == sum(params.values())


def test_cli_depth_by_whole_periods(tmp_path, tiny_tokenizer, calib_txt):
    from typer.testing import CliRunner

    from conftest import TOKENIZER_VOCAB
    from hyprune.cli import app

    jamba(vocab_size=TOKENIZER_VOCAB).save_pretrained(tmp_path / "j")
    tiny_tokenizer.save_pretrained(tmp_path / "j")
    runner = CliRunner()
    common = ["--data", str(calib_txt), "--seq-len", "16", "--num-samples", "4", "--quiet"]
    refused = runner.invoke(app, ["prune", str(tmp_path / "j"), "--drop-blocks", "4", *common,
                                  "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "--depth-mode contiguous" in " ".join(refused.stderr.split())
    result = runner.invoke(app, ["prune", str(tmp_path / "j"), "--drop-blocks", "4", "--depth-mode", "contiguous",
                                 "--target", "mamba_d_state=2,num_experts=2", *common, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (pruned.config.num_hidden_layers, pruned.config.num_experts, pruned.config.mamba_d_state) == (4, 2, 2)


def test_analytic_cache_bytes_match_a_real_cache():
    from hyprune.evaluate import cache_bytes, measured_cache_bytes

    model = jamba()
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    from hyprune.compat import cache_argument, output_cache

    cache = output_cache(model(ids, use_cache=True), cache_argument(model))
    analytic = cache_bytes(model.config, family_for_config(model.config), 7)
    assert analytic["mamba_ssm"] > 0 and analytic["total"] == measured_cache_bytes(cache)


def test_one_expert_means_dense_layers(ids):
    """With num_experts=1 Jamba builds a dense MLP in every layer: no expert axes, one period of attention."""
    model = jamba(num_experts=1, num_experts_per_tok=1)
    family = family_for_config(model.config)
    assert all(kind.endswith("+mlp") for kind in family.block_kinds(model.config))
    assert "experts" not in family.sizes(model.config) and family.depth_period(model.config) == 4
    with pytest.raises(HypruneError, match="no MoE blocks"):
        resolve_target(family, model.config, {"num_experts": 1})
    plan = random_plan(model, random.Random(1), ffn=8, drop=[4, 5, 6, 7])
    assert rel_err(apply_plan(model, plan)(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_experts_cannot_shrink_to_one():
    model = jamba(num_experts_per_tok=1)
    with pytest.raises(HypruneError, match="at least 2 experts"):
        resolve_target(family_for_config(model.config), model.config, {"num_experts": 1})
