"""The search's outputs: the winner's plan, every candidate, a ranking table, a plot and a report."""

from __future__ import annotations

import warnings
from pathlib import Path

from hyprune.search.space import Budget, Candidate

PLOT_FILE = "ranking.png"


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def candidate_rows(candidates: list[Candidate], ranked: list[Candidate], final_order: list[Candidate],
                   records: dict, source_params: int) -> list[dict]:
    """One JSON row per candidate, in final order: sizes, counts, scores and ranks."""
    zero_rank = {c.id: r for r, c in enumerate(ranked, 1)}
    distilled = [c for c in final_order if "distilled" in records[c.id]]
    rows = []
    for final_rank, c in enumerate(final_order, 1):
        rec = records[c.id]
        row = {**c.to_json(), "ratio": c.parameters / source_params, "zero_shot": rec["zero_shot"],
               "zero_shot_rank": zero_rank[c.id], "final_rank": final_rank}
        if "distilled" in rec:
            row.update(distilled=rec["distilled"], distilled_rank=distilled.index(c) + 1, curve=rec["curve"],
                       distill_dir=rec["distill_dir"], distill_tokens=rec["distill_tokens"])
        rows.append(row)
    return rows


def plot_ranking(rows: list[dict], score: str, path: Path, title: str) -> Path | None:
    """Zero-shot score against parameters (every candidate; arrows to the post-distillation score of the
    distilled ones), and the distilled candidates' held-out loss along their short distillation."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: ranking.png was not written.", stacklevel=2)
        return None
    distilled = [r for r in rows if "distilled" in r]
    fig = Figure(figsize=(11 if distilled else 6, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
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
    fig.savefig(path, dpi=120)
    return path


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict, rows: list[dict], limit: int = 30) -> str:
    """The human-readable report: budget, space, ranking table, plot link, latency model."""
    lines = [f"# hyprune search: {report['model']}", "",
             f"- family: {report['family']}, source parameters: {report['source_parameters']:,}",
             f"- budget: {report['budget']}"]
    lines += [f"- note: {n}" for n in report["notes"]]
    lines += [f"- shapes enumerated: {report['shapes']:,}; within the budget: {report['within_budget']:,}; "
              f"evaluated: {report['evaluated']} ({report['score_description']}); "
              f"distilled: {report['distilled']} x {report['distill_tokens']:,} tokens",
              f"- winner: `{report['winner']['id']}` ({report['winner']['parameters']:,} parameters); "
              f"its plan: `plan.json` (`hyprune prune MODEL --plan plan.json --out DIR`)"]
    if report.get("uniform"):
        u = report["uniform"]
        lines.append(f"- uniform baseline: `{u['id']}`, final rank {u['final_rank']}")
    if report.get("spearman_zero_shot_vs_distilled") is not None:
        lines.append(f"- Spearman(zero-shot, after distillation) over the distilled candidates: "
                     f"{report['spearman_zero_shot_vs_distilled']:.3f}")
    lines += ["", f"![ranking]({PLOT_FILE})", "",
              "| rank | candidate | params | ratio | zero-shot | zero-shot rank | distilled | memory MiB "
              "| latency ms |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows[:limit]:
        name = r["id"] + (" (uniform)" if r["uniform"] else "")
        memory = r.get("memory_bytes")
        lines.append(f"| {r['final_rank']} | `{name}` | {r['parameters']:,} | {r['ratio']:.3f} | "
                     f"{_fmt(r['zero_shot'])} | "
                     f"{r['zero_shot_rank']} | {_fmt(r.get('distilled'))} | "
                     f"{'-' if memory is None else f'{memory / 2**20:.2f}'} | {_fmt(r.get('latency_ms'), 3)} |")
    if len(rows) > limit:
        lines.append(f"\n{len(rows) - limit} more in `candidates.json`.")
    lat = report.get("latency_model")
    if lat:
        err = lat.get("held_out_error") or {}
        lines += ["", "## Latency model", "",
                  f"{lat['metric']} ms at batch {lat['batch']}, context {lat['context']} on {lat['device']}; "
                  f"costs (ms): " + ", ".join(f"{k} {v:.4g}" for k, v in lat["costs_ms"].items()) + ".",
                  f"Held-out error over {err.get('shapes', 0)} measured shapes (fit on {err.get('fitted_on', 0)}): "
                  f"mean {_fmt(err.get('mean_abs_rel_error'), 3)}, max {_fmt(err.get('max_abs_rel_error'), 3)} "
                  "(absolute relative error); details in `latency.json`."]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, family, config, source_params: int, budget: Budget, candidates, ranked, final_order,
                  records: dict, plan, lat_model, settings: dict, score: str, shapes: int, feasible: int,
                  progress: bool) -> dict:
    from hyprune.search.run import spearman, write_json_atomic

    rows = candidate_rows(candidates, ranked, final_order, records, source_params)
    distilled = [r for r in rows if "distilled" in r]
    uniform = next((r for r in rows if r["uniform"]), None)
    winner = rows[0]
    report = {
        "model": settings["model"], "family": family.name, "source_parameters": source_params,
        "budget": budget.describe(), "notes": budget.notes, "settings": settings,
        "shapes": shapes, "within_budget": feasible, "evaluated": len(rows), "distilled": len(distilled),
        "distill_tokens": settings["distill_tokens"] if distilled else 0,
        "score": score, "score_description": "KL(teacher || candidate) per token" if score == "kl" else
        "next-token loss in nats on held-out windows",
        "winner": {k: winner[k] for k in ("id", "target", "drop", "parameters", "ratio", "zero_shot")} |
        ({"distilled": winner["distilled"]} if "distilled" in winner else {}),
        "uniform": None if uniform is None else {k: uniform[k] for k in ("id", "parameters", "final_rank",
                                                                         "zero_shot", "zero_shot_rank")}
        | ({"distilled": uniform["distilled"]} if "distilled" in uniform else {}),
        "spearman_zero_shot_vs_distilled": spearman([r["zero_shot"] for r in distilled],
                                                    [r["distilled"] for r in distilled]),
        "latency_model": None if lat_model is None else lat_model.to_json(),
        "files": {"plan": "plan.json", "candidates": "candidates.json", "plot": PLOT_FILE, "report": "report.md",
                  "state": "state.json"},
    }
    write_json_atomic(out / "plan.json", plan.model_dump(exclude_none=True))
    write_json_atomic(out / "candidates.json", {"source_parameters": source_params, "budget": budget.describe(),
                                                "score": score, "candidates": rows})
    if plot_ranking(rows, score, out / PLOT_FILE, f"{family.name}: {budget.describe()}") is None:
        report["files"].pop("plot")
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(markdown(report, rows))
    return report
