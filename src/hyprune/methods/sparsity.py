"""Unstructured and N:M sparsity: ``magnitude``, ``wanda`` and ``sparsegpt`` (shared/reference/methods.md, 5-6).

Weights are set to zero in place and saved dense, so the checkpoint loads anywhere with no custom code;
the report lists the zeros of every pruned tensor.

Which weights: the ``nn.Linear`` layers inside the blocks (never embeddings or the LM head), narrowed by
``--targets``: either a comma-separated list of groups (`GROUPS`: ``in_proj``, ``out_proj``, ``mamba``,
``attention``, ``mlp``) or a regular expression searched in parameter names
(``model.layers.3.mixer.in_proj.weight``; exclude with a lookahead, e.g. ``^(?!.*layers\\.0\\.).*in_proj``).

How many: ``--sparsity R`` zeroes the fraction R of every compared set of weights (Wanda and magnitude
compare within each output row, SparseGPT within each block of 128 columns, as the papers do);
``--nm N:M`` keeps N non-zeros in every M consecutive input weights of a row (2:4, 4:8).

- ``magnitude``: score |W_ij|, no data.
- ``wanda``: score |W_ij| * ||X_j||_2, X_j the j-th input feature over all calibration tokens.
- ``sparsegpt``: optimal brain surgeon one column at a time: H = X^T X (+ 1% of its mean diagonal), the mask
  chosen per column block from w^2 / [U]_jj^2 (U the upper Cholesky factor of H^-1), the error of every
  zeroed weight pushed onto the later columns of its row, lazily per block of 128 columns.

Calibration is sequential, as in both papers: the inputs of a block come from the blocks before it
*after* they were pruned. A capture pass records what the first block receives (and the other arguments
every block gets: masks, rotary embeddings) with the blocks stubbed out; then each block is run on those inputs with hooks collecting
input statistics, pruned, and run again to make the inputs of the next block.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from hyprune.arch.family import Family
from hyprune.parts import PARTS
from hyprune.errors import HypruneError
from hyprune.methods import Method, MethodOptions, MethodResult, register

GROUPS = {
    "in_proj": "Mamba in_proj (z, x, B, C, dt rows)",
    "out_proj": "Mamba out_proj",
    "ssm_proj": "Mamba-1 x_proj",
    "mamba": "Mamba in_proj and out_proj (and Mamba-1's x_proj)",
    "attention": "attention q/k/v/o projections",
    "mlp": "MLP projections",
}
_GROUP_MEMBERS = {"mamba": {"in_proj", "out_proj", "ssm_proj"}}
SPARSEGPT_BLOCK = 128  # columns per lazy-update block (and per mask-selection block), as in the paper
SPARSEGPT_DAMP = 0.01  # dampening: this fraction of the mean diagonal of H is added to the diagonal


@dataclass
class Target:
    """One prunable linear layer: its parameter name, target group and module."""

    name: str  # parameter name, e.g. model.layers.0.mixer.in_proj.weight
    group: str  # in_proj, out_proj, attention or mlp
    module: nn.Linear
    block: int


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def block_linears(model, family: Family) -> list[Target]:
    """Every ``nn.Linear`` inside the blocks, in forward order, with its group."""
    out = []
    kinds = family.block_kinds(model.config)
    for i, (block, kind) in enumerate(zip(family.layers(model), kinds)):
        for part, _, mixer in family.block_parts(block, kind):
            for sub_name, module in mixer.named_modules():
                group = PARTS[part.kind].linear_group(sub_name) if isinstance(module, nn.Linear) else None
                if group is not None:
                    out.append(Target(f"{family.layer_prefix(i)}.{part.mixer}.{sub_name}.weight", group, module, i))
    return out


def select_targets(model, family: Family, spec: str | None) -> list[Target]:
    """The linear layers ``spec`` names (module docstring); all of them when ``spec`` is None."""
    linears = block_linears(model, family)
    if spec is None:
        return linears
    items = [item.strip() for item in spec.split(",")]
    if all(item in GROUPS for item in items):
        groups = set().union(*(_GROUP_MEMBERS.get(item, {item}) for item in items))
        chosen = [t for t in linears if t.group in groups]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise HypruneError(f"--targets '{spec}' is neither a list of groups ({', '.join(GROUPS)}) "
                               f"nor a valid regular expression: {e}.") from None
        chosen = [t for t in linears if pattern.search(t.name)]
    if not chosen:
        examples = ", ".join(t.name for t in linears[:3])
        present = sorted({t.group for t in linears})
        raise HypruneError(
            f"--targets '{spec}' matches no linear layer of this {family.name} model. Use groups among "
            f"{', '.join(present)} (comma-separated) or a regular expression over parameter names such as {examples}."
        )
    return chosen


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------
def lowest_mask(scores: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """True where a weight is removed: the lowest ``sparsity`` of each row, or M - N lowest of every M in a row.

    ``scores``: [rows, cols]; with ``nm``, cols must be a multiple of M.
    """
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        blocks = scores.reshape(rows, cols // m, m)  # [rows, groups of M, M]
        drop = blocks.topk(m - n, dim=-1, largest=False).indices
        return torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, drop, True).reshape(rows, cols)
    drop = scores.topk(round(sparsity * cols), dim=1, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, drop, True)


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from the per-feature sum of squared inputs ([cols])."""
    return weight.abs().double() * input_sq_sum.double().sqrt()[None, :]


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = SPARSEGPT_DAMP) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp * mean diag(H) * I)^-1, in float64.

    Float64 here because this is where conditioning bites: H = X^T X of correlated activations spans many
    orders of magnitude, and U feeds every later update. It is also cheap (two O(cols^3) calls per layer,
    against O(rows * cols^2) for the solve). With J the reversal permutation and J H J = L L^T, H = R R^T
    for the upper triangular R = J L J, so H^-1 = R^-T R^-1 and U = R^-1 = J L^-1 J: one Cholesky and one
    triangular inverse, instead of Cholesky, ``cholesky_inverse`` (slow on CPU) and a second Cholesky.
    """
    H = hessian.detach().double().clone()
    mean_diag = H.diagonal().mean()
    H.diagonal().add_(damp * mean_diag if mean_diag > 0 else 1.0)  # no input seen: plain magnitude order
    L = torch.linalg.cholesky(H.flip(0, 1))
    eye = torch.eye(len(H), dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    nm: tuple[int, int] | None = None, block_size: int = SPARSEGPT_BLOCK,
                    damp: float = SPARSEGPT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight [rows, cols] with input Gram matrix ``hessian`` [cols, cols] (any positive scale).

    Returns (new weight in float32, removed mask). Row j of U (`inverse_hessian_factor`) is the first row
    of the inverse Hessian of columns j.. divided by the square root of its diagonal entry, so removing w_j
    and updating the rest of its row by -w_j / U_jj * U_j,j: is the OBS step with columns < j already fixed.
    Within a block of ``block_size`` columns the updates stay in the block; the accumulated errors reach
    the later columns in one matrix product per block (lazy batch updates).

    The solve runs in float32, as in the paper and llm-compressor (float64 made it about twice as slow);
    only U is computed in float64. It works on W^T so that a column of W is a contiguous row, and each
    column's update is one in-place rank-1 ``addmm_`` with no temporary (``addr_`` measured slower on CPU).
    """
    Wt = weight.detach().t().float().contiguous()  # [cols, rows]
    U = inverse_hessian_factor(hessian, damp).float()
    cols = Wt.shape[0]
    if nm is not None:
        block_size = max(block_size // nm[1], 1) * nm[1]  # N:M groups never straddle two blocks
    removed = torch.zeros_like(Wt, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1, mask1 = Wt[i1:i2], U[i1:i2, i1:i2], removed[i1:i2]  # views, updated in place
        d = U1.diagonal()
        errors = torch.empty_like(W1)
        if nm is None:
            scores = (W1 / d[:, None]).pow(2).flatten()
            mask1.view(-1)[scores.topk(round(sparsity * scores.numel()), largest=False).indices] = True
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                group = (W1[j : j + nm[1]] / d[j : j + nm[1], None]).pow(2)
                mask1[j : j + nm[1]] = lowest_mask(group.t(), nm=nm).t()
            torch.mul(W1[j], mask1[j], out=errors[j]).div_(d[j])  # w / U_jj where removed, else 0
            W1[j:].addmm_(U1[j, j:, None], errors[j, None], alpha=-1)
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), errors, alpha=-1)
    Wt[removed] = 0.0  # exactly zero (the update leaves rounding residue)
    return Wt.t(), removed.t()


# ---------------------------------------------------------------------------------------------
# Calibration: per-feature input statistics, block after block
# ---------------------------------------------------------------------------------------------
class InputStats:
    """Running sum over tokens of x^2 per input feature (Wanda) or of x x^T (SparseGPT's H), in float64."""

    def __init__(self, gram: bool) -> None:
        self.gram = gram
        self.total: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [tokens, features]
        part = (x.T @ x if self.gram else x.pow(2).sum(dim=0)).double()
        self.total = part if self.total is None else self.total + part


@contextmanager
def input_stats(targets: list[Target], gram: bool):
    """``{name: InputStats}`` of ``targets``, filled by hooks on their inputs while the context is open."""
    stats = {t.name: InputStats(gram) for t in targets}
    handles = [t.module.register_forward_pre_hook(lambda m, args, s=stats[t.name]: s.add(args[0])) for t in targets]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


class _Stop(Exception):
    """Raised in the capture pass at the last block: the final norm and the LM head need not run."""


def _capture_block_inputs(model, family: Family, windows: torch.Tensor, batch_size: int, progress: bool):
    """Per batch: the hidden states entering block 0, and per block the other arguments it is called with.

    The other arguments (masks, rotary embeddings, ...) are made before the first block and depend only on
    the batch's shape (no padding mask is passed). So in this pass block 0 runs for real (once, to learn
    what a block returns) and every later block is replaced by a recorder that hands its input on
    unchanged: the pass costs about one block, not a forward of the whole model.
    Returns (hidden per batch, per batch a list over blocks of (args, kwargs)).
    """
    layers = family.layers(model)
    first, calls, recorded = [], [], []
    template = []  # what block 0 returned, so the recorders return the same structure

    def recorder(i, real_forward):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first.append(hidden)
            recorded.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            if i == len(layers) - 1:
                raise _Stop
            if not template:
                template.append(real_forward(*args, **kwargs))
            out = template[0]
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        return forward

    device = next(model.parameters()).device
    for i, layer in enumerate(layers):
        layer.forward = recorder(i, layer.forward)  # an instance attribute shadows the class's forward
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="capture block inputs", unit="batch",
                          disable=not progress):
            recorded = []
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
            calls.append(recorded)
    finally:
        for layer in layers:
            del layer.forward
    return first, calls


def _block_output(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def prune_sequentially(model, family: Family, targets: list[Target], windows: torch.Tensor, prune_layer,
                       gram: bool, batch_size: int = 8, progress: bool = True) -> None:
    """Calibrate and prune block by block; ``prune_layer(target, stats)`` zeroes one layer in place.

    The inputs of block i are the outputs of blocks < i after pruning (module docstring).
    """
    hidden, calls = _capture_block_inputs(model, family, windows, batch_size, progress)
    by_block: dict[int, list[Target]] = {}
    for t in targets:
        by_block.setdefault(t.block, []).append(t)
    last = max(by_block)
    layers = family.layers(model)
    done: set[int] = set()  # modules already pruned: a block shared by several uses (Zamba2) is pruned once
    for i in tqdm(range(last + 1), desc="prune blocks", unit="block", disable=not progress):
        block = layers[i]
        if i in by_block:
            with input_stats(by_block[i], gram) as stats:
                for h, arguments in zip(hidden, calls):
                    args, kwargs = arguments[i]
                    block(h, *args, **kwargs)
            for t in by_block[i]:
                # a layer this block holds but does not call (another use's adapter) waits for its own block
                if id(t.module) not in done and stats[t.name].total is not None:
                    prune_layer(t, stats[t.name])
                    done.add(id(t.module))
        if i < last:
            hidden = [_block_output(block(h, *arguments[i][0], **arguments[i][1]))
                      for h, arguments in zip(hidden, calls)]


# ---------------------------------------------------------------------------------------------
# The methods
# ---------------------------------------------------------------------------------------------
def describe_options(options: MethodOptions) -> dict:
    return {"sparsity": options.sparsity, "nm": f"{options.nm[0]}:{options.nm[1]}" if options.nm else None,
            "targets": options.targets or "all linear layers inside blocks"}


def check(name: str):
    def check_options(family: Family, config, options: MethodOptions) -> None:
        if (options.sparsity is None) == (options.nm is None):
            raise HypruneError(f"--method {name} needs exactly one of --sparsity R (unstructured, e.g. 0.5) "
                               "or --nm N:M (e.g. 2:4).")
        if options.sparsity is not None and not 0 < options.sparsity < 1:
            raise HypruneError(f"--sparsity must be a fraction strictly between 0 and 1, got {options.sparsity}.")
        if options.ratio is not None:
            raise HypruneError(f"--ratio is for the structured SSM methods; --method {name} takes --sparsity or --nm.")
        with torch.device("meta"):  # names and shapes only: no weights are read
            skeleton = AutoModelForCausalLM.from_config(config)
        targets = select_targets(skeleton, family, options.targets)
        if options.nm is not None:
            m = options.nm[1]
            bad = [f"{t.name} ({t.module.in_features} inputs)" for t in targets if t.module.in_features % m]
            if bad:
                raise HypruneError(f"--nm {options.nm[0]}:{m} needs input widths divisible by {m}; not: "
                                   f"{', '.join(bad[:4])}. Narrow --targets or pick another M.")

    return check_options


def tensor_rows(targets: list[Target]) -> list[dict]:
    """Zeros per pruned tensor (counted on the weights as they will be saved)."""
    rows = []
    for t in targets:
        w = t.module.weight
        zeros = int((w == 0).sum())
        rows.append({"name": t.name, "group": t.group, "shape": list(w.shape), "zeros": zeros,
                     "sparsity": zeros / w.numel()})
    return rows


def report_from_rows(rows: list[dict]) -> dict:
    numel = sum(math.prod(row["shape"]) for row in rows)
    zeros = sum(row["zeros"] for row in rows)
    return {"tensors": rows, "total": {"tensors": len(rows), "weights": numel, "zeros": zeros,
                                       "sparsity": zeros / numel}}


def sparsity_report(targets: list[Target]) -> dict:
    """Zeros per pruned tensor and in total."""
    return report_from_rows(tensor_rows(targets))


def _zero_(module: nn.Linear, mask: torch.Tensor, new_weight: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        if new_weight is not None:
            module.weight.copy_(new_weight.to(module.weight.dtype))
        module.weight[mask.to(module.weight.device)] = 0


def layer_pruner(name: str, options: MethodOptions) -> Callable[[Target, InputStats | None], None]:
    """How method ``name`` zeroes one target layer in place, given its input statistics (None: magnitude)."""
    sparsity, nm = options.sparsity, options.nm

    def magnitude(t: Target, stats: InputStats | None) -> None:
        _zero_(t.module, lowest_mask(t.module.weight.detach().abs(), sparsity, nm))

    def wanda(t: Target, stats: InputStats) -> None:
        _zero_(t.module, lowest_mask(wanda_scores(t.module.weight.detach(), stats.total), sparsity, nm))

    def sparsegpt(t: Target, stats: InputStats) -> None:
        weight, mask = sparsegpt_prune(t.module.weight.detach(), stats.total, sparsity, nm)
        _zero_(t.module, mask, weight)

    return {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}[name]


GRAM = {"wanda": False, "sparsegpt": True}  # the input statistics each data method needs


def _run(name: str):
    def run(model, family: Family, windows, options: MethodOptions, *, batch_size: int = 8,
            progress: bool = True) -> MethodResult:
        targets = select_targets(model, family, options.targets)
        prune_layer = layer_pruner(name, options)
        if name == "magnitude":
            for t in tqdm(targets, desc="magnitude", unit="tensor", disable=not progress):
                prune_layer(t, None)
        else:
            prune_sequentially(model, family, targets, windows, gram=GRAM[name], batch_size=batch_size,
                               progress=progress, prune_layer=prune_layer)
        report = {**describe_options(options), **sparsity_report(targets)}
        if windows is not None:
            report["calibration_windows"] = list(windows.shape)
        return MethodResult(model=model, report=report)

    return run


_SUMMARIES = {
    "magnitude": "unstructured / N:M sparsity by |W| per output row (no data)",
    "wanda": "unstructured / N:M sparsity by |W| x input norm per output row (Wanda)",
    "sparsegpt": "unstructured / N:M sparsity with OBS weight reconstruction (SparseGPT)",
}
for _name, _summary in _SUMMARIES.items():
    register(Method(name=_name, summary=_summary, needs_data=_name != "magnitude", check=check(_name),
                    run=_run(_name)))
