"""Teacher top-k cache: precompute the teacher once, then distill without it in memory.

Layout of a cache folder (written atomically, like every checkpoint)::

    manifest.json              format, k, seq_len, windows, vocab_size, dtype, shards (+ sha256)
    shard-00000.safetensors    input_ids [n, seq_len] int32
                               values    [n, seq_len, k] float16|float32  teacher log-probabilities
                               indices   [n, seq_len, k] int32            their vocabulary ids

Values are the teacher's log-probabilities at temperature 1 over the full vocabulary, so their sum
also gives the mass *outside* the top-k: training compares teacher and student over k + 1 buckets,
the k ids and "the rest" (`hyprune.distill.losses.topk_buckets`). Per position the cache holds
``k * (2 + 4)`` bytes at fp16, against ``4 * vocab`` for full fp32 logits.

Minitron found top-k (<= 100) logits hurt pretraining-style KD; this is the SFT-style setting.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hyprune.io import atomic_dir, atomic_write_json, check_output
from hyprune.errors import HypruneError

CACHE_FORMAT = "hyprune-topk-cache/1"
_VALUE_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def cache_teacher_topk(teacher, windows: torch.Tensor, k: int, out_dir: str | Path, batch_size: int = 8,
                       shard_windows: int = 1024, dtype: str = "float16", overwrite: bool = False,
                       progress: bool = True) -> Path:
    """Run ``teacher`` over ``windows`` ([n, seq_len] ids) and write its top-``k`` log-probs to ``out_dir``."""
    if dtype not in _VALUE_DTYPES:
        raise HypruneError(f"Unknown cache dtype '{dtype}'. Use float16, bfloat16 or float32.")
    vocab = int(teacher.config.vocab_size)
    if not 1 <= k <= vocab:
        raise HypruneError(f"Top-k needs 1 <= k <= vocab size ({vocab}); got k={k}.")
    if windows.dim() != 2 or len(windows) == 0:
        raise HypruneError(f"Windows must be a non-empty [num_windows, seq_len] tensor; got {tuple(windows.shape)}.")
    out = check_output(out_dir, "dir", overwrite)
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    shards = []
    with atomic_dir(out) as tmp:
        bar = tqdm(total=len(windows), desc="teacher top-k", unit="win", disable=not progress)
        for shard_no, start in enumerate(range(0, len(windows), shard_windows)):
            chunk = windows[start : start + shard_windows]
            values, indices = [], []
            for b in range(0, len(chunk), batch_size):
                ids = chunk[b : b + batch_size].to(device)
                logp = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
                top = logp.topk(k, dim=-1)  # sorted, largest first
                values.append(top.values.to(_VALUE_DTYPES[dtype]).cpu())
                indices.append(top.indices.to(torch.int32).cpu())
                bar.update(len(ids))
            name = f"shard-{shard_no:05d}.safetensors"
            save_file({"input_ids": chunk.to(torch.int32).contiguous(), "values": torch.cat(values).contiguous(),
                       "indices": torch.cat(indices).contiguous()}, str(tmp / name))
            shards.append({"file": name, "windows": len(chunk), "sha256": sha256_file(tmp / name)})
        bar.close()
        manifest = {"format": CACHE_FORMAT, "k": k, "seq_len": int(windows.shape[1]), "windows": len(windows),
                    "vocab_size": vocab, "dtype": dtype, "values": "log_probs", "shards": shards}
        atomic_write_json(tmp / "manifest.json", manifest)
    teacher.train(was_training)
    return out


class TopKCache:
    """Read access to a top-k cache by window index (memory-mapped; one shard handle each)."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        manifest_file = self.path / "manifest.json"
        if not manifest_file.is_file():
            raise HypruneError(f"{self.path} is not a teacher top-k cache (no manifest.json). "
                               "Write one with cache_teacher_topk().")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError as e:
            raise HypruneError(f"{manifest_file} is not valid JSON ({e}); rebuild the cache.") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise HypruneError(f"{self.path}: unknown cache format {self.manifest.get('format')!r}; "
                               f"expected {CACHE_FORMAT}.")
        self.k = int(self.manifest["k"])
        self.seq_len = int(self.manifest["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._starts, self._files, total = [], [], 0
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise HypruneError(f"Cache shard {file} is missing; rebuild the cache.")
            if verify and sha256_file(file) != shard["sha256"]:
                raise HypruneError(f"Cache shard {file} is corrupt (checksum mismatch); rebuild the cache.")
            self._starts.append(total)
            self._files.append(file)
            total += int(shard["windows"])
        if total != int(self.manifest["windows"]):
            raise HypruneError(f"{self.path}: the shards hold {total} windows, the manifest says "
                               f"{self.manifest['windows']}; rebuild the cache.")
        self._len = total
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self._len

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        return self._handles[shard]

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids [n, L] long, values [n, L, k], indices [n, L, k] long)`` for the given windows."""
        ids, values, idx = [], [], []
        for i in indices:
            if not 0 <= i < self._len:
                raise IndexError(i)
            shard = bisect.bisect_right(self._starts, i) - 1
            row = i - self._starts[shard]
            f = self._handle(shard)
            ids.append(f.get_slice("input_ids")[row : row + 1])
            values.append(f.get_slice("values")[row : row + 1])
            idx.append(f.get_slice("indices")[row : row + 1])
        return torch.cat(ids).long(), torch.cat(values), torch.cat(idx).long()

    def __getstate__(self):  # file handles do not pickle; reopen lazily
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
