"""Whether a workflow reads its model block by block: asked for (``--stream`` / ``--no-stream``), or chosen
because the weights would not fit in the free memory of the device they are computed on."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from hyprune.config import LoadConfig
from hyprune.errors import HypruneError
from hyprune.models import parse_dtype
from hyprune.stream.blocks import available_memory
from hyprune.stream.shards import ShardReader

log = logging.getLogger("hyprune.stream")

# The share of the free memory a model may take before it is streamed: the rest is for activations,
# the sliced copy and the allocator.
FIT_FRACTION = 0.8


def weights_bytes(folder: str | Path, dtype=None) -> int:
    """Bytes of the checkpoint's tensors in ``dtype`` (as stored when None or "auto")."""
    reader = ShardReader(folder)
    dtype = parse_dtype(dtype)
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    return sum(reader.nbytes(name, dtype) for name in reader.names())


def should_stream(load: LoadConfig) -> bool:
    """``load.stream`` when given (checked), else True when the weights in ``load.dtype`` would take more than
    `FIT_FRACTION` of the free memory of ``load.device`` (with a log line that says so)."""
    if load.stream:
        _check_streamable(load)
        return True
    if load.stream is False or load.gguf_file or load.device_map or not Path(str(load.model)).is_dir():
        return False
    try:
        need = weights_bytes(load.model, load.dtype)
    except HypruneError:  # no safetensors: only the in-memory path can read it
        return False
    device = torch.device(load.device or "cpu")
    free = available_memory(device)
    if need <= FIT_FRACTION * free:
        return False
    log.warning("hyprune: %s needs %.1f GiB as %s and %s has %.1f GiB free: reading it block by block "
                "(--no-stream to load it whole).", load.model, need / 2**30, load.dtype, device, free / 2**30)
    return True


def _check_streamable(load: LoadConfig) -> None:
    if load.gguf_file:
        raise HypruneError("--stream reads safetensors shards; a GGUF file is dequantized whole by transformers. "
                           "Drop --stream, or convert the model to safetensors first.")
    if load.device_map:
        raise HypruneError("--stream places one block at a time on --device; it does not take --device-map.")
    if not Path(str(load.model)).is_dir():
        raise HypruneError(f"--stream reads a local checkpoint folder; {load.model} is not one "
                           "(download it first, e.g. `huggingface-cli download MODEL --local-dir DIR`).")
    ShardReader(load.model)  # a folder without safetensors fails here with the reason


__all__ = ["FIT_FRACTION", "should_stream", "weights_bytes"]
