"""The structured SSM methods of Ghattas et al. (hyprune.methods.ssm) against independent computations.

- State and head-channel scores equal a by-hand recomputation with autograd (loops over groups and
  rows, not the module's index tensors), and the plans keep exactly their top units.
- The pruned models equal the float64 masked reference of tests/reference.py.
- head-merge equals the reference run on a copy of the source whose B/C weights are pooled by hand,
  every head reading its merged group (and the gated norm grouped the new way).
- ssm-flap's out_proj bias equals W[:, removed] @ mean(removed inputs), from captured activations.
- CLI end to end for every method, and the refusals.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hyprune.arch import family_for_config
from hyprune.methods import MethodOptions, get_method
from hyprune.plan import top_k

from masking import rel_err
from reference import masks_from_plan, reference_logits
from test_cli import FAST, assert_generates, assert_refused, invoke, load_checked, ok
from test_exactness import mamba2, nemotron


@pytest.fixture
def windows():
    torch.manual_seed(3)
    return torch.randint(0, 64, (4, 10))


def run(model, name, windows, ratio, batch_size=2, seed=0):
    family = family_for_config(model.config)
    method = get_method(name)
    options = MethodOptions(ratio=ratio, seed=seed)
    method.check(family, model.config, options)
    return method.run(model, family, windows, options, batch_size=batch_size, progress=False)


def mamba_layers(model):
    return [i for i, kind in enumerate(family_for_config(model.config).block_kinds(model.config)) if kind == "mamba"]


def by_hand_taylor(model, windows, batch_size, rows_of_unit):
    """Per Mamba layer and unit: (sum_batches sum w*g, mean_batches sum (w*g)^2) over the unit's in_proj rows."""
    layers = mamba_layers(model)
    weights = [model.model.layers[i].mixer.in_proj.weight for i in layers]
    first = {i: {} for i in layers}
    second = {i: {} for i in layers}
    batches = list(windows.split(batch_size))
    for batch in batches:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        grads = torch.autograd.grad(loss, weights)
        for i, w, g in zip(layers, weights, grads):
            wg = (w.detach() * g).double()
            for unit, rows in rows_of_unit(model.model.layers[i].mixer).items():
                first[i][unit] = first[i].get(unit, 0.0) + sum(wg[r].sum() for r in rows)
                second[i][unit] = second[i].get(unit, 0.0) + sum(wg[r].pow(2).sum() for r in rows) / len(batches)
    return first, second


def state_rows(mixer):
    """State n -> its B and C rows in every group, listed one by one."""
    I, G, N = mixer.num_heads * mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    return {n: [2 * I + g * N + n for g in range(G)] + [2 * I + G * N + g * N + n for g in range(G)] for n in range(N)}


def channel_rows(mixer):
    """Head channel p -> its z and x rows in every head."""
    H, P = mixer.num_heads, mixer.head_dim
    return {p: [h * P + p for h in range(H)] + [H * P + h * P + p for h in range(H)] for p in range(P)}


def as_tensor(per_unit: dict) -> torch.Tensor:
    return torch.tensor([float(per_unit[k]) for k in sorted(per_unit)])


def assert_matches_reference(source, result, ids, tol=1e-5):
    family = family_for_config(source.config)
    masks = masks_from_plan(result.plan, family.sizes(source.config))
    assert rel_err(result.model(ids).logits, reference_logits(source, ids, masks, family)) < tol


@pytest.mark.parametrize("name", ["state-taylor1", "state-taylor2"])
def test_state_taylor_scores_and_choice_match_autograd(name, windows):
    model = nemotron(2, 3, True, seed=5)
    source = copy.deepcopy(model)
    first, second = by_hand_taylor(model, windows, 2, state_rows)
    result = run(model, name, windows, ratio=0.5)
    hidden = model.config.hidden_size
    for i in mamba_layers(model):
        expected = as_tensor(first[i]).abs() if name == "state-taylor1" else as_tensor(second[i]) / hidden
        kept = top_k(expected, 3)
        assert result.plan.layers[i].state == kept
        entry = next(e for e in result.report["layers"] if e["layer"] == i)
        assert entry["removed"] == sorted(set(range(6)) - set(kept))
        assert entry["score"]["max"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert result.model.config.ssm_state_size == 3
    assert_matches_reference(source, result, windows)


def test_state_magnitude_and_random(windows):
    model = nemotron(2, 2, False, seed=2)
    result = run(copy.deepcopy(model), "state-magnitude", None, ratio=0.5)
    for i in mamba_layers(model):
        mixer = model.model.layers[i].mixer
        norms = torch.tensor([sum(mixer.in_proj.weight[r].double().pow(2).sum() for r in rows).sqrt().item()
                              for rows in state_rows(mixer).values()])
        assert result.plan.layers[i].state == top_k(norms, 3)
    picks = [run(copy.deepcopy(model), "state-random", None, ratio=0.5, seed=s).plan.layers[0].state
             for s in (0, 0, 1, 2)]
    assert picks[0] == picks[1] and len(set(map(tuple, picks))) > 1  # seeded: reproducible, varies with the seed


def test_headdim_taylor_matches_autograd_and_reference(windows):
    model = nemotron(2, 2, True, seed=7)
    source = copy.deepcopy(model)
    _, second = by_hand_taylor(model, windows, 2, channel_rows)
    result = run(model, "headdim-taylor", windows, ratio=0.5)
    for i in mamba_layers(model):
        assert result.plan.layers[i].head_dim == top_k(as_tensor(second[i]), 2)
    assert result.model.config.mamba_head_dim == 2
    assert_matches_reference(source, result, windows)


def pooled_by_hand(model, groups_left):
    """A copy whose B/C in_proj rows and conv channels hold the mean of their run of consecutive groups
    (written into every group of the run), and the group each head reads afterwards."""
    ref = copy.deepcopy(model)
    family = family_for_config(model.config)
    layers = family.layers(ref)
    G = family.sizes(model.config)["mamba_groups"]
    run_len = G // groups_left
    for i in mamba_layers(ref):
        mixer = layers[i].mixer
        I, N = mixer.num_heads * mixer.head_dim, mixer.ssm_state_size
        with torch.no_grad():
            for part in (0, 1):  # B, C
                for c in range(groups_left):
                    members = range(c * run_len, (c + 1) * run_len)
                    rows = [[2 * I + part * G * N + g * N + n for n in range(N)] for g in members]
                    mean_w = sum(mixer.in_proj.weight[r] for r in rows) / run_len
                    conv = [[I + part * G * N + g * N + n for n in range(N)] for g in members]
                    mean_c = sum(mixer.conv1d.weight[r] for r in conv) / run_len
                    mean_b = sum(mixer.conv1d.bias[r] for r in conv) / run_len
                    for r, cr in zip(rows, conv):
                        mixer.in_proj.weight[r] = mean_w
                        mixer.conv1d.weight[cr] = mean_c
                        mixer.conv1d.bias[cr] = mean_b
    H = family.sizes(model.config)["mamba_heads"]
    group_of_head = torch.tensor([(h // (H // groups_left)) * run_len for h in range(H)])
    return ref, group_of_head


@pytest.mark.parametrize("build,ratio,groups_left", [(lambda: nemotron(4, 2, True, seed=9), 0.5, 2),
                                                     (lambda: nemotron(4, 2, False, seed=4), 0.75, 1),
                                                     (lambda: mamba2(groups=2, seed=3), 0.5, 1)])
def test_head_merge_matches_pooled_reference(build, ratio, groups_left, windows):
    model = build()
    family = family_for_config(model.config)
    source = copy.deepcopy(model)
    ref, group_of_head = pooled_by_hand(model, groups_left)
    result = run(model, "head-merge", None, ratio=ratio)  # pools the loaded model in place
    assert result.model.config.n_groups == groups_left
    masks = masks_from_plan(result.plan, family.sizes(model.config))
    for lp, layer in zip(result.plan.layers, masks["layers"]):
        if lp.kind == "mamba":
            layer["group_of_head"] = group_of_head
    expected = reference_logits(ref, windows, masks, family)
    assert rel_err(result.model(windows).logits, expected) < 1e-5
    # and merging changed the function: the unmerged reference is far off
    assert rel_err(result.model(windows).logits, reference_logits(source, windows, masks, family)) > 1e-3


def test_ssm_flap_compensation_and_heads(windows):
    model = nemotron(2, 4, True, seed=11)
    source = copy.deepcopy(model)
    captured = {i: [] for i in mamba_layers(model)}
    handles = [model.model.layers[i].mixer.out_proj.register_forward_pre_hook(
        lambda m, args, i=i: captured[i].append(args[0].detach().double().reshape(-1, args[0].shape[-1])))
        for i in captured]
    with torch.no_grad():
        for batch in windows.split(2):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    result = run(model, "ssm-flap", windows, ratio=0.5)
    P = model.config.mamba_head_dim
    for i, chunks in captured.items():
        x = torch.cat(chunks)  # [tokens, I]
        weight = source.model.layers[i].mixer.out_proj.weight.detach().double()
        fluct = x.var(dim=0) * weight.pow(2).sum(dim=0)
        head_score = ((fluct - fluct.mean()) / fluct.std()).view(-1, P).mean(dim=1)
        kept = sorted(top_k(head_score[:4], 2) + [4 + h for h in top_k(head_score[4:], 2)])
        assert result.plan.layers[i].heads == kept
        removed = [h * P + p for h in range(8) if h not in kept for p in range(P)]
        mixer = result.model.model.layers[i].mixer
        expected = weight[:, removed] @ x[:, removed].mean(dim=0)
        assert torch.allclose(mixer.out_proj.bias.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(mixer.in_proj.bias) == 0
        assert expected.norm() > 1e-3  # the check has teeth: the compensation is not ~0
    assert result.model.config.use_bias and result.model.config.mamba_num_heads == 4
    # apart from the bias the pruned model is the plan's exact cut (reference reads out_proj.bias)
    biased = copy.deepcopy(source)
    for i in captured:
        mixer = biased.model.layers[i].mixer
        mixer.out_proj.bias = torch.nn.Parameter(result.model.model.layers[i].mixer.out_proj.bias.detach().clone())
    assert_matches_reference(biased, result, windows)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,config_field,expected", [
    ("state-taylor2", "ssm_state_size", 3), ("state-taylor1", "ssm_state_size", 3),
    ("state-magnitude", "ssm_state_size", 3), ("state-random", "ssm_state_size", 3),
    ("headdim-taylor", "mamba_head_dim", 2), ("head-merge", "n_groups", 1), ("ssm-flap", "mamba_num_heads", 4)])
def test_cli_end_to_end(name, config_field, expected, tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / name
    ok(invoke("prune", nemotron_dir, "--data", calib_txt, "--method", name, "--ratio", "0.5", "--out", out, *FAST))
    assert getattr(load_checked(out).config, config_field) == expected
    summary = json.loads((out / "hyprune_summary.json").read_text())
    assert summary["method"]["name"] == name and summary["method"]["ratio"] == 0.5
    assert summary["parameters"]["after"]["total"] < summary["parameters"]["before"]["total"]
    assert json.loads((out / "plan.json").read_text())["method"] == name
    assert_generates(out)


@pytest.mark.parametrize("name,config_field,expected",
                         [("state-taylor2", "state_size", 3), ("head-merge", "n_groups", 1)])
def test_cli_mamba2(name, config_field, expected, tmp_path, mamba2_dir, calib_txt):
    out = tmp_path / name
    ok(invoke("prune", mamba2_dir, "--data", calib_txt, "--method", name, "--ratio", "0.5", "--out", out, *FAST))
    assert getattr(load_checked(out).config, config_field) == expected
    assert_generates(out)


@pytest.mark.parametrize("args,phrases", [
    ((), ["needs --ratio"]),
    (("--ratio", "1.5"), ["strictly between 0 and 1"]),
    (("--ratio", "0"), ["strictly between 0 and 1"]),
    (("--ratio", "0.5", "--sparsity", "0.5"), ["takes --ratio, not --sparsity"]),
])
def test_cli_refuses_bad_ratio(args, phrases, tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    assert_refused(invoke("prune", nemotron_dir, "--data", calib_txt, "--method", "state-taylor2", *args, "--out", out),
                   out, *phrases)


def test_cli_refuses_models_and_axes_it_cannot_express(tmp_path, nemotron_dir, mamba2_dir, llama_dir, calib_txt):
    out = tmp_path / "out"
    common = ("--data", calib_txt, "--ratio", "0.5", "--out", out)
    assert_refused(invoke("prune", llama_dir, "--method", "state-taylor2", *common), out, "has none")
    for name in ("headdim-taylor", "ssm-flap"):
        assert_refused(invoke("prune", mamba2_dir, "--method", name, *common), out, "ties the Mamba width")
    # 2 groups: removing a quarter keeps round(1.5) = 2, nothing merged
    assert_refused(invoke("prune", nemotron_dir, "--method", "head-merge", "--data", calib_txt, "--ratio", "0.25",
                          "--out", out), out, "must remove at least one")
    assert_refused(invoke("prune", nemotron_dir, "--method", "state-taylor2", "--ratio", "0.5", "--out", out),
                   out, "needs calibration text")
