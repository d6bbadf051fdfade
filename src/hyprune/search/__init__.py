"""Architecture search under a budget (Minitron NAS, Minitron-SSM): enumerate shapes, rank, distill the best.

* `counting`: parameters and memory of a shape from the config alone (per family, tested exact).
* `space`: the search space (bounds, granularity, depth), candidates, budgets and their errors.
* `latency`: a per-component latency model fitted on shapes measured with `hyprune.evaluate.bench`.
* `run.search`: the whole search, resumable; ``hyprune search`` is a thin shell over it.
"""

from hyprune.search.counting import count_parameters, memory_bytes
from hyprune.search.run import search

__all__ = ["count_parameters", "memory_bytes", "search"]
