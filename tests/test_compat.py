"""hyprune's own cached decoding works across transformers releases, attention-free hybrids included."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers
from typer.testing import CliRunner

from conftest import build_model, make_llama_config, make_mamba2_config, make_nemotron_config
from hyprune.cli import app
from hyprune.compat import CachedDecoding, cache_argument, probe_generate

ATTENTION_FREE = ["linear_attention", "mlp", "linear_attention", "mlp"]


@pytest.mark.parametrize("make_config", [
    make_nemotron_config, lambda: make_nemotron_config(layers_block_type=ATTENTION_FREE), make_mamba2_config,
    make_llama_config,
], ids=["nemotron_h", "nemotron_h-attention-free", "mamba2", "llama"])
def test_cached_decoding_equals_uncached_generation(make_config):
    """Greedy decoding with the cache gives the tokens of a full forward over the growing sequence."""
    model = build_model(make_config())
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    decoding = CachedDecoding(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated cache argument would warn here
        token = decoding.prefill(ids).argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(4):
            token = decoding.step(token).argmax(-1, keepdim=True)
            tokens.append(token)
        seq = ids
        for _ in range(5):  # the reference: no cache at all
            seq = torch.cat([seq, model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(torch.cat(tokens, dim=1), seq[:, 6:])
    assert decoding.length == 10
    assert cache_argument(model) in ("cache", "past_key_values", "cache_params")


def test_prune_summary_says_whether_stock_generate_works(tmp_path, tiny_tokenizer, calib_txt):
    """An attention-free NemotronH prunes fine; the summary records what stock generate() does with it."""
    from conftest import save_tiny_model

    src = save_tiny_model(make_nemotron_config(layers_block_type=ATTENTION_FREE), tmp_path / "src", tiny_tokenizer)
    result = CliRunner().invoke(app, ["prune", str(src), "--data", str(calib_txt), "--target", "mamba_num_heads=4",
                                      "--seq-len", "16", "--num-samples", "4", "--out", str(tmp_path / "out"),
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "hyprune_summary.json").read_text())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    actual = probe_generate(loaded)  # what a user calling generate() gets, measured independently
    assert summary["generate"] == {"transformers": transformers.__version__, "stock_generate_error": actual}
    assert ("stock generate() fails" in result.output) == (actual is not None)


def test_attention_free_prefill_fails_at_most_once_per_model():
    """After the first prefill learns the default cache cannot work, later ones (timed in bench) run one forward."""
    model = build_model(make_nemotron_config(layers_block_type=ATTENTION_FREE))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    ids = torch.randint(1, 200, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = CachedDecoding(model).prefill(ids)
        before = len(calls)
        second = CachedDecoding(model).prefill(ids)
    assert len(calls) - before == 1
    assert torch.equal(first, second)
