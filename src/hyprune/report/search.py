"""The report of a search run, from its data alone: a ranking plot and the candidates table.

`hyprune.search` computes the summary and the candidate rows and calls `search_report`; rebuilding the
report of a finished search folder (`hyprune report SEARCH_DIR`) reads the same data from disk. This
module imports nothing from the workflows, so the report package stays a leaf.
"""

from __future__ import annotations

import math
from pathlib import Path

from hyprune.report.document import Report, fmt
from hyprune.report.plots import new_figure, save_figure

CANDIDATES_FILE = "candidates.json"  # every candidate of a `hyprune search`
PLOT_FILE = "ranking.png"
TABLE_ROWS = 30  # candidates listed in report.md; all of them are in candidates.json


def plot_ranking(rows: list[dict], score: str, title: str, path: Path) -> Path:
    """Zero-shot score against parameters (every candidate; arrows to the post-distillation score of the
    distilled ones), and the distilled candidates' held-out loss along their short distillation."""
    distilled = [r for r in rows if "distilled" in r]
    fig = new_figure(11 if distilled else 6, 4.2)
    ax = fig.add_subplot(1, 2 if distilled else 1, 1)
    label = "KL to teacher" if score == "kl" else "LM loss (nats/token)"
    ax.scatter([r["parameters"] / 1e6 for r in rows], [r["zero_shot"] for r in rows], s=14, color="#8C8C8C",
               label="zero-shot")
    for r in distilled:
        ax.annotate("", xy=(r["parameters"] / 1e6, r["distilled"]), xytext=(r["parameters"] / 1e6, r["zero_shot"]),
                    arrowprops={"arrowstyle": "->", "color": "#4C72B0", "lw": 0.8})
    if distilled:
        ax.scatter([r["parameters"] / 1e6 for r in distilled], [r["distilled"] for r in distilled], s=18,
                   color="#4C72B0", label="after short distillation")
    best = rows[0]
    ax.scatter([best["parameters"] / 1e6], [best.get("distilled", best["zero_shot"])], marker="*", s=160,
               color="#C44E52", label="winner", zorder=5)
    for r in rows:
        if r["uniform"]:
            ax.scatter([r["parameters"] / 1e6], [r.get("distilled", r["zero_shot"])], marker="D", s=40,
                       facecolors="none", edgecolors="#55A868", label="uniform", zorder=4)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    if distilled:
        ax2 = fig.add_subplot(1, 2, 2)
        for r in distilled:
            ax2.plot([p["tokens"] for p in r["curve"]], [p["loss"] for p in r["curve"]], marker="o", markersize=3,
                     label=f"#{r['final_rank']}" + (" (uniform)" if r["uniform"] else ""))
        ax2.set_xlabel("distillation tokens")
        ax2.set_ylabel("held-out LM loss (nats/token)")
        ax2.set_title("short distillation of the top candidates", fontsize=9)
        ax2.legend(fontsize=7)
    return save_figure(fig, path)


def _lm_loss(row: dict, score: str) -> float | None:
    """A candidate's last held-out LM loss: its score, or with ``--score kl`` the end of its distillation curve."""
    if score == "loss":
        return row.get("distilled", row["zero_shot"])
    return row["curve"][-1]["loss"] if row.get("curve") else None


def search_report(summary: dict, rows: list[dict], out: Path) -> Report:
    """The report of a search in ``out``: budget, candidates, winner against the uniform baseline, ranking
    (table and plot), latency model. ``summary`` becomes its ``data``; the winner and the uniform
    baseline its points (perplexity = exp of the held-out LM loss, where the search measured one)."""
    winner, uniform = rows[0], next((r for r in rows if r["uniform"]), None)
    compared = [("winner", winner)] + ([("uniform", uniform)] if uniform else [])
    report = Report("search", f"Search report: {summary['model']}")
    report.paragraph(_overview(summary, winner))
    _comparison(report, summary, compared, uniform is not None)
    _ranking(report, summary, rows)
    if summary.get("latency_model"):
        _latency(report, summary["latency_model"])
    settings = summary["settings"]
    evaluation = {"data": settings["eval_data"] or f"held-out windows of {settings['data']}",
                  "seq_len": settings["seq_len"], "windows": settings["eval_windows"], "stride": None}
    for label, r in compared:
        loss = _lm_loss(r, summary["score"])
        report.point(label, str(out / r["distill_dir"] / "final") if "distill_dir" in r else None, r["parameters"],
                     perplexity=None if loss is None else math.exp(loss), candidate=r["id"],
                     distilled="distilled" in r, latency_ms=r.get("latency_ms"), evaluation=evaluation)
    report.data = summary
    return report


def _overview(summary: dict, winner: dict) -> str:
    lines = [f"- family: {summary['family']}, source parameters: {summary['source_parameters']:,}",
             f"- budget: {summary['budget']}", *(f"- note: {n}" for n in summary["notes"]),
             f"- shapes enumerated: {summary['shapes']:,}; within the budget: {summary['within_budget']:,}; "
             f"evaluated: {summary['evaluated']} ({summary['score_description']}); "
             f"distilled: {summary['distilled']} x {summary['distill_tokens']:,} tokens",
             f"- winner: `{winner['id']}` ({winner['parameters']:,} parameters"
             + (f", {winner['active_parameters']:,} active" if "active_parameters" in winner else "")
             + "); its plan: `plan.json` "
             "(`hyprune prune MODEL --plan plan.json --out DIR`)"]
    if summary.get("spearman_zero_shot_vs_distilled") is not None:
        lines.append(f"- Spearman(zero-shot, after distillation) over the distilled candidates: "
                     f"{summary['spearman_zero_shot_vs_distilled']:.3f}")
    return "\n".join(lines)


def _comparison(report: Report, summary: dict, compared: list[tuple[str, dict]], has_uniform: bool) -> None:
    report.heading("Winner and uniform baseline")
    report.paragraph(f"Scores are the {summary['score_description']}; lower is better. The uniform baseline cuts "
                     "every axis alike and drops no block."
                     + ("" if has_uniform else " It was not among the candidates (outside the budget or the space)."))
    report.table(["", "candidate", "parameters", "zero-shot", "after distillation", "final rank"],
                 [[label, f"`{r['id']}`", r["parameters"], r["zero_shot"], r.get("distilled"), r["final_rank"]]
                  for label, r in compared])


def _ranking(report: Report, summary: dict, rows: list[dict]) -> None:
    report.heading("Ranking")
    report.paragraph("Distilled candidates first, by their score after the short distillation, then the others by "
                     "their zero-shot score.")
    report.plot("ranking", PLOT_FILE, plot_ranking, rows, summary["score"], f"{summary['family']}: {summary['budget']}",
                caption="Score against parameters; short-distillation curves of the top candidates")
    report.table(["rank", "candidate", "params", "ratio", "zero-shot", "zero-shot rank", "distilled", "memory MiB",
                  "latency ms"],
                 [[r["final_rank"], f"`{r['id']}`" + (" (uniform)" if r["uniform"] else ""), r["parameters"],
                   r["ratio"], r["zero_shot"], r["zero_shot_rank"], r.get("distilled"),
                   None if r.get("memory_bytes") is None else r["memory_bytes"] / 2**20, r.get("latency_ms")]
                  for r in rows[:TABLE_ROWS]])
    if len(rows) > TABLE_ROWS:
        report.paragraph(f"{len(rows) - TABLE_ROWS} more in `{CANDIDATES_FILE}`.")


def _latency(report: Report, lat: dict) -> None:
    err = lat.get("held_out_error") or {}
    report.heading("Latency model")
    report.paragraph(
        f"{lat['metric']} ms at batch {lat['batch']}, context {lat['context']} on {lat['device']}; costs (ms): "
        + ", ".join(f"{k} {v:.4g}" for k, v in lat["costs_ms"].items()) + ".\n"
        f"Held-out error over {err.get('shapes', 0)} measured shapes (fit on {err.get('fitted_on', 0)}): "
        f"mean {fmt(err.get('mean_abs_rel_error'), 3)}, max {fmt(err.get('max_abs_rel_error'), 3)} "
        "(absolute relative error); details in `latency.json`.")


