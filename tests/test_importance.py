"""Activation importance finds planted answers; group-aware planning keeps heads in their groups."""

from __future__ import annotations

import torch

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.importance import ChannelStat, activation_scores
from hyprune.plan import make_plan, plan_mamba_layer

from test_exactness import nemotron


def _windows(n=6, seq=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, seq), generator=g)


def test_channel_stat_is_mean_over_seq_then_l2_over_batch():
    a = torch.randn(5, 7, 3)
    stat = ChannelStat()
    stat.add(a[:2])
    stat.add(a[2:])  # batches accumulate: no per-token storage, same result as one pass
    expected = a.abs().mean(dim=1).pow(2).sum(dim=0).sqrt()
    torch.testing.assert_close(stat.score(), expected)


def test_scores_do_not_depend_on_batch_size():
    model = nemotron(2, 4, True)
    family = family_for_config(model.config)
    a = activation_scores(model, _windows(), family, batch_size=1, progress=False)
    b = activation_scores(model, _windows(), family, batch_size=6, progress=False)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_planted_mamba_heads_rank_last_and_are_pruned():
    model = nemotron(2, 4, False)  # 8 heads in 2 groups
    mixer = model.model.layers[0].mixer
    H, P = mixer.num_heads, mixer.head_dim
    dead = [1, 2, 6]  # two dead heads in group 0, one in group 1
    with torch.no_grad():
        for h in dead:
            mixer.in_proj.weight[H * P + h * P : H * P + (h + 1) * P] = 0  # x rows of head h
    family = family_for_config(model.config)
    scores = activation_scores(model, _windows(), family, progress=False)
    head_score = scores["layers.0.mamba_x"].norm(dim=1)
    assert set(torch.argsort(head_score)[:3].tolist()) == set(dead)
    plan = make_plan(family, model.config, scores, {"mamba_num_heads": 4})
    kept = plan.layers[0].heads
    assert not set(kept) & set(dead)
    assert sorted(h // 4 for h in kept) == [0, 0, 1, 1]  # two heads in each group


def test_planted_state_ffn_and_hidden_channels_are_pruned():
    model = nemotron(2, 4, True)
    backbone = model.model
    mixer = backbone.layers[0].mixer
    H, P, G, N = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    I = H * P
    dead_state, dead_ffn, dead_hidden = 4, [3, 30], 7
    with torch.no_grad():
        for g in range(G):  # B and C rows of state 4 in every group, in every Mamba layer
            for layer in (backbone.layers[0], backbone.layers[3]):
                layer.mixer.in_proj.weight[2 * I + g * N + dead_state] = 0
                layer.mixer.in_proj.weight[2 * I + G * N + g * N + dead_state] = 0
        for layer in (backbone.layers[1], backbone.layers[4]):
            layer.mixer.up_proj.weight[dead_ffn] = 0
        # hidden channel 7 never receives anything: embedding column and every block's output row
        backbone.embeddings.weight[:, dead_hidden] = 0
        for layer in backbone.layers:
            for name in ("out_proj", "down_proj", "o_proj"):
                if hasattr(layer.mixer, name):
                    getattr(layer.mixer, name).weight[dead_hidden] = 0
    family = family_for_config(model.config)
    scores = activation_scores(model, _windows(), family, progress=False)
    plan = make_plan(family, model.config, scores,
                     {"ssm_state_size": 5, "intermediate_size": 38, "hidden_size": 23})
    assert dead_state not in plan.layers[0].state and dead_state not in plan.layers[3].state
    assert not set(dead_ffn) & set(plan.layers[1].ffn)
    assert dead_hidden not in plan.hidden


def test_group_aware_ranking_keeps_best_heads_of_every_group():
    # group 0 holds the 4 best heads overall; group-blind top-4 would empty group 1
    x_score = torch.tensor([[9.0], [8.0], [7.0], [6.0], [1.0], [4.0], [2.0], [3.0]])
    bc_score = torch.ones(2, 2, 3)
    lp = plan_mamba_layer(x_score, bc_score, {"mamba_heads": 4, "mamba_head_dim": 1, "ssm_state": 3,
                                              "mamba_groups": 2})
    assert lp.heads == [0, 1, 5, 7]
    assert lp.groups == [0, 1]


def test_kept_heads_keep_their_group_b_and_c():
    model = nemotron(4, 2, False, seed=7)
    family = family_for_config(model.config)
    scores = activation_scores(model, _windows(), family, progress=False)
    plan = make_plan(family, model.config, scores, {"mamba_num_heads": 4, "n_groups": 2})
    pruned = apply_plan(model, plan)
    old, new = model.model.layers[0].mixer, pruned.model.layers[0].mixer
    lp = plan.layers[0]
    assert [h // 2 for h in lp.heads] == [g for g in lp.groups for _ in range(2)]
    I_old, I_new, N = old.num_heads * old.head_dim, new.num_heads * new.head_dim, old.ssm_state_size
    for j, g in enumerate(lp.groups):  # new group j is old group g, with its B and C untouched
        for offset_old, offset_new in ((2 * I_old, 2 * I_new), (2 * I_old + 4 * N, 2 * I_new + 2 * N)):
            torch.testing.assert_close(new.in_proj.weight[offset_new + j * N : offset_new + (j + 1) * N],
                                       old.in_proj.weight[offset_old + g * N : offset_old + (g + 1) * N])
    # the groups kept are the two with the largest L2 over their heads
    group_score = scores["layers.0.mamba_x"].norm(dim=1).view(4, 2).norm(dim=1)
    assert lp.groups == sorted(torch.argsort(group_score, descending=True)[:2].tolist())
