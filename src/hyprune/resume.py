"""What a resumed run compares with the run it continues: its settings and cheap fingerprints of its inputs.

`distill --resume` / `finetune --resume` and `search --resume` continue work saved in the output
folder. Continuing it with other settings, another model or other data would mix two runs into one
result without saying so; `check_resume` refuses that with the list of changed keys, unless the user
passes ``--resume-changed`` (``allow_changed=True``), in which case the changes are returned so the
caller can print and record them.

The fingerprints are cheap (no full read of weights or data):

* `model_fingerprint` of a local folder: its resolved path, a hash of ``config.json``, and per weights
  file its name, size, modification time and (for safetensors) a hash of the header (tensor names,
  dtypes, shapes, offsets) plus the safetensors index. It catches another model, another shape or
  dtype, a re-saved or overwritten checkpoint, a moved folder. It does not catch weights changed in
  place with the same layout *and* a restored modification time. A hub id is compared by name only
  (the revision it resolves to may move).
* `file_fingerprint` of a data file: its resolved path, its size and a hash of its first MiB. It
  catches another file, a moved file and any edit that changes the size or the first MiB; an edit
  past the first MiB that keeps the size is not caught here (the distillation loop also hashes the
  token windows it trains on, which catches that for the part of the file it uses).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from hyprune.errors import HypruneError

HEAD_BYTES = 1 << 20  # bytes of a data file hashed for its fingerprint
FLAG = "--resume-changed"
PY_FLAG = "allow_changed=True"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _safetensors_header(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 * (1 << 20):
                return None
            return _sha(f.read(size))
    except OSError:
        return None


def model_fingerprint(model: str | Path | None) -> dict | None:
    """A cheap fingerprint of a checkpoint folder (see the module docstring); ``None`` for no model."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return {"id": str(model)}
    out: dict[str, Any] = {"path": str(path.resolve())}
    config = path / "config.json"
    out["config"] = _sha(config.read_bytes()) if config.is_file() else None
    weights = {}
    for file in sorted(path.iterdir()):
        if not file.is_file() or not file.name.endswith((".safetensors", ".bin", ".gguf", ".safetensors.index.json",
                                                          ".bin.index.json", ".pt", ".pth")):
            continue
        stat = file.stat()
        entry: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if file.name.endswith(".safetensors"):
            entry["header"] = _safetensors_header(file)
        elif file.name.endswith(".index.json"):
            entry["sha"] = _sha(file.read_bytes())
        weights[file.name] = entry
    out["weights"] = weights
    return out


def file_fingerprint(source: str | Path | None) -> dict | None:
    """Path, size and a hash of the first MiB of a data file; a folder by its listing; a name as itself."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
        return {"path": str(path.resolve()), "size": path.stat().st_size, "head": _sha(head)}
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():  # a teacher top-k cache: its manifest lists every shard
            return {"path": str(path.resolve()), "manifest": _sha(manifest.read_bytes())}
        files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
        return {"path": str(path.resolve()), "files": _sha(json.dumps(files, sort_keys=True).encode())}
    return {"name": str(source)}


def tensor_fingerprint(tensor) -> str:
    """Shape, dtype and sha256 of a tensor's bytes (the token windows a run trains on)."""
    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()[:16]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def changed_keys(saved: dict, now: dict) -> dict[str, dict]:
    """``{key: {"was": ..., "now": ...}}`` for every key both sides know whose values differ.

    A key only one side has is not compared: it comes from a run written by an older hyprune (or
    from the Python API, which knows no paths), so there is nothing to compare it with.
    """
    saved, now = _jsonable(saved), _jsonable(now)
    return {k: {"was": saved[k], "now": now[k]} for k in now if k in saved and saved[k] != now[k]}


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:30] + "..." + text[-47:]  # a path's end tells most


def describe_changes(changed: dict[str, dict]) -> str:
    """``lr 0.0001 -> 0.001, student.path /a -> /b`` (one line; nested dicts show the parts that differ)."""
    parts = []
    for key, d in changed.items():
        was, now = d["was"], d["now"]
        if isinstance(was, dict) and isinstance(now, dict):
            sub = [k for k in {**was, **now} if was.get(k) != now.get(k)]
            parts.extend(f"{key}.{k} {_short(was.get(k))} -> {_short(now.get(k))}" for k in sub[:3])
        else:
            parts.append(f"{key} {_short(was)} -> {_short(now)}")
    return ", ".join(parts)


def check_resume(where: str | Path, saved: dict, now: dict, allow_changed: bool) -> dict[str, dict]:
    """The changes between a saved run and this one; refuses any unless ``allow_changed``.

    The refusal is one line naming every changed key and the way out.
    """
    changed = changed_keys(saved, now)
    if changed and not allow_changed:
        raise HypruneError(
            f"Cannot resume {where}: changed since the saved run: {', '.join(changed)} ({describe_changes(changed)}). "
            f"Resuming would mix two runs into one result: use the same settings and inputs, pass {FLAG} "
            f"({PY_FLAG} in Python) to continue with the new ones (the changes are logged), or --overwrite to "
            "start over.")
    return changed
