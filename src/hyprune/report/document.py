"""One report = a Markdown page for people and a JSON file for programs, written side by side.

Build a `Report` with headings, paragraphs, tables and images, attach machine-readable ``data`` and
comparable ``points`` (one per model the run produced or measured), then `Report.write` it. Any
command (prune, distill, eval, search, a recipe) uses the same class, so every ``report.json`` has
the same envelope and ``hyprune report`` can compare them::

    {"format": "hyprune-report/1", "kind": "prune", "title": "...", "created": "2026-...Z",
     "points": [{"label": "pruned", "model": "out/", "parameters": 2300000, "perplexity": 14.2,
                 "accuracy": null, "tokens_per_s": null}],
     "plots": {"parameters": "parameters.png"}, "data": {...}}

A point's ``perplexity`` is held-out perplexity (lower is better), ``accuracy`` the mean accuracy
over lm-eval tasks (higher is better), ``tokens_per_s`` decode throughput; absent values are null.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json, atomic_write_text

REPORT_FORMAT = "hyprune-report/1"
POINT_KEYS = ("label", "model", "parameters", "perplexity", "accuracy", "tokens_per_s")


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: integers with thousands separators, floats to ``digits`` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A GitHub-style Markdown table; numbers are right-aligned."""
    rows = [[fmt(v) for v in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in rows) and bool(rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return cell == "-"


class Report:
    """A report under construction; nothing touches the disk before `write`."""

    def __init__(self, kind: str, title: str) -> None:
        self.kind, self.title = kind, title
        self.blocks: list[str] = []
        self.data: dict[str, Any] = {}
        self.points: list[dict] = []
        self.plots: dict[str, str] = {}
        self._figures: dict[str, tuple] = {}

    # content ----------------------------------------------------------------------------------
    def heading(self, text: str) -> None:
        self.blocks.append(f"## {text}")

    def paragraph(self, text: str) -> None:
        self.blocks.append(text)

    def table(self, headers: list[str], rows: Iterable[Iterable[Any]]) -> None:
        self.blocks.append(markdown_table(headers, rows))

    def plot(self, name: str, filename: str, draw, *args, caption: str = "") -> None:
        """Add a PNG drawn at write time by ``draw(*args, path)`` (a `hyprune.report.plots` function)."""
        self._figures[name] = (filename, draw, args)
        self.plots[name] = filename
        self.blocks.append(f"![{caption or name}]({filename})" + (f"\n\n*{caption}*" if caption else ""))

    def link_image(self, path: str, caption: str) -> None:
        """Show a PNG that another report already wrote (``path`` relative to this report's folder)."""
        self.blocks.append(f"![{caption}]({path})\n\n*{caption}*")

    def point(self, label: str, model: str | None, parameters: int | None, perplexity: float | None = None,
              accuracy: float | None = None, tokens_per_s: float | None = None, **extra) -> dict:
        """Record one model for comparisons across runs (see the module docstring)."""
        entry = dict(label=label, model=model, parameters=parameters, perplexity=perplexity, accuracy=accuracy,
                     tokens_per_s=tokens_per_s, **extra)
        self.points.append(entry)
        return entry

    # output -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": REPORT_FORMAT, "kind": self.kind, "title": self.title,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "points": self.points, "plots": dict(self.plots), "data": self.data}

    def to_markdown(self) -> str:
        return f"# {self.title}\n\n" + "\n\n".join(self.blocks) + "\n"

    def write(self, out_dir: str | Path, stem: str = "report") -> dict[str, Path]:
        """Draw the plots and write ``stem.md`` and ``stem.json`` into ``out_dir``; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, (filename, draw, args) in self._figures.items():
            written[name] = draw(*args, out / filename)
        written["markdown"] = atomic_write_text(out / f"{stem}.md", self.to_markdown())
        written["json"] = atomic_write_json(out / f"{stem}.json", self.to_json())
        return written


def load_report(path: str | Path) -> dict:
    """Read a ``report.json`` (or ``*.report.json``) and check its envelope."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HypruneError(f"Could not read the report {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise HypruneError(f"{path} is not a hyprune report (expected \"format\": \"{REPORT_FORMAT}\").")
    return data
