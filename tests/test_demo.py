"""`hyprune demo` end to end on a tiny budget: corpus, tokenizer, teacher, then the tiny recipe
(prune -> distill -> eval -> bench -> report), and reuse of the teacher and the finished stages."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from hyprune.demo import run_demo, stdlib_files
from hyprune.errors import HypruneError

TINY = dict(max_train_bytes=300_000, max_test_bytes=60_000, calib_windows=8, eval_windows=8, seq_len=64,
            batch_size=8, distill_tokens=64 * 8 * 4, progress=False)


def _run(out, **kw):
    buffer = io.StringIO()
    results = run_demo(str(out), train_tokens=64 * 8 * 6, console=Console(file=buffer, width=200), **TINY, **kw)
    return results, buffer.getvalue()


def test_stdlib_corpus_is_found_and_ordered():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert len(files) > 100
    assert not any(part in ("test", "tests", "site-packages") for rel in rels for part in rel.split("/")[:-1])
    assert rels == [rel for rel, _ in stdlib_files()]  # deterministic


def test_demo_trains_prunes_distills_and_reuses_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    results, text = _run(out)

    teacher_dir, run = out / "teacher", out / "run"
    assert (out / "data" / "train.txt").stat().st_size > 0 and (out / "data" / "test.txt").stat().st_size > 0
    assert (run / "pruned" / "plan.json").is_file() and (run / "distill" / "final" / "tokenizer.json").is_file()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    distilled = AutoModelForCausalLM.from_pretrained(run / "distill" / "final")
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert 0.4 < n_pruned / n_teacher < 0.6
    assert pruned.config.hidden_size < teacher.config.hidden_size
    assert pruned.config.layers_block_type == teacher.config.layers_block_type
    assert {k: v for k, v in distilled.config.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in pruned.config.to_dict().items() if k != "_name_or_path"}
    # the distilled student moved away from the pruned weights
    assert any((a - b).abs().max() > 0 for a, b in zip(pruned.parameters(), distilled.parameters()))

    rows = {r["label"]: r for r in results["models"]}
    assert list(rows) == ["teacher", "pruned", "distilled"]
    assert rows["teacher"]["parameters"] == n_teacher and rows["pruned"]["parameters"] == n_pruned
    measured = json.loads((run / "eval" / "distilled.json").read_text())
    assert rows["distilled"]["perplexity"] == measured["perplexity"] and measured["windows"] == 8
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1 and row["tokens_per_s"] > 0
    assert results["teacher"]["reused"] is False and results["teacher"]["training"]["steps"] >= 1
    log = (run / "distill" / "log.jsonl").read_text().splitlines()
    assert len(log) == 4  # distill_tokens / (batch * seq_len) steps
    report = json.loads((run / "report.json").read_text())
    assert {p["label"] for p in report["points"]} == set(rows) and results["report"] == str(run / "report.md")
    for name in ("teacher", "pruned", "distilled", "held-out perplexity", "report:"):
        assert name in text

    weights = next(teacher_dir.glob("*.safetensors"))
    stamps = (weights.stat().st_mtime_ns, (run / "distill" / "log.jsonl").stat().st_mtime_ns)
    capsys.readouterr()
    again, text = _run(out)
    assert again["teacher"]["reused"] is True and "reusing the model trained earlier" in text
    assert capsys.readouterr().err.count("already done") == 4
    assert (weights.stat().st_mtime_ns, (run / "distill" / "log.jsonl").stat().st_mtime_ns) == stamps
    assert again["models"] == results["models"]


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HypruneError, match="does not look like a hyprune demo folder"):
        run_demo(str(tmp_path), train_tokens=64 * 8 * 6, overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_demo_is_deterministic(tmp_path):
    """Two runs from scratch train the same teacher and print the same table (only the times differ)."""
    from safetensors.torch import load_file

    first, text_a = _run(tmp_path / "a", bench=False)
    second, text_b = _run(tmp_path / "b", bench=False)
    weights = [load_file(next((tmp_path / name / "teacher").glob("*.safetensors"))) for name in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [r["perplexity"] for r in first["models"]] == [r["perplexity"] for r in second["models"]]
    training = [{k: v for k, v in r["teacher"]["training"].items() if k != "seconds"} for r in (first, second)]
    assert training[0] == training[1] and training[0]["steps"] == 6  # 64 * 8 * 6 tokens of 8 x 64

    def table(text: str) -> str:
        return text[text.index("hyprune demo:"): text.index("pruned: ")]

    assert table(text_a) == table(text_b) and "decode tokens/s (rough)" in table(text_a)
