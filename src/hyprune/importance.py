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
    Mamba-1 states    outputs of b_layernorm and c_layernorm      -> ``layers.i.mamba1_bc`` [2, state]
    expert neurons    input of each routed expert's down projection,
                      times the token's routing weight            -> ``layers.i.expert_ffn`` [experts, ffn]
    whole experts     L2 norm of each routed expert's output,
                      times the token's routing weight            -> ``layers.i.experts`` [experts]
    shared expert     input of shared_experts.down_proj           -> ``layers.i.shared_ffn`` [shared ffn]

A token an expert does not serve contributes 0 to that expert's scores (its routing weight is 0), so an
expert the router rarely picks, or picks with small weights, scores low.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hyprune.arch.family import ATTENTION, MAMBA, MAMBA1, MLP, MOE, Family, attention_head_dim
from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json

SCORES_FILE = "scores.safetensors"
SUMMARY_FILE = "scores.json"


class ChannelStat:
    """Running ``sum_batch (mean_seq |A|)^2`` per channel, in float32."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.samples = 0

    def add(self, activation: torch.Tensor) -> None:
        # activation: [batch, seq, channels]
        self.add_means(activation.detach().abs().float().mean(dim=1))

    def add_means(self, per_sample: torch.Tensor) -> None:
        """Add per-sample means of |A| over the sequence, [batch, channels] float32."""
        sq = per_sample.pow(2).sum(dim=0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.samples += per_sample.shape[0]

    def score(self) -> torch.Tensor:
        if self.sum_sq is None:
            raise HypruneError("No calibration data reached a hooked module; the sweep saw no tokens.")
        return self.sum_sq.sqrt().cpu()


@contextmanager
def _hooks(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _expert_activations(experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e on tokens x [n, in]: (input of its down projection [n, ffn], its output [n, in]).

    Gated experts hold ``gate_up_proj`` = [gate; up] (Granite, Jamba), non-gated ones ``up_proj`` (NemotronH).
    """
    if hasattr(experts, "gate_up_proj"):
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
    else:
        inner = experts.act_fn(F.linear(x, experts.up_proj[e]))
    return inner, F.linear(inner, experts.down_proj[e])


def _moe_hooks(moe, ffn_stat: "ChannelStat", expert_stat: "ChannelStat") -> list:
    """Hooks on an MoE block that score each routed expert's neurons and the expert as a whole.

    The experts module receives the flattened tokens [batch * seq, in], the chosen experts and their
    routing weights [batch * seq, top_k]; a pre-hook on the MoE block notes the sequence length so each
    token's sample is known. The experts are re-run on their own tokens (a second pass through the
    routed experts, never a dense [tokens, experts, ffn] tensor).
    """
    seq_len = {}

    def note_shape(module, args):
        seq_len["s"] = args[0].shape[-2]

    def score(module, args, output):
        x, index, weight = args[:3]  # [T, in], [T, top_k], [T, top_k]
        num_experts, ffn = module.down_proj.shape[0], module.down_proj.shape[-1]
        samples = x.shape[0] // seq_len["s"]
        sample_of = torch.arange(x.shape[0], device=x.device) // seq_len["s"]
        ffn_sum = torch.zeros(samples, num_experts, ffn, device=x.device)
        out_sum = torch.zeros(samples, num_experts, device=x.device)
        for e in range(num_experts):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            inner, out = _expert_activations(module, e, x[token])
            w = weight[token, slot].float().abs()[:, None]
            ffn_sum[:, e].index_add_(0, sample_of[token], (inner.float().abs() * w))
            out_sum[:, e].index_add_(0, sample_of[token], (out.float().norm(dim=-1, keepdim=True) * w)[:, 0])
        ffn_stat.add_means(ffn_sum.flatten(1) / seq_len["s"])
        expert_stat.add_means(out_sum / seq_len["s"])

    return [moe.register_forward_pre_hook(note_shape), moe.experts.register_forward_hook(score)]


def _mamba_dims(mixer) -> tuple[int, int, int, int]:
    return mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size


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
    handles = []

    def record(key, slicer=None):
        stat = stats.setdefault(key, ChannelStat())

        def hook(module, args, output):
            stat.add(slicer(output) if slicer else output)

        return hook

    def record_input(key):
        stat = stats.setdefault(key, ChannelStat())

        def hook(module, args):
            stat.add(args[0])

        return hook

    for i, (block, kind) in enumerate(zip(family.layers(model), kinds)):
        hooked_norms = set()
        for j, (part, norm, mixer) in enumerate(family.block_parts(block, kind)):
            if id(norm) not in hooked_norms:  # FalconH1's attention and Mamba share one pre-norm
                hooked_norms.add(id(norm))
                handles.append(norm.register_forward_hook(record(f"layers.{i}.hidden.{j}")))
            if part.kind == MAMBA:
                H, P, G, N = _mamba_dims(mixer)
                inner = H * P
                # in_proj output rows: z [0:I], x [I:2I], B [2I:2I+GN], C [2I+GN:2I+2GN], dt
                handles.append(mixer.in_proj.register_forward_hook(
                    record(f"layers.{i}.mamba_x", lambda out, a=inner: out[..., a : 2 * a])))
                handles.append(mixer.in_proj.register_forward_hook(
                    record(f"layers.{i}.mamba_bc", lambda out, a=inner, b=G * N: out[..., 2 * a : 2 * a + 2 * b])))
            elif part.kind == MAMBA1:
                handles.append(mixer.out_proj.register_forward_pre_hook(record_input(f"layers.{i}.mamba1_inner")))
                handles.append(mixer.b_layernorm.register_forward_hook(record(f"layers.{i}.mamba1_b")))
                handles.append(mixer.c_layernorm.register_forward_hook(record(f"layers.{i}.mamba1_c")))
            elif part.kind == ATTENTION:
                handles.append(mixer.o_proj.register_forward_pre_hook(record_input(f"layers.{i}.attention")))
            elif part.kind == MLP:
                down = mixer.down_proj if hasattr(mixer, "down_proj") else mixer.output_linear  # Granite
                handles.append(down.register_forward_pre_hook(record_input(f"layers.{i}.ffn")))
            elif part.kind == MOE:
                handles += _moe_hooks(mixer, stats.setdefault(f"layers.{i}.expert_ffn", ChannelStat()),
                                      stats.setdefault(f"layers.{i}.experts", ChannelStat()))
                if hasattr(mixer, "shared_experts"):
                    handles.append(mixer.shared_experts.down_proj.register_forward_pre_hook(
                        record_input(f"layers.{i}.shared_ffn")))

    device = next(model.parameters()).device
    use_cache = {"use_cache": False}
    with _hooks(handles):
        for start in tqdm(range(0, len(windows), batch_size), desc="importance sweep", unit="batch",
                          disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            model(input_ids=batch, **use_cache)

    scores: dict[str, torch.Tensor] = {}
    hidden_total = None
    for i, (block, kind) in enumerate(zip(family.layers(model), kinds)):
        parts = family.block_parts(block, kind)
        hidden = sum(stats[f"layers.{i}.hidden.{j}"].score() for j in range(len(parts))
                     if f"layers.{i}.hidden.{j}" in stats)
        scores[f"layers.{i}.hidden"] = hidden
        hidden_total = hidden if hidden_total is None else hidden_total + hidden
        for part, _, mixer in parts:
            if part.kind == MAMBA:
                H, P, G, N = _mamba_dims(mixer)
                scores[f"layers.{i}.mamba_x"] = stats[f"layers.{i}.mamba_x"].score().view(H, P)
                scores[f"layers.{i}.mamba_bc"] = stats[f"layers.{i}.mamba_bc"].score().view(2, G, N)
            elif part.kind == MAMBA1:
                scores[f"layers.{i}.mamba1_inner"] = stats[f"layers.{i}.mamba1_inner"].score()
                scores[f"layers.{i}.mamba1_bc"] = torch.stack([stats[f"layers.{i}.mamba1_{x}"].score() for x in "bc"])
            elif part.kind == ATTENTION:
                heads = model.config.num_attention_heads
                scores[f"layers.{i}.attention"] = stats[f"layers.{i}.attention"].score().view(heads, -1)
            elif part.kind == MLP:
                scores[f"layers.{i}.ffn"] = stats[f"layers.{i}.ffn"].score()
            elif part.kind == MOE:
                scores[f"layers.{i}.experts"] = stats[f"layers.{i}.experts"].score()
                scores[f"layers.{i}.expert_ffn"] = stats[f"layers.{i}.expert_ffn"].score().view(
                    mixer.experts.down_proj.shape[0], -1)
                if f"layers.{i}.shared_ffn" in stats:
                    scores[f"layers.{i}.shared_ffn"] = stats[f"layers.{i}.shared_ffn"].score()
    scores["hidden"] = hidden_total
    return scores


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
            if part.kind == MAMBA:
                x = scores[f"layers.{i}.mamba_x"]
                entry["mamba_heads"] = stats(x.norm(dim=1))
                entry["mamba_head_dim"] = stats(x.norm(dim=0))
                entry["ssm_state"] = stats(scores[f"layers.{i}.mamba_bc"].pow(2).sum(dim=(0, 1)).sqrt())
            elif part.kind == MAMBA1:
                entry["mamba_inner"] = stats(scores[f"layers.{i}.mamba1_inner"])
                entry["ssm_state"] = stats(scores[f"layers.{i}.mamba1_bc"].norm(dim=0))
            elif part.kind == ATTENTION:
                entry["attention_heads"] = stats(scores[f"layers.{i}.attention"].norm(dim=1))
            elif part.kind == MLP:
                entry["ffn"] = stats(scores[f"layers.{i}.ffn"])
            elif part.kind == MOE:
                entry["experts"] = stats(scores[f"layers.{i}.experts"])
                entry["expert_ffn"] = stats(scores[f"layers.{i}.expert_ffn"])
                if f"layers.{i}.shared_ffn" in scores:
                    entry["shared_expert_ffn"] = stats(scores[f"layers.{i}.shared_ffn"])
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
            if part.kind == MAMBA:
                expected[f"layers.{i}.mamba_x"] = (sizes["mamba_heads"], sizes["mamba_head_dim"])
                expected[f"layers.{i}.mamba_bc"] = (2, sizes["mamba_groups"], sizes["ssm_state"])
            elif part.kind == MAMBA1:
                expected[f"layers.{i}.mamba1_inner"] = (sizes["mamba_expand"] * sizes["hidden"],)
                expected[f"layers.{i}.mamba1_bc"] = (2, sizes["ssm_state"])
            elif part.kind == ATTENTION:
                expected[f"layers.{i}.attention"] = (sizes["attention_heads"], attention_head_dim(config))
            elif part.kind == MLP:
                expected[f"layers.{i}.ffn"] = (sizes["ffn"],)
            elif part.kind == MOE:
                expected[f"layers.{i}.experts"] = (sizes["experts"],)
                expected[f"layers.{i}.expert_ffn"] = (sizes["experts"], sizes["expert_ffn"])
                if "shared_expert_ffn" in sizes:
                    expected[f"layers.{i}.shared_ffn"] = (sizes["shared_expert_ffn"],)
    for key, shape in expected.items():
        if key not in scores or tuple(scores[key].shape) != shape:
            got = tuple(scores[key].shape) if key in scores else "missing"
            raise HypruneError(
                f"The scores in {file} were made for another model: '{key}' is {got}, this model needs {shape}. "
                "Score this model with `hyprune score`."
            )
    return scores
