"""A model whose blocks live on disk until they run: the skeleton, one block's weights at a time.

`BlockwiseModel` builds the model from its config with every parameter on the meta device (no memory;
the non-persistent buffers such as rotary frequencies are real, computed from the config as
``from_pretrained`` would), then loads the tensors of one module (a block, the embeddings) from the
safetensors shards onto the compute device, and frees them again.

`run_blocks` drives a block-major sweep: the windows go through the embeddings once, then through
block 0 (all of them), block 1, ... Each block's outputs are the next block's inputs, kept as
``[windows, seq, hidden]`` in the compute dtype (`ActivationStore`: in memory, or a memory-mapped
file on disk when they would not fit). Whatever the hooks attached to the skeleton's modules record
sees the same inputs, in the same batch order, as an in-memory forward, so running sums agree bit for
bit.

The keyword arguments the model hands each block (attention masks, rotary embeddings, position ids)
come from the model's own forward: one pass with every block replaced by a recorder that returns its
input (`_capture_calls`), so no family's glue is rewritten here.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from hyprune.apply import parameters_on_meta
from hyprune.errors import HypruneError
from hyprune.models import load_config, parse_dtype
from hyprune.stream.layout import CheckpointLayout
from hyprune.stream.shards import ShardReader

log = logging.getLogger("hyprune.stream")

# Fraction of the available memory the two activation buffers (a block's inputs and outputs) may take
# before they spill to disk.
SPILL_FRACTION = 0.25

# Families the block-by-block path refuses, and why (none at present; the check stays for new families).
NOT_STREAMED: dict[str, str] = {}


class _StopForward(Exception):
    """Raised after the last block during the capture pass: the head is not needed there."""


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def available_memory(device: torch.device) -> int:
    """Bytes free for tensors on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class ActivationStore:
    """``[windows, seq, hidden]`` block inputs or outputs, addressed by batch: in memory, or on disk.

    On disk it is a file mapped with ``torch.from_file`` (shared, so writes go to the file and the
    kernel may evict the pages), in ``spill_dir``; the path and size are logged.
    """

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 spill_dir: Path | None = None):
        self.shape, self.dtype, self.path = shape, dtype, None
        count = shape[0] * shape[1] * shape[2]
        if spill_dir is None:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            return
        spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="hyprune-activations-", suffix=".bin", dir=spill_dir)
        os.close(fd)
        self.path = Path(name)
        self.data = torch.from_file(name, shared=True, size=count, dtype=dtype).view(shape)
        log.warning("hyprune: block activations spill to %s (%.1f MiB)", name,
                    count * self.data.element_size() / 2**20)

    def close(self) -> None:
        del self.data
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass
class _Call:
    """How the model called a block for one batch: the positional and keyword arguments after the
    hidden states, and whether the hidden states came by keyword."""

    args: tuple
    kwargs: dict
    by_keyword: bool


class BlockwiseModel:
    """The skeleton of a checkpoint folder, with `onload` / `offload` of one module's tensors.

    Tensors are read by their names in the shards and converted to the model's names and layout by
    `hyprune.stream.layout.CheckpointLayout` (transformers' own conversion mapping), so legacy names
    (NemotronH's ``backbone.``) and per-expert tensors that the model fuses (Jamba) load as
    ``from_pretrained`` would load them. Weights that several blocks share (Zamba2's shared transformer)
    are read again with each block that holds them.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", dtype=None):
        self.folder = Path(folder)
        self.config, self.family = load_config(folder)
        if self.family.name in NOT_STREAMED:
            raise HypruneError(f"{self.family.name} cannot be read block by block: {NOT_STREAMED[self.family.name]} "
                               "Run without --stream (in memory).")
        self.reader = ShardReader(folder)
        self.device = torch.device(device)
        stored = self.reader.dtype(next(iter(self.reader.names())))
        dtype = parse_dtype(dtype)
        self.dtype = stored if dtype in (None, "auto") else dtype
        with parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.tie_weights()  # a tied head is the embeddings' tensor (`CheckpointLayout.sources`)
        self.model.eval()
        # parameters the model keeps in float32 under a half-precision dtype, as from_pretrained does
        self._fp32 = [*(getattr(self.model, "_keep_in_fp32_modules", None) or []),
                      *(getattr(self.model, "_keep_in_fp32_modules_strict", None) or [])]
        for module in self.model.modules():  # the buffers to the device; the parameters are meta until loaded
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        self.stub_arity: int | None | bool = False  # how a skipped block returns (`_capture_calls`); False: unknown
        self.layout = CheckpointLayout(self.model)
        self._groups = self.layout.groups(self.reader.names())  # model name -> its file tensors
        unknown = sorted(set(self._groups) - set(self.model.state_dict()))
        if unknown:
            raise HypruneError(
                f"{self.folder} holds tensors that {type(self.model).__name__} of this transformers version has no "
                f"place for (e.g. '{unknown[0]}'), so it cannot be read block by block; prune it in memory "
                "(--no-stream).")
        self._holders = self.layout.sources(self.reader.names())  # model name -> the name its data is saved as
        self._shared = self._shared_parameters()
        for path in self.outside_blocks():
            self.onload(path)

    @property
    def shares_weights(self) -> bool:
        """Whether blocks share parameters (Zamba2's shared transformer), or hold weights tied to others."""
        return bool(self._shared) or any(n != h for n, h in self._holders.items()
                                         if n.startswith(f"{self.family.base}.layers."))

    def files_of(self, name: str) -> list[str]:
        """The file tensors a model tensor is built from (several for a fused tensor)."""
        return self._groups[name]

    def _shared_parameters(self) -> set[int]:
        """ids of parameters that more than one block holds."""
        owners: dict[int, set[int]] = {}
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                owners.setdefault(id(p), set()).add(i)
        return {pid for pid, blocks in owners.items() if len(blocks) > 1}

    @property
    def layers(self) -> nn.ModuleList:
        return self.family.layers(self.model)

    @property
    def block_paths(self) -> list[str]:
        """The state-dict prefix of every block, in order."""
        return [self.family.layer_prefix(i) for i in range(len(self.layers))]

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @torch.inference_mode(False)
    def onload(self, path: str) -> nn.Module:
        """Read every tensor of the module at ``path`` (a state-dict prefix) onto the device, converted from
        the file's names and layout to the model's as ``from_pretrained`` converts them.

        Outside inference mode even inside a sweep: weights made as inference tensors take other kernels
        in some ops (Jamba's Mamba-1 mixer then differs from the loaded model by ~1e-7).
        """
        module = self.module(path)
        holders = {name: self._holders[f"{path}.{name}"] for name in module.state_dict(keep_vars=True)}
        files = [f for holder in set(holders.values()) for f in self._groups[holder]]
        self._check_fits(path, files)
        converted = self.layout.to_model({f: self.reader.read(f) for f in files})
        state = {name: converted[holder] for name, holder in holders.items()}
        for name, tensor in state.items():
            if tensor.is_floating_point():
                keep32 = self.dtype in (torch.float16, torch.bfloat16) and any(k in name for k in self._fp32)
                tensor = tensor.to(torch.float32 if keep32 else self.dtype)
            state[name] = tensor.to(self.device)
        module.load_state_dict(state, strict=False, assign=True)
        for name, param in module.named_parameters():
            if param.is_meta and id(param) not in self._shared:
                raise HypruneError(f"{self.folder} holds no tensor for '{path}.{name}', which the model needs.")
        return module

    def _check_fits(self, path: str, files: list[str]) -> None:
        """Refuse a module whose tensors (in the compute dtype) take more than the device's free memory."""
        need = sum(self.reader.nbytes(f, self.dtype) for f in files)
        free = available_memory(self.device)
        if need > free:
            raise HypruneError(
                f"'{path}' needs {_size(need)} as {self.dtype} and {self.device} has {_size(free)} free: even "
                "one block at a time does not fit. Use a device with more memory, or a smaller --dtype."
            )

    def offload(self, path: str) -> None:
        """Free the module's parameters (back to the meta device); its buffers and shared parameters stay."""
        for module in self.module(path).modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) not in self._shared:
                    module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    @contextmanager
    def loaded(self, path: str):
        module = self.onload(path)
        try:
            yield module
        finally:
            self.offload(path)

    def outside_blocks(self) -> list[str]:
        """Module paths (parent of a tensor) whose weights are not a block's own, the embeddings', the final
        norm's or the head's: shared weights (Zamba2's shared transformer), loaded for the whole sweep."""
        blocks = re.compile(rf"^{re.escape(self.family.base)}\.layers\.\d+\.")
        fixed = (self.embeddings + ".", self.final_norm + ".", "lm_head.")
        shared_names = {n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) in self._shared}
        paths = set()
        for target in self._groups:
            if target.startswith(fixed) or (blocks.match(target) and target not in shared_names):
                continue
            paths.add(target.rsplit(".", 1)[0])
        return sorted(paths)

    @property
    def embeddings(self) -> str:
        return f"{self.family.base}.{self.family.embeddings}"

    @property
    def final_norm(self) -> str:
        return f"{self.family.base}.{self.family.final_norm}"


def _capture_calls(bm: BlockwiseModel, batch: torch.Tensor) -> tuple[torch.Tensor, list[_Call]]:
    """One forward of the model whose blocks only record how they are called: (the first block's input,
    one `_Call` per block). The embeddings must be loaded.

    A recorder returns its input as the block's output: a tensor, or for models that unpack a block's
    output (Bamba: ``hidden_states, attn_weights = layer(...)``) a tuple padded with None; what a
    recorder returns is never used, only the arguments each block is called with.
    """
    error = None
    for arity in (None, 2, 3) if bm.stub_arity is False else (bm.stub_arity,):
        try:
            result = _record(bm, batch, arity)
            bm.stub_arity = arity
            return result
        except (ValueError, TypeError, AttributeError) as e:  # the model did not take this output shape
            error = e
    raise HypruneError(f"{type(bm.model).__name__} cannot be run block by block: its forward fails when a "
                       f"block's output is only recorded ({error}).")


@contextmanager
def _blocks_replaced(bm: BlockwiseModel, stub: Callable):
    """Every block's forward replaced by ``stub`` (and the blocks' own hooks set aside, so they do not see
    the stub's calls) while the context is open."""
    originals = [(layer.forward, layer._forward_hooks, layer._forward_pre_hooks) for layer in bm.layers]
    for layer in bm.layers:
        layer.forward, layer._forward_hooks, layer._forward_pre_hooks = stub, OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for layer, (forward, hooks, pre_hooks) in zip(bm.layers, originals):
            layer.forward, layer._forward_hooks, layer._forward_pre_hooks = forward, hooks, pre_hooks


def _as_block_output(hidden: torch.Tensor, arity: int | None):
    """What a stubbed block returns: its input, as a tensor or padded to the tuple the model unpacks."""
    return hidden if arity is None else (hidden, *[None] * (arity - 1))


def _record(bm: BlockwiseModel, batch: torch.Tensor, arity: int | None) -> tuple[torch.Tensor, list[_Call]]:
    calls: list[_Call] = []
    first: list[torch.Tensor] = []

    def recorder(*args, **kwargs):
        by_keyword = not args
        hidden = kwargs.pop("hidden_states") if by_keyword else args[0]
        if not first:
            first.append(hidden)
        calls.append(_Call(args[1:], kwargs, by_keyword))
        return _as_block_output(hidden, arity)

    def stop_here(*_):
        raise _StopForward

    stop = bm.module(bm.final_norm).register_forward_pre_hook(stop_here)
    try:
        with _blocks_replaced(bm, recorder):
            bm.model(input_ids=batch.to(bm.device), use_cache=False)
    except _StopForward:
        pass
    finally:
        stop.remove()
    if len(calls) != len(bm.layers):
        raise HypruneError(f"The model called {len(calls)} of its {len(bm.layers)} blocks in one forward; "
                           "it cannot be run block by block.")
    return first[0], calls


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


class BlockSweep:
    """The windows of one block-major sweep: each batch's block calls (captured once, from the embeddings)
    and the activation buffers the blocks read and write.

    ``buffers`` is how many ``[windows, seq, hidden]`` buffers the caller will hold at once (2 for a
    plain sweep: inputs and outputs); with more than `SPILL_FRACTION` of the free memory they go to disk.
    """

    def __init__(self, bm: BlockwiseModel, windows: torch.Tensor, batch_size: int, *, buffers: int = 2,
                 spill_dir: str | Path | None = None, progress: bool = True):
        self.bm, self.batch_size, self.progress = bm, batch_size, progress
        self.batches = [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]
        with bm.loaded(bm.embeddings):
            self.captured = [_capture_calls(bm, b) for b in tqdm(self.batches, desc="embeddings", unit="batch",
                                                                 disable=not progress)]
        self.shape = (len(windows), windows.shape[1], bm.config.hidden_size)
        self.spill = _spill_dir(self.shape, bm, spill_dir, buffers)
        self.stores: list[ActivationStore] = []

    def rows(self, b: int) -> slice:
        return slice(b * self.batch_size, b * self.batch_size + len(self.batches[b]))

    def new_store(self) -> ActivationStore:
        device = self.bm.device if self.spill is None else torch.device("cpu")
        store = ActivationStore(self.shape, self.bm.dtype, device, self.spill)
        self.stores.append(store)
        return store

    def embedded(self) -> ActivationStore:
        """A buffer holding every window's input to the first block."""
        store = self.new_store()
        for b, (first, _) in enumerate(self.captured):
            store.data[self.rows(b)] = first
        return store

    def forward(self, i: int, block: nn.Module, src: ActivationStore, dst: ActivationStore,
                on_batch: Callable[[int, int], None] | None = None) -> None:
        """Block ``i`` over every batch of ``src`` into ``dst`` (``dst`` may be ``src``: a batch's rows are
        written once the block is done with them)."""
        for rows, out in self.outputs(i, block, src, on_batch):
            dst.data[rows] = out.to(dst.data.device)

    def outputs(self, i: int, block: nn.Module, src: ActivationStore,
                on_batch: Callable[[int, int], None] | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """(rows, block ``i``'s output) for every batch of ``src``, called as the model calls the block."""
        for b, (_, calls) in enumerate(self.captured):
            if on_batch is not None:
                on_batch(i, b)
            rows, call = self.rows(b), calls[i]
            x = src.data[rows].to(self.bm.device)
            out = block(*call.args, hidden_states=x, **call.kwargs) if call.by_keyword else \
                block(x, *call.args, **call.kwargs)
            yield rows, _output(out)

    def close(self) -> None:
        for store in self.stores:
            store.close()
        self.stores.clear()


@torch.inference_mode()
def run_blocks(bm: BlockwiseModel, windows: torch.Tensor, batch_size: int = 8, *, spill_dir: str | Path | None = None,
               progress: bool = True, on_block: Callable[[int, int], None] | None = None) -> None:
    """Every window through every block, block by block (see the module docstring).

    ``on_block(i, batch_index)`` is called before block ``i`` runs on a batch (hooks use it to know
    which batch they see). Mamba blocks need no state across windows: each window is an independent
    sequence and the sweep runs with ``use_cache=False``, so a block sees a window exactly as a
    full forward would.
    """
    sweep = BlockSweep(bm, windows, batch_size, spill_dir=spill_dir, progress=progress)
    try:
        current, nxt = sweep.embedded(), sweep.new_store()
        for i, path in enumerate(tqdm(bm.block_paths, desc="blocks", unit="block", disable=not progress)):
            with bm.loaded(path) as block:
                sweep.forward(i, block, current, nxt, on_block)
            current, nxt = nxt, current
    finally:
        sweep.close()


def head_logits(bm: BlockwiseModel, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of the model for last-block outputs ``hidden`` ([batch, seq, hidden]): the model's own
    forward from the final norm on (its head, any logit scaling), with the blocks skipped. The final norm
    and the head must be loaded."""
    def skip(*args, **kwargs):
        return _as_block_output(args[0] if args else kwargs["hidden_states"], bm.stub_arity)

    def swap_in(module, args):
        return (hidden.to(bm.device), *args[1:])

    handle = bm.module(bm.final_norm).register_forward_pre_hook(swap_in)
    try:
        with _blocks_replaced(bm, skip):
            embeds = torch.zeros(hidden.shape, dtype=bm.dtype, device=bm.device)
            return bm.model(inputs_embeds=embeds, use_cache=False).logits
    finally:
        handle.remove()


def _spill_dir(shape: tuple[int, int, int], bm: BlockwiseModel, spill_dir: str | Path | None,
               buffers: int = 2) -> Path | None:
    """Where the activations go: ``spill_dir`` if given, else memory unless ``buffers`` buffers would take
    more than `SPILL_FRACTION` of the free memory (then the system's temporary folder)."""
    if spill_dir is not None:
        return Path(spill_dir)
    need = buffers * shape[0] * shape[1] * shape[2] * bm.dtype.itemsize
    if need <= SPILL_FRACTION * available_memory(bm.device):
        return None
    log.info("block activations (%.1f GiB in %d buffers) do not fit in memory", need / 2**30, buffers)
    return Path(tempfile.gettempdir())


__all__ = ["ActivationStore", "BlockSweep", "BlockwiseModel", "available_memory", "head_logits", "run_blocks"]
