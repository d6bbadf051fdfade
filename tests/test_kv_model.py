"""DMC / DMS on the models of every registered family with attention: with every decision 0 the model's
logits are the original ones bit for bit; with hard decisions the full forward (the training form) equals a
prefill + token-by-token decode through `CompressedCache` (1e-5), batch 2; generate uses the cache."""

from __future__ import annotations

import pytest
import torch
from test_family_contract import CASES
from transformers import DynamicCache

from hyprune.arch import family_for_config
from hyprune.arch.family import ATTENTION
from hyprune.errors import HypruneError
from hyprune.kv.model import CompressedCache, KVSpec, attach, enable

VOCAB = 64


def with_attention():
    names = []
    for name, case in CASES.items():
        model = case.make()
        if ATTENTION in family_for_config(model.config).part_kinds(model.config):
            names.append(name)
    return names


FAMILIES = with_attention()


def tokens(seed=0, T=18):
    return torch.randint(1, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["dms", "dmc"])
def test_every_decision_zero_is_the_original_model_bit_for_bit(name, method):
    model = CASES[name].make().eval()
    model.set_attn_implementation("eager")
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
        attach(model, KVSpec(method=method, offset=1e9, window=2))
        got = model(ids).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", ["dms", "dmc"])
def test_training_forward_equals_decoding_with_the_compressed_cache(name, method):
    model = CASES[name].make().eval()
    model.set_attn_implementation("eager")
    attach(model, KVSpec(method=method, offset=0.0, window=3, page=4))
    ids = tokens(1)
    with torch.no_grad():
        full = model(ids).logits
        cache = CompressedCache(model)
        steps = [model(ids[:, :7], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(7, ids.shape[1])]
        # the family's own cache against its own full forward: Bamba's torch Mamba scan differs by ~4e-5
        # between the two paths with no KV compression at all, so the bound is 1e-5 on top of that
        plain = CASES[name].make().eval()
        plain.set_attn_implementation("eager")
        own = DynamicCache(config=plain.config)
        plain_steps = [plain(ids[:, :7], cache=own, use_cache=True).logits]
        plain_steps += [plain(ids[:, t : t + 1], cache=own, use_cache=True).logits for t in range(7, ids.shape[1])]
        baseline = (torch.cat(plain_steps, dim=1) - plain(ids).logits).abs().max().item()
    err = (torch.cat(steps, dim=1) - full).abs().max().item()
    assert err <= 1e-5 + 2 * baseline, (err, baseline)
    layers = cache.compressed()
    assert layers and all(layer.state is not None for layer in layers)
    held = [layer.bytes_used() for layer in layers]
    assert all(b > 0 for b in held)


def test_generate_uses_the_compressed_cache_after_enable(tmp_path):
    model = CASES["llama"].make().eval()
    model.set_attn_implementation("eager")
    attach(model, KVSpec(method="dms", offset=0.0, window=3, page=4))
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.hyprune_kv["method"] == "dms"
    enable(loaded.eval())
    ids = tokens(2, T=6)
    seen = []
    plain_init = CompressedCache.__init__

    def spy(self, m):
        plain_init(self, m)
        seen.append(self)

    CompressedCache.__init__ = spy
    try:
        out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    finally:
        CompressedCache.__init__ = plain_init
    assert out.shape == (2, 11) and len(seen) == 1 and seen[0].bytes_used() > 0
    # greedy decoding with the cache equals greedy decoding by full forwards of the compressed model
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, loaded(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_a_sliding_window_layer_stops_at_its_window_with_the_reason():
    model = CASES["mistral"].make().eval()
    model.config.sliding_window = 8
    attach(model, KVSpec(method="dms", offset=0.0, window=2))
    ids = tokens(3, T=12)
    cache = CompressedCache(model)
    with torch.no_grad():
        model(ids[:, :8], cache=cache, use_cache=True)
        with pytest.raises(HypruneError, match="slides its attention over 8 tokens"):
            model(ids[:, 8:9], cache=cache, use_cache=True)
            model(ids[:, 9:10], cache=cache, use_cache=True)


def test_enable_without_a_trained_config_says_what_to_do():
    with pytest.raises(HypruneError, match="config.hyprune_kv"):
        enable(CASES["llama"].make())
    with pytest.raises(HypruneError, match="dmc, dms"):
        KVSpec(method="h2o")


def test_the_ratio_term_pushes_the_decisions_toward_the_target():
    """A few steps on the ratio loss alone (only k_proj trains) raise the merge share to the target."""
    from hyprune.kv.train import kept_share, ratio_loss, target_ratio

    assert [target_ratio(s, 10, 4.0, ramp=0.5) for s in (0, 5, 10)] == [1.0, 4.0, 4.0]
    assert target_ratio(2, 10, 3.0, ramp=0.5) == pytest.approx(1.8)
    model = CASES["llama"].make().train()
    attach(model, KVSpec(method="dmc", offset=2.0))
    params = [p for n, p in model.named_parameters() if "k_proj" in n]
    optimizer = torch.optim.Adam(params, lr=0.05)
    ids = tokens(4)
    torch.manual_seed(0)
    model(ids)
    start = kept_share(model).item()
    for _ in range(40):
        model(ids)
        loss = ratio_loss(model, 2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model(ids)
    assert start > 0.75 and kept_share(model).item() < 0.55


def test_calibrate_standardizes_each_heads_decision_input():
    """centers / scales are the mean / std of each KV head's k_0 (recomputed here from the hidden states);
    the hard decisions are then (k_0 - center) / scale > offset, per head."""
    from hyprune.kv.model import calibrate

    model = CASES["llama"].make().eval()
    model.set_attn_implementation("eager")
    ids = tokens(5)
    centers, scales = calibrate(model, ids, batch_size=1)
    config = model.config
    kv, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    k0s = []
    for i, layer in enumerate(model.model.layers):
        k = layer.self_attn.k_proj(layer.input_layernorm(hidden[i])).view(*ids.shape, kv, head_dim)[..., 0]
        k0s.append(k.reshape(-1, kv))
        torch.testing.assert_close(torch.tensor(centers[i]), k0s[-1].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(scales[i]), k0s[-1].std(0), rtol=1e-5, atol=1e-6)
    attach(model, KVSpec(method="dms", offset=0.5, centers=centers, scales=scales))
    with torch.no_grad():
        model(ids)
    for i, layer in enumerate(model.model.layers):
        z = (k0s[i].view(*ids.shape, kv) - torch.tensor(centers[i])) / torch.tensor(scales[i])
        assert torch.equal(layer.self_attn._hyprune_kv.stats["alpha"], (z > 0.5).float().transpose(1, 2))


def test_calibration_of_another_model_is_refused():
    model = CASES["llama"].make()
    layers = len(model.model.layers)
    with pytest.raises(HypruneError, match=f"has centers for {layers + 1} attention layers; the model has {layers}"):
        attach(model, KVSpec(centers=[[0.0]] * (layers + 1), scales=[[1.0]] * (layers + 1)))


def test_the_ratio_loss_is_each_heads_distance_to_the_target():
    """mean over (layer, KV head) of |mean_t (1 - alpha) - 1 / ratio|, from the decisions of the last forward."""
    from hyprune.kv.train import kept_by_head, kept_share, ratio_loss

    model = CASES["llama"].make().train()
    attach(model, KVSpec(method="dms", offset=0.0))
    torch.manual_seed(0)
    model(tokens(6))
    alphas = [layer.self_attn._hyprune_kv.stats["alpha"] for layer in model.model.layers]
    per_head = torch.stack([1 - a.mean(dim=(0, 2)) for a in alphas])
    torch.testing.assert_close(kept_by_head(model), per_head)
    torch.testing.assert_close(kept_share(model), per_head.mean())
    torch.testing.assert_close(ratio_loss(model, 3.0), (per_head - 1 / 3).abs().mean())


@pytest.mark.parametrize("method", ["dms", "dmc"])
def test_left_padded_batch_generates_what_each_sequence_generates_alone(method):
    """Batch 2 with the shorter prompt left-padded: the padding is never stored or attended, so each row's
    greedy continuation (and logits) equal that prompt's own run with the compressed cache."""
    model = CASES["llama"].make().eval()
    model.set_attn_implementation("eager")
    enable(model, KVSpec(method=method, offset=0.0, window=2, page=4))
    long, short = tokens(7, T=12)[0], tokens(8, T=7)[0]
    pad = 0
    ids = torch.stack([long, torch.cat([torch.full((5,), pad), short])])
    mask = torch.stack([torch.ones(12, dtype=torch.long), torch.cat([torch.zeros(5), torch.ones(7)]).long()])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
    both = model.generate(ids, attention_mask=mask, **kwargs)
    for row, prompt in enumerate((long, short)):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        assert torch.equal(both.sequences[row, -6:], alone.sequences[0, -6:])
        for a, b in zip(both.scores, alone.scores, strict=True):
            torch.testing.assert_close(a[row], b[0], rtol=1e-5, atol=1e-5)
