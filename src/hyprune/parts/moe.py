"""The MoE block: routed experts (each with its own FFN neurons), a router, optionally a shared expert.

Scores (per block i):
    ``layers.i.experts`` [experts]        L2 norm of each routed expert's output x the token's routing weight
    ``layers.i.expert_ffn`` [experts, ffn] input of each routed expert's down projection x routing weight
    ``layers.i.shared_ffn`` [shared ffn]  input of shared_experts.down_proj (NemotronH)

A token an expert does not serve contributes 0 to that expert's scores (its routing weight is 0), so an
expert the router rarely picks, or picks with small weights, scores low.

Tensor names cover NemotronH (``gate``, ``experts.up_proj``/``down_proj``, ``shared_experts``, optional latent
projections) and Granite/Jamba (``router``, ``experts.gate_up_proj`` = [gate; up] per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyprune.arch.family import MOE, expert_groups
from hyprune.errors import HypruneError
from hyprune.parts.base import (BasePart, ChannelStat, Context, check_grouped, check_indices, full, idx, input_hook,
                                top_k, top_k_within_groups)

EXPERT_ALIGNMENT = 8  # values; 16 bytes in bfloat16/float16


# ---- scoring -----------------------------------------------------------------------------------
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


def moe_hooks(moe, ffn_stat: ChannelStat, expert_stat: ChannelStat) -> list:
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


# ---- checks ------------------------------------------------------------------------------------
def check_router(family, config, experts: int) -> None:
    """Can the router still route with ``experts`` routed experts? Raises `HypruneError` if not.

    Every token takes ``num_experts_per_tok`` experts, so at least that many must stay. A grouped router
    (NemotronH ``n_group`` > 1) keeps its group count: experts go evenly from every group, each group
    keeps two (it is ranked by the sum of its two best scores) and the ``topk_group`` groups it picks
    must together hold ``num_experts_per_tok`` experts.
    """
    field = family.fields["experts"]
    top_k = int(config.num_experts_per_tok)
    if experts < top_k:
        raise HypruneError(
            f"{field}={experts} is below num_experts_per_tok={top_k}: every token is routed to {top_k} experts. "
            f"Keep at least {top_k} experts."
        )
    if not hasattr(config, "n_group"):
        return
    groups, topk_group = expert_groups(config), int(getattr(config, "topk_group", None) or 1)
    if experts % groups:
        raise HypruneError(
            f"{field}={experts} is not divisible by n_group={groups}: the router splits the experts into {groups} "
            f"equal groups. Pick a multiple of {groups}."
        )
    per_group = experts // groups
    if per_group < 2:
        raise HypruneError(
            f"{field}={experts} leaves {per_group} expert per router group; the {family.name} router ranks a group "
            f"by its two best experts, so keep at least {2 * groups}."
        )
    if topk_group * per_group < top_k:
        raise HypruneError(
            f"{field}={experts} leaves {per_group} experts per group; the router picks topk_group={topk_group} "
            f"groups and needs {top_k} experts among them. Keep at least {-(-top_k // topk_group) * groups}."
        )


def check_expert_alignment(family, config, sizes: dict[str, int]) -> None:
    """The widths the routed experts multiply over must be multiples of 8. Raises `HypruneError` if not.

    transformers runs routed experts with ``torch.nn.functional.grouped_mm``, which needs every row of its
    operands to start on a 16-byte boundary (8 values in bfloat16/float16, 4 in float32); a pruned model
    that breaks this loads but fails at its first forward pass.
    """
    widths = {family.fields["expert_ffn"]: sizes["expert_ffn"]}
    if getattr(config, "moe_latent_size", None) is None:  # else the experts see the fixed latent width
        widths[family.fields["hidden"]] = sizes["hidden"]
    bad = {name: value for name, value in widths.items() if value % EXPERT_ALIGNMENT}
    if bad:
        raise HypruneError(
            f"{', '.join(f'{k}={v}' for k, v in bad.items())}: in a model with routed experts these widths must "
            f"be multiples of {EXPERT_ALIGNMENT}, because transformers runs the experts with grouped_mm, which "
            "needs 16-byte aligned rows. Round the target to a multiple of 8."
        )


# ---- tensors -----------------------------------------------------------------------------------
def per_expert(experts: torch.Tensor, neurons: torch.Tensor, dim: int):
    """A step that keeps ``experts`` (dim 0) and, inside kept expert j, the rows ``neurons[j]`` along ``dim``.

    For 3-D expert tensors [experts, out, in]; ``neurons`` is [kept experts, kept neurons].
    """

    def select(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.index_select(0, experts.to(tensor.device))
        view = [len(neurons)] + [1] * (tensor.ndim - 1)  # neurons along `dim`, broadcast over the rest
        view[dim] = neurons.shape[1]
        size = list(tensor.shape)
        size[dim] = neurons.shape[1]
        return tensor.gather(dim, neurons.to(tensor.device).view(view).expand(size))

    return select


def routed_expert_parameters(config, lay, sizes: dict[str, int]) -> int:
    """One routed expert: its matrices over the latent width (NemotronH ``moe_latent_size``) or hidden."""
    latent = getattr(config, "moe_latent_size", None) or sizes["hidden"]
    return lay.expert_matrices * sizes["expert_ffn"] * latent


class Moe(BasePart):
    kind = MOE
    component = MOE
    axes = ("experts", "expert_ffn", "shared_expert_ffn")

    # ---- scoring -------------------------------------------------------------------------------
    def hooks(self, mixer, i, stat, names):
        handles = moe_hooks(mixer, stat(f"layers.{i}.expert_ffn"), stat(f"layers.{i}.experts"))
        if hasattr(mixer, "shared_experts"):
            handles.append(mixer.shared_experts.down_proj.register_forward_pre_hook(
                input_hook(stat(f"layers.{i}.shared_ffn"))))
        return handles

    def scores(self, stat, i, mixer, config):
        out = {f"layers.{i}.experts": stat(f"layers.{i}.experts").score(),
               f"layers.{i}.expert_ffn": stat(f"layers.{i}.expert_ffn").score().view(
                   mixer.experts.down_proj.shape[0], -1)}
        if hasattr(mixer, "shared_experts"):
            out[f"layers.{i}.shared_ffn"] = stat(f"layers.{i}.shared_ffn").score()
        return out

    def score_shapes(self, i, sizes, config):
        out = {f"layers.{i}.experts": (sizes["experts"],),
               f"layers.{i}.expert_ffn": (sizes["experts"], sizes["expert_ffn"])}
        if "shared_expert_ffn" in sizes:
            out[f"layers.{i}.shared_ffn"] = (sizes["shared_expert_ffn"],)
        return out

    def summary(self, scores, i, describe):
        out = {"experts": describe(scores[f"layers.{i}.experts"]),
               "expert_ffn": describe(scores[f"layers.{i}.expert_ffn"])}
        if f"layers.{i}.shared_ffn" in scores:
            out["shared_expert_ffn"] = describe(scores[f"layers.{i}.shared_ffn"])
        return out

    # ---- planning ------------------------------------------------------------------------------
    def check_target(self, family, config, sizes, source):
        check_router(family, config, sizes["experts"])
        check_expert_alignment(family, config, sizes)

    def plan(self, scores, i, sizes, ctx: Context):
        """Experts by their routing-weighted output score, evenly inside each router group; then, per kept
        expert, its own best ``expert_ffn`` neurons; the shared expert's neurons if the family has one."""
        groups = expert_groups(ctx.config)
        expert_score, ffn_score = scores[f"layers.{i}.experts"], scores[f"layers.{i}.expert_ffn"]
        per_group = len(expert_score) // groups
        experts = top_k_within_groups(expert_score, list(range(groups)), per_group, sizes["experts"] // groups)
        out = {"experts": experts, "expert_ffn": [top_k(ffn_score[e], sizes["expert_ffn"]) for e in experts]}
        if "shared_expert_ffn" in ctx.family.fields:
            out["shared_ffn"] = top_k(scores[f"layers.{i}.shared_ffn"], sizes["shared_expert_ffn"])
        return out

    def identity(self, sizes, family):
        out = {"experts": full(sizes["experts"]), "expert_ffn": [full(sizes["expert_ffn"])] * sizes["experts"]}
        if "shared_expert_ffn" in family.fields:
            out["shared_ffn"] = full(sizes["shared_expert_ffn"])
        return out

    def validate(self, where, lp, s, ctx: Context):
        family, config = ctx.family, ctx.config
        experts = check_indices(f"{where} experts", lp.experts, s["experts"])
        check_grouped(where, experts, list(range(expert_groups(config))), s["experts"] // expert_groups(config),
                      "expert")
        if lp.expert_ffn is None or len(lp.expert_ffn) != len(experts):
            raise HypruneError(f"Plan {where}: expert_ffn must hold one list of neurons per kept expert "
                               f"({len(experts)}).")
        widths = {len(check_indices(f"{where} expert_ffn of expert {e}", ffn, s["expert_ffn"]))
                  for e, ffn in zip(experts, lp.expert_ffn)}
        if len(widths) != 1:
            raise HypruneError(f"Plan {where}: every expert must keep the same number of FFN neurons (the config "
                               f"has one {family.fields['expert_ffn']}); got {sorted(widths)}.")
        check_router(family, config, len(experts))
        shape = (len(experts), widths.pop())
        if "shared_expert_ffn" in family.fields:
            shape += (len(check_indices(f"{where} shared_ffn", lp.shared_ffn, s["shared_expert_ffn"])),)
        return shape

    def result_sizes(self, lp, hidden):
        if lp.experts is None:
            return None
        out = dict(experts=len(lp.experts), expert_ffn=len(lp.expert_ffn[0]))
        if lp.shared_ffn is not None:
            out["shared_expert_ffn"] = len(lp.shared_ffn)
        return out

    def check_result(self, family, config, result):
        check_expert_alignment(family, config, result)

    # ---- tensors -------------------------------------------------------------------------------
    def rules(self, lp, sizes, h, config, names):
        # with NemotronH's moe_latent_size the experts see the latent width: only the latent projections
        # meet the hidden channels
        expert_input_is_hidden = getattr(config, "moe_latent_size", None) is None
        experts = idx(lp.experts)
        neurons = torch.tensor(lp.expert_ffn, dtype=torch.long)  # [kept experts, kept neurons]
        fused = torch.cat([neurons, sizes["expert_ffn"] + neurons], dim=1)  # [gate; up] rows of each expert
        into = [(2, h)] if expert_input_is_hidden else []
        out_of = [(1, h)] if expert_input_is_hidden else []
        rules = {
            "gate.weight": [(0, experts), (1, h)],
            "gate.e_score_correction_bias": [(0, experts)],
            "router.weight": [(0, experts), (1, h)],
            "experts.up_proj": into + [per_expert(experts, neurons, 1)],
            "experts.gate_up_proj": into + [per_expert(experts, fused, 1)],
            "experts.down_proj": out_of + [per_expert(experts, neurons, 2)],
            "fc1_latent_proj.weight": [(1, h)],
            "fc1_latent_proj.bias": [],
            "fc2_latent_proj.weight": [(0, h)],
            "fc2_latent_proj.bias": [(0, h)],
        }
        if lp.shared_ffn is not None:
            shared = idx(lp.shared_ffn)
            rules.update({
                "shared_experts.up_proj.weight": [(0, shared), (1, h)],
                "shared_experts.up_proj.bias": [(0, shared)],
                "shared_experts.down_proj.weight": [(0, h), (1, shared)],
                "shared_experts.down_proj.bias": [(0, h)],
            })
        return rules

    def parameters(self, config, lay, sizes):
        """A whole MoE block: router, routed experts, shared expert and latent projections (NemotronH)."""
        d, bias = sizes["hidden"], lay.flag(config, lay.mlp_bias)
        count = sizes["experts"] * (d + routed_expert_parameters(config, lay, sizes))  # router rows + experts
        if "shared_expert_ffn" in sizes:  # NemotronH's shared expert (up, down); Granite's is its own MLP part
            shared = sizes["shared_expert_ffn"]
            count += 2 * shared * d + bias * (shared + d)
        latent = getattr(config, "moe_latent_size", None)
        if latent:
            count += 2 * latent * d + bias * (latent + d)
        return count

    def active_reduction(self, config, lay, sizes) -> int:
        """Parameters one token skips in this block: the routed experts its router does not pick."""
        skipped = sizes["experts"] - int(config.num_experts_per_tok)
        return skipped * routed_expert_parameters(config, lay, sizes)


PART = Moe()
