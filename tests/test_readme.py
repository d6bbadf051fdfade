"""The README's code runs as written: every Python block, and the "your own model" walk-through."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_nemotron_config, save_tiny_model
from hyprune.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}")
    return text[start : text.index("\n## ", start + 1)]


@pytest.fixture
def demo_folders(tmp_path, tiny_tokenizer, calibration_documents, monkeypatch):
    """A tiny stand-in for what `hyprune demo` leaves: hyprune-demo/teacher and hyprune-demo/data."""
    save_tiny_model(make_nemotron_config(hidden_size=128), tmp_path / "hyprune-demo" / "teacher", tiny_tokenizer)
    (tmp_path / "hyprune-demo" / "data").mkdir()
    (tmp_path / "hyprune-demo" / "data" / "train.txt").write_text(
        tiny_tokenizer.eos_token.join(calibration_documents * 4))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_python_block_runs_as_written(demo_folders):
    blocks = _blocks("python")
    assert blocks, "the README has Python examples"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    import transformers

    small = transformers.AutoModelForCausalLM.from_pretrained(demo_folders / "hyprune-demo" / "python-pruned")
    assert (small.config.hidden_size, small.config.mamba_num_heads) == (96, 6)


# The walk-through at real sizes, scaled to the tiny model: only these words change.
TINY = {"MODEL": "{model}", "calib.jsonl": "{data}", "train.jsonl": "{data}", "heldout.txt": "{data}",
        "hidden_size=3072,mamba_num_heads=112": "hidden_size=24,mamba_num_heads=4", "100000000": "64",
        "4096": "16", "--batch 64": "--batch 2"}


def test_your_own_model_walk_through_runs(tmp_path, nemotron_dir, calib_txt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _blocks("bash")[[i for i, b in enumerate(_blocks("bash")) if b in _section("Your own model")][0]]
    commands = [re.sub(r"\s+#.*$", "", line) for line in script.replace("\\\n", " ").splitlines() if line.strip()]
    assert len(commands) >= 8
    runner = CliRunner()
    for command in commands:
        for real, tiny in TINY.items():
            command = command.replace(real, tiny)
        args = shlex.split(command.format(model=nemotron_dir, data=calib_txt))
        assert args[0] == "hyprune"
        result = runner.invoke(app, [*args[1:], *(["--num-samples", "4"] if args[1] in ("score",) else [])])
        assert result.exit_code == 0, (command, result.output)
    for written in ("work/scores/scores.safetensors", "work/plan.json", "work/pruned/config.json",
                    "work/distill/final/config.json", "work/eval.json", "work/eval.report.md", "work/bench.json",
                    "work/compare/report.md"):
        assert (tmp_path / written).is_file(), written
