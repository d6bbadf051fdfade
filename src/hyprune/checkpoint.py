"""Saving a pruned model as an ordinary HF checkpoint folder, through the output guard of `hyprune.io`.

The folder is built in a temporary sibling and renamed into place (`hyprune.io.atomic_dir`): a crash
or an error leaves nothing at the output path, and the input checkpoint is never written to.
"""

from __future__ import annotations

from pathlib import Path

from hyprune.io import atomic_dir, atomic_write_json, check_output


def save_pruned(model, tokenizer, out: str | Path, extra_json: dict[str, dict] | None = None, overwrite: bool = False):
    """Save ``model`` (+ tokenizer and JSON side files) as an HF checkpoint folder at ``out``."""
    out = check_output(out, "dir", overwrite)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (extra_json or {}).items():
            atomic_write_json(tmp / name, data)
    return out
