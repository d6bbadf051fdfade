"""FalconMamba (``FalconMambaForCausalLM``): Mamba's layout, with weightless RMSNorms on dt, B and C.

Inside the mixer, dt (``time_step_rank`` wide), B and C (``state_size`` wide each) are each divided by
their RMS over the last axis, ``x * rsqrt(mean(x^2) + mixer_rms_eps)``, with no weights (the norms'
``weight`` is a non-persistent buffer of ones, absent from the state dict).

Exactness: dt's norm runs over ``time_step_rank``, which stays, and every inner channel reaches dt only
through its x_proj column, so inner channels prune exactly (as zeroing their column would). B's and C's
norms run over the states, so after pruning states the mean is over the *kept* states: the pruned model
equals the source with the removed states masked out of x_proj *and* out of the B/C RMS statistic (the
rule Jamba's weighted B/C norms follow, and what the tests check), not the source with those rows zeroed,
which would still divide by the full ``state_size``. The hidden axis is the usual masked block RMSNorm.
"""

from __future__ import annotations

from hyprune.arch.family import register
from hyprune.arch.mamba import family

FALCON_MAMBA = register(family("falcon_mamba", {}, notes=(
    "The B/C RMSNorms inside the mixer average over the kept states after pruning state_size (as Jamba's do).",)))
