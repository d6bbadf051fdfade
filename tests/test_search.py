"""Architecture search: the candidate space and its budgets, the latency model, the resumable run, the CLI.

Tiny random NemotronH from conftest (hidden 32, FFN 40, 8 Mamba heads in 2 groups x head_dim 4,
4 attention heads / 2 KV, pattern M - * M -); every run takes seconds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import build_model, make_nemotron_config
from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.cli import app
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores
from hyprune.models import count_parameters as real_count
from hyprune.plan import make_plan, resolve_target
from hyprune.report import load_report
from hyprune.search import latency as latency_lib
from hyprune.search import run as run_lib
from hyprune.search.counting import count_parameters, shaped_config
from hyprune.search.space import (blocks_to_drop, drop_options, enumerate_shapes, make_budget, parse_drop, parse_space,
                                  sample, uniform_candidate, within_budget)

runner = CliRunner()
FAST = dict(seq_len=16, num_samples=8, eval_windows=4, batch_size=4, progress=False)
FAST_CLI = ("--seq-len", "16", "--num-samples", "8", "--eval-windows", "4", "--batch-size", "4", "--quiet")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def squash(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def config():
    return make_nemotron_config()


@pytest.fixture(scope="module")
def family(config):
    return family_for_config(config)


# ---------------------------------------------------------------------------------------------
# Space and budget
# ---------------------------------------------------------------------------------------------
def test_enumeration_is_every_expressible_shape_in_the_bounds(config, family):
    """Against an independent brute force: every combination in the bounds the config can express, each drop split."""
    axes = parse_space(family, config, "hidden_size=20:32:4,intermediate_size=30:40:5,mamba_num_heads=4:8,"
                                       "mamba_head_dim=3:4,num_attention_heads=2")
    drops = drop_options(family, config, 0, 2)
    shapes = enumerate_shapes(family, config, axes, drops)
    values = {a.field: set(a.values) for a in axes}
    assert values["hidden_size"] == {20, 24, 28, 32} and values["intermediate_size"] == {30, 35, 40}
    assert values["mamba_num_heads"] == {4, 6, 8}  # multiples of the 2 groups
    assert values["num_attention_heads"] == {2} and values["n_groups"] == {2}
    # depth splits: the attention block is protected, at most 2 blocks in all
    assert sorted(map(lambda d: sorted(d.items()), drops)) == sorted(
        [[], [("mamba", 1)], [("mlp", 1)], [("mamba", 2)], [("mlp", 2)], [("mamba", 1), ("mlp", 1)]])
    expected = 4 * 3 * 3 * 2 * 1 * len(drops)
    assert len(shapes) == expected == len({c.id for c in shapes})
    kinds = family.block_kinds(config)
    for c in shapes:
        resolve_target(family, config, c.target)
        for axis in axes:
            assert c.sizes[axis.axis] in axis.values
        kept = [kinds[i] for i in range(len(kinds)) if i not in blocks_to_drop(kinds, c.drop)]
        assert "attention" in kept
        built = shaped_config(family, config, c.sizes, [i for i in range(len(kinds))
                                                         if i not in blocks_to_drop(kinds, c.drop)])
        assert c.parameters == count_parameters(family, built)["total"]


def test_budget_keeps_only_candidates_within_tolerance(config, family):
    source = count_parameters(family, config)["total"]
    axes = parse_space(family, config, None)
    shapes = enumerate_shapes(family, config, axes, drop_options(family, config, *parse_drop(None, family, config)))
    for tolerance in (0.02, 0.1):
        budget = make_budget(family, config, target_ratio=0.6, tolerance=tolerance)
        kept = within_budget(shapes, budget, source)
        brute = [c for c in shapes if abs(c.parameters - 0.6 * source) <= tolerance * budget.parameters]
        assert {c.id for c in kept} == {c.id for c in brute} and kept
    uniform = uniform_candidate(kept, axes, family.sizes(config), budget)
    ratios = lambda c: [c.sizes[a.axis] / family.sizes(config)[a.axis] for a in axes if len(a.values) > 1]  # noqa: E731
    assert not uniform.drop
    assert max(ratios(uniform)) - min(ratios(uniform)) == min(max(ratios(c)) - min(ratios(c)) for c in kept
                                                              if not c.drop)
    chosen = sample(kept, 5, seed=0, keep=[uniform])
    assert len(chosen) == 5 and uniform in chosen and chosen == sample(kept, 5, seed=0, keep=[uniform])


def test_memory_budget_is_a_limit(config, family):
    from hyprune.search.space import add_memory

    axes = parse_space(family, config, None)
    shapes = enumerate_shapes(family, config, axes, [{}])
    full = make_budget(family, config, target_ratio=0.5).parameters  # only to have numbers to compare
    budget = make_budget(family, config, target_memory=3 * full, context=64, tolerance=0.1)
    add_memory(family, config, shapes, budget)
    kept = within_budget(shapes, budget, 2 * full)
    assert kept and all(0.9 * budget.memory <= c.metrics["memory_bytes"] <= budget.memory for c in kept)


@pytest.mark.parametrize("kwargs, phrases", [
    (dict(target_ratio=1.2), ["between 0 and 1"]),
    (dict(target_params=10**9), ["not below the source", "nothing to prune"]),
    (dict(), ["No budget"]),
    (dict(target_params=100, target_ratio=0.5), ["not several"]),
])
def test_bad_budgets(config, family, kwargs, phrases):
    with pytest.raises(HypruneError) as err:
        make_budget(family, config, **kwargs)
    for phrase in phrases:
        assert phrase in str(err.value)


def test_active_parameters_of_a_dense_model_say_so(config, family):
    budget = make_budget(family, config, target_active_params=5000)
    assert budget.parameters == 5000 and "no mixture-of-experts" in budget.notes[0]


def test_unreachable_budget_names_the_nearest_feasible_value(config, family):
    source = count_parameters(family, config)["total"]
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), [{}])
    smallest = min(c.parameters for c in shapes)
    with pytest.raises(HypruneError) as err:
        within_budget(shapes, make_budget(family, config, target_ratio=0.05), source)
    message = str(err.value)
    assert f"--target-params {smallest:,}" in message and "No candidate meets the budget" in message


@pytest.mark.parametrize("space, phrases", [
    ("hidden_size=30:20", ["minimum 30 is above the maximum 20", "hidden_size=20:30"]),
    ("hidden_size=16:64", ["above the source", "largest feasible value is 32"]),
    ("mamba_num_heads=4:8:3", ["multiples of 2", "nearest feasible step: 2 or 4"]),
    ("mamba_num_heads=5", ["no multiple of 2", "4 or 6"]),
    ("hidden_size=a:b", ["MIN:MAX[:STEP]"]),
    ("mamba_heads=4", ["not a prunable config field"]),
])
def test_contradictory_bounds(config, family, space, phrases):
    with pytest.raises(HypruneError) as err:
        parse_space(family, config, space)
    for phrase in phrases:
        assert phrase in str(err.value)


def test_depth_bounds(config, family):
    assert parse_drop("0:2", family, config) == (0, 2)
    assert parse_drop("1:4", family, config) == (1, 4)  # all but the attention block
    with pytest.raises(HypruneError, match="nearest feasible: --drop-blocks 1:4"):
        parse_drop("1:5", family, config)
    with pytest.raises(HypruneError, match="MIN <= MAX"):
        parse_drop("2:1", family, config)


def test_blocks_to_drop_takes_the_lowest_of_each_kind():
    kinds = ["mamba", "mlp", "attention", "mamba", "mlp", "mamba"]
    scores = [0.5, 0.1, 0.0, 0.2, 0.3, 0.9]
    assert blocks_to_drop(kinds, {"mamba": 2, "mlp": 1}, scores) == [0, 1, 3]
    assert blocks_to_drop(kinds, {"mamba": 1}) == [5]


def test_a_candidate_cut_from_a_model_has_its_counted_parameters(config, family, tiny_tokenizer):
    """The real model cut by make_plan + apply_plan (real scores, real dropped blocks) matches the count."""
    model = build_model(config)
    scores = activation_scores(model, torch.randint(0, 320, (4, 16)), family, progress=False)
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), drop_options(family, config, 0, 1))
    kinds = family.block_kinds(config)
    block_scores = [0.3, 0.1, 0.9, 0.2, 0.5]
    for c in shapes[:: len(shapes) // 3]:
        plan = make_plan(family, config, scores, c.target, drop_blocks=blocks_to_drop(kinds, c.drop, block_scores))
        assert real_count(apply_plan(model, plan, family), family)["total"] == c.parameters


# ---------------------------------------------------------------------------------------------
# Latency model
# ---------------------------------------------------------------------------------------------
def test_least_squares_recovers_known_costs():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(12), rng.integers(1, 9, (12, 3)), rng.uniform(0.5, 5, 12)])
    truth = np.array([0.7, 0.3, 0.0, 0.15, 1.2])
    assert np.allclose(latency_lib.fit(x, x @ truth), truth, atol=1e-8)
    x[:, 2] = 4  # a feature that does not vary is folded into the constant
    coefficients = latency_lib.fit(x, x @ truth)
    assert coefficients[2] == 0 and np.allclose(x @ coefficients, x @ truth)


def test_latency_model_predicts_held_out_shapes(config, family, monkeypatch):
    """With measurements that follow the model's form, held-out shapes are predicted exactly; the
    held-out shapes are not in the first fit."""
    truth = np.array([0.5, 0.2, 0.4, 0.1, 3.0])
    seen = []

    def fake_measure(family, config, shapes, *args, **kwargs):
        seen.extend(shapes)
        return [float(np.dot(truth, latency_lib.features(family, config, c))) for c in shapes], "fake"

    monkeypatch.setattr(latency_lib, "measure", fake_measure)
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), drop_options(family, config, 0, 1))
    model = latency_lib.build(family, config, shapes, shapes=9, progress=False)
    assert len(seen) == 9 and len({c.drop.get("mamba", 0) + 2 * c.drop.get("mlp", 0) for c in seen}) == 3
    assert model.held_out_error["shapes"] == 3 and model.held_out_error["max_abs_rel_error"] < 1e-6
    for c in shapes[::97]:
        assert model.predict(latency_lib.features(family, config, c)) == pytest.approx(
            float(np.dot(truth, latency_lib.features(family, config, c))), rel=1e-6)


def test_latency_budget_is_a_limit_on_the_prediction(config, family):
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), drop_options(family, config, 0, 1))
    model = latency_lib.LatencyModel("decode", 1, 128, [1.0, 0.5, 0.25, 0.125, 100.0])
    latency_lib.add_latency(model, family, config, shapes)
    c = shapes[len(shapes) // 2]
    f = latency_lib.features(family, config, c)
    assert c.metrics["latency_ms"] == pytest.approx(1 + 0.5 * f[1] + 0.25 * f[2] + 0.125 * f[3] + 100 * f[4])
    budget = make_budget(family, config, target_latency=c.metrics["latency_ms"], tolerance=0.03)
    source = count_parameters(family, config)["total"]
    kept = within_budget(shapes, budget, source)
    assert c in kept and all(0.97 * budget.latency <= k.metrics["latency_ms"] <= budget.latency for k in kept)
    assert len(kept) == sum(0.97 * budget.latency <= k.metrics["latency_ms"] <= budget.latency for k in shapes)
    with pytest.raises(HypruneError, match="nearest feasible --target-latency"):
        within_budget(shapes, make_budget(family, config, target_latency=0.1), source)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_kl_to_teacher_equals_an_independent_computation(config):
    teacher, student = build_model(config, seed=0), build_model(config, seed=1)
    windows = torch.randint(0, 320, (5, 12))
    logits = run_lib._teacher_logits(teacher, windows, 2)
    assert run_lib.kl_to_teacher(teacher, logits, windows, 2) == pytest.approx(0.0, abs=1e-6)
    t = F.log_softmax(teacher(windows).logits.double(), -1)
    s = F.log_softmax(student(windows).logits.double(), -1)
    expected = float((t.exp() * (t - s)).sum(-1).mean())
    assert run_lib.kl_to_teacher(student, logits, windows, 2) == pytest.approx(expected, rel=1e-5)


def test_search_resumes_without_redoing_finished_candidates(nemotron_dir, calib_txt, tmp_path, monkeypatch):
    calls = []
    real = run_lib.zero_shot_score

    def counting(model, *args, **kwargs):
        calls.append(sum(p.numel() for p in model.parameters()))
        if len(calls) == 2 and crash["on"]:
            raise KeyboardInterrupt  # an interruption in the middle of the candidates
        return real(model, *args, **kwargs)

    crash = {"on": True}
    monkeypatch.setattr(run_lib, "zero_shot_score", counting)
    common = dict(target_ratio=0.6, max_candidates=4, drop_blocks="0", **FAST)
    out = tmp_path / "search"
    with pytest.raises(KeyboardInterrupt):
        run_lib.search(str(nemotron_dir), str(calib_txt), str(out), **common)
    state = json.loads((out / "state.json").read_text())
    assert len(state["candidates"]) == 1  # the one finished before the interruption was saved
    crash["on"] = False
    calls.clear()
    with pytest.raises(HypruneError, match="not empty"):
        run_lib.search(str(nemotron_dir), str(calib_txt), str(out), **common)
    report = run_lib.search(str(nemotron_dir), str(calib_txt), str(out), resume=True, **common)
    assert len(calls) == 3 and report["evaluated"] == 4
    calls.clear()
    again = run_lib.search(str(nemotron_dir), str(calib_txt), str(out), resume=True, **common)
    assert calls == [] and again["winner"] == report["winner"]
    # a fresh uninterrupted run gives the same scores
    fresh = run_lib.search(str(nemotron_dir), str(calib_txt), str(tmp_path / "fresh"), **common)
    rows = {r["id"]: r["zero_shot"] for r in json.loads((out / "candidates.json").read_text())["candidates"]}
    fresh_rows = {r["id"]: r["zero_shot"] for r in
                  json.loads((tmp_path / "fresh" / "candidates.json").read_text())["candidates"]}
    assert rows == pytest.approx(fresh_rows) and fresh["winner"] == report["winner"]
    # no distillation: the winner's point is its zero-shot loss as a perplexity, and it has no checkpoint
    saved = load_report(out / "report.json")
    assert saved["kind"] == "search" and saved["data"] == json.loads(json.dumps(report))
    point = next(p for p in saved["points"] if p["label"] == "winner")
    assert point["model"] is None and point["candidate"] == report["winner"]["id"]
    assert point["perplexity"] == pytest.approx(math.exp(report["winner"]["zero_shot"]))
    with pytest.raises(HypruneError, match="seed"):
        run_lib.search(str(nemotron_dir), str(calib_txt), str(out), resume=True, **{**common, "seed": 1})


def test_cli_search_distills_the_top_k_and_its_plan_applies(nemotron_dir, calib_txt, tmp_path):
    out = tmp_path / "search"
    result = invoke("search", nemotron_dir, "--data", calib_txt, "--target-ratio", "0.6", "--out", out,
                    "--max-candidates", "5", "--top-k", "2", "--distill-tokens", "256", "--distill-uniform",
                    "--distill-batch", "4", "--drop-blocks", "0:1", "--latency", "--latency-shapes", "3",
                    "--latency-repeats", "1", "--latency-context", "8",
                    *FAST_CLI)
    assert result.exit_code == 0, result.output
    assert "winner" in result.output
    for name in ("plan.json", "candidates.json", "report.md", "report.json", "ranking.png", "state.json",
                 "latency.json"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "candidates.json").read_text())["candidates"]
    assert len(rows) == 5 and [r["final_rank"] for r in rows] == [1, 2, 3, 4, 5]
    distilled = [r for r in rows if "distilled" in r]
    uniform = [r for r in rows if r["uniform"]]
    assert len(uniform) == 1 and "distilled" in uniform[0]  # --distill-uniform
    top = [r for r in distilled if r["zero_shot_rank"] <= 2]
    assert len(top) == 2 and len(distilled) == 2 + (uniform[0]["zero_shot_rank"] > 2)
    assert rows[: len(distilled)] == distilled  # the distilled ones lead, best first
    assert [r["distilled"] for r in distilled] == sorted(r["distilled"] for r in distilled)
    for r in distilled:
        assert [p["tokens"] for p in r["curve"]] == [0, 64, 128, 192, 256] and r["curve"][0]["loss"] == r["zero_shot"]
    assert all("latency_ms" in r and "memory_bytes" in r for r in rows)
    report = load_report(out / "report.json")  # the common envelope, like prune, distill and eval reports
    assert report["kind"] == "search" and report["plots"] == {"ranking": "ranking.png"}
    summary = report["data"]
    assert summary["winner"]["id"] == rows[0]["id"] and summary["latency_model"]["held_out_error"]["shapes"] == 1
    points = {p["label"]: p for p in report["points"]}
    assert set(points) == {"winner", "uniform"}
    for label, row in (("winner", rows[0]), ("uniform", uniform[0])):
        assert points[label]["candidate"] == row["id"] and points[label]["parameters"] == row["parameters"]
        assert points[label]["perplexity"] == pytest.approx(math.exp(row["distilled"]))
        assert points[label]["model"] == str(out / row["distill_dir"] / "final")
        assert (out / row["distill_dir"] / "final" / "config.json").is_file()
    text = (out / "report.md").read_text()
    assert "| rank |" in text and "## Winner and uniform baseline" in text and "(ranking.png)" in text
    assert "## Latency model" in text
    assert not [p for p in out.iterdir() if p.name.startswith("hyprune-latency-")]  # the random models are gone
    # the winner's plan through `hyprune prune --plan`
    pruned = tmp_path / "pruned"
    result = invoke("prune", nemotron_dir, "--plan", out / "plan.json", "--out", pruned, "--quiet")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(pruned)
    family = family_for_config(model.config)
    assert real_count(model, family)["total"] == rows[0]["parameters"]
    assert {family.fields[a]: v for a, v in family.sizes(model.config).items()} | {} == {
        family.fields[a]: v for a, v in rows[0]["sizes"].items()}
    assert len(family.block_kinds(model.config)) == 5 - sum(rows[0]["drop"].values())
    # `hyprune report`: rewrites the search's report from its folder, and compares it with the pruned model's
    (out / "report.md").unlink()
    (out / "ranking.png").unlink()
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert (out / "report.md").read_text() == text and (out / "ranking.png").is_file()
    assert load_report(out / "report.json")["points"] == report["points"]
    result = invoke("report", out, pruned, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    cmp = load_report(tmp_path / "cmp" / "report.json")
    compared = {(p["run"], p["label"]): p for p in cmp["points"]}
    assert {("search", "winner"), ("pruned", "pruned")} <= set(compared)
    assert compared["search", "winner"]["parameters"] == compared["pruned", "pruned"]["parameters"]
    assert (tmp_path / "cmp" / "pareto.png").is_file()


@pytest.mark.parametrize("args, phrases", [
    (("--target-ratio", "1.5"), ["between 0 and 1"]),
    (("--target-params", "1e9"), ["not below the source"]),
    (("--target-ratio", "0.01"), ["No candidate meets the budget", "nearest feasible budget is --target-params"]),
    (("--target-ratio", "0.5", "--space", "hidden_size=40:20"), ["above the maximum"]),
    (("--target-ratio", "0.5", "--drop-blocks", "0:9"), ["nearest feasible: --drop-blocks"]),
    (("--target-ratio", "0.5", "--score", "bleu"), ["--score"]),
])
def test_cli_refuses_bad_input_before_any_work(nemotron_dir, calib_txt, tmp_path, args, phrases):
    out = tmp_path / "search"
    result = invoke("search", nemotron_dir, "--data", calib_txt, "--out", out, *args, *FAST_CLI)
    assert result.exit_code == 2, result.output
    message = squash(result.stderr)
    for phrase in phrases:
        assert phrase in message, message
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# MoE (active parameters), Zamba2 and Jamba
# ---------------------------------------------------------------------------------------------
def moe_config(**overrides):
    """Tiny NemotronH with pattern M E * E -: 8 experts in 2 router groups (top-2 of 1 group), a shared expert."""
    from test_search_counting import NEMOTRON_MOE

    return make_nemotron_config(**{**NEMOTRON_MOE, **overrides})


def test_active_budget_searches_expert_count_and_width():
    from hyprune.search.counting import active_parameters

    config = moe_config()
    family = family_for_config(config)
    axes = {a.field: a.values for a in parse_space(family, config, None)}
    assert axes["n_routed_experts"] == (8, 6, 4) and axes["moe_intermediate_size"] == (16, 8)
    assert axes["hidden_size"] == (24, 16)  # the experts multiply over hidden: multiples of 8
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), [{}, {"mamba": 1}])
    source = count_parameters(family, config)["total"]
    budget = make_budget(family, config, target_active_params=14000, tolerance=0.05)
    kept = within_budget(shapes, budget, source)
    assert {c.id for c in kept} == {c.id for c in shapes if abs(c.metrics["active_parameters"] - 14000) <= 700}
    assert {c.sizes["experts"] for c in kept} == {4, 6, 8}  # experts trade against the rest of the model
    kinds = family.block_kinds(config)
    for c in kept[:: max(1, len(kept) // 4)]:
        keep = [i for i in range(len(kinds)) if i not in blocks_to_drop(kinds, c.drop)]
        assert c.metrics["active_parameters"] == active_parameters(family, shaped_config(family, config, c.sizes, keep))
    uniform = uniform_candidate(kept, parse_space(family, config, None), family.sizes(config), budget)
    assert uniform is not None and not uniform.drop
    with pytest.raises(HypruneError, match="active parameters"):
        make_budget(family, config, target_active_params=10**7)
    with pytest.raises(HypruneError, match="nearest feasible budget is --target-active-params"):
        within_budget(shapes, make_budget(family, config, target_active_params=100), source)


def _family_config(name):
    """The tiny config of test_search_counting, with the test tokenizer's vocabulary."""
    from test_search_counting import CONFIGS

    if name == "nemotron_h-moe":
        return moe_config()
    config = CONFIGS[name]()
    config.vocab_size = 320
    return config


def test_a_fixed_axis_is_refused_in_the_space():
    config = _family_config("zamba2")
    family = family_for_config(config)
    assert [a.values for a in parse_space(family, config, "hidden_size=16") if a.field == "hidden_size"] == [(16,)]
    with pytest.raises(HypruneError, match="hidden_size cannot be pruned in zamba2"):
        parse_space(family, config, "hidden_size=8:16")


@pytest.mark.parametrize("name, budget", [("nemotron_h-moe", "target_active_params"), ("jamba", "target_active_params"),
                                          ("zamba2", "target_params")])
def test_search_runs_end_to_end(name, budget, calib_txt, tiny_tokenizer, tmp_path):
    """The whole search on a tiny model of each family: the winner meets the budget and its plan applies."""
    from conftest import save_tiny_model
    from hyprune.plan import load_plan_for

    config = _family_config(name)
    family = family_for_config(config)
    model_dir = save_tiny_model(config, tmp_path / name, tiny_tokenizer)
    shapes = enumerate_shapes(family, config, parse_space(family, config, None), [{}])
    key = "active_parameters" if budget == "target_active_params" else "parameters"
    values = sorted(c.metrics.get(key, c.parameters) for c in shapes)
    target = values[len(values) // 2]
    report = run_lib.search(str(model_dir), str(calib_txt), str(tmp_path / "out"), **{budget: target},
                            max_candidates=2, drop_blocks="0", **FAST)
    rows = json.loads((tmp_path / "out" / "candidates.json").read_text())["candidates"]
    assert len(rows) == 2 and all(abs(r.get(key, r["parameters"]) - target) <= 0.05 * target for r in rows)
    winner = next(r for r in rows if r["id"] == report["winner"]["id"])
    if key == "active_parameters":  # the report names the winner's active parameters
        assert report["winner"]["active_parameters"] == winner["active_parameters"] <= winner["parameters"]
        assert f"{winner['active_parameters']:,} active" in (tmp_path / "out" / "report.md").read_text()
    model = build_model(config)
    pruned = apply_plan(model, load_plan_for(tmp_path / "out" / "plan.json", family, config), family)
    assert real_count(pruned, family)["total"] == winner["parameters"]


def test_search_resume_compares_every_setting_and_resume_changed_records_it(nemotron_dir, calib_txt, tmp_path):
    common = dict(target_ratio=0.6, max_candidates=2, drop_blocks="0", **FAST)
    out = tmp_path / "search"
    run_lib.search(str(nemotron_dir), str(calib_txt), str(out), **common)
    for change, key in ((dict(max_candidates=3), "max_candidates"), (dict(target_ratio=0.5), "budget"),
                        (dict(text_field="body"), "text_field"), (dict(latency_repeats=5), "latency")):
        with pytest.raises(HypruneError) as e:
            run_lib.search(str(nemotron_dir), str(calib_txt), str(out), resume=True, **{**common, **change})
        assert "\n" not in str(e.value) and f"changed since the saved run: {key}" in str(e.value)
        assert "--resume-changed" in str(e.value)
    other = tmp_path / "other.txt"
    other.write_text(calib_txt.read_text())
    with pytest.raises(HypruneError, match="changed since the saved run: data, data_fingerprint .*other.txt"):
        run_lib.search(str(nemotron_dir), str(other), str(out), resume=True, **common)
    # the speed of the scoring passes is free to change
    run_lib.search(str(nemotron_dir), str(calib_txt), str(out), resume=True, **{**common, "batch_size": 2})
    result = invoke("search", nemotron_dir, "--data", calib_txt, "--target-ratio", "0.6", "--out", out,
                    "--max-candidates", "3", "--drop-blocks", "0", "--resume-changed", *FAST_CLI)
    assert result.exit_code == 0, result.output
    assert "note: Resumed with changed settings (--resume-changed): max_candidates 2 -> 3" in result.stdout
    state = json.loads((out / "state.json").read_text())
    assert state["changed_on_resume"] == [{"max_candidates": {"was": 2, "now": 3}}]
    assert state["settings"]["max_candidates"] == 3
    assert any("max_candidates 2 -> 3" in n for n in json.loads((out / "report.json").read_text())["data"]["notes"])


def test_search_resume_without_state_refuses(nemotron_dir, calib_txt, tmp_path):
    with pytest.raises(HypruneError, match="Nothing to resume.*Drop --resume"):
        run_lib.search(str(nemotron_dir), str(calib_txt), str(tmp_path / "none"), resume=True, target_ratio=0.6,
                       max_candidates=2, **FAST)
