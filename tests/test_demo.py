"""`hyprune demo` end to end on a tiny budget: corpus, tokenizer, teacher, prune, evaluate, cache reuse."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console
from transformers import AutoModelForCausalLM

from hyprune.demo import run_demo, stdlib_files
from hyprune.errors import HypruneError

TINY = dict(max_train_bytes=300_000, max_test_bytes=60_000, calib_windows=8, eval_windows=8, progress=False)


def _run(out, **kw):
    buffer = io.StringIO()
    results = run_demo(str(out), train_minutes=0.05, console=Console(file=buffer, width=200), **TINY, **kw)
    return results, buffer.getvalue()


def test_stdlib_corpus_is_found_and_ordered():
    files = stdlib_files()
    rels = [rel for rel, _ in files]
    assert len(files) > 100
    assert not any(part in ("test", "tests", "site-packages") for rel in rels for part in rel.split("/")[:-1])
    assert rels == [rel for rel, _ in stdlib_files()]  # deterministic


def test_demo_trains_prunes_and_reuses_the_teacher(tmp_path):
    out = tmp_path / "demo"
    results, text = _run(out)

    teacher_dir, pruned_dir = out / "teacher", out / "pruned"
    assert (out / "data" / "train.txt").stat().st_size > 0 and (out / "data" / "test.txt").stat().st_size > 0
    assert (pruned_dir / "plan.json").is_file() and (pruned_dir / "tokenizer.json").is_file()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir)
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    assert 0.4 < n_pruned / n_teacher < 0.6
    assert pruned.config.hidden_size < teacher.config.hidden_size
    assert pruned.config.layers_block_type == teacher.config.layers_block_type

    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["pruned"]["parameters"]["total"] == n_pruned
    assert saved["teacher"]["parameters"]["total"] == n_teacher
    for key in ("teacher", "pruned"):
        assert math.isfinite(saved[key]["heldout"]["perplexity"]) and saved[key]["heldout"]["perplexity"] > 1
    assert saved["teacher"]["reused"] is False and saved["teacher"]["training"]["steps"] >= 1
    assert "held-out perplexity" in text and "total" in text

    weights = next(teacher_dir.glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    again, text = _run(out)
    assert again["teacher"]["reused"] is True
    assert "reusing the model trained earlier" in text
    assert weights.stat().st_mtime_ns == mtime
    assert again["teacher"]["heldout"]["perplexity"] == pytest.approx(saved["teacher"]["heldout"]["perplexity"])


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HypruneError, match="does not look like a hyprune demo folder"):
        run_demo(str(tmp_path), train_minutes=0.05, overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
