"""The command line as users see it: score -> plan -> prune, inspect, and every refusal.

Runs in-process through ``typer.testing.CliRunner`` (one real subprocess checks the console script).
Every failure must exit non-zero, say what was wrong on stderr, and leave nothing at ``--out``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import make_nemotron_config, save_tiny_model, tree_digest
from hyprune.cli import app

TARGET = "hidden_size=24,mamba_num_heads=4,n_groups=2"
FAST = ("--seq-len", "16", "--num-samples", "8", "--batch-size", "4", "--quiet")

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def squash(text: str) -> str:
    """Collapse whitespace (rich may wrap long lines)."""
    return " ".join(text.split())


def assert_refused(result, out: Path | None, *phrases: str) -> None:
    """Non-zero exit, a clean one-paragraph error naming the problem, nothing left at ``out``."""
    assert result.exit_code != 0, f"expected a failure, got exit 0:\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"crashed instead of a clean error: {result.exception!r}"
    assert "Traceback" not in result.output
    message = squash(result.stderr)
    assert "error:" in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in error message: {message!r}"
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(prefixes)]
        assert leftovers == [], f"temporary folders left next to {out}: {leftovers}"


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def load_checked(folder: Path):
    """from_pretrained with no missing / unexpected / mismatched keys."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {info[kind]}"
    return model.eval()


def assert_generates(folder: Path) -> None:
    """The tokenizer loads, and greedy generate with the cache equals generate without it."""
    model = load_checked(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("def wrap(text, width=70):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, ids.shape[1] + 5)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------
# Module fixtures: one scoring sweep and one one-shot prune, shared by several tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, nemotron_dir, calib_txt) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "small"
    result = ok(invoke("prune", nemotron_dir, "--data", calib_txt, "--target", TARGET, "--out", out, *FAST))
    assert "total" in result.stdout
    return out


@pytest.fixture(scope="module")
def scores_dir(tmp_path_factory, nemotron_dir, calib_txt) -> Path:
    out = tmp_path_factory.mktemp("scores") / "scores"
    ok(invoke("score", nemotron_dir, "--data", calib_txt, "--out", out, *FAST))
    return out


# ---------------------------------------------------------------------------------------------
# The happy paths
# ---------------------------------------------------------------------------------------------
def test_prune_end_to_end(pruned_dir, nemotron_dir):
    model = load_checked(pruned_dir)
    cfg = model.config
    assert (cfg.hidden_size, cfg.mamba_num_heads, cfg.n_groups) == (24, 4, 2)
    source = make_nemotron_config()
    for field in ("intermediate_size", "num_attention_heads", "num_key_value_heads", "mamba_head_dim",
                  "ssm_state_size", "layers_block_type", "vocab_size"):
        assert getattr(cfg, field) == getattr(source, field), field

    plan = json.loads((pruned_dir / "plan.json").read_text())
    assert plan["family"] == "nemotron_h"
    assert plan["target"] == {"hidden_size": 24, "mamba_num_heads": 4, "n_groups": 2}
    summary = json.loads((pruned_dir / "hyprune_summary.json").read_text())
    assert summary["source"] == str(nemotron_dir)
    assert summary["parameters"]["after"]["total"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters"]["before"]["total"] > summary["parameters"]["after"]["total"]

    assert_generates(pruned_dir)


def test_group_blind_method_regroups_heads(tmp_path, nemotron_dir, scores_dir):
    out = tmp_path / "blind"
    ok(invoke("prune", nemotron_dir, "--scores", scores_dir, "--target", TARGET, "--method", "group-blind",
              "--out", out, "--quiet"))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "group-blind" and plan["heads_regrouped"] is True
    assert json.loads((out / "hyprune_summary.json").read_text())["method"] == {"name": "group-blind"}
    assert_generates(out)


def test_unknown_method_lists_the_choices(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", TARGET, "--method", "nope", "--out", out)
    assert_refused(result, out, "Unknown pruning method 'nope'", "activation, group-blind")


def test_malformed_nm_is_refused(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    assert_refused(invoke("prune", nemotron_dir, "--data", calib_txt, "--nm", "4:2", "--out", out), out, "0 < N < M")


def test_mamba2_prune_end_to_end(tmp_path, mamba2_dir, calib_txt):
    out = tmp_path / "m2-small"
    ok(invoke("prune", mamba2_dir, "--data", calib_txt, "--target", "hidden_size=16,num_heads=4", "--out", out, *FAST))
    cfg = load_checked(out).config
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.n_groups) == (16, 4, 8, 2)
    assert_generates(out)


def test_score_plan_prune_matches_one_shot(tmp_path, nemotron_dir, scores_dir, pruned_dir):
    assert (scores_dir / "scores.safetensors").is_file()
    assert json.loads((scores_dir / "scores.json").read_text())["calibration"]["windows"] == 8

    plan_file = tmp_path / "plans" / "plan.json"
    result = ok(invoke("plan", nemotron_dir, "--scores", scores_dir, "--target", TARGET, "--out", plan_file))
    assert "hidden=24" in squash(result.stdout)
    assert json.loads(plan_file.read_text()) == json.loads((pruned_dir / "plan.json").read_text())

    out = tmp_path / "from-plan"
    ok(invoke("prune", nemotron_dir, "--plan", plan_file, "--out", out, "--quiet"))
    assert_same_weights(out, pruned_dir)
    assert json.loads((out / "config.json").read_text()) == json.loads((pruned_dir / "config.json").read_text())


def test_prune_reuses_scores_without_data(tmp_path, nemotron_dir, scores_dir, pruned_dir):
    out = tmp_path / "from-scores"
    ok(invoke("prune", nemotron_dir, "--scores", scores_dir, "--target", TARGET, "--out", out, "--quiet"))
    assert_same_weights(out, pruned_dir)
    load_checked(out)


@pytest.mark.parametrize("data_fixture", ["calib_jsonl", "calib_parquet"])
def test_score_reads_jsonl_and_parquet(request, tmp_path, nemotron_dir, scores_dir, data_fixture):
    data = request.getfixturevalue(data_fixture)
    out = tmp_path / "scores"
    ok(invoke("score", nemotron_dir, "--data", data, "--out", out, *FAST))
    # The same documents as the .txt fixture, so the same windows and the same scores.
    got, want = load_file(str(out / "scores.safetensors")), load_file(str(scores_dir / "scores.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_input_folder_is_never_modified(tmp_path, nemotron_dir, calib_txt):
    before = tree_digest(nemotron_dir)
    ok(invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "hidden_size=16,intermediate_size=20",
              "--out", tmp_path / "out", *FAST))
    assert tree_digest(nemotron_dir) == before


def test_quiet_prints_no_progress_bars(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    result = ok(invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "hidden_size=16", "--out", out, *FAST))
    assert "%|" not in result.stderr, result.stderr  # neither hyprune's sweep nor transformers' load/save bars


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, family, pattern", [("nemotron_dir", "nemotron_h", "M-*M-"),
                                                    ("mamba2_dir", "mamba2", "MM")])
def test_inspect_text(request, which, family, pattern):
    text = squash(ok(invoke("inspect", request.getfixturevalue(which))).stdout)
    assert f"family {family}" in text
    assert f"pattern {pattern}" in text
    assert "hidden_size" in text and "total" in text


@pytest.mark.parametrize("which, family, pattern", [("nemotron_dir", "nemotron_h", "M-*M-"),
                                                    ("mamba2_dir", "mamba2", "MM")])
def test_inspect_json_counts_match_the_model(request, which, family, pattern):
    folder = request.getfixturevalue(which)
    info = json.loads(ok(invoke("inspect", folder, "--json")).stdout)
    assert info["family"] == family
    assert info["pattern"] == pattern
    assert info["blocks"] == len(pattern)
    params = dict(info["parameters"])
    total = params.pop("total")
    assert sum(params.values()) == total
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert total == sum(p.numel() for p in model.parameters())
    assert "importance" not in info


def test_inspect_with_scores(nemotron_dir, scores_dir):
    info = json.loads(ok(invoke("inspect", nemotron_dir, "--scores", scores_dir, "--json")).stdout)
    layers = info["importance"]["layers"]
    assert [entry["kind"] for entry in layers] == ["mamba", "mlp", "attention", "mamba", "mlp"]
    assert "mamba_heads" in layers[0] and "ffn" in layers[1] and "attention_heads" in layers[2]
    text = squash(ok(invoke("inspect", nemotron_dir, "--scores", scores_dir)).stdout)
    assert "importance" in text


# ---------------------------------------------------------------------------------------------
# Refusals: non-zero exit, a message naming the problem, nothing at --out
# ---------------------------------------------------------------------------------------------
def test_unsupported_architecture(tmp_path, unsupported_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", unsupported_dir, "--data", calib_txt, "--target", "hidden_size=16", "--out", out, *FAST)
    assert_refused(result, out, "Unsupported architecture 'gpt2'", "nemotron_h")


def test_target_larger_than_source(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "hidden_size=48", "--out", out, *FAST)
    assert_refused(result, out, "hidden_size=48 is larger than the source (32)")


def test_mamba_heads_not_divisible_by_groups(tmp_path, nemotron_config, tiny_tokenizer, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    four_groups = save_tiny_model(nemotron_config(n_groups=4), tmp_path / "four-groups", tiny_tokenizer)
    result = invoke("prune", four_groups, "--data", calib_txt, "--target", "mamba_num_heads=6,n_groups=4",
                    "--out", out, *FAST)
    assert_refused(result, out, "mamba_num_heads=6 is not divisible by n_groups=4")
    # the shared fixture has 2 groups: an odd head count cannot be split over them
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "mamba_num_heads=5", "--out", out, *FAST)
    assert_refused(result, out, "mamba_num_heads=5 is not divisible by n_groups=2")


def test_unknown_target_key(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "num_experts=2", "--out", out, *FAST)
    assert_refused(result, out, "'num_experts' is not a prunable config field", "mamba_num_heads")


def test_malformed_target(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "hidden_size:16", "--out", out, *FAST)
    assert_refused(result, out, "is not KEY=VALUE")
    result = invoke("prune", nemotron_dir, "--data", calib_txt, "--target", "hidden_size=1.5", "--out", out, *FAST)
    assert_refused(result, out, "whole number")


def test_missing_data_file(tmp_path, nemotron_dir):
    out = tmp_path / "out"
    missing = tmp_path / "nope.txt"
    result = invoke("prune", nemotron_dir, "--data", missing, "--target", "hidden_size=16", "--out", out, *FAST)
    assert_refused(result, out, "does not exist", "nope.txt")
    result = invoke("score", nemotron_dir, "--data", missing, "--out", out, *FAST)
    assert_refused(result, out, "does not exist")


def test_no_data_at_all(tmp_path, nemotron_dir):
    out = tmp_path / "out"
    assert_refused(invoke("prune", nemotron_dir, "--target", "hidden_size=16", "--out", out), out, "--data")
    assert_refused(invoke("score", nemotron_dir, "--out", out), out, "--data")
    assert_refused(invoke("prune", nemotron_dir, "--out", out), out, "Nothing to prune")


def test_empty_data_file(tmp_path, nemotron_dir):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = invoke("prune", nemotron_dir, "--data", empty, "--target", "hidden_size=16", "--out", out, *FAST)
    assert_refused(result, out, "is empty")


def test_fewer_tokens_than_one_window(tmp_path, nemotron_dir):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n")
    result = invoke("prune", nemotron_dir, "--data", short, "--target", "hidden_size=16", "--out", out,
                    "--seq-len", "256", "--num-samples", "2", "--quiet")
    assert_refused(result, out, "fewer than one window of --seq-len 256")


def test_corrupt_config(tmp_path, nemotron_dir, calib_txt):
    broken = tmp_path / "broken"
    shutil.copytree(nemotron_dir, broken)
    (broken / "config.json").write_text('{"model_type": "nemotron_h", ')
    out = tmp_path / "out"
    result = invoke("prune", broken, "--data", calib_txt, "--target", "hidden_size=16", "--out", out, *FAST)
    assert_refused(result, out, "config.json is not valid JSON")
    assert_refused(invoke("inspect", broken), None, "config.json is not valid JSON")


def test_plan_for_another_model(tmp_path, nemotron_dir, scores_dir, pruned_dir):
    plan_file = tmp_path / "plan.json"
    ok(invoke("plan", nemotron_dir, "--scores", scores_dir, "--target", "hidden_size=16", "--out", plan_file))
    out = tmp_path / "out"
    result = invoke("prune", pruned_dir, "--plan", plan_file, "--out", out, "--quiet")
    assert_refused(result, out, "The plan was made for another model", "hyprune plan")
    # scores of the big model do not fit the pruned one either
    result = invoke("prune", pruned_dir, "--scores", scores_dir, "--target", "hidden_size=16", "--out", out)
    assert_refused(result, out, "were made for another model")


def test_missing_plan_file(tmp_path, nemotron_dir):
    out = tmp_path / "out"
    result = invoke("prune", nemotron_dir, "--plan", tmp_path / "nope.json", "--out", out)
    assert_refused(result, out, "Plan file", "does not exist")


def test_plan_refuses_bad_target_and_writes_nothing(tmp_path, nemotron_dir, scores_dir):
    plan_file = tmp_path / "plan.json"
    result = invoke("plan", nemotron_dir, "--scores", scores_dir, "--target", "intermediate_size=400",
                    "--out", plan_file)
    assert_refused(result, plan_file, "intermediate_size=400 is larger than the source (40)")


def test_non_empty_output_needs_overwrite(tmp_path, nemotron_dir, scores_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ("prune", nemotron_dir, "--scores", scores_dir, "--target", "hidden_size=16", "--out", out, "--quiet")
    result = invoke(*args)
    assert result.exit_code != 0
    assert_refused(result, None, "is not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []

    ok(invoke(*args, "--overwrite"))
    assert not (out / "keep.txt").exists()
    assert load_checked(out).config.hidden_size == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_output_must_not_overlap_the_input(tmp_path, nemotron_dir, calib_txt, scores_dir):
    parent = tmp_path / "models"
    model = parent / "nemotron"
    shutil.copytree(nemotron_dir, model)
    before = tree_digest(parent)
    common = ("--data", calib_txt, "--target", "hidden_size=16", *FAST)
    # --out is the input itself, or a folder holding it: --overwrite would delete the input
    assert_refused(invoke("prune", model, *common, "--out", model, "--overwrite"), None, "is the input")
    assert_refused(invoke("prune", model, *common, "--out", parent, "--overwrite"), None, "contains the input")
    # --out inside the input folder would write into it
    assert_refused(invoke("prune", model, *common, "--out", model / "pruned"), model / "pruned",
                   "is inside the input folder")
    assert_refused(invoke("score", model, "--data", calib_txt, "--out", model / "scores", *FAST), model / "scores",
                   "is inside the input folder")
    assert tree_digest(parent) == before
    # the other inputs are protected too: here the saved scores
    copied = tmp_path / "scores"
    shutil.copytree(scores_dir, copied)
    result = invoke("prune", model, "--scores", copied, "--target", "hidden_size=16", "--out", copied, "--overwrite")
    assert_refused(result, None, "is the input")
    assert (copied / "scores.safetensors").is_file()


def test_pickle_weights_need_allow_pickle(tmp_path, mamba2_dir, calib_txt):
    pickled = tmp_path / "pickled"
    shutil.copytree(mamba2_dir, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    out = tmp_path / "out"
    args = ("prune", pickled, "--data", calib_txt, "--target", "hidden_size=16,num_heads=4", "--out", out, *FAST)
    assert_refused(invoke(*args), out, "only pickle weights", "--allow-pickle")
    ok(invoke(*args, "--allow-pickle"))
    load_checked(out)
    assert any(out.glob("*.safetensors")) and not any(out.glob("*.bin"))


def test_mamba2_width_is_coupled_to_hidden(tmp_path, mamba2_dir, calib_txt):
    out = tmp_path / "out"
    result = invoke("prune", mamba2_dir, "--data", calib_txt, "--target", "num_heads=4", "--out", out, *FAST)
    assert_refused(result, out, "Mamba width is tied to the hidden size")


def test_console_script_reports_errors(tmp_path, nemotron_dir, calib_txt):
    """The installed `hyprune` script: exit code 2, a one-line error on stderr, no traceback, no output."""
    script = Path(sys.executable).with_name("hyprune")
    command = [str(script)] if script.exists() else [shutil.which("hyprune") or "hyprune"]
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        command + ["prune", str(nemotron_dir), "--data", str(calib_txt), "--target", "hidden_size=48",
                   "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error: Target hidden_size=48 is larger than the source (32)" in squash(proc.stderr)
    assert proc.stdout == ""
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []


# ---------------------------------------------------------------------------------------------
# Depth pruning from the command line
# ---------------------------------------------------------------------------------------------
def test_score_depth_writes_ranking_and_plot(nemotron_dir, calib_txt, tmp_path):
    out = tmp_path / "depth"
    result = runner.invoke(app, ["score", str(nemotron_dir), "--data", str(calib_txt), "--depth", "kl",
                                 "--out", str(out), "--seq-len", "16", "--num-samples", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    ranking = json.loads((out / "block_scores.json").read_text())
    assert ranking["method"] == "kl" and len(ranking["scores"]) == 5
    assert (out / "block_scores.png").stat().st_size > 0


@pytest.mark.parametrize("extra", [["--drop-blocks", "2", "--depth-method", "block_influence"],
                                   ["--drop-blocks", "1", "--depth-method", "lm_loss", "--depth-mode", "contiguous"],
                                   ["--drop-block-list", "1,4"]])
def test_prune_depth_and_width_together(nemotron_dir, calib_txt, tmp_path, extra):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(nemotron_dir), "--data", str(calib_txt), "--target", "hidden_size=24",
                                 "--out", str(out), "--seq-len", "16", "--num-samples", "4", "--quiet", *extra])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    dropped = len(plan["drop_blocks"])
    assert dropped == (2 if "2" in extra else (1 if "1" in extra else 2))
    assert model.config.num_hidden_layers == 5 - dropped and model.config.hidden_size == 24
    if "--drop-block-list" in extra:
        assert plan["drop_blocks"] == [1, 4]


def test_prune_depth_refuses_removing_every_block(nemotron_dir, calib_txt, tmp_path):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", str(nemotron_dir), "--data", str(calib_txt), "--drop-blocks", "5",
                                 "--out", str(out)])
    assert result.exit_code != 0 and "every block" in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Distillation from the command line
# ---------------------------------------------------------------------------------------------
def test_distill_cli_end_to_end_and_resume(nemotron_dir, calib_txt, tmp_path):
    student = tmp_path / "student"
    assert runner.invoke(app, ["prune", str(nemotron_dir), "--data", str(calib_txt), "--target", "hidden_size=24",
                               "--out", str(student), "--seq-len", "16", "--num-samples", "4", "--quiet"]).exit_code == 0
    run = tmp_path / "kd"
    args = ["distill", "--teacher", str(nemotron_dir), "--student", str(student), "--data", str(calib_txt),
            "--tokens", str(16 * 4 * 6), "--seq-len", "16", "--batch", "4", "--out", str(run),
            "--checkpoint-every", "2", "--eval-every", "3", "--warmup-steps", "1", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in log if "loss" in row]
    assert steps[-1] == 6 and all({"step", "tokens", "loss"} <= set(row) for row in log if "loss" in row)
    model, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.hidden_size == 24
    again = runner.invoke(app, args)  # a finished run is not silently overwritten
    assert again.exit_code != 0 and "--resume" in again.output


def test_finetune_and_topk_cache_cli(nemotron_dir, calib_txt, tmp_path):
    cache = tmp_path / "cache"
    result = runner.invoke(app, ["cache-teacher", str(nemotron_dir), "--data", str(calib_txt), "--seq-len", "16",
                                 "--top-k", "8", "--tokens", "256", "--out", str(cache), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "from-cache"
    result = runner.invoke(app, ["distill", "--student", str(nemotron_dir), "--data", str(cache), "--tokens", "128",
                                 "--seq-len", "16", "--batch", "4", "--out", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "final" / "config.json").is_file()
    ft = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(nemotron_dir), "--data", str(calib_txt), "--tokens", "128",
                                 "--seq-len", "16", "--batch", "4", "--out", str(ft), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (ft / "final" / "model.safetensors").is_file()


def test_dense_llama_width_and_depth_from_cli(llama_dir, calib_txt, tmp_path):
    out = tmp_path / "llama-pruned"
    result = runner.invoke(app, ["prune", str(llama_dir), "--data", str(calib_txt), "--out", str(out), "--seq-len", "16",
                                 "--num-samples", "4", "--quiet", "--target",
                                 "hidden_size=24,intermediate_size=20,num_attention_heads=2", "--drop-blocks", "1",
                                 "--depth-method", "kl"])
    assert result.exit_code == 0, result.output
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (24, 20, 2, 2)
    shown = runner.invoke(app, ["inspect", str(llama_dir), "--json"])
    assert json.loads(shown.stdout)["pattern"] == "TTT"


def test_eval_and_bench_from_cli(nemotron_dir, llama_dir, calib_txt, tmp_path):
    results = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(nemotron_dir), "--data", str(calib_txt), "--seq-len", "32",
                                 "--num-windows", "4", "--out", str(results), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(results.read_text())
    assert data["tokens"] == 4 * 31 and data["perplexity"] > 1
    bench_json = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(nemotron_dir), str(llama_dir), "--out", str(bench_json),
                                 "--context-lengths", "16", "--decode-tokens", "4", "--repeats", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "ratios" in json.loads(bench_json.read_text())
    refused = runner.invoke(app, ["eval", str(nemotron_dir), "--data", str(tmp_path / "missing.txt"), "--seq-len",
                                  "32", "--out", str(tmp_path / "x.json")])
    assert refused.exit_code != 0 and "does not exist" in refused.output


# ---------------------------------------------------------------------------------------------
# Bad input gives one line naming the field (issue 11)
# ---------------------------------------------------------------------------------------------
def one_line_error(result, *phrases: str) -> str:
    """A clean refusal whose ``error:`` message is a single line holding every phrase."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert start == len(lines) - 1, f"the error is not one line: {lines[start:]}"
    for phrase in phrases:
        assert phrase in lines[start], f"{phrase!r} not in {lines[start]!r}"
    return lines[start]


def _plan_json(tmp_path, nemotron_dir, scores_dir) -> dict:
    plan_file = tmp_path / "made.json"
    ok(invoke("plan", nemotron_dir, "--scores", scores_dir, "--target", TARGET, "--out", plan_file))
    return json.loads(plan_file.read_text())


def test_inconsistent_or_unknown_plan_fields_are_one_line_errors(tmp_path, nemotron_dir, scores_dir):
    good = _plan_json(tmp_path, nemotron_dir, scores_dir)
    assert good["target"]["hidden_size"] == 24 and len(good["hidden"]) == 24
    cases = [
        (lambda p: p["hidden"].pop(), ("target.hidden_size", "says 24", "hidden keeps 23")),
        (lambda p: p.update(notes="mine"), ("field notes: unknown key", "allowed here:", "hidden")),
        (lambda p: p["layers"][0].update(headz=[0]), ("field layers.0.headz: unknown key",)),
        (lambda p: p["hidden"].__setitem__(0, 0.5), ("field hidden.0:", "valid integer", "(got 0.5)")),
        (lambda p: p.pop("layers"), ("field layers: missing",)),
    ]
    for i, (change, phrases) in enumerate(cases):
        plan = json.loads(json.dumps(good))
        change(plan)
        path = tmp_path / f"plan{i}.json"
        path.write_text(json.dumps(plan))
        out = tmp_path / f"out{i}"
        one_line_error(invoke("prune", nemotron_dir, "--plan", path, "--out", out, "--quiet"), *phrases)
        assert not out.exists()


def test_distill_tokens_zero_is_one_line_naming_the_field(tmp_path, nemotron_dir, calib_txt):
    result = invoke("distill", "--teacher", nemotron_dir, "--student", nemotron_dir, "--data", calib_txt,
                    "--tokens", "0", "--seq-len", "16", "--out", tmp_path / "kd", "--quiet")
    one_line_error(result, "Invalid distillation settings: field tokens:", "greater than 0", "(got 0)")


def test_distill_resume_changed_lr_is_refused_then_accepted_and_logged(tmp_path, nemotron_dir, calib_txt):
    run = tmp_path / "kd"
    args = ["distill", "--teacher", nemotron_dir, "--student", nemotron_dir, "--data", calib_txt, "--tokens",
            str(16 * 2 * 4), "--seq-len", "16", "--batch", "2", "--out", run, "--checkpoint-every", "2",
            "--eval-every", "0", "--warmup-steps", "1", "--lr", "1e-4", "--quiet"]
    one_line_error(invoke(*args, "--resume"), "Nothing to resume", "Drop --resume")
    ok(invoke(*args))
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "final")
    one_line_error(invoke(*args[:-3], "--lr", "0.001", "--quiet", "--resume"),
                   "changed since the saved run: lr", "0.0001 -> 0.001", "--resume-changed")
    other = tmp_path / "other.txt"
    other.write_text(calib_txt.read_text() + "\nmore text\n")
    moved = [other if a == calib_txt else a for a in args]
    one_line_error(invoke(*moved, "--resume"), "changed since the saved run: data", "data.path")
    result = ok(invoke(*args[:-3], "--lr", "0.001", "--quiet", "--resume-changed"))
    assert "resuming with changed settings (--resume-changed): lr 0.0001 -> 0.001" in squash(result.stderr)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r for r in log if r.get("event")] == [
        {"event": "resume_changed", "step": 2, "from": str(run / "checkpoints" / "step-00000002"),
         "changed": {"lr": {"was": 1e-4, "now": 1e-3}}}]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_finetune_resume_changed_flag(tmp_path, nemotron_dir, calib_txt):
    run = tmp_path / "ft"
    args = ["finetune", nemotron_dir, "--data", calib_txt, "--tokens", str(16 * 2 * 4), "--seq-len", "16",
            "--batch", "2", "--out", run, "--checkpoint-every", "2", "--eval-every", "0", "--quiet"]
    one_line_error(invoke(*args, "--resume"), "Nothing to resume")
    ok(invoke(*args))
    shutil.rmtree(run / "final")
    one_line_error(invoke(*args, "--seed", "4", "--resume"), "changed since the saved run: seed")
    ok(invoke(*args, "--seed", "4", "--resume-changed"))


def test_undecodable_text_data_is_refused_with_the_count(tmp_path, nemotron_dir, calib_txt):
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    out = tmp_path / "out"
    line = one_line_error(invoke("prune", nemotron_dir, "--data", noise, "--target", "hidden_size=24", "--out", out,
                                 *FAST), f"{noise} is not UTF-8 text: byte ", "byte sequence(s) in 4,096 bytes")
    assert int(re.search(r"\((\d+) undecodable byte sequence", line).group(1)) > 100  # random bytes: many bad sequences
    assert not out.exists()
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    one_line_error(invoke("prune", nemotron_dir, "--data", latin, "--target", "hidden_size=24", "--out", out, *FAST),
                   "is not UTF-8 text: byte 30 (0xe9, line 2) does not decode", "(1 undecodable byte sequence(s) in 34 bytes)")
    binary = tmp_path / "zeros.txt"
    binary.write_bytes(calib_txt.read_bytes() + b"\x00" * 10)
    one_line_error(invoke("prune", nemotron_dir, "--data", binary, "--target", "hidden_size=24", "--out", out, *FAST),
                   "10 NUL bytes", "binary, not text")


def test_auto_map_without_trust_remote_code_warns_and_is_dropped(tmp_path, nemotron_dir, calib_txt):
    model = tmp_path / "with-auto-map"
    shutil.copytree(nemotron_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="auto_map.*without --trust-remote-code it was not run"):
        ok(invoke("prune", model, "--data", calib_txt, "--target", "hidden_size=24", "--out", out, *FAST))
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert "auto_map" in json.loads((model / "config.json").read_text())  # the input is untouched
