"""hyprune: compress hybrid Attention + Mamba-2 language models the Minitron-SSM way.

The workflow, each step a function taking paths and a typed config (`hyprune.config`) or its fields:

    hyprune.score("path/to/model", "calib.txt", out="work/scores", seq_len=256)
    hyprune.write_plan("path/to/model", "work/scores", {"hidden_size": 3072}, out="work/plan.json")
    hyprune.prune("path/to/model", "work/pruned", data="calib.txt", target={"hidden_size": 3072})
    hyprune.run_distill(teacher, "work/pruned", "train.txt", tokens=10**8, seq_len=4096, batch=64, out="work/kd")
    hyprune.run_eval("work/kd/final", data="heldout.txt", seq_len=4096, out="work/eval.json")
    hyprune.bench(["path/to/model", "work/kd/final"], out="work/bench.json")

and in memory: ``activation_scores`` -> ``make_plan`` -> ``apply_plan``. ``run_distill``,
``run_search`` and ``run_eval`` carry a ``run_`` prefix because ``hyprune.distill``,
``hyprune.search`` and ``hyprune.evaluate`` are the packages that hold them.
"""

from hyprune.api import inspect_model, prune, score, write_plan
from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.config import (BenchConfig, CacheConfig, DataConfig, EvalConfig, LoadConfig, PruneConfig, SearchConfig,
                            TrainData)
from hyprune.distill import DistillConfig, cache_teacher, run_distill, run_finetune as finetune
from hyprune.errors import HypruneError
from hyprune.evaluate import bench, evaluate as run_eval
from hyprune.importance import activation_scores
from hyprune.plan import Plan, identity_plan, make_plan
from hyprune.search import search as run_search

__all__ = ["BenchConfig", "CacheConfig", "DataConfig", "DistillConfig", "EvalConfig", "HypruneError", "LoadConfig",
           "Plan", "PruneConfig", "SearchConfig", "TrainData", "activation_scores", "apply_plan", "bench",
           "cache_teacher", "family_for_config", "finetune", "identity_plan", "inspect_model", "make_plan", "prune",
           "run_distill", "run_eval", "run_search", "score", "write_plan"]
__version__ = "0.1.0"
