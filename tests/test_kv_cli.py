"""`hyprune kv-compress` as users run it: a short DMS / DMC retrofit of a tiny Llama, the checkpoint it
writes (stock from_pretrained, config.hyprune_kv), `hyprune.kv.enable` + generate, the log's ratio term,
and a resume that refuses a changed ratio."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hyprune.cli import app
from hyprune.kv.model import CompressedCache, enable

ARGS = ("--tokens", 2048, "--seq-len", 32, "--batch", 4, "--lr", 1e-3, "--min-lr", 1e-4, "--warmup-steps", 2,
        "--checkpoint-every", 8, "--eval-every", 0, "--quiet")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("method", ["dms", "dmc"])
def test_kv_compress_writes_a_checkpoint_that_enable_generates_with(method, llama_dir, calib_txt, tmp_path):
    out = tmp_path / method
    result = invoke("kv-compress", llama_dir, "--method", method, "--ratio", 2, "--window", 4, "--offset", 1.0,
                    "--data", calib_txt, "--out", out, *ARGS)
    assert result.exit_code == 0, result.output
    assert "KV cache kept share at the end" in result.output
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert steps and all("aux_loss" in r and "kv_kept_share" in r for r in steps)
    assert steps[0]["kv_target_ratio"] == 1.0 and steps[-1]["kv_target_ratio"] == 2.0
    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.config.hyprune_kv["method"] == method and model.config.hyprune_kv["window"] == 4
    enable(model.eval())
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    cache = CompressedCache(model)
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                               cache=cache)
    assert generated.shape == (2, 16) and cache.bytes_used() > 0


def test_kv_compress_resume_refuses_a_changed_ratio(llama_dir, calib_txt, tmp_path):
    out = tmp_path / "run"
    first = invoke("kv-compress", llama_dir, "--ratio", 2, "--data", calib_txt, "--out", out, *ARGS)
    assert first.exit_code == 0, first.output
    again = invoke("kv-compress", llama_dir, "--ratio", 3, "--data", calib_txt, "--out", out, "--resume", *ARGS)
    assert again.exit_code != 0 and "ratio" in again.output


def test_bench_kv_measures_the_compressed_cache_and_matches_its_count(llama_dir, calib_txt, tmp_path):
    out = tmp_path / "run"
    assert invoke("kv-compress", llama_dir, "--ratio", 2, "--offset", 0.0, "--window", 2, "--data", calib_txt,
                  "--out", out, *ARGS).exit_code == 0
    args = ("--context-lengths", 24, "--decode-tokens", 4, "--repeats", 1, "--warmup", 0, "--batch-sizes", 2)
    kv = invoke("bench", out / "final", "--kv", *args, "--out", tmp_path / "kv.json")
    plain = invoke("bench", out / "final", *args, "--out", tmp_path / "plain.json")
    assert kv.exit_code == 0 and plain.exit_code == 0, kv.output + plain.output
    row = json.loads((tmp_path / "kv.json").read_text())["models"][0]["runs"][0]["cache_bytes_per_sequence"]
    base = json.loads((tmp_path / "plain.json").read_text())["models"][0]["runs"][0]["cache_bytes_per_sequence"]
    assert row["match"] and row["measured"] == row["analytic"]  # pools hold what the decisions imply
    assert row["uncompressed_analytic"] == base["analytic"] == base["measured"]
    assert row["measured"] < base["measured"]  # offset 0: about half the tokens evicted
    refused = invoke("bench", llama_dir, "--kv", *args, "--out", tmp_path / "no.json")
    assert refused.exit_code != 0 and "config.hyprune_kv" in refused.output


def test_eval_kv_measures_the_compressed_model(llama_dir, calib_txt, tmp_path):
    out = tmp_path / "run"
    assert invoke("kv-compress", llama_dir, "--ratio", 2, "--offset", 0.0, "--window", 2, "--data", calib_txt,
                  "--out", out, *ARGS).exit_code == 0
    common = ("--data", calib_txt, "--seq-len", 32, "--num-windows", 4, "--quiet")
    kv = invoke("eval", out / "final", "--kv", *common, "--out", tmp_path / "kv.json")
    plain = invoke("eval", out / "final", *common, "--out", tmp_path / "plain.json")
    assert kv.exit_code == 0 and plain.exit_code == 0, kv.output + plain.output
    with_kv, without = (json.loads((tmp_path / f).read_text()) for f in ("kv.json", "plain.json"))
    assert with_kv["kv"]["method"] == "dms" and "kv" not in without
    assert with_kv["perplexity"] != without["perplexity"]  # offset 0: tokens evicted past the window
    refused = invoke("eval", llama_dir, "--kv", *common, "--out", tmp_path / "no.json")
    assert refused.exit_code != 0 and "config.hyprune_kv" in refused.output
