"""Pruned model == independent reference computation, on tiny random models of several shapes.

- A keep-everything plan reproduces the original logits exactly.
- Removing whole groups or SSM states equals zeroing the same weights (bit-exact up to fp32 rounding).
- Removing heads, head channels, hidden channels, FFN neurons and attention heads equals the reference
  forward of tests/reference.py (masks, gated-norm statistic over kept channels) to 1e-5 relative.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, NemotronHConfig

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.plan import LayerPlan, Plan, fingerprint, identity_plan

from masking import randomized, rel_err
from reference import masks_from_plan, reference_logits

HYBRID = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]
MAMBA_MLP = ["linear_attention", "mlp", "linear_attention", "mlp"]

# (n_groups, heads per group, with attention)
SHAPES = [(1, 2, True), (2, 4, False), (4, 2, True), (2, 8, True), (4, 3, False)]


def nemotron(groups: int, per_group: int, attention: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=64, hidden_size=24, layers_block_type=HYBRID if attention else MAMBA_MLP,
        mamba_num_heads=groups * per_group, mamba_head_dim=4, n_groups=groups, ssm_state_size=6,
        intermediate_size=40, num_attention_heads=6, num_key_value_heads=2, head_dim=8, chunk_size=4,
        use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    return randomized(AutoModelForCausalLM.from_config(config))


def mamba2(groups: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=64, hidden_size=24, num_heads=6, head_dim=8, expand=2, n_groups=groups,
                          state_size=6, num_hidden_layers=2, chunk_size=4, use_cache=False)
    return randomized(AutoModelForCausalLM.from_config(config))


def _subset(rng, n, k):
    return sorted(rng.sample(range(n), k))


def random_plan(model, rng, keep_groups=None, mamba_heads=None, head_dim=None, state=None, hidden=None, ffn=None,
                attn_per_kv=None, drop_blocks=()):
    """A random valid plan; ``None`` keeps an axis whole."""
    family = family_for_config(model.config)
    plan = identity_plan(family, model.config)
    s = family.sizes(model.config)
    if hidden is not None:
        plan.hidden = _subset(rng, s["hidden"], hidden)
    layers = []
    for lp in plan.layers:
        lp = lp.model_copy(deep=True)
        if lp.kind == "mamba":
            per_group = s["mamba_heads"] // s["mamba_groups"]
            if keep_groups is not None:
                lp.groups = _subset(rng, s["mamba_groups"], keep_groups)
            k = mamba_heads if mamba_heads is not None else per_group
            lp.heads = [g * per_group + i for g in lp.groups for i in _subset(rng, per_group, k)]
            if head_dim is not None:
                lp.head_dim = _subset(rng, s["mamba_head_dim"], head_dim)
            if state is not None:
                lp.state = _subset(rng, s["ssm_state"], state)
        elif lp.kind == "attention" and attn_per_kv is not None:
            per_kv = s["attention_heads"] // s["kv_heads"]
            lp.query_heads = [g * per_kv + i for g in lp.kv_heads for i in _subset(rng, per_kv, attn_per_kv)]
        elif lp.kind == "mlp" and ffn is not None:
            lp.ffn = _subset(rng, s["ffn"], ffn)
        layers.append(lp)
    plan.layers = layers
    plan.drop_blocks = list(drop_blocks)
    return plan


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 11))  # 11 is not a multiple of chunk_size: padding path covered


@pytest.mark.parametrize("groups,per_group,attention", SHAPES)
def test_identity_plan_reproduces_logits_exactly(groups, per_group, attention, ids):
    model = nemotron(groups, per_group, attention)
    family = family_for_config(model.config)
    pruned = apply_plan(model, identity_plan(family, model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


def test_reference_matches_unpruned_model(ids):
    """The reference itself must reproduce the HF model when nothing is masked."""
    for model in (nemotron(2, 4, True), mamba2()):
        family = family_for_config(model.config)
        plan = identity_plan(family, model.config)
        ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
        assert rel_err(model(ids).logits, ref) < 1e-5


@pytest.mark.parametrize("groups,per_group,attention", SHAPES)
@pytest.mark.parametrize("axis", ["mamba_heads", "head_dim", "hidden", "ffn", "attention", "all"])
def test_pruning_matches_masked_reference(groups, per_group, attention, axis, ids):
    model = nemotron(groups, per_group, attention, seed=groups * 10 + per_group)
    if axis == "mamba_heads" and per_group == 1:
        pytest.skip("one head per group: nothing to rank inside a group")
    if axis == "attention" and not attention:
        pytest.skip("no attention block in this shape")
    rng = random.Random(f"{groups}-{per_group}-{axis}")
    kw = {
        "mamba_heads": dict(mamba_heads=max(1, per_group // 2)),
        "head_dim": dict(head_dim=3),
        "hidden": dict(hidden=15),
        "ffn": dict(ffn=17),
        "attention": dict(attn_per_kv=2),
        "all": dict(mamba_heads=max(1, per_group - 1), head_dim=2, hidden=13, ffn=9, attn_per_kv=1, state=4,
                    keep_groups=max(1, groups // 2)),
    }[axis]
    plan = random_plan(model, rng, **kw)
    family = family_for_config(model.config)
    pruned = apply_plan(model, plan)
    ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
    assert rel_err(pruned(ids).logits, ref) < 1e-5
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def _zero_mamba(model, layer_plan_by_index, family):
    """Copy of ``model`` with removed groups' and states' weights zeroed (heads of removed groups too)."""
    zeroed = copy.deepcopy(model)
    s = family.sizes(model.config)
    H, P, G, N = s["mamba_heads"], s["mamba_head_dim"], s["mamba_groups"], s["ssm_state"]
    I = H * P
    per_group = H // G
    with torch.no_grad():
        for i, lp in layer_plan_by_index.items():
            mixer = family.layers(zeroed)[i].mixer
            drop_groups = [g for g in range(G) if g not in lp.groups]
            drop_state = [n for n in range(N) if n not in lp.state]
            inner = [h * P + p for g in drop_groups for h in range(g * per_group, (g + 1) * per_group) for p in range(P)]
            bc = sorted({g * N + n for g in drop_groups for n in range(N)} | {g * N + n for g in range(G) for n in drop_state})
            rows = inner + [I + c for c in inner] + [2 * I + c for c in bc] + [2 * I + G * N + c for c in bc]
            conv = inner + [I + c for c in bc] + [I + G * N + c for c in bc]
            mixer.in_proj.weight[rows] = 0
            mixer.conv1d.weight[conv] = 0
            mixer.conv1d.bias[conv] = 0
    return zeroed


@pytest.mark.parametrize("groups,per_group,attention", [(2, 4, True), (4, 2, False), (4, 3, True)])
@pytest.mark.parametrize("what", ["groups", "state", "both"])
def test_removing_groups_or_states_equals_zeroing(groups, per_group, attention, what, ids):
    model = nemotron(groups, per_group, attention, seed=3)
    family = family_for_config(model.config)
    rng = random.Random(what)
    kw = {"groups": dict(keep_groups=groups // 2), "state": dict(state=3),
          "both": dict(keep_groups=groups // 2, state=2)}[what]
    plan = random_plan(model, rng, **kw)
    mamba_layers = {i: lp for i, lp in enumerate(plan.layers) if lp.kind == "mamba"}
    expected = _zero_mamba(model, mamba_layers, family)(ids).logits
    got = apply_plan(model, plan)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_mamba2_family_matches_reference(ids):
    """Mamba2 (coupled width): heads and hidden shrink together; states and groups freely."""
    model = mamba2(groups=2)
    family = family_for_config(model.config)
    rng = random.Random(0)
    # 6 heads x 8 = 48 = expand 2 * hidden 24; keep 4 heads x 6 channels = 24 = 2 * 12 hidden
    plan = random_plan(model, rng, mamba_heads=2, head_dim=6, hidden=12, state=4)
    pruned = apply_plan(model, plan)
    assert pruned.config.hidden_size == 12 and pruned.config.num_heads == 4 and pruned.config.head_dim == 6
    ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
    assert rel_err(pruned(ids).logits, ref) < 1e-5


def test_dropping_blocks_equals_skipping_them(ids):
    model = nemotron(2, 4, True)
    family = family_for_config(model.config)
    plan = random_plan(model, random.Random(0), drop_blocks=[1, 2])
    pruned = apply_plan(model, plan)
    assert pruned.config.layers_block_type == ["linear_attention", "linear_attention", "mlp"]
    ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
    assert rel_err(pruned(ids).logits, ref) < 1e-5


def test_pruned_model_generates_with_cache_like_without():
    model = nemotron(2, 4, True)
    plan = random_plan(model, random.Random(5), mamba_heads=2, head_dim=3, hidden=16, ffn=20, attn_per_kv=2, state=4)
    pruned = apply_plan(model, plan)
    prompt = torch.randint(1, 64, (1, 7))
    with_cache = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = pruned.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)


def test_save_load_roundtrip_is_identical(tmp_path, ids):
    model = nemotron(4, 2, True)
    plan = random_plan(model, random.Random(2), mamba_heads=1, head_dim=3, hidden=16, ffn=20, keep_groups=2)
    pruned = apply_plan(model, plan)
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(loaded(ids).logits, pruned(ids).logits)


def test_input_model_is_untouched(ids):
    model = nemotron(2, 4, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, random_plan(model, random.Random(1), mamba_heads=2, hidden=12, ffn=8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plan_fingerprint_rejects_other_model():
    from hyprune.errors import HypruneError
    from hyprune.plan import validate_plan

    a, b = nemotron(2, 4, True), nemotron(2, 2, True)
    plan = identity_plan(family_for_config(a.config), a.config)
    with pytest.raises(HypruneError, match="another model"):
        validate_plan(plan, family_for_config(b.config), b.config)
    assert plan.source == fingerprint(family_for_config(a.config), a.config)


def test_uneven_heads_per_group_rejected():
    from hyprune.errors import HypruneError

    model = nemotron(2, 4, False)
    plan = identity_plan(family_for_config(model.config), model.config)
    plan.layers[0] = LayerPlan(kind="mamba", heads=[0, 1, 2, 4], head_dim=[0, 1, 2, 3], state=list(range(6)),
                               groups=[0, 1])
    with pytest.raises(HypruneError, match="same number of heads"):
        apply_plan(model, plan)
    assert isinstance(plan, Plan)


@pytest.mark.parametrize("groups,per_group,keep_groups", [(2, 4, 2), (4, 2, 2), (4, 3, 4)])
def test_group_blind_plan_matches_regrouped_reference(groups, per_group, keep_groups, ids):
    """Heads kept from anywhere and handed to the kept groups in order: the pruned model equals the
    reference in which each kept head reads its new group's B/C (and normalises with its new group)."""
    model = nemotron(groups, per_group, True, seed=5)
    family = family_for_config(model.config)
    s = family.sizes(model.config)
    rng = random.Random(f"blind-{groups}-{per_group}")
    plan = random_plan(model, rng, keep_groups=keep_groups, head_dim=3, state=4)
    plan.heads_regrouped = True
    regrouped = 0
    for lp in plan.layers:
        if lp.kind == "mamba":
            lp.heads = _subset(rng, s["mamba_heads"], keep_groups * max(1, per_group - 1))
            new_group = [lp.groups[j // (len(lp.heads) // keep_groups)] for j in range(len(lp.heads))]
            regrouped += sum(g != h // per_group for g, h in zip(new_group, lp.heads))
    assert regrouped > 0, "the random plan should move at least one head to another group"
    pruned = apply_plan(model, plan)
    ref = reference_logits(model, ids, masks_from_plan(plan, s), family)
    assert rel_err(pruned(ids).logits, ref) < 1e-5


def test_group_blind_make_plan_keeps_best_heads_anywhere():
    """The same scores give balanced heads group-aware and the global top heads group-blind."""
    from hyprune.plan import plan_mamba_layer

    x_score = torch.ones(8, 4)
    x_score[[0, 1, 2, 3]] = 10.0  # group 0 (heads 0-3) holds the four best heads
    sizes = {"mamba_heads": 4, "mamba_head_dim": 4, "ssm_state": 6, "mamba_groups": 2}
    bc_score = torch.ones(2, 2, 6)
    aware = plan_mamba_layer(x_score, bc_score, sizes)
    blind = plan_mamba_layer(x_score, bc_score, sizes, group_aware=False)
    assert aware.heads == [0, 1, 4, 5]
    assert blind.heads == [0, 1, 2, 3]


def test_regrouped_heads_must_split_evenly():
    from hyprune.errors import HypruneError

    model = nemotron(2, 4, False)
    plan = identity_plan(family_for_config(model.config), model.config)
    plan.heads_regrouped = True
    plan.layers[0] = LayerPlan(kind="mamba", heads=[0, 1, 2], head_dim=[0, 1, 2, 3], state=list(range(6)),
                               groups=[0, 1])
    with pytest.raises(HypruneError, match="split evenly"):
        apply_plan(model, plan)
