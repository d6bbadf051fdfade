"""Writing output folders safely: build in a temporary sibling folder, then rename into place.

A crash or an error leaves nothing at the output path (at most a hidden ``.name.tmp-*`` folder that
the next run removes), and the input checkpoint is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hyprune.errors import HypruneError


def check_output_dir(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse a non-empty output folder (unless ``overwrite``) and any output that is, holds or sits in an input."""
    out = Path(out).expanduser()
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        src_path, out_path = Path(src).expanduser().resolve(), out.resolve()
        if src_path == out_path:
            raise HypruneError(f"The output folder {out} is the input {src}; pick another --out.")
        if out_path in src_path.parents:
            raise HypruneError(
                f"The output folder {out} contains the input {src}; writing there would delete it. Pick another --out."
            )
        if src_path.is_dir() and src_path in out_path.parents:
            raise HypruneError(
                f"The output folder {out} is inside the input folder {src}; hyprune never writes into its inputs. "
                "Pick another --out."
            )
    if out.exists() and not out.is_dir():
        raise HypruneError(f"--out {out} is a file; pass a folder path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HypruneError(f"The output folder {out} is not empty. Pick a new folder or pass --overwrite.")
    return out


@contextmanager
def atomic_dir(out: str | Path):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should be an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def save_pruned(model, tokenizer, out: str | Path, extra_json: dict[str, dict] | None = None, overwrite: bool = False):
    """Save ``model`` (+ tokenizer and JSON side files) as an HF checkpoint folder at ``out``."""
    out = check_output_dir(out, overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=1) + "\n")
    return out
