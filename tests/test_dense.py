"""Dense Transformers (Llama, Qwen2, Qwen3, Mistral): width and depth pruning against references.

The reference is the original HF model with the removed channels masked: removed query heads and
FFN neurons get zero output columns, removed hidden channels are zero in the embeddings and in every
block's output rows, and every hidden-size RMSNorm takes its statistic over the kept channels only.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.importance import activation_scores
from hyprune.plan import identity_plan, make_plan

from masking import masked_rmsnorm, randomized, rel_err, skip_block

FAMILIES = {
    "llama": lambda **kw: transformers.LlamaConfig(**kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**kw),  # q/k/v biases
    "qwen3": lambda **kw: transformers.Qwen3Config(**kw),  # q/k norms over head_dim
    "mistral": lambda **kw: transformers.MistralConfig(**kw),
}


def dense(name: str, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILIES[name](vocab_size=64, hidden_size=48, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie,
                           use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return randomized(AutoModelForCausalLM.from_config(config))


def masked_reference(model, plan):
    """A copy of ``model`` that computes what ``plan`` keeps, by masking instead of slicing."""
    ref = copy.deepcopy(model)
    config = model.config
    d = config.head_dim
    hidden = torch.zeros(config.hidden_size)
    hidden[plan.hidden] = 1
    removed_hidden = hidden == 0
    backbone = ref.model
    with torch.no_grad():
        backbone.embed_tokens.weight[:, removed_hidden] = 0
        for lp, layer in zip(plan.layers, backbone.layers):
            attn, mlp = layer.self_attn, layer.mlp
            dead_heads = [h for h in range(config.num_attention_heads) if h not in lp.query_heads]
            for h in dead_heads:
                attn.o_proj.weight[:, h * d : (h + 1) * d] = 0
            dead_ffn = [f for f in range(config.intermediate_size) if f not in lp.ffn]
            mlp.down_proj.weight[:, dead_ffn] = 0
            attn.o_proj.weight[removed_hidden] = 0
            mlp.down_proj.weight[removed_hidden] = 0
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.forward = masked_rmsnorm(norm, hidden)
        backbone.norm.forward = masked_rmsnorm(backbone.norm, hidden)
    for i in plan.drop_blocks:
        backbone.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


def random_dense_plan(model, rng, hidden=None, heads_per_kv=None, kv=None, ffn=None, drop=()):
    family = family_for_config(model.config)
    plan = identity_plan(family, model.config)
    c = model.config
    per_kv = c.num_attention_heads // c.num_key_value_heads
    if hidden:
        plan.hidden = sorted(rng.sample(range(c.hidden_size), hidden))
    for lp in plan.layers:
        if kv:
            lp.kv_heads = sorted(rng.sample(range(c.num_key_value_heads), kv))
        k = heads_per_kv or per_kv
        lp.query_heads = [g * per_kv + i for g in lp.kv_heads for i in sorted(rng.sample(range(per_kv), k))]
        if ffn:
            lp.ffn = sorted(rng.sample(range(c.intermediate_size), ffn))
    plan.drop_blocks = list(drop)
    return plan


@pytest.fixture
def ids():
    return torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_identity_plan_is_exact(name, ids):
    model = dense(name)
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("what", ["heads", "kv", "ffn", "hidden", "depth", "all"])
def test_dense_pruning_matches_masked_reference(name, what, ids):
    model = dense(name, seed=hash(what) % 100)
    rng = random.Random(f"{name}{what}")
    kw = {"heads": dict(heads_per_kv=2), "kv": dict(kv=1), "ffn": dict(ffn=20), "hidden": dict(hidden=30),
          "depth": dict(drop=[1]), "all": dict(hidden=24, heads_per_kv=1, ffn=30, drop=[0])}[what]
    plan = random_dense_plan(model, rng, **kw)
    pruned = apply_plan(model, plan)
    expected = masked_reference(model, plan)(ids).logits
    assert rel_err(pruned(ids).logits, expected) < 1e-5
    assert pruned.config.head_dim == 8  # explicit: never re-derived from a pruned hidden size


def test_tied_embeddings_stay_tied_and_roundtrip(tmp_path, ids):
    model = dense("llama", tie=True)
    plan = random_dense_plan(model, random.Random(0), hidden=30, ffn=24)
    pruned = apply_plan(model, plan)
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(loaded(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_minitron_plan_generates_with_cache(name):
    model = dense(name)
    family = family_for_config(model.config)
    windows = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    scores = activation_scores(model, windows, family, progress=False)
    plan = make_plan(family, model.config, scores, {"hidden_size": 36, "intermediate_size": 32,
                                                    "num_attention_heads": 4}, drop_blocks=[2])
    pruned = apply_plan(model, plan)
    assert pruned.config.num_hidden_layers == 2 and pruned.config.num_attention_heads == 4
    prompt = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    a = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    b = pruned.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_llama_hidden_must_stay_a_multiple_of_heads():
    from hyprune.errors import HypruneError
    from hyprune.plan import resolve_target

    model = dense("llama")
    family = family_for_config(model.config)
    with pytest.raises(HypruneError, match="multiple of num_attention_heads"):
        resolve_target(family, model.config, {"hidden_size": 40})
    qwen2 = dense("qwen2").config
    resolve_target(family_for_config(qwen2), qwen2, {"hidden_size": 40})  # Qwen2 has no such rule
