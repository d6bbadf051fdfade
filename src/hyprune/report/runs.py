"""Reports of prune, distill and eval runs, built from the files those runs leave behind.

Every builder reads only the run's own output (``hyprune_summary.json``, ``plan.json``,
``log.jsonl``, ``RESULTS.json``), so a report can be (re)made at any time, for old runs too, with
``hyprune report RUN_DIR``. `compare_reports` gathers the ``points`` of many reports into one table
and a Pareto plot.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Sequence

from hyprune.errors import HypruneError
from hyprune.report import plots
from hyprune.report.document import Report, fmt, load_report
from hyprune.report.search import CANDIDATES_FILE, search_report
from hyprune.resume import describe_changes

SUMMARY_FILE = "hyprune_summary.json"
DISTILL_FILE = "hyprune_distill.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HypruneError(f"Could not read {path}: {e}") from None


def checkpoint_parameters(folder: str | Path) -> int | None:
    """Parameters stored in a checkpoint's safetensors files, read from their headers (no weights loaded)."""
    total, found = 0, False
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for d in info["shape"]:
                    count *= d
                total += count
                found = True
    return total if found else None


def _mean_accuracy(tasks: dict | None) -> float | None:
    accs = [t["acc"] for t in (tasks or {}).values() if t.get("acc") is not None]
    return sum(accs) / len(accs) if accs else None


# ---------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------
def prune_report(out_dir: str | Path) -> Report:
    """What `hyprune prune` cut: sizes per axis, parameters per component (bars), importance (heatmap)."""
    out = Path(out_dir)
    summary = _read_json(out / SUMMARY_FILE)
    plan = _read_json(out / "plan.json") if (out / "plan.json").is_file() else {}
    before, after = summary["parameters"]["before"], summary["parameters"]["after"]
    method = summary.get("method", {}).get("name", "activation")
    report = Report("prune", f"Pruning report: {summary.get('source', out)}")
    report.paragraph(
        f"Source model `{summary.get('source')}` was pruned with the **{method}** method to "
        f"**{after['total']:,}** parameters, {100 * after['total'] / before['total']:.1f}% of its "
        f"{before['total']:,}. The pruned checkpoint is this folder (`plan.json` says exactly which channels, "
        "heads and blocks were kept).")
    if plan.get("target"):
        report.paragraph("Target: " + ", ".join(f"`{k}={v}`" for k, v in plan["target"].items()))
    if "before" in summary and "after" in summary:
        report.heading("Sizes per axis")
        axes = [a for a in summary["before"] if summary["before"][a] is not None]
        report.table(["axis", "before", "after", "kept"],
                     [[a, summary["before"][a], summary["after"][a], _share(summary["after"][a], summary["before"][a])]
                      for a in axes])
        report.paragraph(f"Blocks: {summary['blocks_before']} -> {summary['blocks_after']}"
                         + (f" (dropped {summary['drop_blocks']})" if summary.get("drop_blocks") else "") + ".")
    report.heading("Parameters per component")
    report.table(["component", "before", "after", "kept"],
                 [[k, before[k], after.get(k, 0), _share(after.get(k, 0), before[k])] for k in before])
    report.plot("parameters", "parameters.png", plots.parameter_bars, before, after,
                caption="Parameters per component, before and after pruning")
    if summary.get("importance"):
        report.heading("Importance per layer and axis")
        report.paragraph("Median activation score of the units of each axis in each layer (Minitron importance, "
                         "from the calibration sweep). Each column is scaled to its own maximum, so a colour says "
                         "how a layer ranks against the other layers on that axis.")
        report.plot("importance", "importance.png", plots.importance_heatmap, summary["importance"],
                    caption="Importance per layer and axis")
    if (out / "block_scores.png").is_file():
        report.link_image("block_scores.png", "Depth ranking of the blocks")
    report.data = {"summary": summary, "target": plan.get("target")}
    report.point("source", summary.get("source"), before["total"])
    report.point("pruned", str(out), after["total"])
    return report


def _share(after: int | None, before: int | None) -> str:
    return f"{100 * after / before:.0f}%" if before and after is not None else "-"


# ---------------------------------------------------------------------------------------------
# distill
# ---------------------------------------------------------------------------------------------
def read_log(path: str | Path) -> list[dict]:
    """The records of a ``log.jsonl``; a torn last line (a crash mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def distill_report(run_dir: str | Path) -> Report:
    """How a distillation (or fine-tuning) run went: settings, final numbers, loss and perplexity curves."""
    run = Path(run_dir)
    log = run / "log.jsonl"
    if not log.is_file():
        raise HypruneError(f"{run} holds no log.jsonl: it is not a `hyprune distill` run folder.")
    records = read_log(log)
    events = [r for r in records if "event" in r]  # e.g. a resume that accepted changed settings
    records = [r for r in records if "event" not in r]
    final = run / "final"
    saved = _read_json(final / DISTILL_FILE) if (final / DISTILL_FILE).is_file() else {}
    summary, config = saved.get("summary", {}), saved.get("config", {})
    last = records[-1] if records else {}
    loss_name = config.get("loss", "forward_kl")
    report = Report("distill", f"Distillation report: {run}")
    status = "finished" if summary else "not finished (no final/ yet)"
    report.paragraph(
        f"The student was trained with the **{loss_name}** loss"
        + (f" (CE weight {config['ce_weight']})" if config.get("ce_weight") else "")
        + f" for {fmt(last.get('tokens'))} tokens in {fmt(last.get('step'))} steps; the run is {status}. "
        f"Final student: `{final}`; per-step log: `log.jsonl`.")
    for e in events:
        if e["event"] == "resume_changed":
            report.paragraph(f"Resumed at step {e.get('step')} with changed settings (`--resume-changed`): "
                             f"{describe_changes(e.get('changed', {}))}.")
    report.heading("Results")
    teacher_ppl = summary.get("teacher_ppl", last.get("teacher_ppl"))
    student_ppl = summary.get("student_ppl", last.get("eval_ppl"))
    rows = [["steps", last.get("step")], ["training tokens", last.get("tokens")],
            ["final training loss", last.get("loss")], ["held-out perplexity, student", student_ppl],
            ["held-out perplexity, teacher", teacher_ppl],
            ["wall time (s)", summary.get("elapsed_s", last.get("elapsed_s"))]]
    report.table(["", "value"], rows)
    if config:
        report.heading("Settings")
        keys = ("tokens", "seq_len", "batch", "micro_batch", "lr", "min_lr", "warmup_steps", "temperature",
                "hidden_loss", "eval_windows", "seed", "precision")
        report.table(["setting", "value"], [[k, config.get(k)] for k in keys if k in config])
    if records:
        report.heading("Curves")
        report.plot("curves", "training_curves.png", plots.training_curves, records,
                    caption="Training loss and held-out perplexity against training tokens")
    report.data = {"summary": summary, "config": config, "last": last,
                   "evals": [{k: r.get(k) for k in ("step", "tokens", "eval_ppl")} for r in records if "eval_ppl" in r]}
    report.point("distilled", str(final), checkpoint_parameters(final) if final.is_dir() else None,
                 perplexity=student_ppl,
                 evaluation={"data": f"held-out windows of the distillation run {run}",
                             "seq_len": config.get("seq_len"), "windows": config.get("eval_windows"), "stride": None})
    return report


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def eval_report_paths(results: str | Path) -> tuple[Path, str]:
    """Where the report of ``RESULTS.json`` goes: next to it, as ``RESULTS.report.md`` / ``.json``."""
    results = Path(results)
    return results.parent, f"{results.stem}.report"


def eval_report(results_path: str | Path) -> Report:
    """Perplexity and task accuracies of one `hyprune eval` results file."""
    results = _read_json(Path(results_path))
    report = Report("eval", f"Evaluation report: {results.get('model')}")
    report.paragraph(f"Model `{results.get('model')}` ({fmt(results.get('parameters'))} parameters, "
                     f"{results.get('dtype')}). Raw numbers: `{Path(results_path).name}`.")
    if results.get("perplexity") is not None:
        report.heading("Perplexity")
        report.paragraph(f"exp(mean next-token loss) over {fmt(results.get('windows'))} windows of "
                         f"{fmt(results.get('seq_len'))} tokens; lower is better.")
        report.table(["data", "perplexity", "mean loss", "tokens", "windows", "window length", "stride"],
                     [[results.get("data"), results["perplexity"], results.get("loss"), results.get("tokens"),
                       results.get("windows"), results.get("seq_len"), results.get("stride")]])
    if results.get("tasks"):
        report.heading("Tasks (lm-evaluation-harness)")
        report.table(["task", "shots", "acc", "acc_norm"],
                     [[name, t.get("shots"), t.get("acc"), t.get("acc_norm")] for name, t in results["tasks"].items()])
    report.data = results
    report.point(Path(results_path).stem, results.get("model"), results.get("parameters"),
                 perplexity=results.get("perplexity"),
                 accuracy=_mean_accuracy(results.get("tasks")),
                 evaluation={k: results.get(k) for k in ("data", "seq_len", "windows", "stride")})
    return report


# ---------------------------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------------------------
def search_folder_report(out_dir: str | Path) -> Report:
    """The report of a finished `hyprune search` folder, rebuilt from its summary (the ``data`` of its
    report.json) and candidates.json (`hyprune.report.search.search_report`)."""
    out = Path(out_dir)
    return search_report(load_report(out / "report.json")["data"], _read_json(out / CANDIDATES_FILE)["candidates"],
                         out)


# ---------------------------------------------------------------------------------------------
# comparison across runs
# ---------------------------------------------------------------------------------------------
def find_reports(inputs: Sequence[str | Path]) -> list[Path]:
    """Report files named by ``inputs``: a ``*.json`` report, or a folder's ``report.json`` and ``*.report.json``."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = ([path / "report.json"] if (path / "report.json").is_file() else []) + sorted(
                path.glob("*.report.json"))
            if not inside:
                raise HypruneError(f"{path} holds no report.json or *.report.json; run `hyprune report {path}` "
                                   "on a prune, distill, eval or search output first, or name the files.")
            found += inside
        else:
            raise HypruneError(f"{path} does not exist.")
    return list(dict.fromkeys(p.resolve() for p in found))


def compare_reports(inputs: Sequence[str | Path]) -> Report:
    """One table of every model point in the given reports, and a Pareto plot of quality vs size vs speed."""
    points, sources = [], []
    for path in find_reports(inputs):
        data = load_report(path)
        sources.append({"report": str(path), "kind": data["kind"], "title": data["title"]})
        for p in data["points"]:
            points.append({**p, "run": path.parent.name, "report": str(path)})
    unique, seen = [], set()
    for p in points:  # the same model measured the same way shows once (e.g. one teacher in every recipe)
        key = (p.get("model"), p.get("parameters"), p.get("perplexity"), p.get("accuracy"))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    report = Report("comparison", f"Comparison of {len(sources)} reports")
    report.paragraph("Every model the runs produced or measured, smallest first. Perplexity is held-out "
                     "(lower is better); accuracy is the mean over lm-eval tasks; speed is decode tokens/s "
                     "where a benchmark ran. Compare perplexities only when they were measured on the same "
                     "data and window length (see each report).")
    unique.sort(key=lambda p: p.get("parameters") or 0)
    report.table(["run", "model", "parameters", "perplexity", "accuracy", "decode tokens/s"],
                 [[p["run"], p["label"], p.get("parameters"), p.get("perplexity"), p.get("accuracy"),
                   p.get("tokens_per_s")] for p in unique])
    measured_on = {json.dumps(p.get("evaluation"), sort_keys=True) for p in unique if p.get("perplexity") is not None}
    if len(measured_on) > 1:
        report.paragraph("**Careful:** these perplexities were measured on different data or windows, so they "
                         "do not compare across those groups:\n\n" + "\n".join(f"- `{m}`" for m in sorted(measured_on)))
    metric = ("perplexity" if sum(p.get("perplexity") is not None for p in unique) >= 2 else
              "accuracy" if sum(p.get("accuracy") is not None for p in unique) >= 2 else None)
    if metric is not None:
        labelled = [{**p, "label": f"{p['run']}/{p['label']}"} for p in unique]
        front = plots.pareto_front([p for p in labelled if p.get(metric) is not None and p.get("parameters")],
                                   metric, metric == "perplexity")
        report.heading("Pareto front")
        report.paragraph("On the front (no other model is both smaller and better): "
                         + ", ".join(f"`{p['label']}`" for p in front) + ".")
        report.plot("pareto", "pareto.png", plots.pareto_plot, labelled, metric,
                    caption=f"{metric.capitalize()} against parameters; colour = decode speed where measured")
        report.data["pareto_front"] = [p["label"] for p in front]
    else:
        report.paragraph("Fewer than two models have a perplexity or an accuracy: no Pareto plot.")
    report.data["reports"] = sources
    report.points = unique
    return report


def report_for(path: str | Path) -> tuple[Report, Path, str]:
    """The report of one run output, whatever it is: (report, folder, file stem)."""
    path = Path(path)
    if path.is_dir() and (path / SUMMARY_FILE).is_file():
        return prune_report(path), path, "report"
    if path.is_dir() and (path / "log.jsonl").is_file():
        return distill_report(path), path, "report"
    if path.is_dir() and (path / CANDIDATES_FILE).is_file():
        return search_folder_report(path), path, "report"
    if path.is_file() and path.suffix == ".json":
        folder, stem = eval_report_paths(path)
        return eval_report(path), folder, stem
    raise HypruneError(f"{path} is not a prune output (hyprune_summary.json), a distill run (log.jsonl), "
                       f"a finished search ({CANDIDATES_FILE}) or an eval results file (.json).")
