"""Training checkpoints: atomic, checksummed, pruned to the last K, and chosen safely on resume.

One checkpoint is a folder ``checkpoints/step-XXXXXXXX/`` (the number of optimizer steps done)::

    model.safetensors     student weights (tied tensors stored once)
    optimizer.pt          AdamW state (torch.save; loaded with weights_only=True)
    trainer_state.pt      scheduler state and the RNG states of every rank
    trainer_state.json    step, tokens, last loss, world size, the run's config
    manifest.json         size and sha256 of every file above, written LAST

The folder is built under a hidden temporary name and renamed into place only once the manifest
is on disk, so a crash (SIGKILL, power loss, a full disk) leaves either a complete checkpoint or a
hidden ``.step-*.tmp-*`` folder that is ignored and later removed. A checkpoint whose manifest is
missing or whose files do not match it is skipped on resume, with a warning, in favour of the
previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch

from hyprune.io import atomic_dir, fsync_path
from hyprune.distill.cache import sha256_file
from hyprune.errors import HypruneError

CHECKPOINT_FORMAT = "hyprune-distill-checkpoint/1"
WEIGHTS, OPTIMIZER, TRAINER_STATE, TRAINER_JSON, MANIFEST = (
    "model.safetensors", "optimizer.pt", "trainer_state.pt", "trainer_state.json", "manifest.json")
_STEP_RE = re.compile(r"^step-(\d{8})$")

# torch.save, behind a name so tests can simulate a full disk in the middle of a checkpoint.
_torch_save = torch.save


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every visible checkpoint folder under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def check_checkpoint(path: str | Path, deep: bool = True) -> str | None:
    """``None`` when ``path`` is a complete checkpoint, else what is wrong with it.

    ``deep`` compares sha256 checksums, not only sizes.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"manifest.json is not valid JSON ({e})"
    if manifest.get("format") != CHECKPOINT_FORMAT:
        return f"unknown format {manifest.get('format')!r}"
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['size']}"
        if deep and sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    for required in (WEIGHTS, OPTIMIZER, TRAINER_STATE, TRAINER_JSON):
        if required not in manifest.get("files", {}):
            return f"the manifest does not list {required}"
    return None


def newest_valid_checkpoint(root: str | Path, deep: bool = True) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its manifest; newer broken ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(root)):
        problem = check_checkpoint(path, deep=deep)
        if problem is None:
            return path, json.loads((path / MANIFEST).read_text())
        warnings.warn(f"Skipping checkpoint {path}: {problem}. Falling back to the previous checkpoint.",
                      stacklevel=2)
    return None


def write_checkpoint(root: str | Path, step: int, writers: dict[str, Callable[[Path], None]],
                     meta: dict) -> Path:
    """Write one checkpoint folder atomically; ``writers`` maps file name -> function(path).

    The manifest (sizes and sha256 of every file) is written last, then the folder is renamed into
    place. Any exception (an ``OSError`` for a full disk) removes the temporary folder and leaves
    every earlier checkpoint as it was.
    """
    root = Path(root)
    final = root / step_name(step)
    with atomic_dir(final) as tmp:
        files = {}
        for name, write in writers.items():
            write(tmp / name)
            fsync_path(tmp / name)
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest = {"format": CHECKPOINT_FORMAT, **meta, "files": files}
        part = tmp / (MANIFEST + ".part")
        part.write_text(json.dumps(manifest, indent=1) + "\n")
        fsync_path(part)
        os.replace(part, tmp / MANIFEST)
    fsync_path(root)
    return final


def remove_stale(root: str | Path) -> None:
    """Remove hidden leftovers of interrupted writes (``.step-*.tmp-*``, ``.step-*.old-*``)."""
    root = Path(root)
    if root.is_dir():
        for p in root.glob(".step-*"):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoint folders and delete the older ones."""
    if keep_last < 1:
        return
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def save_torch(obj, path: Path) -> None:
    _torch_save(obj, path)


def load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem means the same thing to the user
        raise HypruneError(f"Could not read {path}: {e}. The checkpoint is damaged; delete it to resume from "
                           "the previous one.") from None
