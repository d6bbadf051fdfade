"""Safetensors shards read one tensor at a time and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: ``dtype``,
``shape``, ``data_offsets`` relative to the end of the header; plus ``__metadata__``) and the raw
little-endian bytes of every tensor. Both classes here work on that layout directly, so a checkpoint
larger than memory passes through with about one tensor in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from hyprune.errors import HypruneError

__all__ = ["DTYPES", "ShardReader", "ShardWriter", "shard_names"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    if dtype not in CODES:
        raise HypruneError(f"Tensors of dtype {dtype} cannot be stored in safetensors by hyprune.")
    return CODES[dtype]


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, parsed JSON header) of one safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HypruneError(f"{path} is not a safetensors file (shorter than its 8-byte header length).")
        (size,) = struct.unpack("<Q", head)
        if size > _HEADER_LIMIT:
            raise HypruneError(f"{path} is not a safetensors file (header length {size} is implausible).")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HypruneError(f"{path} has a corrupt safetensors header ({e}).") from None
    return 8 + size, header


class ShardReader:
    """The tensors of a checkpoint folder (``model.safetensors.index.json`` or one ``model.safetensors``).

    `read` takes one tensor's bytes with a plain ``seek`` + ``readinto`` into a fresh buffer. The usual
    ``safe_open`` memory-maps the whole shard: the pages it touches count in the process RSS and stay
    mapped while the file is open, so reading a model through it looks (and, under a memory limit, acts)
    like holding whole shards. Plain reads leave only the page cache, which the kernel can drop.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HypruneError(f"{index} is not a valid safetensors index ({e}).") from None
            files = list(dict.fromkeys(weight_map.values()))
        elif single.is_file():
            files = [SINGLE]
        else:
            found = sorted(p.name for p in self.folder.glob("*")) if self.folder.is_dir() else []
            others = [n for n in found if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            what = f"only {', '.join(others[:3])} (pickle)" if others else "no model.safetensors"
            raise HypruneError(f"{self.folder} holds {what}; streaming needs safetensors weights "
                               "(model.safetensors or model.safetensors.index.json with its shards).")
        self._entries: dict[str, tuple[str, int, dict]] = {}  # name -> (file, data start, header entry)
        self.metadata: dict[str, str] = {}
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise HypruneError(f"The shard {file} named in {INDEX} is missing from {self.folder}.")
            start, header = read_header(path)
            self.metadata.update(header.pop("__metadata__", None) or {})
            # file order: by position in the data section, as the shards were written
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self._entries[name] = (file, start, entry)

    def names(self) -> list[str]:
        """Every tensor's name, shard by shard in file order."""
        return list(self._entries)

    def _entry(self, name: str) -> tuple[str, int, dict]:
        if name not in self._entries:
            raise HypruneError(f"The checkpoint {self.folder} has no tensor '{name}'.")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[2]["dtype"]
        if code not in DTYPES:
            raise HypruneError(f"Tensor '{name}' has dtype {code}, which this torch cannot hold.")
        return DTYPES[code]

    def nbytes(self, name: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tensor once read, floating-point tensors converted to ``dtype`` (None: as stored)."""
        stored = self.dtype(name)
        itemsize = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
        return itemsize * torch.Size(self.shape(name)).numel()

    def shard_of(self, name: str) -> str:
        return self._entry(name)[0]

    def shard_sizes(self) -> dict[str, int]:
        """Bytes of tensor data per source shard file."""
        sizes: dict[str, int] = {}
        for file, _, entry in self._entries.values():
            begin, end = entry["data_offsets"]
            sizes[file] = sizes.get(file, 0) + end - begin
        return sizes

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard into its own (CPU) memory."""
        file, start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        if end - begin != nbytes(shape, dtype):
            raise HypruneError(f"Tensor '{name}' in {file} has {end - begin} bytes for shape {list(shape)} "
                               f"of {entry['dtype']}; the shard is corrupt.")
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.folder / file, "rb") as f:
            f.seek(start + begin)
            got = f.readinto(memoryview(buffer.numpy())) if end > begin else 0
        if got != end - begin:
            raise HypruneError(f"{file} ends inside tensor '{name}'; the shard is truncated.")
        return buffer.view(dtype).reshape(shape)


def shard_names(count: int) -> list[str]:
    """File names as ``save_pretrained`` gives them: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    return [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Safetensors shards written tensor by tensor, every tensor's name, shape and dtype known up front.

    Hand-written because safetensors' Python API (``save_file``) takes a whole dict of tensors at once:
    a shard's worth of tensors would have to be in memory together. Here each shard's header is written
    when the shard is opened (the offsets follow from the entries), then `write` appends each tensor's
    bytes in entry order.
    """

    def __init__(self, folder: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise HypruneError(f"The shard size limit must be positive, got {max_shard_bytes} bytes.")
        names = [name for name, _, _ in entries]
        if len(set(names)) != len(names):
            raise HypruneError("The output tensors' names are not unique.")
        self.folder = Path(folder)
        self.entries = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in entries]
        self.shards = self._assign(max_shard_bytes)
        files = shard_names(max(len(self.shards), 1))
        self.files = {name: files[i] for i, shard in enumerate(self.shards) for name in shard}
        self.total_size = sum(nbytes(shape, dtype) for _, shape, dtype in self.entries)
        self._next = 0  # index into entries of the next tensor to write
        self._file = None
        self._left = 0  # tensors still to write in the open shard
        self.closed = False

    def _assign(self, limit: int) -> list[list[str]]:
        """Tensors into shards in order: a new shard when the next tensor would take this one past ``limit``."""
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape, dtype in self.entries:
            n = nbytes(shape, dtype)
            if shards[-1] and size + n > limit:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += n
        return shards if shards[-1] else []

    def _open_shard(self, name: str) -> None:
        """Open the shard that starts with tensor ``name`` and write its header."""
        shard = next(s for s in self.shards if s[0] == name)
        kinds = {n: (shape, dtype) for n, shape, dtype in self.entries}
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in shard:
            shape, dtype = kinds[n]
            header[n] = {"dtype": dtype_code(dtype), "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes(shape, dtype)]}
            offset += nbytes(shape, dtype)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.folder / self.files[name], "wb")  # noqa: SIM115 (open across write calls)
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._left = len(shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (in entry order, with its entry's shape and dtype)."""
        if self.closed or self._next >= len(self.entries):
            raise HypruneError(f"Tensor '{name}' was written after every output tensor was already written.")
        want, shape, dtype = self.entries[self._next]
        if name != want:
            raise HypruneError(f"Tensor '{name}' was written out of order; the next output tensor is '{want}'.")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise HypruneError(f"Tensor '{name}' is {list(tensor.shape)} {tensor.dtype}; its entry says "
                               f"{list(shape)} {dtype}.")
        if self._file is None:
            self._open_shard(name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._next += 1
        self._left -= 1
        if self._left == 0:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def close(self, total_parameters: int | None = None) -> dict:
        """Check every tensor was written; write the index when sharded. Returns the index (or a one-shard summary)."""
        if self._next < len(self.entries):
            missing = [name for name, _, _ in self.entries[self._next:]]
            raise HypruneError(f"{len(missing)} output tensors were never written, starting with '{missing[0]}'.")
        self.closed = True
        metadata = {"total_size": self.total_size}
        if total_parameters is not None:
            metadata = {"total_parameters": total_parameters, **metadata}
        index = {"metadata": metadata, "weight_map": dict(sorted(self.files.items()))}
        if len(self.shards) > 1:
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.folder / INDEX).write_text(text)
        return index

    def abort(self) -> None:
        """Close an open shard after an error (the caller's temporary folder is removed anyway)."""
        if self._file is not None:
            self._file.close()
            self._file = None
