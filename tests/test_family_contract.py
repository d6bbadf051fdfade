"""The family contract: every registered family passes the same checks from one tiny fixture.

``CASES`` maps each registered family's name to a `Case`: how to build a tiny random model, a random width
(and depth) plan for it, and an independent reference for that plan. A registered family without a case
fails `test_every_registered_family_has_a_case`, so a new family cannot skip the contract.

Checks, for every family:
- the identity plan reproduces the logits bit for bit;
- the random plan's pruned model equals the reference (to 1e-5 relative): ``masked`` is the family's
  masked copy of the original HF model (removed channels' output weights zeroed, norms over the kept
  channels: the ``masked_reference`` of the per-family test files), ``float64`` the hand-written float64
  forward of `reference.reference_logits` (NemotronH, Mamba2);
- save -> stock ``AutoModelForCausalLM.from_pretrained`` (no missing/unexpected/mismatched keys) ->
  greedy ``generate`` with the cache equals it without (`masking.assert_roundtrip_generates`);
- ``hyprune prune --plan`` on the saved tiny model writes a checkpoint that reloads to the same weights
  as `apply_plan` in-process.
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config, registered
from hyprune.plan import identity_plan

import test_dense
import test_exactness
import test_falcon_h1
import test_hybrid_decoder
import test_jamba
import test_zamba2
from masking import assert_roundtrip_generates, masked_rmsnorm, random_plan, randomized, rel_err, skip_block
from reference import masks_from_plan, reference_logits

VOCAB = 64


# ---- the two Mamba-1 families' fixtures and masked reference ----------------------------------------
def mamba1(config_class, seed=0, **overrides):
    torch.manual_seed(seed)
    # hidden 32: time_step_rank "auto" resolves to 2, and must stay 2 when hidden shrinks (auto would give 1)
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, expand=2, state_size=6, num_hidden_layers=3, conv_kernel=4,
                  time_step_rank="auto", use_bias=True, use_cache=False, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=False)
    kwargs.update(overrides)
    return randomized(AutoModelForCausalLM.from_config(config_class(**kwargs)), output_scale=0.2)


def masked_state_norm(norm, mask):
    """FalconMamba's weightless B/C RMSNorm with its statistic over the kept states only."""
    def forward(x):
        x32 = x.float()
        var = (x32.pow(2) * mask).sum(-1, keepdim=True) / mask.sum()
        return (x32 * torch.rsqrt(var + norm.eps)).type_as(x)
    return forward


def mamba1_masked_reference(model, plan):
    """Removed hidden channels zero in the embeddings and every output row, RMSNorms over the kept ones; a
    removed inner channel zero in x_proj's and out_proj's columns; a removed state zero in x_proj's B and C
    rows, and (FalconMamba) out of the B/C norms' statistic."""
    c = model.config
    ref = copy.deepcopy(model)
    hidden = torch.zeros(c.hidden_size)
    hidden[plan.hidden] = 1
    gone = hidden == 0
    R, N = int(c.time_step_rank), c.state_size
    with torch.no_grad():
        ref.backbone.embeddings.weight[:, gone] = 0
        for lp, layer in zip(plan.layers, ref.backbone.layers):
            layer.norm.forward = masked_rmsnorm(layer.norm, hidden)
            mixer = layer.mixer
            removed = [k for k in range(mixer.intermediate_size) if k not in lp.inner]
            mixer.x_proj.weight[:, removed] = 0
            mixer.out_proj.weight[:, removed] = 0
            mixer.out_proj.weight[gone] = 0
            mixer.out_proj.bias[gone] = 0
            dropped = [n for n in range(N) if n not in lp.state]
            mixer.x_proj.weight[[R + n for n in dropped] + [R + N + n for n in dropped]] = 0
            if hasattr(mixer, "b_layernorm"):
                states = torch.zeros(N)
                states[lp.state] = 1
                for norm in (mixer.b_layernorm, mixer.c_layernorm):
                    norm.forward = masked_state_norm(norm, states)
        ref.backbone.norm_f.forward = masked_rmsnorm(ref.backbone.norm_f, hidden)
    for i in plan.drop_blocks:
        ref.backbone.layers[i].register_forward_hook(skip_block, with_kwargs=True)
    return ref


# ---- the cases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    make: Callable  # () -> a tiny random model (eval mode, use_cache=False, vocab <= VOCAB)
    plan: Callable  # (model, rng) -> a random plan that prunes every width axis the fixture can and drops a block
    reference: Callable  # (model, plan, ids) -> reference logits
    check: str  # "masked" or "float64" (see the module docstring)


def masked(reference):
    return lambda model, plan, ids: reference(model, plan)(ids).logits


def float64(model, plan, ids):
    family = family_for_config(model.config)
    return reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)


def dense_case(name):
    return Case(lambda: test_dense.dense(name),
                lambda m, rng: test_dense.random_dense_plan(m, rng, hidden=24, heads_per_kv=1, ffn=30, drop=[0]),
                masked(test_dense.masked_reference), "masked")


def bamba_case(name):
    return Case(lambda: test_hybrid_decoder.bamba(family=name),
                lambda m, rng: random_plan(m, rng, hidden=12, head_dim=3, state=4, ffn=12, attn_per_kv=1, drop=[2]),
                masked(test_hybrid_decoder.masked_reference), "masked")


def mamba1_case(config_class):
    return Case(lambda: mamba1(config_class),
                lambda m, rng: random_plan(m, rng, hidden=8, inner=16, state=4, drop=[1]),
                masked(mamba1_masked_reference), "masked")


CASES: dict[str, Case] = {
    **{name: dense_case(name) for name in ("llama", "qwen2", "qwen3", "mistral")},
    "bamba": bamba_case("bamba"),
    "granitemoehybrid": bamba_case("granitemoehybrid"),
    "falcon_h1": Case(lambda: test_falcon_h1.falcon(),
                      lambda m, rng: random_plan(m, rng, hidden=12, heads_per_group=3, head_dim=2, state=4, ffn=12,
                                                 attn_per_kv=1, keep_groups=1, drop=[0]),
                      masked(test_falcon_h1.masked_reference), "masked"),
    "jamba": Case(lambda: test_jamba.jamba(),
                  lambda m, rng: random_plan(m, rng, hidden=8, inner=8, state=3, experts=3, drop=[1, 2, 3, 4]),
                  masked(test_jamba.masked_reference), "masked"),
    "zamba2": Case(lambda: test_zamba2.zamba2(),
                   lambda m, rng: test_zamba2.zamba2_plan(m, rng, keep_groups=1, state=3, ffn=12, drop=[2]),
                   masked(test_zamba2.masked_reference), "masked"),
    "nemotron_h": Case(lambda: test_exactness.nemotron(2, 3, True),
                       lambda m, rng: test_exactness.random_plan(m, rng, mamba_heads=2, head_dim=3, hidden=16, ffn=20,
                                                                 attn_per_kv=2, state=4, drop_blocks=[1]),
                       float64, "float64"),
    "mamba2": Case(lambda: test_exactness.mamba2(groups=2),
                   lambda m, rng: test_exactness.random_plan(m, rng, mamba_heads=2, head_dim=6, hidden=12, state=4,
                                                             drop_blocks=[1]),
                   float64, "float64"),
    "mamba": mamba1_case(transformers.MambaConfig),
    "falcon_mamba": mamba1_case(transformers.FalconMambaConfig),
}
NAMES = [family.name for family in registered()]


def test_every_registered_family_has_a_case():
    missing = [name for name in NAMES if name not in CASES]
    assert not missing, f"registered families without a contract case in tests/test_family_contract.py: {missing}"
    assert not set(CASES) - set(NAMES), "contract cases for families that are not registered"


def case(name) -> Case:
    if name not in CASES:
        pytest.fail(f"family {name} has no contract case in CASES")
    return CASES[name]


@functools.cache
def built(name):
    """(model, random plan, pruned model) of a family's case, built once for the tests below (none mutates them)."""
    c = case(name)
    model = c.make()
    plan = c.plan(model, random.Random(name))
    return model, plan, apply_plan(model, plan)


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", NAMES)
def test_identity_plan_is_bit_exact(name, ids):
    model = case(name).make()
    assert model.config.model_type == name
    pruned = apply_plan(model, identity_plan(family_for_config(model.config), model.config))
    assert torch.equal(pruned(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", NAMES)
def test_random_plan_matches_reference_and_roundtrips(name, ids, tmp_path):
    model, plan, pruned = built(name)
    assert pruned.num_parameters() < model.num_parameters()
    assert rel_err(pruned(ids).logits, case(name).reference(model, plan, ids)) < 1e-5
    assert_roundtrip_generates(pruned, tmp_path / "pruned", vocab=VOCAB)


@pytest.mark.parametrize("name", NAMES)
def test_cli_prune_with_plan_roundtrips(name, tmp_path, tiny_tokenizer):
    from typer.testing import CliRunner

    from hyprune.cli import app

    model, plan, pruned = built(name)
    model.save_pretrained(tmp_path / "source")
    tiny_tokenizer.save_pretrained(tmp_path / "source")  # the CLI copies it to the output
    plan.save(tmp_path / "plan.json")
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "source"), "--plan", str(tmp_path / "plan.json"),
                                      "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected, got = pruned.state_dict(), loaded.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


# ---- the Mamba-1 families beyond the contract -------------------------------------------------------
@pytest.mark.parametrize("name", ["mamba", "falcon_mamba"])
def test_mamba1_scores_plan_and_count(name, tmp_path):
    """Scores hook x_proj's B/C rows (Mamba) or the B/C norms (FalconMamba); the analytic parameter count
    (search) equals the built model's, before and after pruning."""
    from hyprune.importance import activation_scores
    from hyprune.models import count_parameters
    from hyprune.plan import make_plan
    from hyprune.search.counting import count_parameters as analytic

    model = CASES[name].make()
    family = family_for_config(model.config)
    windows = torch.randint(1, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = activation_scores(model, windows, family, progress=False)
    assert scores["layers.0.mamba1_inner"].shape == (64,) and scores["layers.0.mamba1_bc"].shape == (2, 6)
    plan = make_plan(family, model.config, scores, {"hidden_size": 8, "expand": 1, "state_size": 3})
    pruned = apply_plan(model, plan)
    c = pruned.config
    assert (c.hidden_size, c.expand, c.intermediate_size, c.state_size, c.time_step_rank) == (8, 1, 8, 3, 2)
    nonzero = lambda counts: {k: v for k, v in counts.items() if v}  # noqa: E731
    for m in (model, pruned):
        assert nonzero(analytic(family, m.config)) == nonzero(count_parameters(m, family))
    assert_roundtrip_generates(pruned, tmp_path, vocab=VOCAB)


def test_falcon_mamba_state_norms_average_over_the_kept_states(ids):
    """Zeroing removed states alone is not the pruned model: B/C are normalised over the kept states only."""
    model = CASES["falcon_mamba"].make()
    plan = random_plan(model, random.Random(0), state=3)
    pruned = apply_plan(model, plan)(ids).logits
    assert rel_err(pruned, mamba1_masked_reference(model, plan)(ids).logits) < 1e-5
    zeroed = mamba1_masked_reference(model, plan)
    for layer in zeroed.backbone.layers:
        for norm in (layer.mixer.b_layernorm, layer.mixer.c_layernorm):
            del norm.forward  # back to the full-width statistic
    assert rel_err(pruned, zeroed(ids).logits) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_cache_bytes_formula_equals_the_real_cache(name, ids):
    """`hyprune bench`'s analytic cache bytes (each part's count) equal the bytes the model's own cache holds
    after a prefill, for the source and the pruned model (batch 2: twice one sequence's bytes)."""
    from hyprune.compat import cache_argument, output_cache
    from hyprune.evaluate.bench import cache_bytes, measured_cache_bytes

    model, _, pruned = built(name)
    for m in (model, pruned):
        out = m(input_ids=ids, use_cache=True)
        measured = measured_cache_bytes(output_cache(out, cache_argument(m)))
        assert measured > 0, name
        assert measured == 2 * cache_bytes(m.config, family_for_config(m.config), ids.shape[1])["total"], name
