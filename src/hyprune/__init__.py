"""hyprune: compress hybrid Attention + Mamba-2 language models the Minitron-SSM way.

    scores = hyprune.score("path/to/model", "calib.txt")
    plan = hyprune.make_plan(family, config, scores, {"hidden_size": 3072, "mamba_num_heads": 112})
    small = hyprune.apply_plan(model, plan)
"""

from hyprune.api import inspect_model, plan, prune, score
from hyprune.apply import apply_plan
from hyprune.arch import family_for_config
from hyprune.errors import HypruneError
from hyprune.importance import activation_scores
from hyprune.plan import Plan, identity_plan, make_plan

__all__ = ["HypruneError", "Plan", "activation_scores", "apply_plan", "family_for_config", "identity_plan",
           "inspect_model", "make_plan", "plan", "prune", "score"]
__version__ = "0.1.0"
