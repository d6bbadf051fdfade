"""Activation-based importance (Minitron, Minitron-SSM) in one hooked forward sweep.

For an activation A of shape [batch, seq, channels] the score of channel c is
``sqrt(sum_batch (mean_seq |A[b, :, c]|)^2)``: mean over the sequence, L2 over the batch. Only the
running sum of squares (float32, one value per channel) is kept; no per-token activation is stored.

What each hook reads (shared/reference/methods.md, section 1):
    hidden channels   output of every block's pre-norm            -> per-layer scores, summed
    FFN neurons       input of down_proj (output_linear)          -> ``layers.i.ffn`` [ffn]
    attention heads   input of o_proj, [heads, head_dim]          -> ``layers.i.attention``
    Mamba heads/dims  x slice of in_proj output, [heads, head_dim] -> ``layers.i.mamba_x``
    SSM states        B and C slices of in_proj output            -> ``layers.i.mamba_bc`` [2, groups, state]
    Mamba-1 channels  input of out_proj (gated scan output)       -> ``layers.i.mamba1_inner`` [inner]
    Mamba-1 states    outputs of b/c_layernorm (or x_proj's B, C) -> ``layers.i.mamba1_bc`` [2, state]
    expert neurons    input of each routed expert's down projection,
                      times the token's routing weight            -> ``layers.i.expert_ffn`` [experts, ffn]
    whole experts     L2 norm of each routed expert's output,
                      times the token's routing weight            -> ``layers.i.experts`` [experts]
    shared expert     input of shared_experts.down_proj           -> ``layers.i.shared_ffn`` [shared ffn]

A token an expert does not serve contributes 0 to that expert's scores (its routing weight is 0), so an
expert the router rarely picks, or picks with small weights, scores low.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hyprune.arch.family import Family
from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json
from hyprune.parts import PARTS, names_of
from hyprune.parts.base import ChannelStat, output_hook

SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "scores.json"

__all__ = ["ChannelStat", "activation_scores", "collect_scores", "register_hooks", "summarize_scores", "save_scores", "load_scores"]


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def register_hooks(model, family: Family, kinds: list[str], stat) -> list:
    """Every hook of the sweep: each block's pre-norms (once each) and each part's own (`hyprune.parts`)."""
    handles = []
    for i, (block, kind) in enumerate(zip(family.layers(model), kinds)):
        hooked_norms = set()
        for j, (part, norm, mixer) in enumerate(family.block_parts(block, kind)):
            if id(norm) not in hooked_norms:  # FalconH1's attention and Mamba share one pre-norm
                hooked_norms.add(id(norm))
                handles.append(norm.register_forward_hook(output_hook(stat(f"layers.{i}.hidden.{j}"))))
            handles += PARTS[part.kind].hooks(mixer, i, stat, names_of(part))
    return handles


def collect_scores(model, family: Family, kinds: list[str], stats: dict[str, ChannelStat]) -> dict[str, torch.Tensor]:
    """The finished scores: per block its hidden scores (summed over its pre-norms) and its parts' scores."""
    scores: dict[str, torch.Tensor] = {}
    hidden_total = None
    for i, (block, kind) in enumerate(zip(family.layers(model), kinds)):
        parts = family.block_parts(block, kind)
        hidden = sum(stats[f"layers.{i}.hidden.{j}"].score() for j in range(len(parts))
                     if f"layers.{i}.hidden.{j}" in stats)
        scores[f"layers.{i}.hidden"] = hidden
        hidden_total = hidden if hidden_total is None else hidden_total + hidden
        for part, _, mixer in parts:
            scores.update(PARTS[part.kind].scores(stats.__getitem__, i, mixer, model.config))
    scores["hidden"] = hidden_total
    return scores


@torch.inference_mode()
def activation_scores(
    model,
    windows: torch.Tensor,
    family: Family,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``windows`` ([num_samples, seq_len] token ids) through ``model`` once and score every axis.

    Returns a flat dict of float32 CPU tensors (see the module docstring for the keys), plus
    ``hidden``: the per-layer hidden scores summed over layers (the global hidden ranking).
    """
    kinds = family.block_kinds(model.config)
    stats: dict[str, ChannelStat] = {}
    handles = register_hooks(model, family, kinds, lambda key: stats.setdefault(key, ChannelStat()))
    device = next(model.parameters()).device
    with _hooks(handles):
        for start in tqdm(range(0, len(windows), batch_size), desc="importance sweep", unit="batch",
                          disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False)
    return collect_scores(model, family, kinds, stats)


# ---------------------------------------------------------------------------------------------
# Saving and summaries
# ---------------------------------------------------------------------------------------------
def summarize_scores(scores: dict[str, torch.Tensor], family: Family, config) -> dict:
    """A small JSON-able view: per layer and axis, min / median / max of the unit scores."""

    def stats(t: torch.Tensor) -> dict:
        t = t.flatten().float()
        return {"min": float(t.min()), "median": float(t.median()), "max": float(t.max()), "count": t.numel()}

    layers = []
    for i, kind in enumerate(family.block_kinds(config)):
        entry = {"layer": i, "kind": kind, "hidden": stats(scores[f"layers.{i}.hidden"])}
        for part in family.parts(kind):
            entry.update(PARTS[part.kind].summary(scores, i, stats))
        layers.append(entry)
    return {"family": family.name, "hidden": stats(scores["hidden"]), "layers": layers}


def save_scores(scores: dict[str, torch.Tensor], out_dir: str | Path, summary: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in scores.items()}, str(out / SCORES_FILE))
    atomic_write_json(out / SUMMARY_FILE, summary)
    return out


def load_scores(path: str | Path, family: Family, config) -> dict[str, torch.Tensor]:
    """Load scores saved by `save_scores` (a folder or the .safetensors file) and check their shapes."""
    path = Path(path)
    file = path / SCORES_FILE if path.is_dir() else path
    if not file.is_file():
        raise HypruneError(f"No scores at {path}: expected {SCORES_FILE} (written by `hyprune score`).")
    scores = load_file(str(file))
    sizes = family.sizes(config)
    expected = {"hidden": (sizes["hidden"],)}
    for i, kind in enumerate(family.block_kinds(config)):
        for part in family.parts(kind):
            expected.update(PARTS[part.kind].score_shapes(i, sizes, config))
    for key, shape in expected.items():
        if key not in scores or tuple(scores[key].shape) != shape:
            got = tuple(scores[key].shape) if key in scores else "missing"
            raise HypruneError(
                f"The scores in {file} were made for another model: '{key}' is {got}, this model needs {shape}. "
                "Score this model with `hyprune score`."
            )
    return scores
