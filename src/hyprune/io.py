"""Writing results safely: one guard before the work, atomic writes after it.

Every command that writes (score, plan, prune, distill, finetune, cache-teacher, eval, bench, search,
report, run, demo) calls `check_output` before it loads weights or reads data, and writes through
`atomic_dir`, `atomic_write_text` or `atomic_write_json`:

* an existing file or a non-empty folder is refused unless ``overwrite`` (or ``reuse``: a run folder
  that the command continues, such as ``distill --resume``);
* an output that is an input, holds an input or sits inside an input folder is refused, even with
  ``overwrite``: hyprune never writes into or over its inputs;
* the folder the output will be written in is probed with a real temporary file, so a read-only or
  missing location fails in seconds with a one-line error, not after the work (``os.access`` alone
  says yes to root even for a read-only folder);
* a write goes to a hidden temporary sibling that is flushed, synced and renamed into place: a crash
  leaves the old output or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Literal

from hyprune.errors import HypruneError

__all__ = ["atomic_dir", "atomic_write_json", "atomic_write_text", "check_output", "check_writable"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse ``path`` (a file or folder to be created or replaced) when its folder cannot be written.

    Finds the nearest existing ancestor of ``path``'s parent folder, refuses it when it is a file, and
    creates and deletes a temporary file there: the same call the write will make later.
    """
    path = Path(path).expanduser()
    where = _nearest_existing(path.parent.absolute())
    if not where.is_dir():
        raise HypruneError(f"{flag} {path} cannot be created: {where} is a file, not a folder. "
                           "Pick a path in a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".hyprune-write-probe-", dir=where)
    except OSError as e:
        raise HypruneError(f"{flag} {path} cannot be written: {where} is not writable ({e.strerror}). "
                           "Pick a folder you can write to.") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output(
    path: str | os.PathLike,
    kind: Literal["file", "dir"] = "dir",
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike | None] = (),
    reuse: bool = False,
    flag: str = "--out",
) -> Path:
    """Check an output path before any work; returns it (``~`` expanded). Raises `HypruneError`.

    ``kind="file"``: a results file (eval, bench, plan). ``kind="dir"``: an output folder. ``inputs``
    are the command's model folders, data files, plans and scores (None and non-local ids are
    skipped). ``reuse``: the caller continues an existing folder (resume, a recipe's run folder), so a
    non-empty one is fine; writability is then probed inside it.
    """
    out = Path(path).expanduser()
    resolved = out.resolve()
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        src_path = Path(src).expanduser().resolve()
        if src_path == resolved:
            raise HypruneError(f"{flag} {out} is the input {src}; hyprune never writes over its inputs. "
                               f"Pick another {flag.rstrip(':')}.")
        if resolved in src_path.parents:
            raise HypruneError(f"The output folder {out} contains the input {src}; writing there could delete it. "
                               f"Pick another {flag.rstrip(':')}.")
        if src_path.is_dir() and src_path in resolved.parents:
            raise HypruneError(f"{flag} {out} is inside the input folder {src}; hyprune never writes into its "
                               f"inputs. Pick another {flag.rstrip(':')}.")
    if kind == "file":
        if out.is_dir():
            raise HypruneError(f"{flag} {out} is a folder; pass a file path such as {out / 'results.json'}.")
        if out.exists() and not overwrite:
            raise HypruneError(f"{flag} {out} already exists. Pick a new path or pass --overwrite.")
    elif kind == "dir":
        if out.exists() and not out.is_dir():
            raise HypruneError(f"{flag} {out} is a file; pass a folder path.")
        if out.is_dir() and not (overwrite or reuse) and any(out.iterdir()):
            raise HypruneError(f"The output folder {out} is not empty. Pick a new folder or pass --overwrite.")
    else:
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if kind == "dir" and reuse and out.is_dir():
        check_writable(out / ".probe", flag)  # written inside the folder
    else:
        check_writable(out, flag)
    return out


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's entry to disk (best effort: some file systems refuse it for folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) through a temporary sibling, fsync and `os.replace`: never half a file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should be an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    """`atomic_write_text` of ``data`` as indented JSON (non-JSON values as ``str``) and a newline."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


@contextmanager
def atomic_dir(out: str | os.PathLike):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    An error inside the block removes the temporary folder and leaves ``out`` as it was; stale
    temporary folders of an earlier crash are removed first.
    """
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should be an ordinary folder
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
    fsync_path(out.parent)
