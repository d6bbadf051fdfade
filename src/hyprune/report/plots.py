"""PNG plots for reports, drawn on matplotlib's Agg canvas.

Each function takes plain JSON-like data (what the report also stores) and a path, writes one PNG and
returns the path. They use ``Figure`` + ``FigureCanvasAgg`` directly, never pyplot: no display is
needed, nothing blocks, and a notebook's backend is left alone. Plots drawn elsewhere (the search's
ranking) start from `new_figure` and end with `save_figure` the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from hyprune.depth import BlockScores

# The axes a Minitron importance sweep scores, in the order a reader expects them.
IMPORTANCE_AXES = ("hidden", "mamba_heads", "mamba_head_dim", "ssm_state", "attention_heads", "ffn")
BEFORE, AFTER = "#9DB7D5", "#2E5A88"


def new_figure(width: float, height: float) -> Figure:
    # imported here, not at module level: every command imports the report package, few draw
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def importance_heatmap(importance: dict, path: str | Path) -> Path:
    """Median unit score per layer (rows) and axis (columns), each column scaled to its own maximum.

    ``importance`` is `hyprune.importance.summarize_scores` output. Scores of different axes are
    activations of different tensors and do not compare, so each column is divided by its largest
    layer value: a cell shows how a layer ranks against the other layers on that axis. Grey cells are
    axes the layer does not have.
    """
    layers = importance["layers"]
    axes = [a for a in IMPORTANCE_AXES if any(a in entry for entry in layers)]
    values = np.full((len(layers), len(axes)), np.nan)
    for i, entry in enumerate(layers):
        for j, axis in enumerate(axes):
            if axis in entry:
                values[i, j] = entry[axis]["median"]
    peak = np.nanmax(values, axis=0)
    scaled = values / np.where(peak > 0, peak, 1.0)
    fig = new_figure(1.3 * len(axes) + 2.5, 0.32 * len(layers) + 1.6)
    ax = fig.add_subplot()
    ax.set_facecolor("#DDDDDD")
    image = ax.imshow(np.ma.masked_invalid(scaled), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(axes)), [a.replace("_", " ") for a in axes], fontsize=8)
    ax.set_yticks(range(len(layers)), [f"{e['layer']} {e['kind']}" for e in layers], fontsize=7)
    ax.set_ylabel("layer")
    if len(layers) <= 40:
        for i in range(len(layers)):
            for j in range(len(axes)):
                if not math.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if scaled[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="median score / column maximum")
    ax.set_title("Importance per layer and axis (median unit score)", fontsize=9)
    return save_figure(fig, path)


def parameter_bars(before: dict[str, int], after: dict[str, int], path: str | Path) -> Path:
    """Parameters per component before and after pruning, side by side, with the share kept."""
    parts = [k for k in before if k != "total" and (before[k] or after.get(k))]
    fig = new_figure(max(5.0, 1.1 * len(parts) + 1.5), 3.6)
    ax = fig.add_subplot()
    xs = range(len(parts))
    ax.bar([x - 0.2 for x in xs], [before[k] for k in parts], 0.4, label="before", color=BEFORE)
    ax.bar([x + 0.2 for x in xs], [after.get(k, 0) for k in parts], 0.4, label="after", color=AFTER)
    for x, k in zip(xs, parts):
        if before[k]:
            ax.annotate(f"{100 * after.get(k, 0) / before[k]:.0f}%", (x + 0.2, after.get(k, 0)), ha="center",
                        va="bottom", fontsize=7)
    ax.set_xticks(list(xs), parts, fontsize=8)
    ax.set_ylabel("parameters")
    total_b, total_a = before.get("total", sum(before[k] for k in parts)), after.get("total", 0)
    ax.set_title(f"Parameters per component: {total_b:,} -> {total_a:,} "
                 f"({100 * total_a / max(total_b, 1):.0f}% kept)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def training_curves(records: Sequence[dict], path: str | Path) -> Path:
    """Training loss (and its parts) and held-out perplexity against tokens, from ``log.jsonl`` records."""
    fig = new_figure(9.0, 3.4)
    loss_ax, ppl_ax = fig.subplots(1, 2)
    tokens = [r["tokens"] for r in records]
    loss_ax.plot(tokens, [r["loss"] for r in records], label="loss", color=AFTER, linewidth=1.2)
    parts = [k for k in ("kd_loss", "ce_loss", "hidden_loss") if any(k in r for r in records)]
    if len(parts) > 1:  # a single part *is* the loss: drawing it again would hide nothing new
        for key, color in zip(parts, ("#D17A22", "#6B9E3A", "#8E5EA2")):
            loss_ax.plot([r["tokens"] for r in records if key in r], [r[key] for r in records if key in r],
                         label=key.replace("_", " "), color=color, linewidth=0.9, alpha=0.8)
    loss_ax.set_xlabel("training tokens")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Training loss", fontsize=9)
    loss_ax.legend(fontsize=7)
    evals = [r for r in records if r.get("eval_ppl") is not None]
    if evals:
        ppl_ax.plot([r["tokens"] for r in evals], [r["eval_ppl"] for r in evals], "o-", color=AFTER,
                    label="student", markersize=3)
        teacher = next((r["teacher_ppl"] for r in evals if r.get("teacher_ppl") is not None), None)
        if teacher is not None:
            ppl_ax.axhline(teacher, color="#B03A2E", linestyle="--", linewidth=1, label=f"teacher {teacher:.3g}")
        ppl_ax.legend(fontsize=7)
    else:
        ppl_ax.text(0.5, 0.5, "no held-out evaluation", ha="center", va="center", transform=ppl_ax.transAxes)
    ppl_ax.set_xlabel("training tokens")
    ppl_ax.set_ylabel("held-out perplexity")
    ppl_ax.set_title("Held-out perplexity", fontsize=9)
    return save_figure(fig, path)


def pareto_front(points: Sequence[dict], metric: str, lower_is_better: bool) -> list[dict]:
    """The points no other point beats on both size and ``metric``, smallest first."""
    front, best = [], None
    for p in sorted(points, key=lambda p: (p["parameters"], p[metric] if lower_is_better else -p[metric])):
        value = p[metric]
        if best is None or (value < best if lower_is_better else value > best):
            front.append(p)
            best = value
    return front


def pareto_plot(points: Sequence[dict], metric: str, path: str | Path) -> Path:
    """Quality against parameters, colour = decode speed where measured; the Pareto front joined up.

    ``points`` are report points (``label``, ``parameters``, ``metric``, optional ``tokens_per_s``).
    Lower perplexity is better (a log axis when the values span more than 3x); higher accuracy is better.
    """
    lower = metric == "perplexity"
    points = [p for p in points if p.get(metric) is not None and p.get("parameters")]
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    speeds = [p.get("tokens_per_s") for p in points]
    if points and all(s is not None for s in speeds):
        art = ax.scatter([p["parameters"] for p in points], [p[metric] for p in points], c=speeds, cmap="plasma",
                         s=45, zorder=3)
        fig.colorbar(art, ax=ax, label="decode tokens/s")
    else:
        ax.scatter([p["parameters"] for p in points], [p[metric] for p in points], color=AFTER, s=45, zorder=3)
    front = pareto_front(points, metric, lower)
    if len(front) > 1:
        ax.plot([p["parameters"] for p in front], [p[metric] for p in front], "--", color="#888888", zorder=2,
                label="Pareto front")
        ax.legend(fontsize=7)
    for p in points:
        ax.annotate(p["label"], (p["parameters"], p[metric]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    values = [p[metric] for p in points]
    if lower and values and min(values) > 0 and max(values) / min(values) > 3:  # perplexities spanning a wide range
        ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
    ax.set_title(f"{metric.capitalize()} vs size (and speed)", fontsize=9)
    return save_figure(fig, path)


# Colours of block kinds in depth plots.
KIND_COLORS = {"mamba": "#4C72B0", "attention": "#DD8452", "mlp": "#55A868", "moe": "#C44E52", "transformer": "#8172B3"}


def block_scores_plot(result: BlockScores, path: str | Path) -> Path:
    """A per-block bar plot of `hyprune.depth` scores (colour = block kind) as PNG."""
    from matplotlib.patches import Patch  # with new_figure's imports: few commands draw

    count = len(result.scores)
    fig = new_figure(max(6.0, 0.28 * count + 2), 3.6)
    ax = fig.add_subplot()
    kinds = [result.kinds[j] if result.window == 1 else "window" for j in range(count)]
    colors = [KIND_COLORS.get(k, "#8C8C8C") for k in kinds]
    ax.bar(range(count), result.scores, color=colors)
    ax.set_xlabel(f"blocks (windows of {result.window})" if result.window > 1 else "block index")
    ax.set_ylabel(f"{result.method} (higher = more important)", fontsize=8)
    span = f", windows of {result.window} blocks" if result.window > 1 else ""
    ax.set_title(f"{result.family + ': ' if result.family else ''}{result.method}{span}", fontsize=9)
    ax.axhline(0, color="black", linewidth=0.6)
    if count <= 64:
        labels = [str(j) if result.window == 1 else f"{j}-{j + result.window - 1}" for j in range(count)]
        ax.set_xticks(range(count), labels, rotation=90 if result.window > 1 and count > 16 else 0)
        ax.tick_params(axis="x", labelsize=7)
    if result.window == 1:
        present = [k for k in KIND_COLORS if k in kinds]
        ax.legend(handles=[Patch(color=KIND_COLORS[k], label=k) for k in present], fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
