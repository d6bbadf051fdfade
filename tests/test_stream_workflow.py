"""The streamed path as users meet it: ``--stream`` on ``score`` and ``prune``, the automatic choice, and
the refusals, each checked against the in-memory path on the same inputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hyprune import api
from hyprune.cli import app
from hyprune.config import LoadConfig
from hyprune.errors import HypruneError
from hyprune.stream import blocks
from hyprune.stream.choice import should_stream, weights_bytes

from conftest import build_model, make_nemotron_config


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny NemotronH saved in several shards (streaming reads across them)."""
    path = tmp_path_factory.mktemp("models") / "sharded"
    build_model(make_nemotron_config()).save_pretrained(path, max_shard_size="60kB")
    tiny_tokenizer.save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def tensors(folder):
    """Every tensor of a checkpoint folder, by its model name (as stock from_pretrained loads it)."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.state_dict()


COMMON = ("--seq-len", 16, "--num-samples", 6, "--batch-size", 2, "--quiet")


def test_score_stream_equals_in_memory(sharded_dir, calib_txt, tmp_path):
    for flag in ("--stream", "--no-stream"):
        result = invoke("score", sharded_dir, "--data", calib_txt, "--out", tmp_path / flag, flag, *COMMON)
        assert result.exit_code == 0, result.output
    streamed, whole = (load_file(tmp_path / f / "scores.safetensors") for f in ("--stream", "--no-stream"))
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    summary = json.loads((tmp_path / "--stream" / "scores.json").read_text())
    assert summary["calibration"]["streamed"] is True


@pytest.mark.parametrize("request_args", [
    ("--target", "hidden_size=24,mamba_num_heads=4,intermediate_size=40"),
    ("--target", "hidden_size=24", "--drop-blocks", 1, "--depth-method", "block_influence"),
    ("--drop-blocks", 1, "--depth-method", "kl"),
], ids=["width", "width+depth", "depth-kl"])
def test_prune_stream_writes_what_in_memory_writes(sharded_dir, calib_txt, tmp_path, request_args):
    outs = {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / flag.strip("-")
        result = invoke("prune", sharded_dir, "--data", calib_txt, "--out", outs[flag], flag, *request_args, *COMMON)
        assert result.exit_code == 0, result.output
    plans = [json.loads((outs[f] / "plan.json").read_text()) for f in outs]
    assert plans[0] == plans[1]
    streamed, whole = tensors(outs["--stream"]), tensors(outs["--no-stream"])
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)
    assert json.loads((outs["--stream"] / "hyprune_summary.json").read_text())["streamed"] is True
    assert (outs["--stream"] / "report.md").is_file() and (outs["--stream"] / "model.safetensors.index.json").is_file()


def test_stream_is_chosen_when_the_weights_do_not_fit(sharded_dir, monkeypatch, caplog):
    load = LoadConfig(model=sharded_dir)
    assert not should_stream(load)  # a few hundred kB fit
    need = weights_bytes(sharded_dir, "float32")
    monkeypatch.setattr("hyprune.stream.choice.available_memory", lambda device: need)  # 80% of need is free
    with caplog.at_level(logging.WARNING, logger="hyprune.stream"):
        assert should_stream(load)
    assert "reading it block by block" in caplog.text and "--no-stream" in caplog.text
    assert not should_stream(LoadConfig(model=sharded_dir, stream=False))
    assert weights_bytes(sharded_dir, "bfloat16") * 2 == need


def test_stream_refusals_come_before_any_work(sharded_dir, calib_txt, tmp_path, tiny_tokenizer):
    with pytest.raises(HypruneError, match="--method state-taylor2 needs the whole model in memory"):
        api.prune(str(sharded_dir), tmp_path / "w", method="state-taylor2", ratio=0.25, data=str(calib_txt),
                  stream=True)
    with pytest.raises(HypruneError, match="GGUF"):
        should_stream(LoadConfig(model=sharded_dir, stream=True, gguf_file="x.gguf"))
    with pytest.raises(HypruneError, match="--device-map"):
        should_stream(LoadConfig(model=sharded_dir, stream=True, device_map="auto"))
    with pytest.raises(HypruneError, match="not one"):
        should_stream(LoadConfig(model="org/some-hub-id", stream=True))
    pickled = tmp_path / "pickled"  # a config and pickle weights only
    model = build_model(make_nemotron_config())
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(HypruneError, match="pickle"):
        should_stream(LoadConfig(model=pickled, stream=True))
    assert not (tmp_path / "w").exists()


def test_a_module_larger_than_the_free_memory_is_refused_by_name(sharded_dir, monkeypatch):
    """The embeddings (read first) or a block that does not fit in the free memory: an error naming it and
    its size in the compute dtype, before it is read."""
    from hyprune.stream.score import stream_activation_scores

    windows = torch.randint(1, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    reader = blocks.ShardReader(sharded_dir)
    block = sum(torch.Size(reader.shape(n)).numel() * 4 for n in reader.names() if ".layers.0." in n)
    free = iter([10**12])  # plenty for the embeddings, then less than block 0 needs
    monkeypatch.setattr(blocks, "available_memory", lambda device: next(free, block - 1))
    expected = rf"'model.layers.0' needs {block / 2**20:.2f} MiB as torch.float32 and cpu has "
    with pytest.raises(HypruneError, match=expected + r".*does not fit"):
        stream_activation_scores(sharded_dir, windows, batch_size=2, progress=False)
    monkeypatch.setattr(blocks, "available_memory", lambda device: block - 1)
    with pytest.raises(HypruneError, match=r"'model.embeddings' needs"):
        stream_activation_scores(sharded_dir, windows, batch_size=2, progress=False)


def test_activations_spill_to_disk_with_the_same_scores(sharded_dir, calib_txt, tmp_path, monkeypatch, caplog):
    """Forced to spill (no share of the free memory for activations), the block inputs live in a file in the spill folder, logged, removed
    after; the scores do not change."""
    from hyprune.stream.score import stream_activation_scores

    windows = torch.randint(1, 200, (5, 12), generator=torch.Generator().manual_seed(0))
    expected = stream_activation_scores(sharded_dir, windows, batch_size=2, progress=False)
    monkeypatch.setattr(blocks, "SPILL_FRACTION", 0.0)
    monkeypatch.setattr(blocks.tempfile, "gettempdir", lambda: str(tmp_path))
    with caplog.at_level(logging.INFO, logger="hyprune.stream"):
        got = stream_activation_scores(sharded_dir, windows, batch_size=2, progress=False)
    assert "spill to" in caplog.text and str(tmp_path) in caplog.text
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not list(tmp_path.glob("hyprune-activations-*"))  # removed after the sweep


def test_prune_stream_wanda_cli_equals_in_memory(sharded_dir, calib_txt, tmp_path):
    outs = {}
    for flag in ("--stream", "--no-stream"):
        outs[flag] = tmp_path / flag.strip("-")
        result = invoke("prune", sharded_dir, "--data", calib_txt, "--out", outs[flag], flag, "--method", "wanda",
                        "--sparsity", 0.5, *COMMON)
        assert result.exit_code == 0, result.output
    streamed, whole = tensors(outs["--stream"]), tensors(outs["--no-stream"])
    assert all(torch.equal(streamed[k], whole[k]) for k in whole)
    summaries = [json.loads((outs[f] / "hyprune_summary.json").read_text()) for f in outs]
    assert summaries[0]["method"]["total"] == summaries[1]["method"]["total"]
    assert summaries[0]["parameters"] == summaries[1]["parameters"]
    assert (outs["--stream"] / "report.md").is_file()


def test_score_depth_stream_equals_in_memory(sharded_dir, calib_txt, tmp_path):
    for flag in ("--stream", "--no-stream"):
        result = invoke("score", sharded_dir, "--data", calib_txt, "--out", tmp_path / flag, "--depth", "angular",
                        "--window", 2, flag, *COMMON)
        assert result.exit_code == 0, result.output
    streamed, whole = (json.loads((tmp_path / f / "block_scores.json").read_text()) for f in ("--stream", "--no-stream"))
    assert streamed["scores"] == whole["scores"] and streamed["window"] == 2
