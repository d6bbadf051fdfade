"""NemotronH MoE blocks (``E``): routed experts, their width, the shared expert, against masked references.

The reference is the original HF model with what the plan removes masked instead of sliced (see
`masking.mask_moe`): a removed expert gets a -inf ``e_score_correction_bias`` (the sigmoid router then
never picks it, and the kept experts' weights are unchanged), removed expert neurons and shared-expert
neurons are zeroed in their down projections, and the Mamba, attention and hidden axes are masked as in
the other families' tests. The router's expert groups (``n_group``) are exercised with 2 groups.
Granite's MoE runs in tests/test_hybrid_decoder.py.
"""

from __future__ import annotations

import copy
import json
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

from masking import (assert_roundtrip_generates, inner_mask, mask_moe, masked_gated_norm, masked_rmsnorm, random_plan,
                     randomized, rel_err, skip_block, zero_removed_bc, zero_removed_query_heads)

VOCAB = 64


def nemotron_moe(seed=0, latent=None, **overrides):
    """Tiny NemotronH with pattern M E * E -: 8 experts in 2 router groups, top-2 of 1 group, a shared expert."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=24,
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "mlp"],
        mamba_num_heads=4, mamba_head_dim=4, n_groups=2, ssm_state_size=4, intermediate_size=20,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4, chunk_size=4,
        n_routed_experts=8, moe_intermediate_size=16, moe_shared_expert_intermediate_size=10, moe_latent_size=latent,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.7, norm_topk_prob=True,
        initializer_range=0.1, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    model = randomized(AutoModelForCausalLM.from_config(transformers.NemotronHConfig(**kwargs)))
    with torch.no_grad():  # the router starts at zero: give it real, distinct choices
        for block in model.model.layers:
            if hasattr(block.mixer, "gate"):
                block.mixer.gate.weight.normal_(0, 0.5)
                block.mixer.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


def masked_reference(model, plan):
    c = model.config
    sizes = family_for_config(c).sizes(c)
    ref = copy.deepcopy(model)
    hidden = torch.zeros(c.hidden_size)
    hidden[plan.hidden] = 1
    gone = hidden == 0
    with torch.no_grad():
        ref.model.embeddings.weight[:, gone] = 0
        for lp, block in zip(plan.layers, ref.model.layers):
            block.norm.forward = masked_rmsnorm(block.norm, hidden)
            mixer = block.mixer
            if lp.kind == "mamba":
                mixer.norm.forward = masked_gated_norm(mixer.norm, inner_mask(lp, sizes), sizes["mamba_groups"])
                zero_removed_bc(mixer, lp, sizes)
                mixer.out_proj.weight[gone] = 0
            elif lp.kind == "attention":
                zero_removed_query_heads(mixer, lp.query_heads, c.num_attention_heads, c.head_dim)
                mixer.o_proj.weight[gone] = 0
            elif lp.kind == "mlp":
                mixer.down_proj.weight[:, [f for f in range(sizes["ffn"]) if f not in lp.ffn]] = 0
                mixer.down_proj.weight[gone] = 0
            else:
                mask_moe(mixer, lp, sizes, gone)
        ref.model.norm_f.forward = masked_rmsnorm(ref.model.norm_f, hidden)
    for i in plan.drop_blocks:
        ref.model.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("latent", [None, 8])
def test_identity_is_exact(latent, ids):
    model = nemotron_moe(latent=latent)
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


def test_routing_is_not_trivial(ids):
    """The references below only mean something if removing experts changes the routing."""
    model = nemotron_moe()
    plan = random_plan(model, random.Random(0), experts=4)
    assert rel_err(masked_reference(model, plan)(ids).logits, model(ids).logits) > 1e-2


@pytest.mark.parametrize("what", [
    dict(experts=4), dict(experts=6, expert_ffn=8), dict(expert_ffn=8, shared_ffn=4),
    dict(hidden=16, experts=4, expert_ffn=8, shared_ffn=6, attn_per_kv=1, ffn=13),
    dict(experts=4, drop=[1]), dict(hidden=8, state=3, head_dim=3, experts=6, drop=[4]),
])
def test_pruning_matches_masked_reference(what, ids):
    model = nemotron_moe(seed=len(what))
    plan = random_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_latent_experts_prune_hidden_through_the_latent_projections(ids):
    """With ``moe_latent_size`` the experts work in the latent space; hidden pruning cuts fc1/fc2 only."""
    model = nemotron_moe(latent=8)
    plan = random_plan(model, random.Random(1), hidden=12, experts=4, expert_ffn=8)
    pruned = apply_plan(model, plan)
    assert pruned.model.layers[1].mixer.experts.up_proj.shape == (4, 8, 8)
    assert pruned.model.layers[1].mixer.fc1_latent_proj.weight.shape == (8, 12)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_minitron_plan_roundtrips_and_generates(tmp_path):
    model = nemotron_moe()
    family = family_for_config(model.config)
    windows = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    assert scores["layers.1.expert_ffn"].shape == (8, 16) and scores["layers.1.experts"].shape == (8,)
    assert scores["layers.1.shared_ffn"].shape == (10,)
    assert (scores["layers.1.experts"] > 0).sum() >= 2  # the routed experts were seen
    target = {"n_routed_experts": 4, "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 6,
              "hidden_size": 16}
    plan = make_plan(family, model.config, scores, target, drop_blocks=[4])
    # the best-scored experts of each router group are kept
    for lp, i in ((plan.layers[1], 1), (plan.layers[3], 3)):
        score = scores[f"layers.{i}.experts"]
        for g in (0, 1):
            kept = [e for e in lp.experts if e // 4 == g]
            assert len(kept) == 2 and min(score[kept]) >= max(score[[e for e in range(4 * g, 4 * g + 4)
                                                                      if e not in kept]])
    pruned = apply_plan(model, plan)
    c = pruned.config
    assert (c.n_routed_experts, c.moe_intermediate_size, c.moe_shared_expert_intermediate_size) == (4, 8, 6)
    assert c.layers_block_type == ["linear_attention", "moe", "full_attention", "moe"]
    assert_roundtrip_generates(pruned, tmp_path, vocab=VOCAB)


@pytest.mark.parametrize("target, message", [
    ({"n_routed_experts": 1}, "below num_experts_per_tok"),
    ({"n_routed_experts": 5}, "not divisible by n_group"),
    ({"moe_intermediate_size": 17}, "larger than the source"),
    ({"moe_intermediate_size": 12}, "multiples of 8"), ({"hidden_size": 20}, "multiples of 8"),
])
def test_impossible_expert_targets_are_rejected(target, message):
    model = nemotron_moe()
    with pytest.raises(HypruneError, match=message):
        resolve_target(family_for_config(model.config), model.config, target)


def test_router_group_limits_are_rejected():
    # 4 groups of 2: keeping 4 experts leaves 1 per group, which the router's top-2 group score cannot rank
    model = nemotron_moe(n_group=4, topk_group=2)
    family = family_for_config(model.config)
    with pytest.raises(HypruneError, match="two best experts"):
        resolve_target(family, model.config, {"n_routed_experts": 4})
    # 2 groups, topk_group 1, top-4 routing: each group must keep 4
    model = nemotron_moe(num_experts_per_tok=4)
    with pytest.raises(HypruneError, match="topk_group"):
        resolve_target(family_for_config(model.config), model.config, {"n_routed_experts": 6})


def test_uneven_expert_plans_are_rejected():
    model = nemotron_moe()
    family = family_for_config(model.config)
    plan = identity_plan(family, model.config)
    plan.layers[1].experts = [0, 1, 2, 4, 5]  # 3 from group 0, 2 from group 1
    plan.layers[1].expert_ffn = plan.layers[1].expert_ffn[:5]
    with pytest.raises(HypruneError, match="same number of experts"):
        validate_plan(plan, family, model.config)
    plan = identity_plan(family, model.config)
    plan.layers[1].expert_ffn[0] = plan.layers[1].expert_ffn[0][:5]
    with pytest.raises(HypruneError, match="same number of FFN neurons"):
        validate_plan(plan, family, model.config)


def test_dense_model_has_no_experts_to_prune(nemotron_config):
    config = nemotron_config()
    with pytest.raises(HypruneError, match="no MoE blocks"):
        resolve_target(family_for_config(config), config, {"n_routed_experts": 4})


def test_cli_prunes_experts_and_depth(tmp_path, tiny_tokenizer, calib_txt):
    from typer.testing import CliRunner

    from conftest import TOKENIZER_VOCAB
    from hyprune.cli import app

    model = nemotron_moe()
    model.config.vocab_size = TOKENIZER_VOCAB
    model.resize_token_embeddings(TOKENIZER_VOCAB)
    model.save_pretrained(tmp_path / "moe")
    tiny_tokenizer.save_pretrained(tmp_path / "moe")
    runner = CliRunner()
    info = runner.invoke(app, ["inspect", str(tmp_path / "moe"), "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["pattern"] == "ME*E-" and data["sizes"]["n_routed_experts"] == 8 and data["parameters"]["moe"] > 0
    result = runner.invoke(app, ["prune", str(tmp_path / "moe"), "--data", str(calib_txt), "--target",
                                 "n_routed_experts=4,moe_intermediate_size=8", "--drop-blocks", "1",
                                 "--depth-method", "kl", "--seq-len", "16", "--num-samples", "4", "--quiet",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pruned.config.n_routed_experts == 4 and len(pruned.config.layers_block_type) == 4
    refused = runner.invoke(app, ["prune", str(tmp_path / "moe"), "--data", str(calib_txt), "--target",
                                  "n_routed_experts=1", "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "num_experts_per_tok" in " ".join(refused.stderr.split())
    assert not (tmp_path / "bad").exists()


def test_expert_scores_equal_a_dense_reference():
    """Routing-weighted expert scores against a dense [tokens, experts] computation from the router's choices."""
    model = nemotron_moe()
    family = family_for_config(model.config)
    windows = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))
    moe = model.model.layers[1].mixer
    seen = []
    handle = moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    scores = activation_scores(model, windows, family, batch_size=2, progress=False)
    handle.remove()
    x = torch.cat(seen)  # [samples, seq, hidden]: the MoE block's input in every batch
    with torch.no_grad():
        _, weight, index = moe.gate(x)  # [tokens, top_k]
        routed = torch.zeros(x.shape[0] * x.shape[1], 8, dtype=torch.float64)
        routed.scatter_(1, index, weight.double())  # [tokens, experts]; 0 where not routed
        up = torch.einsum("th,efh->tef", x.reshape(-1, 24).double(), moe.experts.up_proj.double())
        inner = torch.relu(up).pow(2)  # relu2, [tokens, experts, ffn]
        out = torch.einsum("tef,ehf->teh", inner, moe.experts.down_proj.double())
    per_sample = lambda t: t.view(x.shape[0], x.shape[1], *t.shape[1:]).mean(1)  # noqa: E731
    ffn_ref = per_sample(inner * routed[..., None]).pow(2).sum(0).sqrt()  # [experts, ffn]
    expert_ref = per_sample(out.norm(dim=-1) * routed).pow(2).sum(0).sqrt()  # [experts]
    assert torch.allclose(scores["layers.1.expert_ffn"].double(), ffn_ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(scores["layers.1.experts"].double(), expert_ref, rtol=1e-4, atol=1e-7)


def test_dense_fingerprint_ignores_expert_fields(nemotron_config):
    """Plans made for dense NemotronH models before MoE support still match: no expert axes in the sizes."""
    from hyprune.plan import fingerprint

    config = nemotron_config()
    assert not {"experts", "expert_ffn", "shared_expert_ffn"} & set(fingerprint(family_for_config(config), config)["sizes"])
