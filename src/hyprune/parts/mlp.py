"""The MLP (dense FFN): ``ffn`` neurons, gated (gate, up, down) or not (up, down; NemotronH).

Score: ``layers.i.ffn`` [ffn], the input of the down projection. An MLP whose weights several blocks
share (Zamba2's shared transformer) is ranked once, from the summed scores of every use.

Tensor names are roles (``gate``, ``up``, ``down`` and the fused ``gate_up`` = [gate; up]); a family
whose MLP names them otherwise says so in `Part.names` (Granite: ``input_linear``, ``output_linear``).
"""

from __future__ import annotations

import torch

from hyprune.arch.family import MLP
from hyprune.parts.base import BasePart, Context, check_indices, full, idx, input_hook, top_k


class Mlp(BasePart):
    kind = MLP
    component = MLP
    axes = ("ffn",)
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", "gate_up": "gate_up_proj"}

    def hooks(self, mixer, i, stat, names):
        down = getattr(mixer, names["down"])
        return [down.register_forward_pre_hook(input_hook(stat(f"layers.{i}.ffn")))]

    def scores(self, stat, i, mixer, config):
        return {f"layers.{i}.ffn": stat(f"layers.{i}.ffn").score()}

    def score_shapes(self, i, sizes, config):
        return {f"layers.{i}.ffn": (sizes["ffn"],)}

    def summary(self, scores, i, describe):
        return {"ffn": describe(scores[f"layers.{i}.ffn"])}

    def plan(self, scores, i, sizes, ctx: Context):
        # an MLP shared by several blocks is ranked once, over all of its uses
        ffn_score = sum(scores[f"layers.{j}.ffn"] for j in ctx.uses.get(i, [i]))
        return {"ffn": top_k(ffn_score, sizes["ffn"])}

    def identity(self, sizes, family):
        return {"ffn": full(sizes["ffn"])}

    def validate(self, where, lp, s, ctx: Context):
        return (len(check_indices(f"{where} ffn", lp.ffn, s["ffn"])),)

    def result_sizes(self, lp, hidden):
        return None if lp.ffn is None else {"ffn": len(lp.ffn)}

    def rules(self, lp, sizes, h, config, names):
        ffn = idx(lp.ffn)
        gate_up = torch.cat([ffn, sizes["ffn"] + ffn])  # fused [gate; up] rows
        fused, gate, up, down = names["gate_up"], names["gate"], names["up"], names["down"]
        return {
            f"{fused}.weight": [(0, gate_up), (1, h)],
            f"{fused}.bias": [(0, gate_up)],
            f"{fused}_adapter_list.*.0.weight": [(1, h)],  # Zamba2's per-use LoRA: hidden -> rank -> [gate; up]
            f"{fused}_adapter_list.*.1.weight": [(0, gate_up)],
            f"{gate}.weight": [(0, ffn), (1, h)],
            f"{gate}.bias": [(0, ffn)],
            f"{up}.weight": [(0, ffn), (1, h)],
            f"{up}.bias": [(0, ffn)],
            f"{down}.weight": [(0, h), (1, ffn)],
            f"{down}.bias": [(0, h)],
        }

    def parameters(self, config, lay, sizes):
        d, F = sizes["hidden"], sizes["ffn"]
        bias = lay.flag(config, lay.mlp_bias) * ((lay.mlp_matrices - 1) * F + d)
        return lay.mlp_matrices * F * d + bias

    def linear_group(self, sub_name):
        return "mlp"


PART = Mlp()
