"""Result files: checked before any work starts, written atomically (temporary sibling + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hyprune.errors import HypruneError


def check_out_file(out: str | os.PathLike, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Refuse a results path that is a folder, an existing file (unless ``overwrite``), or one of the inputs.

    ``inputs`` are model folders and data files: hyprune never writes into or over its inputs.
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise HypruneError(f"--out {out} is a folder; pass a file path such as {out / 'results.json'}.")
    resolved = out.resolve()
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        src_path = Path(src).expanduser().resolve()
        if src_path == resolved or (src_path.is_dir() and src_path in resolved.parents):
            raise HypruneError(f"--out {out} is (inside) the input {src}; hyprune never writes into its inputs. "
                               "Pick another --out.")
    if out.exists() and not overwrite:
        raise HypruneError(f"--out {out} already exists. Pick a new path or pass --overwrite.")
    if out.parent.exists() and not out.parent.is_dir():
        raise HypruneError(f"--out {out}: {out.parent} is a file, not a folder.")
    return out


def write_json(out: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON; a crash leaves either the old file or the new one, never half of one."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
