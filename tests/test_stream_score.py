"""Streamed scoring (`hyprune.stream`): block by block from the shards, equal to the in-memory sweep.

For every registered family (the tiny random models of the family contract), saved in several shards:
activation scores and the depth sweep's block scores, computed one block in memory at a time, equal
the in-memory results bit for bit in float32.
"""

from __future__ import annotations

import pytest
import torch
from test_family_contract import CASES, NAMES, VOCAB

from hyprune.arch import family_for_config
from hyprune.depth import removal_sweep, stream_sweep
from hyprune.importance import activation_scores
from hyprune.stream.blocks import NOT_STREAMED
from hyprune.stream.score import stream_activation_scores, stream_block_scores, stream_removal_scores


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (model, folder) with the model saved in shards of at most 20 kB."""
    cache = {}

    def get(name):
        if name not in cache:
            model = CASES[name].make()
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, max_shard_size="20kB")
            cache[name] = model, folder
        return cache[name]

    return get


STREAMED = [name for name in NAMES if name not in NOT_STREAMED]
WINDOWS = torch.randint(1, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_activation_scores_equal_in_memory(name, saved):
    model, folder = saved(name)
    assert len(list(folder.glob("*.safetensors"))) > 1  # the test reads across shards
    family = family_for_config(model.config)
    expected = activation_scores(model, WINDOWS, family, batch_size=2, progress=False)
    got = stream_activation_scores(folder, WINDOWS, batch_size=2, progress=False)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_block_scores_equal_in_memory(name, saved):
    model, folder = saved(name)
    family = family_for_config(model.config)
    expected = stream_sweep(model, WINDOWS, family, window=2, batch_size=2, progress=False)
    got = stream_block_scores(folder, WINDOWS, window=2, batch_size=2, progress=False)
    for method in ("block_influence", "angular"):
        assert got[method].scores == expected[method].scores, method
        assert (got[method].samples, got[method].tokens) == (expected[method].samples, expected[method].tokens)


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_removal_scores_equal_in_memory(name, saved):
    """KL and LM loss without each block: every candidate a stream of its own, each block read once."""
    model, folder = saved(name)
    family = family_for_config(model.config)
    expected = removal_sweep(model, WINDOWS, family, batch_size=2, progress=False)
    got = stream_removal_scores(folder, WINDOWS, batch_size=2, progress=False)
    for method in ("kl", "lm_loss"):
        assert got[method].scores == expected[method].scores, method


@pytest.mark.filterwarnings("ignore:No tokenizer copied")  # the contract models have none
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("name", ["nemotron_h", "llama", "jamba", "falcon_h1", "granitemoehybrid"])
def test_streamed_sparsity_writes_what_in_memory_writes(name, method, saved, tmp_path):
    """Sequential calibration block by block from the shards, each block pruned and written before the next
    is read: every tensor equals the in-memory method's, bit for bit."""
    import copy

    from transformers import AutoModelForCausalLM

    from hyprune.methods import MethodOptions, get_method
    from hyprune.stream.sparsify import stream_sparsify

    model, folder = saved(name)
    options = MethodOptions(sparsity=0.5)
    windows = None if method == "magnitude" else WINDOWS
    expected = get_method(method).run(copy.deepcopy(model), family_for_config(model.config), windows, options,
                                      batch_size=2, progress=False).model.state_dict()
    report = stream_sparsify(folder, tmp_path / "out", method, options, windows, batch_size=2, progress=False)
    got, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    got = got.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got), [k for k in got if not torch.equal(got[k], expected[k])]
    assert report["total"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_streamed_sparsity_refuses_shared_block_weights(saved, tmp_path):
    from hyprune.errors import HypruneError
    from hyprune.methods import MethodOptions
    from hyprune.stream.sparsify import stream_sparsify

    _, folder = saved("zamba2")
    with pytest.raises(HypruneError, match="shares weights between blocks.*--no-stream"):
        stream_sparsify(folder, tmp_path / "out", "magnitude", MethodOptions(sparsity=0.5), None, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_in_memory_sparsity_on_shared_blocks_prunes_each_weight_once(method, saved):
    """Zamba2's shared transformer appears in several hybrid layers, each calling its own adapters: every
    shared weight is pruned once, by the first block that calls it (it used to fail on the uncalled ones)."""
    import copy

    from hyprune.methods import MethodOptions, get_method

    model, _ = saved("zamba2")
    result = get_method(method).run(copy.deepcopy(model), family_for_config(model.config), WINDOWS,
                                    MethodOptions(sparsity=0.5), batch_size=2, progress=False)
    rows = result.report["tensors"]

    def expected(row):  # Wanda zeroes round(R x inputs) per output row; SparseGPT R of each column block
        cols = row["shape"][1]
        return round(0.5 * cols) / cols if method == "wanda" else 0.5

    assert rows and all(row["sparsity"] == pytest.approx(expected(row), abs=0.02) for row in rows), \
        [(r["name"], r["sparsity"]) for r in rows if abs(r["sparsity"] - expected(r)) > 0.02]
