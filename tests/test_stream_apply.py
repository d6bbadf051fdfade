"""Streaming a plan from safetensors shards to shards (`hyprune.stream`), for every registered family.

- `ShardReader` / `ShardWriter`: round trips against ``safetensors``' own reader and writer, and the
  errors (order, shape, dtype, a tensor never written, a missing tensor, a folder of pickle weights).
- `stream_apply` on each family's contract case (`test_family_contract.CASES`), source saved in several
  shards: the output files hold exactly what ``save_pretrained`` of the in-memory ``apply_plan`` holds,
  bit for bit; stock ``from_pretrained`` loads them without missing/unexpected/mismatched keys to the
  same state dict; the index covers the files and totals their bytes; shards keep to the size limit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import test_dense
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_family_contract import NAMES, built
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.errors import HypruneError
from hyprune.stream.apply import stream_apply
from hyprune.stream.shards import ShardReader, ShardWriter


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, through safetensors' own reader."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            names = f.keys()
            for name in names:
                assert name not in out, f"{name} is in two shards"
                out[name] = f.get_tensor(name)
    return out


def file_of(folder: Path) -> dict[str, str]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names = f.keys()
        out.update(dict.fromkeys(names, path.name))
    return out


def data_bytes(path: Path) -> list[int]:
    with safe_open(path, "pt") as f:
        names = f.keys()
        return [f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in names]


# ---- ShardReader / ShardWriter -------------------------------------------------------------------
def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.fp32": torch.randn(7, generator=g),
            "c.fp16": torch.randn(2, 2, 2, generator=g).half(), "d.int64": torch.arange(6).reshape(2, 3),
            "e.empty": torch.zeros(0, 4), "f.scalar": torch.tensor(2.5)}


def write_all(folder: Path, tensors: dict[str, torch.Tensor], limit: int) -> dict:
    writer = ShardWriter(folder, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()], limit)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.close()


def test_writer_round_trips_through_safe_open_and_reader(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path, tensors, 1 << 20)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # one shard: no index
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    reader = ShardReader(tmp_path)
    assert reader.names() == list(tensors) and reader.metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.read(name), tensor), name


def test_writer_shards_in_order_with_an_index(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(7)}  # 40 bytes each
    index = write_all(tmp_path, tensors, 100)  # two tensors per shard
    files = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    on_disk = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert on_disk == index and on_disk["metadata"]["total_size"] == 7 * 40
    assert on_disk["weight_map"] == file_of(tmp_path) and on_disk["weight_map"]["t6"] == files[3]
    assert all(sum(data_bytes(tmp_path / f)) <= 100 for f in files)
    reader = ShardReader(tmp_path)
    assert reader.names() == list(tensors)
    assert reader.shard_sizes() == {files[0]: 80, files[1]: 80, files[2]: 80, files[3]: 40}
    assert reader.shard_of("t3") == files[1] and torch.equal(reader.read("t5"), tensors["t5"])


def test_reader_reads_safetensors_own_files(tmp_path):
    tensors = sample_tensors()
    save_file({k: v for k, v in tensors.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reader = ShardReader(tmp_path)
    assert sorted(reader.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(reader.read(name), tensor), name


def test_writer_refuses_wrong_order_shape_dtype_and_missing(tmp_path):
    entries = [("x", (2, 3), torch.float32), ("y", (4,), torch.bfloat16)]
    writer = ShardWriter(tmp_path, entries, 1 << 20)
    with pytest.raises(HypruneError, match="out of order; the next output tensor is 'x'"):
        writer.write("y", torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(HypruneError, match=r"is \[3, 2\] torch.float32; its entry says \[2, 3\]"):
        writer.write("x", torch.zeros(3, 2))
    with pytest.raises(HypruneError, match="torch.float16; its entry says"):
        writer.write("x", torch.zeros(2, 3, dtype=torch.float16))
    writer.write("x", torch.zeros(2, 3))
    with pytest.raises(HypruneError, match="1 output tensors were never written, starting with 'y'"):
        writer.close()
    writer.abort()


def test_reader_errors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HypruneError, match=r"holds only pytorch_model.bin \(pickle\); streaming needs safetensors"):
        ShardReader(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(HypruneError, match="has no tensor 'v'"):
        ShardReader(tmp_path).read("v")


# ---- stream_apply, every family ------------------------------------------------------------------
def saved_source(model, folder: Path, shards: int = 3) -> Path:
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(folder, max_shard_size=size // shards)
    assert len(list(folder.glob("*.safetensors"))) >= 2, "the source should be sharded"
    return folder


def check_stream(model, plan, pruned, tmp_path: Path, limit: int) -> None:
    """(a)-(d) of the module docstring for one model, plan and its in-memory pruned model."""
    source = saved_source(model, tmp_path / "source")
    with pytest.warns(UserWarning, match="No tokenizer"):
        summary = stream_apply(source, plan, tmp_path / "out", progress=False, max_shard_bytes=limit)
    out = tmp_path / "out"
    pruned.save_pretrained(tmp_path / "reference")
    got, want = file_tensors(out), file_tensors(tmp_path / "reference")
    assert got.keys() == want.keys()
    for name, tensor in want.items():  # (a) what save_pretrained of apply_plan writes, bit for bit
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # (b)
    assert not any(info.values()), info
    state = pruned.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name].to(tensor.dtype)), name
    files = sorted(out.glob("*.safetensors"))
    total = sum(sum(data_bytes(f)) for f in files)
    if len(files) > 1:  # (c)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == file_of(out) and index["metadata"]["total_size"] == total
    for f in files:  # (d) over the limit only as a shard of one tensor
        sizes = data_bytes(f)
        assert sum(sizes) <= limit or len(sizes) == 1, f.name
    assert summary["tensors"] == len(got) and summary["shards"] == len(files) and summary["bytes"] == total
    assert json.loads((out / "plan.json").read_text())["hidden"] == plan.hidden
    assert summary["parameters"]["after"]["total"] < summary["parameters"]["before"]["total"]


@pytest.mark.parametrize("name", NAMES)
def test_stream_apply_equals_apply_plan(name, tmp_path):
    model, plan, pruned = built(name)
    size = sum(t.numel() * t.element_size() for t in pruned.state_dict().values())
    check_stream(model, plan, pruned, tmp_path, limit=size // 3)


def test_stream_apply_bf16_and_tied_lm_head_in_the_file(tmp_path):
    """A bf16 Llama with tied embeddings whose files also hold lm_head.weight (some checkpoints do): the
    output holds the embeddings once, as save_pretrained writes them."""
    model = test_dense.dense("llama", tie=True).to(torch.bfloat16)
    plan = test_dense.random_dense_plan(model, random.Random(1), hidden=24, heads_per_kv=1, ffn=30, drop=[1])
    check_stream(model, plan, apply_plan(model, plan), tmp_path / "plain", limit=4000)
    source = tmp_path / "with_head"
    model.save_pretrained(source)
    state = file_tensors(source)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="No tokenizer"):
        stream_apply(source, plan, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in file_tensors(tmp_path / "out")


def test_stream_apply_guards_the_output_and_copies_the_tokenizer(tmp_path, tiny_tokenizer):
    model, plan, _ = built("llama")
    source = saved_source(model, tmp_path / "source")
    tiny_tokenizer.save_pretrained(source)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(HypruneError, match="is not empty"):
        stream_apply(source, plan, tmp_path / "busy", progress=False)
    with pytest.raises(HypruneError, match="inside the input folder"):
        stream_apply(source, plan, source / "out", progress=False)
    stream_apply(source, plan, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()
