"""The CLI options come from the workflow configs (`hyprune.config`): every field has its option, and
every option is a field, except the explicit lists below."""

from __future__ import annotations

import pytest
import typer

from hyprune import cli
from hyprune.config import BenchConfig, DataConfig, LoadConfig, PruneConfig, SearchConfig, build, flag_of
from hyprune.errors import HypruneError

# options that are not settings of a workflow: where the output goes and how the command runs
NOT_CONFIG_OPTIONS = {"out", "overwrite", "quiet", "resume", "resume_changed", "help",
                      "depth", "window",  # score --depth: the depth-scoring mode of the score command
                      "teacher", "student", "models", "model"}  # the models of distill, bench, finetune (loading: LoadConfig)
CONFIG_COMMANDS = ("score", "prune", "search", "eval", "bench", "distill", "finetune", "cache-teacher")


def _commands():
    group = typer.main.get_command(cli.app)
    return {name: group.commands[name] for name in CONFIG_COMMANDS}


def _wrapped(name):
    return next(c for c in cli.app.registered_commands if (c.name or c.callback.__name__) == name).callback


@pytest.mark.parametrize("name", CONFIG_COMMANDS)
def test_every_config_field_has_its_option_and_every_option_is_a_field(name):
    command = _commands()[name]
    options = {p.name: p for p in command.params}
    fields = cli.cli_fields(_wrapped(name))
    covered = set()
    for cls, names in fields.items():
        skipped = set(cls.model_fields) - set(names)
        # what a command leaves out is declared where the command is (a commented skip list)
        assert skipped <= set(cli.DISTILL_NOT_ON_CLI) | set(cli.FINETUNE_NOT_ON_CLI) | set(cli.TRAIN_LOAD_NOT_ON_CLI) \
            | {"device_map", "gguf_file", "model"}, (name, cls.__name__, skipped)
        for field in names:
            assert field in options, (name, cls.__name__, field)
            param = options[field]
            if param.param_type_name == "option":
                assert flag_of(cls, field).split("/") == [*param.opts, *param.secondary_opts]  # --on/--off pairs
            covered.add(field)
    assert set(options) - covered <= NOT_CONFIG_OPTIONS, set(options) - covered


def test_existing_flags_keep_their_names_and_defaults():
    commands = _commands()
    prune = {p.name: p for p in commands["prune"].params}
    assert prune["plan_file"].opts == ["--plan"] and prune["seq_len"].default == 256
    assert prune["depth_method"].default == "block_influence" and prune["method"].default == "activation"
    search = {p.name: p for p in commands["search"].params}
    assert "device_map" not in search and "gguf_file" not in search
    assert search["tolerance"].default == 0.05 and search["max_candidates"].default == 64
    bench = {p.name: p for p in commands["bench"].params}
    assert bench["context_lengths"].default == "128,512" and bench["batch_sizes"].default == "1"
    cache = {p.name: p for p in commands["cache-teacher"].params}
    assert cache["k"].opts == ["--top-k"] and cache["k"].default == 100


def test_configs_check_ranges_in_one_line_naming_the_flag():
    with pytest.raises(HypruneError, match=r"^bench: field decode_tokens \(--decode-tokens\): .*greater than"):
        build(BenchConfig, where="bench", decode_tokens=0)
    with pytest.raises(HypruneError, match=r"num_samples \(--num-samples\)"):
        build(DataConfig, num_samples=0)
    with pytest.raises(HypruneError, match=r"unknown key"):
        build(SearchConfig, budget=3)
    assert build(PruneConfig, target={"hidden_size": 8}).target == {"hidden_size": 8}
    assert LoadConfig(model="m").load_kwargs() == {"dtype": "float32", "device": None, "device_map": None,
                                                   "allow_pickle": False, "trust_remote_code": False,
                                                   "gguf_file": None}
