"""One typed config per workflow: what a command, a Python call and a recipe stage all take.

Each workflow's settings are a pydantic model, written once here: the field's type, default,
constraint (``Field(ge=1)``) and help text. `hyprune.cli` builds every command's options from these
fields (`hyprune.cli_options`), the Python API takes a config or the same fields as keyword
arguments, and the recipe stages (`hyprune.recipe`) are these configs. A field whose command-line
form is not its Python form (a ``--target KEY=VALUE,...`` string for a dict) names its flag and its
parser with `Cli` in its annotation; parsing CLI strings happens only in the CLI layer.

    LoadConfig      how a model is read (dtype, device, device_map, allow_pickle, ...)
    DataConfig      calibration windows (data, seq_len, num_samples, batch_size, seed, ...)
    PruneConfig     ``hyprune prune``: target, scores, plan, depth, method and its options
    SearchConfig    ``hyprune search``: budget, space, ranking, short distillation, latency model
    EvalConfig      ``hyprune eval``: perplexity and lm-eval tasks
    BenchConfig     ``hyprune bench``: batch sizes, context lengths, decode tokens, repeats
    DistillConfig   ``hyprune distill`` / ``finetune`` (`hyprune.distill.train`)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Callable, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from hyprune.errors import HypruneError, validation_message
from hyprune.methods import MethodOptions, parse_nm
from hyprune.plan import parse_target


@dataclass(frozen=True)
class Cli:
    """How a config field appears on the command line, when not as ``--field-name`` of its own type.

    ``flag``: the option name; ``parse``: CLI text -> the field's value (raises `HypruneError`);
    ``default``: the text shown as the CLI default (parsed like a given value); ``argument``: positional.
    """

    flag: str | None = None
    parse: Callable[[str], Any] | None = None
    default: str | None = None
    argument: bool = False


class WorkflowConfig(BaseModel):
    """Base of the workflow configs: unknown keys are errors, fields are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


C = TypeVar("C", bound=BaseModel)
# a path or hub id: an `os.PathLike` is taken as its string
Path_ = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]


def _names(value):
    """``"piqa, arc_easy"`` (or a list) -> a list of names; blanks kept for the caller's check."""
    return value.split(",") if isinstance(value, str) else value


def flag_of(cls: type[BaseModel], name: str) -> str:
    """The CLI flag of field ``name`` of ``cls`` (``--seq-len`` for ``seq_len``, or its `Cli` flag)."""
    cli = cli_meta(cls.model_fields[name])
    return (cli.flag if cli and cli.flag else "--" + name.replace("_", "-"))


def cli_meta(field) -> Cli | None:
    return next((m for m in field.metadata if isinstance(m, Cli)), None)


def build(cls: type[C], config: C | None = None, where: str | None = None, **fields) -> C:
    """``config`` (updated with ``fields``) or a new ``cls(**fields)``; one `HypruneError` line on bad values."""
    try:
        if config is None:
            return cls.model_validate(fields)
        if not isinstance(config, cls):
            raise HypruneError(f"Expected a {cls.__name__}, got {type(config).__name__}.")
        return cls.model_validate({**config.model_dump(), **fields}) if fields else config
    except ValidationError as e:
        raise HypruneError(config_error(cls, where or cls.__name__, e)) from None


def resolve(where: str, fields: dict, *sections: tuple[type[BaseModel], BaseModel | None]) -> list:
    """One instance per ``(cls, given)`` section: ``given`` (or a new one), updated with the keyword
    ``fields`` that name its fields (a name several sections share goes to each). An unknown keyword
    is an error naming the accepted ones."""
    known = set().union(*(cls.model_fields for cls, _ in sections))
    unknown = sorted(set(fields) - known)
    if unknown:
        raise HypruneError(f"{where}: unknown setting {', '.join(unknown)} (accepted: {', '.join(sorted(known))}).")
    return [build(cls, given, where, **{k: v for k, v in fields.items() if k in cls.model_fields})
            for cls, given in sections]


def config_error(cls: type[BaseModel], where: str, error: ValidationError) -> str:
    """`validation_message` of ``error``, each top-level field also named by its CLI flag."""
    flags = {name: flag_of(cls, name) for name in cls.model_fields}

    def allowed(loc):
        return sorted(cls.model_fields) if len(loc) == 1 else []

    message = validation_message(where, error, allowed)
    for name, flag in flags.items():
        message = message.replace(f"field {name}:", f"field {name} ({flag}):").replace(
            f"field {name}.", f"field ({flag}) {name}.")
    return message


# ---------------------------------------------------------------------------------------------
# Loading and calibration data: shared by most workflows
# ---------------------------------------------------------------------------------------------
class LoadConfig(WorkflowConfig):
    """How a model is read (`hyprune.models.load_model`); ``model`` is a folder or a hub id (a required
    argument on the command line; None where the caller names the models, as bench and recipes do)."""

    model: Annotated[Path_ | None, Cli(argument=True)] = Field(
        None, description="A local HF checkpoint folder or a hub id.")
    dtype: str = Field("float32", description="float32, bfloat16, float16 or auto.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: where from_pretrained puts it).")
    device_map: str | None = Field(None, description="'auto' to spread a large model over devices.")
    allow_pickle: bool = Field(False, description="Allow loading pickle (.bin) weights.")
    trust_remote_code: bool = Field(False, description="Run the checkpoint's own modeling code.")
    gguf_file: Path_ | None = Field(None, description="Load this GGUF file from the MODEL folder (needs `gguf`).")
    stream: Annotated[bool | None, Cli(flag="--stream/--no-stream")] = Field(
        None, description="Read the model block by block from its safetensors shards, one block in memory "
                          "(default: when the weights would not fit in the free memory of the device).")

    def load_kwargs(self, exclude: tuple = ()) -> dict:
        """The keyword arguments of `hyprune.models.load_model` (everything but ``model``, ``stream`` and
        ``exclude``)."""
        return self.model_dump(exclude={"model", "stream", *exclude})

    def source(self) -> dict:
        """Where the config and the tokenizer come from (`load_config`, `load_tokenizer`)."""
        return {"trust_remote_code": self.trust_remote_code, "gguf_file": self.gguf_file}


class DataConfig(WorkflowConfig):
    """Calibration windows (`hyprune.data.calibration_windows`) and the batch of a scoring pass."""

    data: Path_ | None = Field(None, description=".txt(.gz), .jsonl, .parquet file or a datasets name.")
    seq_len: int = Field(256, ge=2, description="Tokens per calibration window.")
    num_samples: int = Field(64, ge=1, description="Number of calibration windows.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    seed: int = Field(0, description="Seed for the choice of calibration documents.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/datasets.")
    split: str = Field("train", description="Split of a datasets dataset.")

    def window_kwargs(self) -> dict:
        return dict(seq_len=self.seq_len, num_samples=self.num_samples, seed=self.seed, text_field=self.text_field,
                    split=self.split)


class TrainData(WorkflowConfig):
    """The text of a distillation or fine-tuning run (the settings of the loop are `DistillConfig`)."""

    data: Path_ = Field(description="Training text, or a folder written by `hyprune cache-teacher`.")
    eval_data: Path_ | None = Field(None, description="Held-out text (default: the tail of --data).")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/datasets.")
    split: str = Field("train", description="Split of a datasets dataset.")


# ---------------------------------------------------------------------------------------------
# CLI parsers of the fields whose command-line form is text
# ---------------------------------------------------------------------------------------------
def _parse_target(text: str) -> dict[str, int]:
    return parse_target(text)


def _parse_nm(text: str):
    return parse_nm(text)


def parse_block_list(text: str) -> list[int]:
    """``"3,5,7"`` -> [3, 5, 7] (the text of ``--drop-block-list``; checked by `drop_blocks_from_list`)."""
    items = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            items.append(int(part))
        except ValueError:
            raise HypruneError(f"Block index '{part}' is not a whole number. Example: 3,5,7") from None
    return items


def parse_ints(flag: str):
    """A parser of comma-separated whole numbers (``"128,512"``) for ``flag``."""
    def parse(text: str) -> list[int]:
        try:
            return [int(p) for p in str(text).split(",") if p.strip()]
        except ValueError:
            raise HypruneError(f"{flag} takes comma-separated whole numbers, got '{text}'.") from None
    return parse


def space_from_text(text: str) -> dict[str, str]:
    """``"hidden_size=96:192:24,mamba_num_heads=8"`` -> ``{"hidden_size": "96:192:24", "mamba_num_heads": "8"}``."""
    entries = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise HypruneError(f"--space entry '{item}' is not FIELD=MIN:MAX[:STEP]. "
                               "Example: --space hidden_size=96:192:24,intermediate_size=384:768")
        key, value = item.split("=", 1)
        entries[key.strip()] = value.strip()
    return entries


def _parse_space(text: str) -> dict[str, int | tuple[int, ...]]:
    """``"hidden_size=96:192:24,mamba_num_heads=8"`` -> ``{"hidden_size": (96, 192, 24), "mamba_num_heads": 8}``."""
    entries: dict[str, int | tuple[int, ...]] = {}
    for key, value in space_from_text(text).items():
        try:
            numbers = tuple(int(p) for p in value.split(":"))
        except ValueError:
            raise HypruneError(f"--space {key}={value}: write MIN:MAX[:STEP] or one VALUE, in whole numbers "
                               "(e.g. hidden_size=96:192:24).") from None
        entries[key] = numbers[0] if len(numbers) == 1 else numbers
    return entries


def _parse_drop_range(text: str) -> int | tuple[int, int]:
    """``"0:2"`` -> (0, 2), ``"1"`` -> 1."""
    try:
        numbers = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise HypruneError(f"--drop-blocks {text}: write MIN:MAX or N (whole numbers), e.g. 0:2.") from None
    if len(numbers) not in (1, 2):
        raise HypruneError(f"--drop-blocks {text}: write MIN:MAX or N, e.g. 0:2.")
    return numbers[0] if len(numbers) == 1 else (numbers[0], numbers[1])


# ---------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------
class PruneConfig(WorkflowConfig):
    """``hyprune prune``: what to cut (a width ``target``, ``drop_blocks``, a ``plan_file``) and how (``method``)."""

    target: Annotated[dict[str, int], Cli(parse=_parse_target)] = Field(
        default_factory=dict, description="KEY=VALUE[,KEY=VALUE...] target sizes.")
    scores: Path_ | None = Field(None, description="Reuse saved scores instead of a sweep.")
    plan_file: Annotated[Path_ | None, Cli(flag="--plan")] = Field(None, description="Apply this plan (no scoring).")
    drop_blocks: int | None = Field(None, ge=1, description="Drop this many blocks (depth pruning).")
    drop_block_list: Annotated[list[int] | None, Cli(parse=parse_block_list)] = Field(
        None, description="Drop these blocks: I,J,...")
    depth_method: str = Field("block_influence", description="block_influence, angular, kl or lm_loss "
                                                             "(for --drop-blocks).")
    depth_mode: str = Field("lowest", description="lowest (any blocks) or contiguous (one window).")
    method: str = Field("activation", description="activation (default), group-blind, or a registered method; "
                                                  "a wrong name lists them all.")
    sparsity: float | None = Field(None, description="Unstructured methods: fraction of zeros.")
    nm: Annotated[tuple[int, int] | None, Cli(parse=_parse_nm)] = Field(
        None, description="Unstructured methods: N:M sparsity, e.g. 2:4.")
    targets: str | None = Field(None, description="Sparsity methods: groups (in_proj,out_proj,mamba,attention,mlp) "
                                                  "or a regex over parameter names; default every linear layer "
                                                  "inside the blocks.")
    ratio: float | None = Field(None, description="Structured SSM methods: fraction removed.")

    def method_options(self, seed: int = 0):
        return MethodOptions(sparsity=self.sparsity, nm=self.nm, targets=self.targets, ratio=self.ratio, seed=seed)


class SearchConfig(WorkflowConfig):
    """``hyprune search``: the budget, the space, the ranking, the short distillation and the latency model."""

    target_params: float | None = Field(None, description="Parameter budget (e.g. 4e9).")
    target_ratio: float | None = Field(None, description="Budget as a fraction of the source.")
    target_active_params: float | None = Field(None, description="Active-parameter budget (MoE: per token, top-k "
                                                                 "of the routed experts; dense: = total).")
    target_memory: float | None = Field(None, description="Bytes of weights + cache at --memory-context tokens.")
    target_latency: float | None = Field(None, description="Milliseconds, as the fitted latency model predicts.")
    tolerance: float = Field(0.05, description="Parameters within +-T of the budget; memory and latency within "
                                               "[1-T, 1] of the limit.")
    memory_context: int = Field(2048, description="Context length of the memory budget.")
    memory_dtype: str = Field("bfloat16", description="Weights and cache dtype of the memory budget.")
    memory_batch: int = Field(1, description="Sequences in the cache of the memory budget.")
    space: Annotated[dict[str, int | tuple[int, ...]] | None, Cli(parse=_parse_space)] = Field(
        None, description="FIELD=MIN:MAX[:STEP] or FIELD=VALUE, comma-separated (config field names); unlisted "
                          "axes automatic.")
    min_fraction: float = Field(0.5, description="Lower bound of automatic axes, of the source.")
    drop_blocks: Annotated[int | tuple[int, int] | None, Cli(parse=_parse_drop_range)] = Field(
        None, description="MIN:MAX blocks dropped (default 0:L/5).")
    depth_method: str = Field("block_influence", description="Which blocks of a kind go: block_influence, angular, "
                                                             "kl or lm_loss.")
    max_candidates: int = Field(64, description="Evaluate at most this many (seeded sample).")
    score: str = Field("loss", description="Ranking score: loss (LM loss) or kl (KL to the teacher).")
    top_k: int = Field(4, ge=0, description="Candidates given a short distillation.")
    distill_tokens: int = Field(0, ge=0, description="Tokens of short distillation per top-k candidate (0: rank by "
                                                     "the zero-shot score only).")
    distill_uniform: bool = Field(False, description="Also distill the uniform baseline (every axis cut alike, no "
                                                     "blocks dropped), for comparison.")
    distill_batch: int = Field(8, ge=1, description="Windows per distillation step.")
    distill_lr: float = Field(1e-4, description="Peak learning rate of the short distillation.")
    eval_data: Path_ | None = Field(None, description="Held-out text (default: windows of --data not used for "
                                                    "calibration or distillation).")
    eval_windows: int = Field(32, ge=1, description="Held-out windows for the ranking score.")
    latency: bool = Field(False, description="Fit the latency model and report every candidate's.")
    latency_shapes: int = Field(12, description="Shapes measured for the latency model.")
    latency_metric: str = Field("decode", description="decode (ms per step) or prefill (ms).")
    latency_context: int = Field(128, description="Context length of the latency model.")
    latency_batch: int = Field(1, description="Batch size of the latency model.")
    latency_repeats: int = Field(3, description="Timings per measured shape (medians).")


class EvalConfig(WorkflowConfig):
    """``hyprune eval``: perplexity on local text and/or lm-evaluation-harness tasks."""

    data: Path_ | None = Field(None, description="Text for token-level perplexity.")
    seq_len: int | None = Field(None, description="Tokens per perplexity window.")
    stride: int | None = Field(None, description="Overlapping windows S tokens apart.")
    num_windows: int | None = Field(None, ge=1, description="Read at most this many windows.")
    tasks: Annotated[list[str] | None, BeforeValidator(_names)] = Field(
        None, description="lm-evaluation-harness tasks: piqa,arc_easy,...")
    shots: int | None = Field(None, description="Few-shot examples (default: each task's).")
    limit: float | None = Field(None, description="Examples per task (or a fraction < 1).")
    task_paths: Path_ | None = Field(None, description="Folder of local task YAMLs.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/datasets.")
    split: str = Field("train", description="Split of a datasets dataset.")
    kv: bool = Field(False, description="With the KV compression of config.hyprune_kv (hard decisions: what "
                                        "decoding with the compressed cache computes).")


class CacheConfig(WorkflowConfig):
    """``hyprune cache-teacher``: the teacher's top-k log-probabilities over a text."""

    data: Path_ = Field(description="Text to run the teacher over.")
    seq_len: int = Field(ge=2, description="Tokens per window.")
    k: Annotated[int, Cli(flag="--top-k")] = Field(100, ge=1, description="Logits kept per token.")
    tokens: int | None = Field(None, ge=1, description="Tokens to cache (default: all of --data).")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    shard_windows: int = Field(1024, ge=1, description="Windows per safetensors shard.")
    cache_dtype: str = Field("float16", description="dtype of the cached log-probabilities.")
    text_field: str = Field("text", description="Field holding the text in .jsonl/.parquet/datasets.")
    split: str = Field("train", description="Split of a datasets dataset.")


class BenchConfig(WorkflowConfig):
    """``hyprune bench``: the settings measured, for every model alike."""

    batch_sizes: Annotated[list[Annotated[int, Field(gt=0)]], Cli(parse=parse_ints("--batch-sizes"), default="1")] = \
        Field(default_factory=lambda: [1], min_length=1, description="Comma-separated batch sizes.")
    context_lengths: Annotated[list[Annotated[int, Field(gt=0)]],
                               Cli(parse=parse_ints("--context-lengths"), default="128,512")] = \
        Field(default_factory=lambda: [128, 512], min_length=1, description="Comma-separated prompt lengths.")
    decode_tokens: int = Field(32, ge=1, description="Tokens decoded with the cache.")
    kv: bool = Field(False, description="Decode with the compressed KV cache of each model's config.hyprune_kv "
                                        "(hyprune kv-compress outputs; hyprune.kv.enable).")
    repeats: int = Field(3, ge=1, description="Measurements per setting (medians reported).")
    warmup: int = Field(1, ge=0, description="Untimed runs per setting before the measured ones.")
    seed: int = Field(0, description="Seed of the random prompts.")
