"""Zamba2 (Mamba-2 layers + shared transformer blocks with per-use LoRA adapters) against masked references.

The tiny model has two shared blocks (``num_mem_blocks=2``) used by three hybrid layers (1, 3, 4: layers
1 and 4 share block 0), attention and MLP adapters, and rotary embeddings. The reference is the
original HF model with what the plan removes masked: the gated Mamba norm's statistic over the kept
(head, channel) pairs, zero B/C rows and conv channels for removed states and groups, zero down_proj
columns for removed shared-MLP neurons (tied, so every use of a block sees it), dropped Mamba layers
skipped.
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
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores
from hyprune.plan import identity_plan, make_plan, resolve_target, validate_plan

from masking import (assert_roundtrip_generates, inner_mask, masked_gated_norm, random_plan, randomized, rel_err,
                     skip_block, zero_removed_bc)

VOCAB = 64
PATTERN = ["mamba", "hybrid", "mamba", "hybrid", "hybrid"]


def zamba2(seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=VOCAB, hidden_size=16, layers_block_type=PATTERN, num_hidden_layers=len(PATTERN),
                  mamba_d_state=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=8, intermediate_size=24,
                  num_attention_heads=4, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=3,
                  use_mem_rope=True, chunk_size=4, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    model = randomized(AutoModelForCausalLM.from_config(transformers.Zamba2Config(**kwargs)))
    with torch.no_grad():  # adapters start at zero in HF's init: make every per-use adapter matter
        for name, p in model.named_parameters():
            if "adapter_list" in name:
                p.normal_(0, 0.3)
    return model


def zamba2_plan(model, rng, **what):
    """`random_plan`, with one shared-MLP choice per shared block (its uses share the weights)."""
    plan = random_plan(model, rng, **what)
    for group in family_for_config(model.config).tied_mlps(model.config):
        for i in group:
            plan.layers[i].ffn = plan.layers[group[0]].ffn
    return plan


def masked_reference(model, plan):
    sizes = family_for_config(model.config).sizes(model.config)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lp, layer in zip(plan.layers, ref.model.layers):
            if lp.kind == "hybrid":
                down = layer.shared_transformer.feed_forward.down_proj
                down.weight[:, [f for f in range(sizes["ffn"]) if f not in lp.ffn]] = 0
                mixer = layer.mamba_decoder.mamba
            else:
                mixer = layer.mamba
            mixer.norm.forward = masked_gated_norm(mixer.norm, inner_mask(lp, sizes), sizes["mamba_groups"])
            zero_removed_bc(mixer, lp, sizes)
    for i in plan.drop_blocks:
        ref.model.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def test_identity_is_exact(ids):
    model = zamba2()
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


def test_shared_blocks_and_adapters_matter(ids):
    """Sanity of the fixture: the two shared blocks differ and each use's adapter changes the output."""
    model = zamba2()
    layers = model.model.layers
    down = [layer.shared_transformer.feed_forward.down_proj.weight if i in (1, 3, 4) else None
            for i, layer in enumerate(layers)]
    assert down[1] is down[4] and not torch.equal(down[1], down[3])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.layers[4].shared_transformer.feed_forward.gate_up_proj_adapter_list[2][1].weight.zero_()
    assert rel_err(ref(ids).logits, model(ids).logits) > 1e-4


@pytest.mark.parametrize("what", [
    dict(state=3), dict(keep_groups=1), dict(heads_per_group=2, state=2), dict(head_dim=2, ffn=10),
    dict(ffn=7, drop=[0]), dict(keep_groups=1, state=3, ffn=12, drop=[2]), dict(heads_per_group=2, drop=[0, 2]),
])
def test_pruning_matches_masked_reference(what, ids):
    model = zamba2(seed=len(what))
    plan = zamba2_plan(model, random.Random(str(what)), **what)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5


def test_minitron_plan_roundtrips_and_generates(tmp_path):
    model = zamba2()
    family = family_for_config(model.config)
    windows = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    plan = make_plan(family, model.config, scores, {"n_mamba_heads": 4, "intermediate_size": 16, "mamba_d_state": 3},
                     drop_blocks=[2])
    # one ranking per shared block, from the summed scores of its uses
    assert plan.layers[1].ffn == plan.layers[4].ffn
    summed = scores["layers.1.ffn"] + scores["layers.4.ffn"]
    assert plan.layers[1].ffn == sorted(torch.argsort(summed, descending=True)[:16].tolist())
    pruned = apply_plan(model, plan)
    c = pruned.config
    assert (c.n_mamba_heads, c.mamba_headdim, c.mamba_expand, c.mamba_d_state, c.intermediate_size) == (4, 4, 1, 3, 16)
    assert c.layers_block_type == ["linear_attention", "hybrid", "hybrid", "hybrid"] and c.hybrid_layer_ids == [1, 2, 3]
    assert_roundtrip_generates(pruned, tmp_path, vocab=VOCAB)


@pytest.mark.parametrize("target, message", [
    ({"hidden_size": 8}, "hidden_size cannot be pruned"),
    ({"n_mamba_heads": 6}, "multiple of hidden_size"),
    ({"num_attention_heads": 2}, "not a prunable config field"),
])
def test_inexpressible_targets_are_rejected(target, message):
    model = zamba2()
    with pytest.raises(HypruneError, match=message):
        resolve_target(family_for_config(model.config), model.config, target)


def test_hybrid_layers_are_not_dropped_with_two_shared_blocks():
    from hyprune.depth import BlockScores, check_depth_request, choose_blocks_to_drop

    model = zamba2()
    family = family_for_config(model.config)
    plan = identity_plan(family, model.config)
    plan.drop_blocks = [3]
    with pytest.raises(HypruneError, match="cannot drop"):
        validate_plan(plan, family, model.config)
    with pytest.raises(HypruneError, match="can drop only its mamba blocks"):
        check_depth_request(family, model.config, 3)
    # scored choice skips hybrid layers even when they score lowest
    scores = BlockScores("block_influence", [5.0, 0.0, 4.0, 0.1, 0.2], family.block_kinds(model.config))
    never = tuple(family.undroppable(model.config))
    assert choose_blocks_to_drop(scores, 1, never_kinds=never) == [2]
    assert choose_blocks_to_drop(scores, 1, mode="contiguous", never_kinds=never) == [2]


@pytest.mark.parametrize("drop", [[1], [3, 4], [0, 3]])
def test_one_shared_block_drops_hybrid_layers_and_renumbers_adapter_slots(drop, ids, tmp_path):
    """With num_mem_blocks=1 a dropped hybrid layer equals skipping it: later layers keep their adapters."""
    model = zamba2(num_mem_blocks=1)
    plan = zamba2_plan(model, random.Random(str(drop)), ffn=12, state=3, drop=drop)
    pruned = apply_plan(model, plan)
    assert rel_err(pruned(ids).logits, masked_reference(model, plan)(ids).logits) < 1e-5
    hybrids = sum(1 for i, t in enumerate(PATTERN) if t == "hybrid" and i not in drop)
    adapters = pruned.model.layers[pruned.config.hybrid_layer_ids[0]].shared_transformer.feed_forward
    assert len(adapters.gate_up_proj_adapter_list) == hybrids
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(ids).logits, pruned(ids).logits)
    prompt = ids[:1, :5]
    a = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    b = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_inspect_states_the_free_axes(tmp_path):
    from hyprune.api import inspect_model

    model = zamba2()
    model.save_pretrained(tmp_path)
    info = inspect_model(str(tmp_path))
    assert info["family"] == "zamba2" and info["pattern"] == "MHMHH"
    assert any("Fixed: hidden_size" in n for n in info["notes"])
    params = dict(info["parameters"])
    assert params.pop("total") == sum(p.numel() for p in model.parameters()) == sum(params.values())


def test_cli_prunes_mamba_width_and_depth(tmp_path, tiny_tokenizer, calib_txt):
    from typer.testing import CliRunner

    from conftest import TOKENIZER_VOCAB
    from hyprune.cli import app

    zamba2(vocab_size=TOKENIZER_VOCAB).save_pretrained(tmp_path / "z")
    tiny_tokenizer.save_pretrained(tmp_path / "z")
    runner = CliRunner()
    common = ["--data", str(calib_txt), "--seq-len", "16", "--num-samples", "4", "--quiet"]
    result = runner.invoke(app, ["prune", str(tmp_path / "z"), "--target", "n_mamba_heads=4,intermediate_size=16",
                                 "--drop-blocks", "1", *common, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert pruned.config.n_mamba_heads == 4 and pruned.config.layers_block_type.count("hybrid") == 3
    assert len(pruned.config.layers_block_type) == 4
    refused = runner.invoke(app, ["prune", str(tmp_path / "z"), "--target", "hidden_size=8", *common,
                                  "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "cannot be pruned" in " ".join(refused.stderr.split())
    assert not (tmp_path / "bad").exists()


def test_depth_by_count_keeps_one_hybrid_layer():
    """Without a hybrid layer (its attention) transformers cannot generate with a cache."""
    from hyprune.depth import BlockScores, choose_blocks_to_drop, protected_kinds, with_dropped_blocks

    model = zamba2(num_mem_blocks=1)
    family = family_for_config(model.config)
    assert protected_kinds(family, model.config) == ("hybrid",)
    scores = BlockScores("block_influence", [5.0, 0.0, 4.0, 0.1, 0.2], family.block_kinds(model.config))
    assert choose_blocks_to_drop(scores, 3, keep_kinds=("hybrid",)) == [1, 2, 3]
    with pytest.warns(UserWarning, match="Keep one hybrid block"):
        with_dropped_blocks(None, [1, 3, 4], family, model.config)
