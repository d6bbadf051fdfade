"""Depth pruning: block importance finds planted answers, agrees with independent computations, and the
chosen blocks become plans that apply, save, reload and generate; width and depth combine in one plan."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Mamba2Config, NemotronHConfig

from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.depth import (
    BLOCK_PLOT_FILE,
    BLOCK_SCORES_FILE,
    METHODS,
    BlockScores,
    block_importance,
    block_importance_all,
    check_depth_request,
    choose_blocks_to_drop,
    depth_plan,
    drop_blocks_from_list,
    format_block_table,
    load_block_scores,
    removed_block,
    save_block_scores,
    with_dropped_blocks,
)
from hyprune.api import score_depth
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores
from hyprune.plan import identity_plan, make_plan

from masking import randomized
from reference import masks_from_plan, reference_logits

HYBRID = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]
KINDS = ["mamba", "mlp", "attention", "mamba", "mlp"]
OUT_PROJ = {"mamba": "out_proj", "attention": "o_proj", "mlp": "down_proj"}


pytestmark = pytest.mark.usefixtures("one_thread")


def nemotron(seed: int = 0):
    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=64, hidden_size=24, layers_block_type=HYBRID, mamba_num_heads=4, mamba_head_dim=4, n_groups=2,
        ssm_state_size=6, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        chunk_size=8, initializer_range=0.1, use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )
    return randomized(AutoModelForCausalLM.from_config(config), output_scale=0.3)


def mamba2(seed: int = 0, layers: int = 4):
    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=64, hidden_size=16, num_heads=4, head_dim=8, expand=2, n_groups=2, state_size=6,
                          num_hidden_layers=layers, chunk_size=8, initializer_range=0.1, use_cache=False,
                          pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return randomized(AutoModelForCausalLM.from_config(config), output_scale=0.3)


def output_projection(model, i):
    family = family_for_config(model.config)
    kind = family.block_kinds(model.config)[i]
    return getattr(family.layers(model)[i].mixer, OUT_PROJ[kind]).weight


@torch.no_grad()
def sample_windows(model, n=16, seq=16, seed=0):
    """Token windows sampled from ``model`` itself: on such data the expected loss increase of a removed
    block is KL(p_full || p_removed) >= 0, so the planted identity block (exactly 0) must rank last."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (n, 1), generator=g)
    for _ in range(seq - 1):
        probs = model(input_ids=ids, use_cache=False).logits[:, -1].softmax(-1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    return ids


def random_windows(n=8, seq=12, seed=1):
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Planted answers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,planted", [(nemotron, [0, 1, 2]), (mamba2, [2])], ids=["nemotron", "mamba2"])
def test_identity_blocks_score_zero_and_rank_last_for_every_method(make, planted):
    """Zeroing a block's output projection (Mamba out_proj, MLP down_proj, attention o_proj) makes it
    exactly the identity: nothing it computes reaches the residual stream."""
    model = make()
    with torch.no_grad():
        for i in planted:
            output_projection(model, i).zero_()
    windows = sample_windows(model)
    results = block_importance_all(model, windows, METHODS, batch_size=16, progress=False)
    for i in planted:
        assert results["block_influence"].scores[i] == pytest.approx(0, abs=1e-6)
        assert results["angular"].scores[i] == pytest.approx(0, abs=1e-3)  # arccos is steep near 1
        assert results["kl"].scores[i] == 0
        assert results["lm_loss"].scores[i] == 0
    for method, result in results.items():
        others = [s for j, s in enumerate(result.scores) if j not in planted]
        assert min(others) > max(result.scores[i] for i in planted), method
        last = len(result.scores)
        assert sorted(result.ranks()[i] for i in planted) == list(range(last - len(planted) + 1, last + 1)), method
        assert choose_blocks_to_drop(result, len(planted), keep_kinds=()) == planted, method


@pytest.mark.parametrize("make,planted", [(nemotron, 3), (mamba2, 1)])
def test_dominant_block_ranks_first_for_block_influence(make, planted):
    model = make()
    with torch.no_grad():
        for i in range(len(family_for_config(model.config).layers(model))):
            output_projection(model, i).mul_(30 if i == planted else 0.03)  # one block swamps the stream
    result = block_importance(model, random_windows(), "block_influence", progress=False)
    assert result.ranks()[planted] == 1
    assert result.scores[planted] > 0.5 > max(s for j, s in enumerate(result.scores) if j != planted)


# ---------------------------------------------------------------------------------------------
# Agreement with independent computations
# ---------------------------------------------------------------------------------------------
def _streams_from_hidden_states(model, ids):
    """Residual stream before every block and after the last one, from output_hidden_states.

    What transformers 5.23 returns (pinned here):
      NemotronH: (embeddings, out_0, ..., out_{L-2}, norm_f(out_{L-1})): the last entry is replaced by the
                 final-norm output unless config.tie_last_hidden_states is False, then it is out_{L-1}.
      Mamba2:    (out_0, ..., out_{L-1}, norm_f(out_{L-1})): no embeddings entry.
    """
    family = family_for_config(model.config)
    L = len(family.layers(model))
    if family.name == "nemotron_h":
        tied = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        assert len(tied) == L + 1
        torch.testing.assert_close(tied[0], model.get_input_embeddings()(ids))
        model.config.tie_last_hidden_states = False
        try:
            hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
        finally:
            del model.config.tie_last_hidden_states
        torch.testing.assert_close(tied[-1], model.model.norm_f(hs[-1]))
        return list(hs)  # [L + 1]: x_0 .. x_L
    hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    assert len(hs) == L + 1
    torch.testing.assert_close(hs[-1], model.backbone.norm_f(hs[-2]))
    return [model.get_input_embeddings()(ids)] + list(hs[:-1])


@pytest.mark.parametrize("make", [nemotron, mamba2])
def test_block_influence_and_angular_agree_with_output_hidden_states(make):
    model = make(seed=4)
    ids = random_windows(n=7, seq=13)
    with torch.no_grad():
        x = _streams_from_hidden_states(model, ids)
    L = len(x) - 1
    expected_bi = [1 - F.cosine_similarity(x[i].double(), x[i + 1].double(), dim=-1).mean().item() for i in range(L)]
    # batch size 3 over 7 windows: sums accumulate across uneven batches
    got = block_importance_all(model, ids, ["block_influence", "angular"], window=2, batch_size=3, progress=False)
    assert rel_err(got["block_influence"].scores, expected_bi) < 1e-5
    last = [t[:, -1].double() for t in x]
    cos = [F.cosine_similarity(last[l], last[l + 2], dim=-1).clamp(-1, 1) for l in range(L - 1)]
    expected_ang = [(torch.arccos(c) / math.pi).mean().item() for c in cos]
    assert got["angular"].window == 2 and len(got["angular"].scores) == L - 1
    assert rel_err(got["angular"].scores, expected_ang) < 1e-6


@pytest.mark.parametrize("make", [nemotron, mamba2])
def test_removal_scores_equal_kl_and_loss_of_the_depth_pruned_model(make):
    model = make(seed=2)
    family = family_for_config(model.config)
    ids = random_windows(n=5, seq=11)
    got = block_importance_all(model, ids, ["kl", "lm_loss"], batch_size=3, progress=False)  # uneven batches
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.double()
        log_p = full.log_softmax(-1)
        base_loss = F.cross_entropy(full[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        for i in range(len(family.layers(model))):
            plan = identity_plan(family, model.config)
            plan.drop_blocks = [i]
            logits = apply_plan(model, plan)(input_ids=ids, use_cache=False).logits.double()
            kl = (log_p.exp() * (log_p - logits.log_softmax(-1))).sum(-1).mean().item()
            loss = (F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)) - base_loss).item()
            assert got["kl"].scores[i] == pytest.approx(kl, rel=1e-4, abs=1e-7)
            assert got["lm_loss"].scores[i] == pytest.approx(loss, rel=1e-4, abs=1e-6)


def test_removed_block_returns_its_input_positionally_or_by_keyword():
    model = nemotron()
    block = model.model.layers[0]
    x = torch.randn(2, 5, 24)
    with torch.no_grad(), removed_block(block):
        assert block(x) is x
        assert block(hidden_states=x) is x
    assert not torch.equal(block(x), x)  # the hook is gone afterwards


# ---------------------------------------------------------------------------------------------
# Choosing blocks
# ---------------------------------------------------------------------------------------------
def test_choose_lowest_and_contiguous():
    scores = BlockScores("kl", [0.5, 0.1, 0.9, 0.05, 0.3], KINDS)
    assert choose_blocks_to_drop(scores, 2, "lowest") == [1, 3]
    assert choose_blocks_to_drop(scores, 2, "contiguous") == [3, 4]  # window sums 0.6, 1.0, 0.95, 0.35
    assert choose_blocks_to_drop(scores, 3, "contiguous") == [1, 2, 3]  # 1.5, 1.05, 1.25
    assert choose_blocks_to_drop([3.0, 1.0, 1.0, 2.0], 1) == [1]  # ties: the lower index
    # angular over windows of 2 blocks: the window score is used directly
    angular = BlockScores("angular", [0.4, 0.2, 0.3, 0.1], KINDS, window=2)
    assert choose_blocks_to_drop(angular, 2, "contiguous") == [3, 4]
    with pytest.raises(HypruneError, match="per-block scores"):
        choose_blocks_to_drop(angular, 2, "lowest")
    with pytest.raises(HypruneError, match="Rescore with window 3"):
        choose_blocks_to_drop(angular, 3, "contiguous")


def test_choose_keeps_one_attention_block_when_asked():
    scores = BlockScores("block_influence", [0.5, 0.4, 0.01, 0.6, 0.3], KINDS)
    assert choose_blocks_to_drop(scores, 2, "lowest") == [2, 4]
    assert choose_blocks_to_drop(scores, 2, "lowest", keep_kinds=["attention"]) == [1, 4]
    assert choose_blocks_to_drop(scores, 2, "contiguous", keep_kinds=["attention"]) == [3, 4]
    model = nemotron()
    family = family_for_config(model.config)
    with pytest.raises(HypruneError, match="last attention block"):
        check_depth_request(family, model.config, 5 - 1, "kl", "contiguous")
    check_depth_request(family, model.config, 4, "kl", "lowest")  # keeps the attention block alone


@pytest.mark.parametrize("n,mode,match", [(0, "lowest", "at least 1"), (5, "lowest", "every block"),
                                          (2, "middle", "Unknown depth mode")])
def test_choose_rejects_bad_counts_and_modes(n, mode, match):
    with pytest.raises(HypruneError, match=match):
        choose_blocks_to_drop(BlockScores("kl", [1.0] * 5, KINDS), n, mode)


def test_explicit_lists_are_checked():
    assert drop_blocks_from_list("4, 1", 5) == [1, 4]
    assert drop_blocks_from_list([3], 5) == [3]
    for bad, match in [([5], "do not exist"), ([-1], "do not exist"), ([1, 1], "more than once"),
                       ("1,x", "not a whole number"), ([0, 1, 2, 3, 4], "every block"), ([], "empty")]:
        with pytest.raises(HypruneError, match=match):
            drop_blocks_from_list(bad, 5)
    with pytest.raises(HypruneError):
        BlockScores("depth", [1.0], ["mamba"])
    with pytest.raises(HypruneError, match="Unknown depth method"):
        block_importance(nemotron(), random_windows(), "cosine", progress=False)


def test_with_dropped_blocks_builds_on_a_plan():
    model = nemotron()
    family = family_for_config(model.config)
    plan = with_dropped_blocks(None, [3, 1], family, model.config)
    assert plan.drop_blocks == [1, 3] and plan.kept_blocks() == [0, 2, 4]
    more = with_dropped_blocks(plan, [4], family, model.config)
    assert more.drop_blocks == [1, 3, 4] and plan.drop_blocks == [1, 3]  # the input plan is not modified
    with pytest.raises(HypruneError, match="already drops"):
        with_dropped_blocks(plan, [1], family, model.config)
    with pytest.raises(HypruneError, match="do not exist"):
        with_dropped_blocks(plan, [7], family, model.config)
    with pytest.warns(UserWarning, match="every attention block"):
        no_attention = with_dropped_blocks(None, [2], family, model.config)
    pruned = apply_plan(model, no_attention)
    assert pruned.config.layers_block_type == ["linear_attention", "mlp", "linear_attention", "mlp"]
    bad = identity_plan(family, model.config)
    bad.drop_blocks = [2, 1]
    with pytest.raises(HypruneError, match="sorted and unique"):
        apply_plan(model, bad)


# ---------------------------------------------------------------------------------------------
# Depth plans: apply, save, reload, generate
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,method,mode,n", [
    (nemotron, "kl", "lowest", 2), (nemotron, "block_influence", "contiguous", 2),
    (mamba2, "angular", "contiguous", 2), (mamba2, "lm_loss", "lowest", 1),
])
def test_depth_plan_applies_saves_reloads_and_generates(tmp_path, make, method, mode, n):
    model = make(seed=5)
    family = family_for_config(model.config)
    windows = random_windows()
    plan, scores = depth_plan(model, n, method, mode, windows=windows, progress=False)
    assert scores.method == method and len(plan.drop_blocks) == n
    assert scores.window == (n if (method, mode) == ("angular", "contiguous") else 1)
    keep = ("attention",) if family.name == "nemotron_h" else ()
    assert plan.drop_blocks == choose_blocks_to_drop(scores, n, mode, keep_kinds=keep)
    if mode == "contiguous":
        assert plan.drop_blocks == list(range(plan.drop_blocks[0], plan.drop_blocks[0] + n))
    pruned = apply_plan(model, plan)
    kinds = family.block_kinds(model.config)
    assert family.block_kinds(pruned.config) == [k for i, k in enumerate(kinds) if i not in plan.drop_blocks]
    # the pruned model is the original with those blocks skipped
    ids = random_windows(n=2, seq=9, seed=7)
    ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
    assert rel_err(pruned(input_ids=ids, use_cache=False).logits, ref) < 1e-5
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(loaded(input_ids=ids, use_cache=False).logits, pruned(input_ids=ids, use_cache=False).logits)
    prompt = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with_cache = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = loaded.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape[1] == 14 and torch.equal(with_cache, without)


@pytest.mark.parametrize("make,target,drop", [
    (nemotron, {"hidden_size": 16, "mamba_num_heads": 2, "mamba_head_dim": 3, "intermediate_size": 20,
                "num_attention_heads": 2, "ssm_state_size": 4}, 1),
    (mamba2, {"hidden_size": 12, "head_dim": 6, "state_size": 4}, 2),
])
def test_width_and_depth_in_one_plan_match_the_reference(make, target, drop):
    model = make(seed=6)
    family = family_for_config(model.config)
    windows = random_windows()
    width = make_plan(family, model.config, activation_scores(model, windows, family, progress=False), target)
    plan, _ = depth_plan(model, drop, "block_influence", windows=windows, plan=width, progress=False)
    assert plan.method == "activation+depth:block_influence/lowest"
    assert [lp.model_dump() for lp in plan.layers] == [lp.model_dump() for lp in width.layers]
    assert plan.hidden == width.hidden and len(plan.drop_blocks) == drop and not width.drop_blocks
    pruned = apply_plan(model, plan)
    for field, value in target.items():
        assert getattr(pruned.config, field) == value
    ids = random_windows(n=2, seq=11, seed=8)
    ref = reference_logits(model, ids, masks_from_plan(plan, family.sizes(model.config)), family)
    assert rel_err(pruned(input_ids=ids, use_cache=False).logits, ref) < 1e-5
    with pytest.raises(HypruneError, match="already drops"):
        depth_plan(model, 1, scores=BlockScores("kl", [1.0] * len(plan.layers), family.block_kinds(model.config)),
                   plan=plan)


# ---------------------------------------------------------------------------------------------
# Saving, loading, the CLI entry point
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:matplotlib is not installed")
def test_save_block_scores_writes_the_ranking_and_a_plot(tmp_path):
    result = BlockScores("kl", [0.5, 0.1, 0.9, 0.05, 0.3], KINDS, family="nemotron_h", samples=4, tokens=64)
    written = save_block_scores(result, tmp_path)
    data = json.loads((tmp_path / BLOCK_SCORES_FILE).read_text())
    assert data["higher_is_more_important"] is True and data["method"] == "kl"
    assert [r["rank"] for r in data["ranking"]] == [2, 4, 1, 5, 3]
    assert [r["kind"] for r in data["ranking"]] == KINDS
    assert data["lowest_first"] == [3, 1, 4, 0, 2]
    assert load_block_scores(tmp_path) == result
    assert "rank" in format_block_table(result)
    if "plot" in written:  # matplotlib installed
        assert (tmp_path / BLOCK_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of matplotlib now fails
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        written = save_block_scores(BlockScores("angular", [0.2, 0.1], KINDS[:3], window=2), tmp_path)
    assert "plot" not in written and not (tmp_path / BLOCK_PLOT_FILE).exists()
    assert (tmp_path / BLOCK_SCORES_FILE).is_file()


def test_plot_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    written = save_block_scores(BlockScores("block_influence", [0.3, 0.2, 0.5, 0.1, 0.4], KINDS), tmp_path)
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.filterwarnings("ignore:matplotlib is not installed")
def test_score_depth_end_to_end(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "depth"
    with pytest.raises(HypruneError, match="Unknown depth method"):
        score_depth(str(nemotron_dir), str(calib_txt), "cosine", str(out))
    result = score_depth(str(nemotron_dir), str(calib_txt), "block_influence", str(out), seq_len=32,
                         num_samples=4, batch_size=2, progress=False)
    assert (out / BLOCK_SCORES_FILE).is_file() and len(result.scores) == 5
    assert result.calibration["windows"] == 4 and result.tokens == 4 * 32
    model = AutoModelForCausalLM.from_pretrained(nemotron_dir)
    family = family_for_config(model.config)
    assert load_block_scores(out, family, model.config) == result
    plan, scores = depth_plan(model, 1, scores=str(out))
    assert plan.drop_blocks == choose_blocks_to_drop(result, 1, keep_kinds=("attention",))
    with pytest.raises(HypruneError, match="not empty"):
        score_depth(str(nemotron_dir), str(calib_txt), "kl", str(out))
    other = mamba2()
    with pytest.raises(HypruneError, match="another model"):
        load_block_scores(out, family_for_config(other.config), other.config)
