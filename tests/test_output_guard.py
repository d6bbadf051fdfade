"""Every command that writes goes through one output guard (`hyprune.io`), before any work.

Each writing command is run against each bad output: an existing file, a non-empty folder, a path
inside an input model folder, an input data file itself (the last two even with --overwrite), a
path under a regular file (fails for root too) and a read-only folder (simulated: root can write
anywhere, so the guard's write probe is made to fail). Every case must exit 2 with one ``error:``
line, write nothing, leave the inputs byte-identical and refuse before any model or tokenizer is
loaded (the loaders are replaced by ones that fail loudly).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import tree_digest
from hyprune.cli import _run, app
from hyprune.errors import HypruneError
from hyprune.io import atomic_dir, atomic_write_json, atomic_write_text, check_output
from hyprune.report import Report

runner = CliRunner()
TARGET = "hidden_size=24,mamba_num_heads=4,n_groups=2"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, nemotron_dir, calib_txt):
    """Inputs of their own (a model, a data file, scores, a report), so a guard bug cannot harm other tests."""
    root = tmp_path_factory.mktemp("guard-inputs")
    model = shutil.copytree(nemotron_dir, root / "model")
    data = shutil.copy(calib_txt, root / "calib.txt")
    scores = root / "scores.safetensors"
    scores.write_bytes(b"not read: the guard refuses first")
    report_dir = root / "run"
    report = Report("eval", "a run")
    report.data = {"model": str(model)}
    report.write(report_dir)
    return {"root": root, "model": Path(model), "data": Path(data), "scores": scores, "report": report_dir}


def _recipe(tmp: Path, inputs: dict, out: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "guard", "model": str(inputs["model"]), "output": str(out),
        "prune": {"data": str(inputs["data"]), "target": {"hidden_size": 24}, "seq_len": 16, "num_samples": 4},
    }))
    return path


# command -> (kind, argv builder (tmp, inputs, out) -> list, has --overwrite, data-like input)
COMMANDS = {
    "score": ("dir", lambda t, i, o: ["score", i["model"], "--data", i["data"], "--out", o, "--quiet"], True, "data"),
    "score-depth": ("dir", lambda t, i, o: ["score", i["model"], "--data", i["data"], "--out", o, "--depth",
                                            "angular", "--quiet"], True, "data"),
    "plan": ("file", lambda t, i, o: ["plan", i["model"], "--scores", i["scores"], "--target", TARGET, "--out", o],
             True, "scores"),
    "prune": ("dir", lambda t, i, o: ["prune", i["model"], "--data", i["data"], "--target", TARGET, "--out", o,
                                      "--quiet"], True, "data"),
    "distill": ("dir", lambda t, i, o: ["distill", "--teacher", i["model"], "--student", i["model"], "--data",
                                        i["data"], "--tokens", 64, "--seq-len", 16, "--out", o, "--quiet"], True,
                "data"),
    "finetune": ("dir", lambda t, i, o: ["finetune", i["model"], "--data", i["data"], "--tokens", 64, "--seq-len", 16,
                                         "--out", o, "--quiet"], True, "data"),
    "cache-teacher": ("dir", lambda t, i, o: ["cache-teacher", i["model"], "--data", i["data"], "--seq-len", 16,
                                              "--out", o, "--quiet"], True, "data"),
    "eval": ("file", lambda t, i, o: ["eval", i["model"], "--data", i["data"], "--seq-len", 16, "--out", o,
                                      "--quiet"], True, "data"),
    "bench": ("file", lambda t, i, o: ["bench", i["model"], "--out", o, "--context-lengths", 8, "--decode-tokens", 2,
                                       "--repeats", 1, "--quiet"], True, None),
    "search": ("dir", lambda t, i, o: ["search", i["model"], "--data", i["data"], "--out", o, "--target-ratio", 0.6,
                                       "--quiet"], True, "data"),
    "report": ("dir", lambda t, i, o: ["report", i["report"], "--out", o], True, "report"),
    "run": ("dir", lambda t, i, o: ["run", _recipe(t, i, o), "--quiet"], False, "data"),
    "demo": ("dir", lambda t, i, o: ["demo", "--out", o, "--quiet"], True, None),
}

CASES = ("existing-file", "non-empty-folder", "inside-model", "input-data", "under-a-file", "read-only")

# what the one error line must say, per case (and where a command has its own words for it)
PHRASES = {
    ("existing-file", "dir"): "is a file", ("existing-file", "file"): "already exists",
    ("non-empty-folder", "dir"): "is not empty", ("non-empty-folder", "file"): "is a folder",
    "inside-model": "is inside the input folder", "input-data": "is the input",
    "under-a-file": "is a file, not a folder", "read-only": "is not writable",
    ("existing-file", "run"): "is not a hyprune run folder", ("non-empty-folder", "run"): "is not a hyprune run folder",
    ("input-data", "run"): "is not a hyprune run folder",
    ("non-empty-folder", "demo"): "does not look like a hyprune demo folder",
}


def _error_line(stderr: str) -> str:
    """The one ``error:`` line; only the threads notice (`hyprune.threads`) may come before it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), stderr
    assert all(line.startswith("using ") for line in lines[:-1]), stderr
    return lines[-1]


def _phrase(case: str, command: str, kind: str) -> str:
    return PHRASES.get((case, command)) or PHRASES.get((case, kind)) or PHRASES[case]


@pytest.fixture
def no_work(monkeypatch):
    """Any model or tokenizer load, scoring or reading of scores/reports means the guard came too late."""
    import hyprune.api
    import hyprune.demo
    import hyprune.models
    import hyprune.report

    def started(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    for module, names in ((hyprune.models, ("load_model", "load_tokenizer")),
                          (hyprune.api, ("load_model", "load_tokenizer", "load_scores", "make_plan")),
                          (hyprune.demo, ("build_corpus",)),
                          (hyprune.report, ("compare_reports", "write_run_report"))):
        for name in names:
            monkeypatch.setattr(module, name, started)


def _snapshot(*folders: Path) -> dict:
    """Every path (folders too) and every file's bytes under ``folders``."""
    return {str(f): tree_digest(f) | {str(p.relative_to(f)) + "/": "dir" for p in f.rglob("*") if p.is_dir()}
            for f in folders}


def _setup_case(case: str, kind: str, command: str, tmp: Path, inputs: dict, monkeypatch) -> tuple[Path, bool]:
    """The bad ``--out`` for ``case`` and whether to add --overwrite (cases that --overwrite must not unlock)."""
    if case == "existing-file":
        out = tmp / "taken.json"
        out.write_text("keep me\n")
        return out, False
    if case == "non-empty-folder":
        out = tmp / "full"
        out.mkdir()
        (out / "keep.txt").write_text("keep me\n")
        return out, False
    if case == "inside-model":
        folder = inputs["report"] if command == "report" else inputs["model"]
        return (folder / "config.json" if kind == "file" else folder / "out"), True
    if case == "input-data":
        key = COMMANDS[command][3]
        return inputs[key], True
    if case == "under-a-file":
        blocker = tmp / "blocker"
        blocker.write_text("a regular file\n")
        return blocker / ("r.json" if kind == "file" else "out"), False
    if case == "read-only":
        readonly = tmp / "readonly"
        readonly.mkdir()
        import hyprune.io

        real = hyprune.io.tempfile.mkstemp

        def mkstemp(*args, **kwargs):  # a folder that refuses new files, for root as well
            if Path(kwargs.get("dir", ".")).resolve() == readonly.resolve():
                raise PermissionError(13, "Permission denied", str(readonly))
            return real(*args, **kwargs)

        monkeypatch.setattr(hyprune.io.tempfile, "mkstemp", mkstemp)
        return readonly / ("r.json" if kind == "file" else "out"), False
    raise AssertionError(case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_writer_refuses_a_bad_output_before_the_work(command, case, inputs, tmp_path, monkeypatch, no_work):
    kind, argv, has_overwrite, data_key = COMMANDS[command]
    if case in ("inside-model", "input-data") and data_key is None and command == "demo":
        pytest.skip("the demo reads no input")
    if case == "input-data" and data_key is None:
        pytest.skip(f"{command} reads no data file (its model folder is the inside-model case)")
    out, force = _setup_case(case, kind, command, tmp_path, inputs, monkeypatch)
    args = [str(a) for a in argv(tmp_path, inputs, out)] + (["--overwrite"] if force and has_overwrite else [])
    before = _snapshot(tmp_path, inputs["root"])
    result = runner.invoke(app, args)
    assert not isinstance(result.exception, AssertionError), result.exception  # the guard came after the work
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    line = _error_line(result.stderr)
    assert _phrase(case, command, kind) in line, line
    assert str(out) in line, line  # the error names the path
    assert _snapshot(tmp_path, inputs["root"]) == before  # nothing written, nothing replaced, inputs intact


# ---- the guard itself ------------------------------------------------------------------------------
def test_check_output_accepts_new_paths_and_what_overwrite_allows(tmp_path):
    assert check_output(tmp_path / "new" / "deeper", "dir") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output(tmp_path / "r.json", "file") == tmp_path / "r.json"
    (tmp_path / "r.json").write_text("{}")
    check_output(tmp_path / "r.json", "file", overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    check_output(tmp_path / "full", "dir", overwrite=True)
    check_output(tmp_path / "full", "dir", reuse=True)
    check_output(tmp_path / "empty-ok", "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "r.json"]  # the probes left nothing


def test_check_output_refuses_an_output_holding_an_input(tmp_path):
    model = tmp_path / "runs" / "model"
    model.mkdir(parents=True)
    with pytest.raises(HypruneError, match="contains the input"):
        check_output(tmp_path / "runs", "dir", overwrite=True, inputs=(model,))
    with pytest.raises(HypruneError, match="is the input"):
        check_output(model, "dir", overwrite=True, reuse=True, inputs=(None, "org/hub-id", model))


def test_cli_turns_an_os_error_into_one_line_naming_the_path(capsys):
    def full_disk():
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    with pytest.raises(typer.Exit) as exit_info:
        _run(full_disk)
    assert exit_info.value.exit_code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: could not write /data/out/model.safetensors: No space left on device. "
                     "Check the --out location (space, permissions) and retry."]


def test_a_write_that_fails_after_the_checks_is_one_line_and_leaves_nothing(inputs, tmp_path, monkeypatch):
    """eval on the tiny model, with the disk full at the final rename: one line, no results file, no temp file."""
    import hyprune.io

    def replace(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(hyprune.io.os, "replace", replace)
    out = tmp_path / "results.json"
    before = _snapshot(inputs["root"])
    result = runner.invoke(app, ["eval", str(inputs["model"]), "--data", str(inputs["data"]), "--seq-len", "16",
                                 "--num-windows", "2", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert _error_line(result.stderr).startswith(f"error: could not write {out}: No space left"), result.stderr
    assert list(tmp_path.iterdir()) == []
    assert _snapshot(inputs["root"]) == before


def test_report_without_out_refuses_a_run_folder_it_cannot_write(inputs, monkeypatch, no_work):
    import hyprune.io

    real = hyprune.io.tempfile.mkstemp
    target = inputs["report"].resolve()

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", ".")).resolve() == target:
            raise PermissionError(13, "Permission denied", str(target))
        return real(*args, **kwargs)

    monkeypatch.setattr(hyprune.io.tempfile, "mkstemp", mkstemp)
    result = runner.invoke(app, ["report", str(inputs["report"])])
    assert result.exit_code == 2
    assert "is not writable" in result.stderr and "Traceback" not in result.output


def test_atomic_writers_replace_whole_files_and_folders(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1, "p": Path("/p")})
    assert path.read_text() == '{\n "x": 1,\n "p": "/p"\n}\n'
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    atomic_write_text(path, "two\n")
    assert path.read_text() == "two\n"
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert not (tmp_path / "folder").exists()
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "whole").write_text("x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in (tmp_path / "folder").iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "sub"]  # no temporary siblings left
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.json"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
