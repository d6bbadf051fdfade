"""Evaluation: perplexity on local text, the lm-evaluation-harness bridge, speed and memory benchmarks.

* `perplexity` (in-memory model, windows) and `eval_perplexity` (checkpoint path, data file).
* `evaluate`: what ``hyprune eval`` runs: perplexity and/or lm-eval tasks, one load, one JSON file.
* `run_tasks` / `eval_tasks`: lm-eval tasks (optional extra ``hyprune[eval]``).
* `bench` + `format_bench_table`: prefill/decode speed, peak memory, cache bytes, parameters, and
  ratios between two models measured in the same run; `cache_bytes` is the analytic cache size.
"""

from hyprune.evaluate.bench import bench, cache_bytes, format_bench_table, measured_cache_bytes
from hyprune.evaluate.harness import run_tasks
from hyprune.evaluate.perplexity import perplexity, strided_windows
from hyprune.evaluate.run import eval_perplexity, eval_tasks, evaluate

__all__ = ["bench", "cache_bytes", "eval_perplexity", "eval_tasks", "evaluate", "format_bench_table",
           "measured_cache_bytes", "perplexity", "run_tasks", "strided_windows"]
