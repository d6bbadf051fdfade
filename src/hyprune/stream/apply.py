"""A plan applied tensor by tensor, from the source safetensors shards to the output shards.

Only the config is loaded. Every output tensor's name, shape and dtype is worked out first, by passing
meta tensors (shapes, no data) through the same `hyprune.apply.TensorSlicer` that `apply_plan` uses;
then each tensor is read, sliced and written before the next one is read. Peak memory is about one
tensor (one fused expert tensor for MoE layouts that fuse on load), never the model. The folder holds
what ``apply_plan`` + ``save_pretrained`` would write: config, generation config, tokenizer, weights
(tied weights once), and ``plan.json``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from hyprune.apply import TensorSlicer, pruned_config
from hyprune.errors import HypruneError
from hyprune.io import atomic_dir, atomic_write_json, check_output
from hyprune.models import count_parameters, load_config, load_tokenizer
from hyprune.plan import Plan, summarize, validate_plan
from hyprune.stream.layout import CheckpointLayout, skeleton
from hyprune.stream.shards import ShardReader, ShardWriter

__all__ = ["stream_apply", "write_side_files"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class _Step:
    """One output model tensor: the source model name it is cut from, and the file tensors that hold it."""

    source: str  # model name in the source
    holder: str  # model name whose file tensors hold the data (itself, or the weight it is tied to)
    files: list[str]  # file tensor names of ``holder``
    target: str  # model name in the pruned model


def _steps(reader: ShardReader, slicer: TensorSlicer, src: CheckpointLayout, dst: CheckpointLayout) -> list[_Step]:
    """The output model tensors in source order: one step for each name the pruned save keeps."""
    groups = src.groups(reader.names())
    holders = src.sources(reader.names())
    keep = set(dst.saved_names())
    steps, done = [], set()
    for name, holder in holders.items():
        target = slicer.target(name)
        if target is None or target not in keep or target in done:
            continue  # dropped by the plan, or tied to (saved as) another name in the pruned model
        done.add(target)
        steps.append(_Step(name, holder, groups[holder], target))
    if done != keep:
        raise HypruneError(f"The pruned model expects weights the stream does not produce: {sorted(keep - done)[:5]}.")
    known = src.model.state_dict()
    unused = [f for f in reader.names() if src.model_name(f)[0] not in known]
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors fit no weight of the model and are not copied "
                      f"(from_pretrained ignores them too), e.g. {min(unused)}.", stacklevel=3)
    return steps


def _cut(step: _Step, tensors: dict[str, torch.Tensor], slicer: TensorSlicer, src: CheckpointLayout,
         dst: CheckpointLayout) -> dict[str, torch.Tensor]:
    """File tensors of one step -> the pruned file tensors to write (meta in, meta out: the shapes)."""
    model = src.to_model(tensors)
    if step.holder not in model:
        raise HypruneError(f"The checkpoint tensors {step.files[:3]} do not convert to '{step.holder}'.")
    return dst.to_file({step.target: slicer.slice(step.source, model[step.holder])})


def _read(reader: ShardReader, names: list[str], meta: bool) -> dict[str, torch.Tensor]:
    if meta:
        return {n: torch.empty(reader.shape(n), dtype=reader.dtype(n), device="meta") for n in names}
    return {n: reader.read(n) for n in names}


def write_side_files(model: Path, new_config, plan: Plan | None, tmp: Path, summary: dict) -> None:
    """config.json, generation config and tokenizer (when the source has them), plan.json (if any), the summary."""
    new_config.save_pretrained(tmp)
    if plan is not None:
        atomic_write_json(tmp / "plan.json", plan.model_dump(exclude_none=True))
    atomic_write_json(tmp / "hyprune_summary.json", summary)
    if (model / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(model).save_pretrained(tmp)
    # loaded and saved (not copied file by file) so the output holds what `hyprune prune` writes
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        warnings.warn(f"No tokenizer copied to the output: {model} has no tokenizer files.", stacklevel=3)
        return
    try:
        tokenizer = load_tokenizer(model)
    except HypruneError as e:
        warnings.warn(f"No tokenizer copied to the output: {e}", stacklevel=3)
    else:
        tokenizer.save_pretrained(tmp)


@torch.no_grad()
def stream_apply(model: str | Path, plan: Plan, out: str | Path, *, overwrite: bool = False, progress: bool = True,
                 max_shard_bytes: int | None = None, summary: dict | None = None) -> dict:
    """Apply ``plan`` to the checkpoint folder ``model`` tensor by tensor and write the pruned checkpoint to ``out``.

    Shards are at most ``max_shard_bytes`` (default: the source's largest shard) unless a single tensor
    is larger. Returns a summary (written to ``hyprune_summary.json`` with the entries of ``summary``):
    tensors and shards written, bytes, source and pruned parameter counts.
    """
    model = Path(model).expanduser()
    config, family = load_config(model)
    validate_plan(plan, family, config)
    out = check_output(out, "dir", overwrite, inputs=(model,))
    reader = ShardReader(model)
    new_config = pruned_config(family, config, plan)
    slicer = TensorSlicer(family, config, plan)
    src, dst = CheckpointLayout(skeleton(config)), CheckpointLayout(skeleton(new_config))
    steps = _steps(reader, slicer, src, dst)
    entries = [(name, tuple(t.shape), t.dtype) for step in steps
               for name, t in _cut(step, _read(reader, step.files, True), slicer, src, dst).items()]
    limit = max_shard_bytes or max(reader.shard_sizes().values(), default=1)
    parameters = {"before": count_parameters(src.model, family), "after": count_parameters(dst.model, family)}
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, entries, limit)
        try:
            for step in tqdm(steps, desc="Pruning tensors", unit="tensor", disable=not progress):
                for name, tensor in _cut(step, _read(reader, step.files, False), slicer, src, dst).items():
                    writer.write(name, tensor)
            writer.close(total_parameters=sum(math.prod(shape) for _, shape, _ in entries))
        finally:
            writer.abort()
        summary = {"source": str(model), "streamed": True, "tensors": len(entries), "shards": len(writer.shards),
                   "bytes": writer.total_size, "parameters": parameters, **summarize(plan), **(summary or {})}
        write_side_files(model, new_config, plan, tmp, summary)
    return summary

