"""DMC and DMS on random tensors: with every decision 0 they are plain attention bit for bit; with hard
decisions the training forward (masks, running sums) equals token-by-token decoding with the paged cache;
the cache holds the bytes the decisions imply."""

from __future__ import annotations

import math

import pytest
import torch

from hyprune.kv.methods import DMCState, DMSState, attend, causal_bias, dmc_accumulate, dmc_bias, dms_bias, segment_sums
from hyprune.kv.store import PagedRows

B, KV, GROUPS, T, D = 2, 2, 3, 23, 8
SCALE = 1 / math.sqrt(D)


def tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, KV * GROUPS, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, KV, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, KV, T, D, generator=g, dtype=dtype)
    return q, k, v, g


def hard_decisions(g, p):
    """0/1 decisions, different for every sequence and head."""
    return (torch.rand(B, KV, T, generator=g) < p).float()


def eager(q, k, v):
    """transformers' eager attention (repeat_kv, scores + causal mask, softmax in float32)."""
    k, v = (x.repeat_interleave(GROUPS, dim=1) for x in (k, v))
    scores = torch.matmul(q, k.transpose(2, 3)) * SCALE + causal_bias(T, q)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def test_segment_sums_against_a_loop():
    x = torch.randn(3, 7)
    x[0, 2] = float("-inf")
    got = segment_sums(x)
    for i in range(7):
        for j in range(7):
            want = float("-inf") if j > i else float(x[:, j + 1 : i + 1].sum(-1)[1])
            assert got[1, i, j].item() == pytest.approx(want, abs=1e-6) or (math.isinf(want) and got[1, i, j] == want)
    assert torch.isinf(got[0, 3, 1]) and got[0, 1, 0] == x[0, 1]  # -inf stays exact, no NaN
    assert not torch.isnan(got).any()


def test_every_decision_zero_is_plain_attention_bit_for_bit():
    q, k, v, _ = tensors()
    zero = torch.zeros(B, KV, T)
    expected = eager(q, k, v)
    assert torch.equal(dms_bias(zero, window=4), torch.zeros(B, KV, T, T))
    assert torch.equal(attend(q, k, v, causal_bias(T, q) + dms_bias(zero, 4), SCALE), expected)
    keys, values, _ = dmc_accumulate(k, v, zero, torch.rand(B, KV, T) + 0.5)
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert torch.equal(attend(q, keys, values, causal_bias(T, q) + dmc_bias(zero), SCALE), expected)


def test_dmc_accumulation_is_the_weighted_average_of_each_run():
    """Against a loop: each position holds the omega-weighted mean of its run (a run starts at alpha 0)."""
    _, k, v, g = tensors(1)
    alpha, omega = hard_decisions(g, 0.6), torch.rand(B, KV, T, generator=g) + 0.1
    keys, _, z = dmc_accumulate(k, v, alpha, omega)
    for b in range(B):
        for h in range(KV):
            start = 0
            for t in range(T):
                if t == 0 or alpha[b, h, t] == 0:
                    start = t
                w = omega[b, h, start : t + 1]
                mean = (w[:, None] * k[b, h, start : t + 1]).sum(0) / w.sum()
                torch.testing.assert_close(keys[b, h, t], mean, rtol=1e-5, atol=1e-6)
                assert z[b, h, t].item() == pytest.approx(w.sum().item(), rel=1e-6)


def decode(state_cls, q, k, v, alpha, omega, prefill, **kw):
    """Prefill ``prefill`` tokens (their outputs from the training forward, as a model's prefill computes
    them), then one token at a time through the cache; every position's output and the final state."""
    state = state_cls(B, KV, D, page=4, **kw)
    valid = torch.ones(B, KV, T, dtype=torch.bool)
    outputs = []
    if prefill:
        P = prefill
        if state_cls is DMCState:
            keys, values, z = dmc_accumulate(k[:, :, :P], v[:, :, :P], alpha[..., :P], omega[..., :P])
            outputs.append(attend(q[:, :, :P], keys, values, causal_bias(P, q) + dmc_bias(alpha[..., :P]), SCALE))
            state.prefill(keys, values, z, alpha[..., :P], valid[..., :P])
        else:
            bias = causal_bias(P, q) + dms_bias(alpha[..., :P], kw["window"])
            outputs.append(attend(q[:, :, :P], k[:, :, :P], v[:, :, :P], bias, SCALE))
            state.add(k[:, :, :P], v[:, :, :P], alpha[..., :P], valid[..., :P])
    for t in range(prefill, T):
        one = slice(t, t + 1)
        if state_cls is DMCState:
            state.step(k[:, :, one], v[:, :, one], alpha[..., one], omega[..., one], valid[..., one])
        else:
            state.add(k[:, :, one], v[:, :, one], alpha[..., one], valid[..., one])
        keys, values, bias = state.keys()
        outputs.append(attend(q[:, :, one], keys, values, bias, SCALE))
    return torch.cat(outputs, dim=2), state


@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_dms_training_forward_equals_decoding_with_the_cache(prefill):
    q, k, v, g = tensors(2)
    alpha, window = hard_decisions(g, 0.5), 3
    train = attend(q, k, v, causal_bias(T, q) + dms_bias(alpha, window), SCALE)
    got, state = decode(DMSState, q, k, v, alpha, None, prefill, window=window)
    torch.testing.assert_close(got, train, rtol=1e-5, atol=1e-5)
    # every token that left the window with alpha 1 is gone; the rest are kept
    left = alpha[..., : T - window - 1]
    assert state.evicted.tolist() == left.sum(-1).flatten().long().tolist()
    assert state.kept.lengths.tolist() == (1 - left).sum(-1).flatten().long().tolist()


@pytest.mark.parametrize("prefill", [0, 1, 9])
def test_dmc_training_forward_equals_decoding_with_the_cache(prefill):
    q, k, v, g = tensors(3)
    alpha, omega = hard_decisions(g, 0.6), torch.rand(B, KV, T, generator=g) + 0.1
    keys, values, _ = dmc_accumulate(k, v, alpha, omega)
    train = attend(q, keys, values, causal_bias(T, q) + dmc_bias(alpha), SCALE)
    got, state = decode(DMCState, q, k, v, alpha, omega, prefill)
    torch.testing.assert_close(got, train, rtol=1e-5, atol=1e-5)
    merges = alpha[..., 1:].sum(-1).flatten().long()
    assert state.merged.tolist() == merges.tolist()
    assert state.slots.lengths.tolist() == (T - merges).tolist()


def test_cache_bytes_are_the_analytic_count_of_the_decisions():
    q, k, v, g = tensors(4)
    alpha, omega = hard_decisions(g, 0.7), torch.rand(B, KV, T, generator=g) + 0.1
    page, row = 4, 2 * D * 4  # float32 K and V
    _, dmc = decode(DMCState, q, k, v, alpha, omega, 0)
    slots = T - alpha[..., 1:].sum(-1).flatten().long()
    assert dmc.bytes_used() == sum(-(-int(n) // page) * page for n in slots) * (row + 4)  # + z per slot
    window = 5
    _, dms = decode(DMSState, q, k, v, alpha, None, 0, window=window)
    kept = (1 - alpha[..., : T - window - 1]).sum(-1).flatten().long()
    ring = B * KV * (window + 1) * (row + 4 + 1)  # K, V, a float32 decision and a validity byte per token
    assert dms.bytes_used() == sum(-(-int(n) // page) * page for n in kept) * row + ring
    assert dms.bytes_allocated() >= dms.bytes_used() and dmc.bytes_allocated() >= dmc.bytes_used()
    full = B * KV * T * row
    assert dmc.bytes_used() < full  # 70% merges: the cache is smaller than an uncompressed one


def test_paged_rows_read_back_what_each_lane_was_given():
    store = PagedRows(3, 2, page=2)
    expected = [[], [], []]
    g = torch.Generator().manual_seed(5)
    for _ in range(6):
        keep = torch.rand(3, 3, generator=g) < 0.5
        k = torch.randn(3, 3, 2, generator=g)
        store.extend(keep, k, -k)
        for lane in range(3):
            expected[lane] += [k[lane, i] for i in range(3) if keep[lane, i]]
    keys, values, valid = store.gather()
    for lane in range(3):
        n = len(expected[lane])
        assert valid[lane].sum() == n and store.lengths[lane] == n
        assert torch.equal(keys[lane, :n], torch.stack(expected[lane])) and torch.equal(values[lane, :n], -keys[lane, :n])
    assert store.bytes_used() == sum(-(-len(e) // 2) * 2 for e in expected) * 2 * 2 * 4
