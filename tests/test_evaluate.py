"""hyprune.evaluate: perplexity (hand computation, stride), eval JSON, the lm-eval bridge, bench and cache bytes."""

from __future__ import annotations

import importlib
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

from conftest import EOS, build_model, make_llama_config, make_mamba2_config, make_nemotron_config
from hyprune.arch import family_for_config
from hyprune.compat import cache_argument, output_cache
from hyprune.errors import HypruneError
from hyprune.evaluate import (bench, cache_bytes, eval_perplexity, evaluate, format_bench_table, measured_cache_bytes,
                              perplexity, strided_windows)
from hyprune.evaluate import harness

# `hyprune.evaluate.bench` is the function (re-exported); the module is reached through importlib
bench_module = importlib.import_module("hyprune.evaluate.bench")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights fails the test: the error must come before."""
    import hyprune.models

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the input error was raised")

    monkeypatch.setattr(hyprune.models, "load_model", refuse)


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------
class Bigram(torch.nn.Module):
    """logits[t] = table[token[t]]: the next-token distribution depends only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def hand_nll(table: list[list[float]], prev: int, nxt: int) -> float:
    row = table[prev]
    return math.log(sum(math.exp(v) for v in row)) - row[nxt]


TABLE = [[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.7, 0.2], [0.0, 0.0, 1.0, -2.0], [-0.4, 2.5, 0.1, 0.9]]
STREAM = [0, 2, 3, 1, 1, 2, 0, 3, 3, 0, 2, 1]


def test_perplexity_matches_a_hand_computation():
    model = Bigram(torch.tensor(TABLE))
    windows = torch.tensor(STREAM).view(3, 4)
    # non-overlapping: targets 1..3 of each window; the first token of a window is never predicted
    nll = [hand_nll(TABLE, w[t - 1], w[t]) for w in windows.tolist() for t in range(1, 4)]
    got = perplexity(model, windows, batch_size=2)
    assert got["tokens"] == 9 and got["windows"] == 3 and got["seq_len"] == 4 and got["stride"] is None
    assert got["loss"] == pytest.approx(sum(nll) / 9, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(sum(nll) / 9), rel=1e-6)
    # strided: every token of the stream but the first counts once
    nll_all = [hand_nll(TABLE, STREAM[t - 1], STREAM[t]) for t in range(1, len(STREAM))]
    strided = perplexity(model, windows, batch_size=2, stride=3)
    assert strided["tokens"] == len(STREAM) - 1
    assert strided["loss"] == pytest.approx(sum(nll_all) / len(nll_all), rel=1e-6)


@pytest.mark.parametrize("stride", [1, 2, 3, 5, 6])
def test_strided_windows_count_every_token_once_with_enough_context(stride):
    seq_len, stream = 6, torch.arange(4 * 6)
    windows, counted = strided_windows(stream, seq_len, stride)
    assert windows.shape[1] == seq_len and len(counted) == len(windows)
    targets = []
    for k, (window, n) in enumerate(zip(windows.tolist(), counted.tolist())):
        assert window == list(range(window[0], window[0] + seq_len))  # consecutive tokens of the stream
        for pos in range(seq_len - n, seq_len):  # the window's counted targets
            targets.append(window[pos])
            if k > 0:
                assert pos >= seq_len - stride  # at least seq_len - stride tokens of context
    if stride < seq_len:
        assert targets == list(range(1, len(stream)))  # each token but the first, once, in order
    else:  # stride == seq_len: the non-overlapping windows
        assert targets == [t for t in range(len(stream)) if t % seq_len]


def test_stride_equal_to_seq_len_is_non_overlapping():
    model = build_model(make_nemotron_config())
    windows = torch.randint(1, 320, (3, 8), generator=torch.Generator().manual_seed(0))
    plain = perplexity(model, windows)
    assert perplexity(model, windows, stride=8)["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    half = perplexity(model, windows, stride=4)
    assert half["tokens"] == 3 * 8 - 1 and half["windows"] == 5 and half["stride"] == 4
    with pytest.raises(HypruneError, match="--stride"):
        perplexity(model, windows, stride=9)


def test_eval_perplexity_writes_json(nemotron_dir, calib_txt, tmp_path):
    out = tmp_path / "res" / "results.json"
    result = eval_perplexity(nemotron_dir, calib_txt, seq_len=16, out=out, stride=8, num_windows=3, batch_size=2)
    saved = json.loads(out.read_text())
    assert saved == result
    for key in ("perplexity", "tokens", "loss", "windows", "seq_len", "stride", "data", "model"):
        assert key in saved
    assert saved["tokens"] == 3 * 16 - 1 and saved["seq_len"] == 16 and saved["stride"] == 8
    assert 1 < saved["perplexity"] < 1e4 and saved["model"] == str(nemotron_dir)
    # the same number as the in-memory function on the same windows
    from hyprune.data import heldout_windows
    from hyprune.models import load_model, load_tokenizer

    model, _ = load_model(nemotron_dir)
    windows = heldout_windows(load_tokenizer(nemotron_dir), calib_txt, 16, 3)
    assert perplexity(model, windows, stride=8)["perplexity"] == pytest.approx(saved["perplexity"], rel=1e-5)
    with pytest.raises(HypruneError, match="already exists"):
        eval_perplexity(nemotron_dir, calib_txt, seq_len=16, out=out, num_windows=1)


def test_bad_eval_inputs_fail_before_the_weights(nemotron_dir, calib_txt, tmp_path, no_weights):
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass" + EOS)
    cases = [
        (dict(data=tmp_path / "missing.txt", seq_len=16), "does not exist"),
        (dict(data=short, seq_len=64), "fewer than one window"),
        (dict(data=calib_txt), "--seq-len"),
        (dict(data=calib_txt, seq_len=1), "at least 2"),
        (dict(data=calib_txt, seq_len=16, stride=17), "--stride"),
        (dict(seq_len=16), "--data"),
        ({}, "Nothing to evaluate"),
        (dict(data=calib_txt, seq_len=16, out=tmp_path), "is a folder"),
        (dict(data=calib_txt, seq_len=16, out=nemotron_dir / "r.json"), "never writes into its inputs"),
        (dict(data=calib_txt, seq_len=16, shots=5), "--tasks"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HypruneError, match=message):
            evaluate(nemotron_dir, **kwargs)
    with pytest.raises(HypruneError, match="does not exist"):
        eval_perplexity(tmp_path / "no-model", calib_txt, seq_len=16)


# ---------------------------------------------------------------------------------------------
# lm-eval bridge
# ---------------------------------------------------------------------------------------------
def test_missing_lm_eval_says_how_to_install(monkeypatch, nemotron_dir, no_weights):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(HypruneError, match=r"pip install 'hyprune\[eval\]'"):
        harness.run_tasks(object(), object(), ["piqa"])
    with pytest.raises(HypruneError, match=r"hyprune\[eval\]"):
        evaluate(nemotron_dir, tasks="piqa,arc_easy")


RAW = {  # the shape of lm-eval 0.4's simple_evaluate output, trimmed
    "results": {
        "piqa": {"alias": "piqa", "acc,none": 0.75, "acc_stderr,none": 0.1, "acc_norm,none": 0.8,
                 "acc_norm_stderr,none": "N/A"},
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05},
    },
    "n-shot": {"piqa": 0, "gsm8k": 5},
    "n-samples": {"piqa": {"original": 1838, "effective": 4}, "gsm8k": {"original": 1319, "effective": 4}},
}


def fake_lm_eval(calls: dict):
    class Manager:
        all_tasks = ["arc_easy", "gsm8k", "piqa"]

        def __init__(self, include_path=None, include_defaults=True):
            calls["manager"] = (include_path, include_defaults)

    def HFLM(pretrained, tokenizer, batch_size):  # noqa: N802
        calls["hflm"] = (pretrained, tokenizer, batch_size)
        return "wrapped"

    def simple_evaluate(model, tasks, num_fewshot, limit, task_manager, **kw):
        calls["evaluate"] = (model, tasks, num_fewshot, limit)
        return RAW

    return SimpleNamespace(simple_evaluate=simple_evaluate, HFLM=HFLM, TaskManager=Manager, version="0.4.fake")


def test_task_results_are_parsed_with_shots(monkeypatch, nemotron_dir, tmp_path):
    calls = {}
    monkeypatch.setattr(harness, "_lm_eval", lambda: fake_lm_eval(calls))
    out = tmp_path / "tasks.json"
    result = evaluate(nemotron_dir, tasks="piqa, gsm8k", shots=5, limit=4, batch_size=2, out=out)
    assert json.loads(out.read_text()) == result
    model, tokenizer, batch = calls["hflm"]
    assert isinstance(model, transformers.PreTrainedModel) and batch == 2  # the in-memory model, loaded once
    assert calls["evaluate"] == ("wrapped", ["piqa", "gsm8k"], 5, 4)
    piqa = result["tasks"]["piqa"]
    assert piqa["acc"] == 0.75 and piqa["acc_stderr"] == 0.1 and piqa["acc_norm"] == 0.8
    assert piqa["acc_norm_stderr"] is None and piqa["shots"] == 0 and piqa["samples"] == 4
    gsm = result["tasks"]["gsm8k"]
    assert "acc" not in gsm and gsm["metrics"]["exact_match,strict-match"] == 0.25 and gsm["shots"] == 5
    assert result["shots"] == 5 and result["limit"] == 4 and "perplexity" not in result


def test_unknown_task_fails_before_the_weights(monkeypatch, nemotron_dir, no_weights):
    monkeypatch.setattr(harness, "_lm_eval", lambda: fake_lm_eval({}))
    with pytest.raises(HypruneError, match="did you mean piqa"):
        evaluate(nemotron_dir, tasks="piqaa")


def test_lm_eval_runs_a_local_task_on_the_in_memory_model(nemotron_dir, calib_txt, tmp_path, monkeypatch):
    """The real harness, offline: a multiple-choice task from a local YAML + JSONL (no hub dataset)."""
    pytest.importorskip("lm_eval")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")  # keep ~/.cache clean
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"{a} plus {b}?", "choices": [str(a + b), str(a + b + 1), "seven"], "label": 0}
            for a in range(3) for b in range(2)]
    (tasks / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "tiny_sums.yaml").write_text(
        "task: tiny_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'sums.jsonl'}\ntest_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\nmetadata:\n  version: 1.0\n")
    result = evaluate(nemotron_dir, data=calib_txt, seq_len=16, num_windows=2, tasks="tiny_sums", task_paths=tasks,
                      shots=1, limit=4, batch_size=4, out=tmp_path / "r.json")
    entry = result["tasks"]["tiny_sums"]
    assert 0 <= entry["acc"] <= 1 and 0 <= entry["acc_norm"] <= 1
    assert entry["shots"] == 1 and entry["samples"] == 4 and result["tokens"] == 2 * 15
    assert entry["acc_stderr"] is not None and entry["acc_stderr"] >= 0


# ---------------------------------------------------------------------------------------------
# Cache bytes and bench
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_config", [make_nemotron_config, make_llama_config, make_mamba2_config],
                         ids=["nemotron_h", "llama", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cache_bytes_formula_equals_the_real_cache(make_config, dtype):
    config = make_config()
    model, family = build_model(config).to(dtype), family_for_config(config)
    cache_arg = cache_argument(model)
    for context in (5, 11):
        out = model(input_ids=torch.randint(1, 320, (2, context)), use_cache=True)
        cache = output_cache(out, cache_arg)
        expected = cache_bytes(config, family, context, dtype)
        assert measured_cache_bytes(cache) == 2 * expected["total"], (context, expected)
    kinds = family.block_kinds(config)
    if "mamba" in kinds:  # conv (I + 2GN) x K in the model dtype, SSM [H, P, N] in float32; flat in context
        size = torch.tensor([], dtype=dtype).element_size()
        h, p, g, n = 8, config.head_dim if family.name == "mamba2" else 4, 2, 6
        assert expected["mamba_conv"] == kinds.count("mamba") * (h * p + 2 * g * n) * 4 * size
        assert expected["mamba_ssm"] == kinds.count("mamba") * h * p * n * 4
        assert cache_bytes(config, family, 1000, dtype)["mamba_ssm"] == expected["mamba_ssm"]


def test_sliding_window_attention_caches_at_most_the_window():
    config = transformers.MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=5)
    model, family = build_model(config), family_for_config(config)
    for context in (3, 9):
        out = model(input_ids=torch.randint(1, 320, (1, context)), use_cache=True)
        assert measured_cache_bytes(output_cache(out, cache_argument(model))) == cache_bytes(config, family, context)["total"]
    assert cache_bytes(config, family, 100) == cache_bytes(config, family, 9)


def test_bench_two_models_interleaved_with_ratios(nemotron_dir, llama_dir, tmp_path, monkeypatch):
    order = []
    measure = bench_module._measure_once
    monkeypatch.setattr(bench_module, "_measure_once",
                        lambda model, ids, n, kv: order.append(model.config.model_type) or measure(model, ids, n, kv))
    out = tmp_path / "bench.json"
    result = bench([str(nemotron_dir), str(llama_dir)], batch_sizes=(1,), context_lengths=(8, 12), decode_tokens=2,
                   repeats=1, warmup=1, out=out)
    assert json.loads(out.read_text()) == result
    assert order == ["nemotron_h", "llama"] * 4  # (warmup + repeat) x 2 contexts, alternating
    a, b = result["models"]
    for entry in (a, b):
        assert entry["parameters"]["total"] > 0 and entry["weights_bytes"] >= 4 * entry["parameters"]["total"]
        assert [row["context"] for row in entry["cache_bytes_per_sequence"]] == [8, 10, 12, 14]
        for run in entry["runs"]:
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token"):
                assert run[key] > 0
            assert run["peak_bytes"] >= entry["weights_bytes"] and run["cache_bytes_per_sequence"]["match"]
    ratio = result["ratios"][0]
    assert ratio["baseline"] == str(nemotron_dir) and ratio["model"] == str(llama_dir)
    assert ratio["parameters"] == pytest.approx(b["parameters"]["total"] / a["parameters"]["total"])
    first = ratio["runs"][0]
    assert first["decode_tokens_per_s"] == pytest.approx(b["runs"][0]["decode_tokens_per_s"]
                                                         / a["runs"][0]["decode_tokens_per_s"])
    # the KV cache of 3 attention layers grows with context; NemotronH's one attention layer + Mamba state less so
    assert ratio["cache_bytes_per_sequence"][-1]["total"] > ratio["cache_bytes_per_sequence"][0]["total"]
    table = format_bench_table(result)
    assert f"| metric | {nemotron_dir.name} | {llama_dir.name} | {llama_dir.name} / {nemotron_dir.name} |" in table
    assert "decode tok/s (batch 1, context 12)" in table and "cache / sequence @ 14" in table


def test_bench_bad_inputs_fail_before_the_weights(nemotron_dir, tmp_path, no_weights):
    (tmp_path / "exists.json").write_text("{}")
    cases = [
        (dict(context_lengths="128,x"), "context-lengths"),
        (dict(batch_sizes=(0,)), "batch-sizes"),
        (dict(decode_tokens=0), "decode-tokens"),
        (dict(repeats=0), "repeats"),
        (dict(dtype="auto"), "explicit --dtype"),
        (dict(out=tmp_path / "exists.json"), "already exists"),
    ]
    for kwargs, message in cases:
        with pytest.raises(HypruneError, match=message):
            bench([str(nemotron_dir)], **kwargs)
    with pytest.raises(HypruneError, match="does not exist"):
        bench([str(nemotron_dir), str(tmp_path / "missing")])
