"""Reports: ``report.md`` (for people) + ``report.json`` (for programs) + PNG plots, for every run.

* `Report`: build a page (headings, paragraphs, tables, plots) plus machine-readable data and
  comparable model ``points``; `Report.write(folder)` writes it. Other commands (``search``, recipes)
  build their own reports with it.
* `prune_report`, `distill_report`, `eval_report`, `search_folder_report`: a run's report, from the
  files the run left.
* `write_run_report(path)`: the right one of those, written next to the run's output.
* `compare_reports(paths)`: many reports' points in one table and a Pareto plot (``hyprune report``).
"""

from pathlib import Path

from hyprune.report.document import REPORT_FORMAT, Report, load_report, markdown_table
from hyprune.report.runs import (checkpoint_parameters, compare_reports, distill_report, eval_report,
                                 eval_report_paths, find_reports, prune_report, read_log, report_for,
                                 search_folder_report)


def write_run_report(path: str | Path) -> dict[str, Path]:
    """Write the report of a prune output, a distill or search run folder, or an eval results file; returns paths."""
    report, folder, stem = report_for(path)
    return report.write(folder, stem)


__all__ = ["REPORT_FORMAT", "Report", "checkpoint_parameters", "compare_reports", "distill_report", "eval_report",
           "eval_report_paths", "find_reports", "load_report", "markdown_table", "prune_report", "read_log",
           "report_for", "search_folder_report", "write_run_report"]
