"""Reports: report.md + report.json + PNGs from prune, distill and eval, and `hyprune report` comparisons."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hyprune import api
from hyprune.cli import app
from hyprune.distill import run_distill
from hyprune.errors import HypruneError
from hyprune.evaluate import evaluate
from hyprune.report import REPORT_FORMAT, Report, compare_reports, load_report, markdown_table
from hyprune.report.plots import pareto_front

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def test_prune_writes_a_report_with_bars_heatmap_and_depth_plot(nemotron_dir, calib_txt, tmp_path):
    out = tmp_path / "pruned"
    summary = api.prune(str(nemotron_dir), str(out), data=str(calib_txt), target={"hidden_size": 24, "mamba_num_heads": 4},
                        drop_blocks=1, seq_len=32, num_samples=4, progress=False)
    for png in ("parameters.png", "importance.png", "block_scores.png"):
        assert _is_png(out / png), png
    data = load_report(out / "report.json")
    assert data["kind"] == "prune" and data["plots"] == {"parameters": "parameters.png", "importance": "importance.png"}
    pruned = next(p for p in data["points"] if p["label"] == "pruned")
    assert pruned["parameters"] == summary["parameters"]["after"]["total"]
    text = (out / "report.md").read_text()
    assert "## Parameters per component" in text and "(importance.png)" in text and "(block_scores.png)" in text
    # the heatmap is drawn from the sweep's scores, kept in the summary: one row per layer
    assert len(summary["importance"]["layers"]) == 5


def test_distill_report_has_curves_and_the_students_size(nemotron_dir, calib_txt, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "kd"
    run_distill(str(nemotron_dir), str(nemotron_dir), str(calib_txt), 32 * 2 * 4, 32, 2, str(run), eval_every=2,
                checkpoint_every=0, progress=False)
    assert _is_png(run / "training_curves.png")
    data = load_report(run / "report.json")
    student = AutoModelForCausalLM.from_pretrained(run / "final")
    assert data["points"][0]["parameters"] == sum(p.numel() for p in student.parameters())
    assert [e["step"] for e in data["data"]["evals"]] == [2, 4]
    assert data["points"][0]["perplexity"] == pytest.approx(data["data"]["evals"][-1]["eval_ppl"])
    assert "held-out perplexity, student" in (run / "report.md").read_text()


def test_eval_reports_and_comparison_from_cli(nemotron_dir, llama_dir, calib_txt, tmp_path):
    results = {}
    for name, model in (("nemotron", nemotron_dir), ("llama", llama_dir)):
        results[name] = evaluate(str(model), data=str(calib_txt), seq_len=32, num_windows=4,
                                 out=str(tmp_path / "eval" / f"{name}.json"))
        data = load_report(tmp_path / "eval" / f"{name}.report.json")
        assert data["points"][0]["perplexity"] == results[name]["perplexity"]
        assert data["points"][0]["parameters"] == results[name]["parameters"] > 0
        assert f"{name}.json" in (tmp_path / "eval" / f"{name}.report.md").read_text()

    result = CliRunner().invoke(app, ["report", str(tmp_path / "eval"), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    cmp = load_report(tmp_path / "cmp" / "report.json")
    assert {p["label"] for p in cmp["points"]} == {"nemotron", "llama"}
    assert _is_png(tmp_path / "cmp" / "pareto.png")
    best = min(results, key=lambda name: results[name]["perplexity"])  # the best quality is always on the front
    smallest = min(results, key=lambda name: results[name]["parameters"])  # and so is the smallest model
    assert f"eval/{best}" in cmp["data"]["pareto_front"] and f"eval/{smallest}" in cmp["data"]["pareto_front"]
    assert "Careful" not in (tmp_path / "cmp" / "report.md").read_text()  # same data, same windows

    # regenerating one run's report in place
    result = CliRunner().invoke(app, ["report", str(tmp_path / "eval" / "llama.json")])
    assert result.exit_code == 0 and "llama.report.md" in result.output


def test_pareto_front_keeps_only_undominated_points():
    points = [{"label": "a", "parameters": 10, "perplexity": 5.0}, {"label": "b", "parameters": 20, "perplexity": 4.0},
              {"label": "c", "parameters": 30, "perplexity": 6.0}, {"label": "d", "parameters": 20, "perplexity": 4.5}]
    assert [p["label"] for p in pareto_front(points, "perplexity", lower_is_better=True)] == ["a", "b"]
    acc = [{"label": "a", "parameters": 10, "accuracy": 0.5}, {"label": "b", "parameters": 20, "accuracy": 0.4}]
    assert [p["label"] for p in pareto_front(acc, "accuracy", lower_is_better=False)] == ["a"]


def test_comparison_deduplicates_a_shared_teacher(tmp_path):
    for run, ppl in (("r1", 9.0), ("r2", 7.0)):
        report = Report("pipeline", run)
        report.point("teacher", "t", 100, perplexity=5.0)
        report.point("student", f"{run}/s", 50, perplexity=ppl)
        report.write(tmp_path / run)
    cmp = compare_reports([tmp_path / "r1", tmp_path / "r2"])
    assert [(p["run"], p["label"]) for p in cmp.points] == [("r1", "student"), ("r2", "student"), ("r1", "teacher")]
    assert cmp.data["pareto_front"] == ["r2/student", "r1/teacher"]


def test_comparison_warns_when_perplexities_were_measured_differently(tmp_path):
    for run, seq_len in (("short", 128), ("long", 256)):
        report = Report("eval", run)
        report.point("model", run, 100, perplexity=5.0, evaluation={"data": "test.txt", "seq_len": seq_len})
        report.write(tmp_path / run)
    text = compare_reports([tmp_path / "short", tmp_path / "long"]).to_markdown()
    assert "**Careful:**" in text and '"seq_len": 128' in text and '"seq_len": 256' in text


def test_report_envelope_and_table():
    data = Report("eval", "t").to_json()
    assert data["format"] == REPORT_FORMAT and data["points"] == [] and data["created"].endswith("Z")
    table = markdown_table(["name", "n"], [["a|b", 1234], ["c", None]])
    assert table.splitlines()[1] == "| --- | ---: |" and "a\\|b" in table and "1,234" in table


def test_bad_report_inputs_are_clear_errors(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(HypruneError, match="not a hyprune report"):
        compare_reports([tmp_path / "other.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HypruneError, match="holds no report.json"):
        compare_reports([tmp_path / "empty"])
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "is not a prune output" in result.output
