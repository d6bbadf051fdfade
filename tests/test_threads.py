"""The default CPU thread count follows the free cores; --threads overrides it and is logged."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from hyprune import threads as threads_module
from hyprune.cli import app
from hyprune.errors import HypruneError


@pytest.mark.parametrize("cores,load,expected", [(2, 0.0, 2), (2, 0.4, 2), (2, 1.2, 1), (2, 6.0, 1), (16, 3.2, 13)])
def test_default_threads_are_the_free_cores_and_at_least_one(monkeypatch, cores, load, expected):
    monkeypatch.setattr(threads_module, "available_cores", lambda: cores)
    monkeypatch.setattr(threads_module.os, "getloadavg", lambda: (load, load, load))
    chosen, why = threads_module.choose_threads()
    assert chosen == expected
    assert f"{cores} cores" in why and ("busy" in why) == (expected < cores)


def test_threads_flag_sets_torch_and_is_logged(nemotron_dir):
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(app, ["--threads", "1", "inspect", str(nemotron_dir), "--json"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        assert "using 1 CPU thread: --threads 1" in result.stderr
    finally:
        torch.set_num_threads(before)


def test_threads_below_one_is_refused():
    with pytest.raises(HypruneError, match="at least 1"):
        threads_module.choose_threads(0)
    result = CliRunner().invoke(app, ["--threads", "0", "inspect", "x"])
    assert result.exit_code == 2 and result.output.strip() == "error: --threads must be at least 1, got 0."
