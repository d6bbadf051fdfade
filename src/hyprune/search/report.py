"""The search's outputs: the winner's plan, every candidate, a ranking plot and the report.

The report is a `hyprune.report.Report` of kind ``search`` (built by `hyprune.report.search`): its
``data`` is the search's summary (what `hyprune.search.search` returns), its points are the winner and the
uniform baseline, so ``hyprune report SEARCH_DIR OTHER_RUNS... --out DIR`` compares them with prune,
distill and eval runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hyprune.arch.family import Family
from hyprune.io import atomic_write_json
from hyprune.plan import Plan
from hyprune.report.search import CANDIDATES_FILE, PLOT_FILE, TABLE_ROWS, plot_ranking, search_report  # noqa: F401 (re-exported)
from hyprune.search.space import Budget, Candidate


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation of two score lists (None for fewer than 3 pairs)."""
    from scipy.stats import spearmanr  # scipy loads in ~0.5 s; only a finished search needs it

    if len(a) < 3:
        return None
    return float(spearmanr(a, b).statistic)


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


@dataclass
class SearchOutcome:
    """What a finished search hands to its outputs: the source, the budget, every candidate with its
    records (scores, curves), the rankings, the winner's plan and the latency model (or None)."""

    family: Family
    source_params: int
    budget: Budget
    settings: dict
    score: str
    shapes: int
    feasible: int
    candidates: list[Candidate]
    ranked: list[Candidate]
    final_order: list[Candidate]
    records: dict
    plan: Plan
    latency_model: object = None


def write_outputs(out: Path, outcome: SearchOutcome) -> dict:
    """Write plan.json, candidates.json and the report (report.md/json, ranking.png); returns the summary."""
    o = outcome
    rows = candidate_rows(o.candidates, o.ranked, o.final_order, o.records, o.source_params)
    distilled = [r for r in rows if "distilled" in r]
    uniform = next((r for r in rows if r["uniform"]), None)
    winner = rows[0]
    summary = {
        "model": o.settings["model"], "family": o.family.name, "source_parameters": o.source_params,
        "budget": o.budget.describe(), "notes": o.budget.notes, "settings": o.settings,
        "shapes": o.shapes, "within_budget": o.feasible, "evaluated": len(rows), "distilled": len(distilled),
        "distill_tokens": o.settings["distill_tokens"] if distilled else 0,
        "score": o.score, "score_description": "KL(teacher || candidate) per token" if o.score == "kl" else
        "next-token loss in nats on held-out windows",
        "winner": {k: winner[k] for k in ("id", "target", "drop", "parameters", "ratio", "zero_shot",
                                          "active_parameters", "distilled") if k in winner},
        "uniform": None if uniform is None else {k: uniform[k] for k in ("id", "parameters", "final_rank",
                                                                         "zero_shot", "zero_shot_rank")}
        | ({"distilled": uniform["distilled"]} if "distilled" in uniform else {}),
        "spearman_zero_shot_vs_distilled": spearman([r["zero_shot"] for r in distilled],
                                                    [r["distilled"] for r in distilled]),
        "latency_model": None if o.latency_model is None else o.latency_model.to_json(),
        "files": {"plan": "plan.json", "candidates": CANDIDATES_FILE, "report": "report.md", "state": "state.json"},
    }
    atomic_write_json(out / "plan.json", o.plan.model_dump(exclude_none=True))
    atomic_write_json(out / CANDIDATES_FILE, {"source_parameters": o.source_params, "budget": o.budget.describe(),
                                              "score": o.score, "candidates": rows})
    search_report(summary, rows, out).write(out)
    return summary
