"""Recipes: the schema (errors name the key), the shipped examples, a tiny run end to end, resume and changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hyprune.cli import app
from hyprune.demo import demo_recipe
from hyprune.errors import HypruneError
from hyprune.recipe import RUN_FILE, check_inputs, load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.stages() == ["prune", "distill", "eval", "report"]
    assert recipe.distill.loss == "forward_kl"


def test_shipped_recipes_are_the_ones_documented():
    assert {p.stem for p in RECIPES} >= {"nemotron-h-8b-to-4b", "nemotron-h-8b-depth", "demo"}
    width = load_recipe(RECIPES[0].parent / "nemotron-h-8b-to-4b.yaml")
    assert width.model == "nvidia/Nemotron-H-8B-Base-8K"
    assert width.prune.target == {"hidden_size": 3072, "intermediate_size": 12288, "mamba_num_heads": 112,
                                  "mamba_head_dim": 64}
    assert width.prune.drop_blocks is None
    depth = load_recipe(RECIPES[0].parent / "nemotron-h-8b-depth.yaml")
    assert depth.prune.drop_blocks == 26 and not depth.prune.target


def test_demo_recipe_file_is_what_the_demo_runs():
    assert load_recipe(RECIPES[0].parent / "demo.yaml") == demo_recipe("hyprune-demo")


def _tiny(model: Path, data: Path, out: Path, **changes) -> dict:
    recipe = {
        "name": "tiny", "model": str(model), "output": str(out),
        "prune": {"data": str(data), "target": {"hidden_size": 24, "mamba_num_heads": 4, "intermediate_size": 20},
                  "seq_len": 32, "num_samples": 4},
        "distill": {"data": str(data), "tokens": 32 * 4 * 3, "seq_len": 32, "batch": 4, "lr": 1e-3,
                    "eval_every": 2, "eval_windows": 4, "checkpoint_every": 2},
        "eval": {"data": str(data), "seq_len": 32, "num_windows": 4,
                 "bench": {"context_lengths": [16], "decode_tokens": 2, "repeats": 1}},
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            recipe[section][field] = value
        elif value is None:
            del recipe[section]
    return recipe


def _write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda r: r["distill"].update(lrr=1.0), r"distill\.lrr: unknown key \(allowed here: .*\blr\b"),
    (lambda r: r["prune"].update(seq_len="long"), r"prune\.seq_len: Input should be a valid integer"),
    (lambda r: r.pop("model"), r"model: missing"),
    (lambda r: r["eval"].update(models=["teacher", "student"]), r"eval\.models\.1: Input should be"),
    (lambda r: r["prune"].update(target={}), r"prune: nothing to prune"),
    (lambda r: r.update(stages=["prune"]), r"stages: unknown key \(allowed here: description, distill, eval"),
    (lambda r: r["eval"].update(bench={"context_lengths": []}), r"eval\.bench\.context_lengths: List should have"),
])
def test_schema_errors_name_the_key(tmp_path, change, message):
    recipe = _tiny(tmp_path / "m", tmp_path / "d.txt", tmp_path / "out")
    change(recipe)
    with pytest.raises(HypruneError, match=message):
        load_recipe(_write(tmp_path / "r.yaml", recipe))


def test_unreadable_recipes_are_clear_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(HypruneError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(HypruneError, match="top level must be a mapping"):
        parse_recipe(["a"], "list.yaml")
    with pytest.raises(HypruneError, match="No recipe at"):
        load_recipe(tmp_path / "missing.yaml")


def test_missing_files_and_bad_targets_name_the_key(tmp_path, nemotron_dir, calib_txt):
    missing = {"distill.data": str(tmp_path / "no.txt")}
    recipe = parse_recipe(_tiny(nemotron_dir, calib_txt, tmp_path / "out", **missing))
    with pytest.raises(HypruneError, match=r"distill\.data: .*no\.txt"):
        check_inputs(recipe)
    recipe = parse_recipe(_tiny(nemotron_dir, calib_txt, tmp_path / "out", **{"prune.target": {"hidden_size": 64}}))
    with pytest.raises(HypruneError, match=r"prune\.target: "):
        check_inputs(recipe)
    recipe = parse_recipe(_tiny(tmp_path / "nowhere", calib_txt, tmp_path / "out"))
    with pytest.raises(HypruneError, match=r"Recipe tiny: model: "):
        check_inputs(recipe)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    recipe = parse_recipe(_tiny(nemotron_dir, calib_txt, tmp_path / "busy"))
    with pytest.raises(HypruneError, match="not a hyprune run folder"):
        check_inputs(recipe)


def test_tiny_recipe_end_to_end_resume_and_change(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "run"
    path = _write(tmp_path / "tiny.yaml", _tiny(nemotron_dir, calib_txt, out))
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(path), "--check"])
    assert result.exit_code == 0 and "prune (run), distill (run), eval (run), report (run)" in result.output
    assert not out.exists()  # --check runs nothing

    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / RUN_FILE).read_text())
    assert [s for s, e in record["stages"].items() if e["status"] == "done"] == ["prune", "distill", "eval", "report"]
    for file in ("pruned/plan.json", "pruned/report.md", "distill/final/config.json", "distill/report.md",
                 "eval/teacher.json", "eval/pruned.json", "eval/distilled.json", "eval/bench.json", "report.md",
                 "pareto.png"):
        assert (out / file).is_file(), file
    report = json.loads((out / "report.json").read_text())
    points = {p["label"]: p for p in report["points"]}
    assert set(points) == {"teacher", "pruned", "distilled"}
    for name in points:
        measured = json.loads((out / "eval" / f"{name}.json").read_text())
        assert points[name]["perplexity"] == measured["perplexity"]
        assert points[name]["parameters"] == measured["parameters"]
    assert points["pruned"]["parameters"] < points["teacher"]["parameters"]
    assert points["distilled"]["tokens_per_s"] == points["pruned"]["tokens_per_s"] > 0
    text = (out / "report.md").read_text()
    assert "[pruned/report.md](pruned/report.md)" in text and "(distill/training_curves.png)" in text

    # the same recipe again: every stage is skipped, nothing is rewritten
    weights = out / "pruned" / "model.safetensors"
    stamp = (weights.stat().st_mtime_ns, (out / "distill" / "log.jsonl").stat().st_mtime_ns)
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 0 and result.output.count("already done") == 4
    assert (weights.stat().st_mtime_ns, (out / "distill" / "log.jsonl").stat().st_mtime_ns) == stamp

    # a changed distillation budget is refused, naming the key; --restart redoes distill and later only
    _write(path, _tiny(nemotron_dir, calib_txt, out, **{"distill.tokens": 32 * 4 * 4}))
    result = runner.invoke(app, ["run", str(path), "--quiet"])
    assert result.exit_code == 2 and "distill.tokens" in result.output and "--restart" in result.output
    result = runner.invoke(app, ["run", str(path), "--check"])
    assert "prune (skip), distill (changed), eval (changed), report (changed)" in result.output
    result = runner.invoke(app, ["run", str(path), "--quiet", "--restart"])
    assert result.exit_code == 0, result.output
    assert weights.stat().st_mtime_ns == stamp[0]
    steps = [json.loads(line)["step"] for line in (out / "distill" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_an_interrupted_distillation_resumes_from_its_checkpoint(tmp_path, nemotron_dir, calib_txt):
    from hyprune.recipe import RunRecord, fingerprints, run_recipe, run_status

    recipe = parse_recipe(_tiny(nemotron_dir, calib_txt, tmp_path / "run", eval=None))
    run_recipe(recipe, progress=False)
    out = tmp_path / "run"
    log = [json.loads(line) for line in (out / "distill" / "log.jsonl").read_text().splitlines()]
    # simulate a crash after the step-2 checkpoint: the record says "running", step 3 and final/ are gone
    record = RunRecord(out)
    record.stages["distill"]["status"] = "running"
    del record.stages["report"]
    record.save()
    shutil.rmtree(out / "distill" / "final")
    shutil.rmtree(out / "distill" / "checkpoints" / "step-00000003")
    assert run_status(recipe) == {"prune": "skip", "distill": "resume", "report": "run"}
    run_recipe(recipe, progress=False)
    summary = json.loads((out / "distill" / "final" / "hyprune_distill.json").read_text())["summary"]
    assert summary["resumed_from"] and summary["resumed_from"].endswith("step-00000002")
    assert run_status(recipe) == {"prune": "skip", "distill": "skip", "report": "skip"}
    assert RunRecord(out).stages["distill"]["fingerprint"] == fingerprints(recipe)["distill"]
    assert log[-1]["step"] == 3


def test_schema_errors_are_one_line_listing_every_bad_key(tmp_path):
    recipe = _tiny(tmp_path / "m", tmp_path / "d.txt", tmp_path / "out")
    recipe["distill"].update(lrr=1.0)
    recipe["prune"].update(seq_len="long")
    with pytest.raises(HypruneError) as e:
        load_recipe(_write(tmp_path / "r.yaml", recipe))
    message = str(e.value)
    assert "\n" not in message and "field distill.lrr: unknown key" in message and "field prune.seq_len:" in message


def test_a_kv_stage_retrofits_the_distilled_student_and_is_evaluated_with_its_cache(tmp_path, nemotron_dir, calib_txt):
    from hyprune.recipe import run_recipe

    out = tmp_path / "run"
    recipe = _tiny(nemotron_dir, calib_txt, out)
    recipe["eval"].pop("bench")
    recipe["kv"] = {"data": str(calib_txt), "tokens": 32 * 4 * 2, "seq_len": 32, "batch": 4, "method": "dms",
                    "ratio": 2, "window": 2, "offset": 0.0, "checkpoint_every": 0, "eval_every": 0, "calibration": 2}
    record = run_recipe(parse_recipe(recipe), progress=False)
    assert [s for s, e in record.stages.items() if e["status"] == "done"] == ["prune", "distill", "kv", "eval", "report"]
    config = json.loads((out / "kv" / "final" / "config.json").read_text())
    assert config["hyprune_kv"]["method"] == "dms" and len(config["hyprune_kv"]["centers"]) >= 1
    compressed = json.loads((out / "eval" / "compressed.json").read_text())
    distilled = json.loads((out / "eval" / "distilled.json").read_text())
    assert compressed["kv"]["method"] == "dms" and "kv" not in distilled
    assert compressed["perplexity"] != distilled["perplexity"]  # offset 0: about half the tokens evicted
    report = json.loads((out / "report.json").read_text())
    assert {p["label"] for p in report["points"]} == {"teacher", "pruned", "distilled", "compressed"}
    assert "prune -> distill -> kv -> eval" in (out / "report.md").read_text()
