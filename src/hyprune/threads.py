"""How many CPU threads torch uses: no more than the cores that are free, one on a busy machine.

torch starts one thread per core. On a machine where other jobs hold the cores, those threads wait
for each other at every parallel region: the demo decoded at 2 tokens/s with 2 threads next to other
jobs, and at 35-109 tokens/s with one. So the default counts the cores this process may run on, takes
away the load average, and never goes below one; ``--threads`` overrides it.
"""

from __future__ import annotations

import os

import torch

from hyprune.errors import HypruneError


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why) for this machine now; ``requested`` (the user's ``--threads``) wins when given."""
    cores = available_cores()
    if requested is not None:
        if requested < 1:
            raise HypruneError(f"--threads must be at least 1, got {requested}.")
        return requested, f"--threads {requested} ({cores} cores)"
    load = os.getloadavg()[0]
    free = max(1, int(cores - load + 0.5))
    threads = min(cores, free)
    busy = " (busy: other jobs hold the rest)" if threads < cores else ""
    return threads, f"{cores} cores, load average {load:.1f}{busy}; pass --threads N to change"


def set_threads(requested: int | None = None) -> str:
    """Apply ``choose_threads`` to torch; returns the log line that says what was chosen and why."""
    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    return f"using {threads} CPU thread{'s' if threads > 1 else ''}: {why}"
