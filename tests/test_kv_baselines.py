"""The training-free KV baselines (StreamingLLM, TOVA): their masks against step-by-step caches written
with Python lists, and on a model: a budget that holds the whole sequence changes nothing, a small one does."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hyprune.errors import HypruneError
from hyprune.kv import baselines


def test_streaming_mask_is_sinks_plus_the_recent_tokens():
    T, budget, sinks = 20, 7, 2
    got = baselines.streaming_visible(T, budget, sinks)
    for i in range(T):
        cache = list(range(i))
        while len(cache) > budget:  # drop the oldest token that is not a sink
            cache.pop(sinks)
        want = set(cache) | {i}
        assert {j for j in range(T) if got[i, j]} == want, i


def test_tova_mask_matches_a_cache_of_lists():
    B, KV, groups, T, budget = 2, 2, 3, 16, 5
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(B, KV * groups, T, T, generator=g)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    got = baselines.tova_visible(scores, budget, groups)
    for b in range(B):
        for h in range(KV):
            cache = []
            for i in range(T):
                cache.append(i)
                assert {j for j in range(T) if got[b, h, i, j]} == set(cache), (b, h, i)
                if len(cache) > budget:
                    heads = scores[b, h * groups : (h + 1) * groups, i, cache]
                    weights = torch.softmax(heads, dim=-1).mean(0)
                    cache.pop(int(weights.argmin()))
    assert got.sum(-1).max() == budget + 1  # the cache, and the new token


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("method", baselines.BASELINES)
def test_a_budget_that_holds_everything_is_the_plain_model(method):
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        baselines.use(model, method, budget=24)
        same = model(ids).logits
        baselines.use(model, method, budget=6)
        smaller = model(ids).logits
    torch.testing.assert_close(same, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(smaller[:, :7], expected[:, :7], rtol=0, atol=1e-6)  # nothing dropped yet
    assert (smaller[:, 8:] - expected[:, 8:]).abs().max() > 1e-3


def test_bad_baseline_arguments_say_what_is_wrong():
    model = tiny_llama()
    with pytest.raises(HypruneError, match="baseline must be one of"):
        baselines.use(model, "h2o", budget=8)
    with pytest.raises(HypruneError, match="sinks < budget"):
        baselines.use(model, "streaming", budget=4, sinks=4)
