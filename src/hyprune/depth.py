"""Depth pruning: score whole blocks, choose which ones to drop, and put the choice into a plan.

In a hybrid model every block is its own candidate: a Mamba block, an attention block and an MLP block
(NemotronH ``M``, ``*``, ``-``) are scored and dropped one by one, and the config's layer pattern follows
(`hyprune.apply` renumbers the kept blocks and rewrites the pattern from ``plan.drop_blocks``).

Methods (shared/reference/methods.md, section 3). **For every method a higher score means a more
important block**; depth pruning drops the lowest.

    block_influence  BI_i = 1 - mean over tokens of cos(x_in, x_out) of block i, where x_in / x_out are
                     the residual stream before / after the block (ShortGPT; ModelOpt). 0 for a block
                     that leaves the stream's direction unchanged.
    angular          d(l, n) = arccos(cos(x_l, x_{l+n})) / pi on the last token, averaged over samples
                     (Gromov et al.): x_l is the input of block l, x_{l+n} the output of block l+n-1.
                     One score per window of n consecutive blocks (``window``); n = 1 scores blocks.
    kl               KL(p_full || p_without_block_i) of the next-token distributions, mean over tokens
                     (Minitron-SSM).
    lm_loss          next-token loss without block i minus the loss of the full model, mean over
                     tokens (Minitron). Negative when removing the block *helps*.

``block_influence`` and ``angular`` come from one hooked forward sweep (forward hooks on
``family.layers(model)[i]``; only float sums and, per batch, the last-token residual vectors are
kept, never per-token activations). ``kl`` and ``lm_loss`` need one forward per block and batch: the
block is made the identity by a forward hook that returns its input (the residual stream skips it,
exactly as if it had been dropped), and both scores come from the same passes.

Typical use::

    result = block_importance(model, windows, method="kl")          # BlockScores
    blocks = choose_blocks_to_drop(result, 4, mode="lowest")          # [3, 7, 8, 12]
    plan = with_dropped_blocks(width_plan_or_None, blocks, family, model.config)
    small = apply_plan(model, plan)
"""

from __future__ import annotations

import inspect
import json
import math
import operator
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hyprune.arch import family_for_config
from hyprune.arch.family import Family
from hyprune.config import parse_block_list
from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json
from hyprune.plan import Plan, identity_plan, validate_plan
from hyprune.report.plots import block_scores_plot

METHODS = ("block_influence", "angular", "kl", "lm_loss")
SWEEP_METHODS = ("block_influence", "angular")  # one hooked forward sweep
REMOVAL_METHODS = ("kl", "lm_loss")  # one forward per block and batch, with the block removed
MODES = ("lowest", "contiguous")
BLOCK_SCORES_FORMAT = "hyprune-block-scores/1"
BLOCK_SCORES_FILE = "block_scores.json"
BLOCK_PLOT_FILE = "block_scores.png"


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------
@dataclass
class BlockScores:
    """Importance of every block (or of every window of ``window`` consecutive blocks).

    Attributes:
        method: one of `METHODS`.
        scores: higher = more important. One per block when ``window == 1``; otherwise one per
            window start l, covering blocks l .. l + window - 1 (``len(kinds) - window + 1`` values).
        kinds: the block kind of every source block (``mamba``, ``attention``, ``mlp``).
        window: blocks per scored candidate (only ``angular`` uses more than 1).
        family: the model family.
        samples / tokens: how much calibration data the scores saw.
        calibration: free-form notes on the data (file, seq_len, seed).
    """

    method: str
    scores: list[float]
    kinds: list[str]
    window: int = 1
    family: str = ""
    samples: int = 0
    tokens: int = 0
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise HypruneError(f"Unknown depth method '{self.method}'. Use one of: {', '.join(METHODS)}.")
        if self.window < 1 or len(self.scores) != len(self.kinds) - self.window + 1:
            raise HypruneError(
                f"Block scores hold {len(self.scores)} values for {len(self.kinds)} blocks and window "
                f"{self.window}; expected {len(self.kinds) - self.window + 1}."
            )

    @property
    def num_blocks(self) -> int:
        return len(self.kinds)

    def blocks_of(self, j: int) -> list[int]:
        """The source blocks that candidate j covers."""
        return list(range(j, j + self.window))

    def ranks(self) -> list[int]:
        """Rank of every candidate: 1 = most important (highest score); ties go to the lower index."""
        order = sorted(range(len(self.scores)), key=lambda j: (-self.scores[j], j))
        rank = [0] * len(self.scores)
        for r, j in enumerate(order, start=1):
            rank[j] = r
        return rank

    def table(self) -> list[dict]:
        """The ranking table, in block order: index, kind, score, rank (and the blocks of a window)."""
        rows = []
        for j, (score, rank) in enumerate(zip(self.scores, self.ranks())):
            blocks = self.blocks_of(j)
            row = {"index": j, "kind": "+".join(self.kinds[b] for b in blocks), "score": score, "rank": rank}
            if self.window > 1:
                row["blocks"] = blocks
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        data = asdict(self)
        data = {"format": BLOCK_SCORES_FORMAT, "higher_is_more_important": True,
                "description": _DESCRIPTIONS[self.method], **data}
        data["ranking"] = self.table()
        data["lowest_first"] = sorted(range(len(self.scores)), key=lambda j: (self.scores[j], j))
        return data

    @classmethod
    def from_json(cls, data: dict) -> "BlockScores":
        if data.get("format") != BLOCK_SCORES_FORMAT:
            raise HypruneError(f"Not a hyprune block-scores file (format {data.get('format')!r}, "
                               f"expected {BLOCK_SCORES_FORMAT!r}). Write one with `hyprune score --depth`.")
        keys = ("method", "scores", "kinds", "window", "family", "samples", "tokens", "calibration")
        return cls(**{k: data[k] for k in keys if k in data})


_DESCRIPTIONS = {
    "block_influence": "1 - mean over tokens of cos(block input, block output) on the residual stream",
    "angular": "arccos(cos(x_l, x_{l+n})) / pi on the last token, mean over samples; one score per window of n blocks",
    "kl": "KL(full model || model without the block) of the next-token distributions, mean over tokens",
    "lm_loss": "next-token loss without the block minus the full model's loss, mean over tokens",
}


def check_method(method: str) -> None:
    if method not in METHODS:
        raise HypruneError(f"Unknown depth method '{method}'. Use one of: {', '.join(METHODS)}.")


# ---------------------------------------------------------------------------------------------
# Reading and skipping blocks
# ---------------------------------------------------------------------------------------------
def _block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream entering a block: NemotronH and Mamba2 pass it first, positionally or by name."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise HypruneError("A block was called without hidden_states; hyprune cannot read its residual stream.")


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def removed_block(block):
    """Inside this context ``block`` returns its input unchanged: the model runs as if it were dropped.

    A forward hook (``with_kwargs=True``, registered last so it has the final word) replaces the block's
    output by its ``hidden_states`` input, which the families call positionally or by keyword. The block
    still computes (hooks cannot skip ``forward``), but nothing it computes reaches the stream; run
    with ``use_cache=False`` so it writes no cache either.
    """

    def identity(module, args, kwargs, output):
        x_in = _block_input(args, kwargs)
        if isinstance(output, tuple):
            return (x_in, *output[1:])
        return x_in

    handle = block.register_forward_hook(identity, with_kwargs=True)
    try:
        yield block
    finally:
        handle.remove()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _no_logits(model) -> dict:
    """Forward kwargs that skip most of the LM head when only the hidden states matter."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _batches(windows: torch.Tensor, batch_size: int):
    if batch_size < 1:
        raise HypruneError(f"--batch-size must be at least 1, got {batch_size}.")
    if windows.ndim != 2 or len(windows) == 0:
        raise HypruneError("Calibration windows must be a non-empty [num_samples, seq_len] tensor; "
                           f"got {tuple(windows.shape)}.")
    return [windows[s : s + batch_size] for s in range(0, len(windows), batch_size)]


# ---------------------------------------------------------------------------------------------
# One hooked sweep: block influence and angular distance
# ---------------------------------------------------------------------------------------------
class SweepRecorder:
    """Block influence and angular distance from the blocks' inputs and outputs, recorded by forward hooks.

    Blocks and batches may come in any order (a full forward per batch, or block by block in
    `hyprune.stream`): `at_batch` says which batch the hooks see. Every sum adds its batches in batch
    order, so both orders give the same floats.
    """

    def __init__(self, family: Family, config, window: int = 1):
        self.kinds, self.family = family.block_kinds(config), family.name
        L = self.num_blocks = len(self.kinds)
        if not 1 <= window <= L:
            raise HypruneError(f"The angular window must be between 1 and the number of blocks ({L}); got {window}.")
        self.window = window
        self.bi = [dict() for _ in range(L)]  # block -> batch -> sum over its tokens of 1 - cos(x_in, x_out)
        # last-token residual vectors, [batch, hidden] float64 on the CPU: (0, b) = input of block 0 for
        # batch b, (i + 1, b) = output of block i
        self.last: dict[tuple[int, int], torch.Tensor] = {}
        self.sizes: dict[int, tuple[int, int]] = {}  # batch -> (samples, tokens)
        self.batch = 0

    def at_batch(self, b: int) -> None:
        self.batch = b

    def attach(self, layers) -> list:
        def hook(i):
            def record(module, args, kwargs, output):
                x_in, x_out = _block_input(args, kwargs), _block_output(output)
                cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [batch, seq]
                self.bi[i][self.batch] = float((1 - cos).double().sum())
                if i == 0:
                    self.last[0, self.batch] = x_in[:, -1].detach().double().cpu()
                    self.sizes[self.batch] = (x_in.shape[0], x_in.shape[0] * x_in.shape[1])
                self.last[i + 1, self.batch] = x_out[:, -1].detach().double().cpu()

            return record

        return [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(layers)]

    def result(self) -> dict[str, BlockScores]:
        L, w, batches = self.num_blocks, self.window, sorted(self.sizes)
        if any(len(self.last) != (L + 1) * len(batches) or b not in self.bi[i] for i in range(L) for b in batches):
            raise HypruneError("Some blocks were not reached by the forward pass; cannot score depth.")
        bi_sum = [0.0] * L  # in float64 (Python floats), batch by batch
        for i in range(L):
            for b in batches:
                bi_sum[i] += self.bi[i][b]
        ang_sum = [0.0] * (L - w + 1)
        for b in batches:
            for l in range(L - w + 1):
                cos = F.cosine_similarity(self.last[l, b], self.last[l + w, b], dim=-1).clamp(-1.0, 1.0)  # [batch]
                ang_sum[l] += float((torch.arccos(cos) / math.pi).sum())
        samples, tokens = (sum(self.sizes[b][k] for b in batches) for k in (0, 1))
        common = dict(kinds=self.kinds, family=self.family, samples=samples, tokens=tokens)
        return {
            "block_influence": BlockScores("block_influence", [s / tokens for s in bi_sum], **common),
            "angular": BlockScores("angular", [s / samples for s in ang_sum], window=w, **common),
        }


@torch.inference_mode()
def stream_sweep(model, windows: torch.Tensor, family: Family, window: int = 1, batch_size: int = 8,
                 progress: bool = True) -> dict[str, BlockScores]:
    """Block influence and angular distance (windows of ``window`` blocks) from one forward sweep.

    Returns ``{"block_influence": BlockScores, "angular": BlockScores}``.
    """
    recorder = SweepRecorder(family, model.config, window)
    handles = recorder.attach(family.layers(model))
    device = _device(model)
    try:
        for b, batch in enumerate(tqdm(_batches(windows, batch_size), desc="block sweep", unit="batch",
                                       disable=not progress)):
            recorder.at_batch(b)
            model(input_ids=batch.to(device), use_cache=False, **_no_logits(model))
    finally:
        for h in handles:
            h.remove()
    return recorder.result()


# ---------------------------------------------------------------------------------------------
# One pass per block: KL divergence and LM-loss increase with the block removed
# ---------------------------------------------------------------------------------------------
def _loss_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of next-token cross-entropies. logits: [batch, seq, vocab] float32; ids: [batch, seq]."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum"))


class RemovalSums:
    """KL(full || without block i) and the LM-loss increase, summed batch by batch.

    `full` takes a batch's full-model logits, then `removed` the logits with each block removed, in
    any order of blocks; batches must come in order (a full forward per removed block, or block by
    block in `hyprune.stream`: the same floats either way).
    """

    def __init__(self, family: Family, config):
        self.kinds, self.family = family.block_kinds(config), family.name
        L = len(self.kinds)
        self.kl_sum, self.loss_sum = [0.0] * L, [0.0] * L
        self.tokens = self.loss_tokens = self.samples = 0
        self.ids = self.log_p = self.p = None
        self.base_loss = 0.0

    def full(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        logits = logits.float()  # [batch, seq, vocab]
        self.ids, self.log_p = ids, F.log_softmax(logits, dim=-1)
        self.p = self.log_p.exp()
        self.base_loss = _loss_sum(logits, ids)
        self.tokens += ids.numel()
        self.loss_tokens += ids[:, 1:].numel()
        self.samples += len(ids)

    def removed(self, i: int, logits: torch.Tensor) -> None:
        logits, p, log_p = logits.float(), self.p, self.log_p
        for r in range(len(self.ids)):  # one sample at a time: temporaries of [seq, vocab], not [batch, seq, vocab]
            log_q = F.log_softmax(logits[r], dim=-1)
            # p log(p / q), with 0 where p == 0 (a -inf logit would otherwise give 0 * nan)
            kl = torch.where(p[r] > 0, p[r] * (log_p[r] - log_q), torch.zeros((), device=p.device))
            self.kl_sum[i] += float(kl.sum(dtype=torch.float64))
        self.loss_sum[i] += _loss_sum(logits, self.ids) - self.base_loss

    def result(self) -> dict[str, BlockScores]:
        common = dict(kinds=self.kinds, family=self.family, samples=self.samples, tokens=self.tokens)
        return {
            "kl": BlockScores("kl", [s / self.tokens for s in self.kl_sum], **common),
            "lm_loss": BlockScores("lm_loss", [s / self.loss_tokens for s in self.loss_sum], **common),
        }


@torch.inference_mode()
def removal_sweep(model, windows: torch.Tensor, family: Family, batch_size: int = 8,
                  progress: bool = True) -> dict[str, BlockScores]:
    """KL divergence and LM-loss increase of the logits with each block removed, in one set of passes.

    Per batch: one full forward (its log-probabilities are kept for that batch only), then one forward
    per block with that block made the identity (`removed_block`). Returns ``{"kl": ..., "lm_loss": ...}``.
    Memory: about four [batch, seq, vocab] float32 tensors at a time; lower ``batch_size`` for large
    vocabularies.
    """
    layers = family.layers(model)
    batches = _batches(windows, batch_size)
    sums = RemovalSums(family, model.config)
    device = _device(model)
    bar = tqdm(total=len(batches) * len(layers), desc="block removal", unit="pass", disable=not progress)
    try:
        for batch in batches:
            ids = batch.to(device)
            sums.full(model(input_ids=ids, use_cache=False).logits, ids)
            for i, block in enumerate(layers):
                with removed_block(block):
                    sums.removed(i, model(input_ids=ids, use_cache=False).logits)
                bar.update(1)
    finally:
        bar.close()
    return sums.result()


def block_importance_all(model, windows: torch.Tensor, methods: Iterable[str] = METHODS,
                         family: Family | None = None, window: int = 1, batch_size: int = 8,
                         progress: bool = True) -> dict[str, BlockScores]:
    """Several methods at once, sharing sweeps: ``{method: BlockScores}`` for the methods asked for."""
    methods = list(dict.fromkeys(methods))
    for m in methods:
        check_method(m)
    family = family or family_for_config(model.config)
    out: dict[str, BlockScores] = {}
    if any(m in SWEEP_METHODS for m in methods):
        out.update(stream_sweep(model, windows, family, window=window, batch_size=batch_size, progress=progress))
    if any(m in REMOVAL_METHODS for m in methods):
        out.update(removal_sweep(model, windows, family, batch_size=batch_size, progress=progress))
    return {m: out[m] for m in methods}


def block_importance(model, windows: torch.Tensor, method: str = "block_influence", family: Family | None = None,
                     window: int = 1, batch_size: int = 8, progress: bool = True) -> BlockScores:
    """Importance of every block of ``model`` on ``windows`` ([num_samples, seq_len] token ids).

    Higher = more important, for every method. ``window`` (angular only) scores runs of that many
    consecutive blocks. See the module docstring for the definitions.
    """
    check_method(method)
    if window != 1 and method != "angular":
        raise HypruneError(f"A window of {window} blocks applies to the angular method only, not '{method}'.")
    return block_importance_all(model, windows, [method], family, window, batch_size, progress)[method]


# ---------------------------------------------------------------------------------------------
# Choosing blocks
# ---------------------------------------------------------------------------------------------
def protected_kinds(family: Family, config) -> tuple[str, ...]:
    """Kinds of which a depth plan chosen by count keeps at least one block, so the result still works.

    A NemotronH with no attention block (a Zamba2 with no hybrid layer) cannot generate with a cache in
    transformers 5.x (``DynamicCache.get_seq_length`` raises for a cache with only Mamba layers, and so
    does a plain forward with the config's default ``use_cache=True``): the family's ``keep_one`` kinds
    keep one block each, where the source has one.
    """
    kinds = family.block_kinds(config)
    return tuple(k for k in family.keep_one if k in kinds)


def _as_block_scores(scores) -> BlockScores:
    if isinstance(scores, BlockScores):
        return scores
    values = [float(s) for s in (scores.tolist() if isinstance(scores, torch.Tensor) else scores)]
    # Plain numbers: kinds unknown; "block" is a placeholder that no protection matches.
    return BlockScores("block_influence", values, ["block"] * len(values))


def _check_count(n: int, num_blocks: int) -> int:
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise HypruneError(f"The number of blocks to drop must be a whole number, got {n!r}.") from None
    if n < 1:
        raise HypruneError(f"--drop-blocks must be at least 1, got {n}.")
    if n >= num_blocks:
        raise HypruneError(
            f"--drop-blocks {n} would remove every block (the model has {num_blocks}); "
            f"drop at most {num_blocks - 1}."
        )
    return n


def _keeps_protected(kinds: list[str], dropped: set[int], keep_kinds: Sequence[str]) -> bool:
    kept = {kinds[i] for i in range(len(kinds)) if i not in dropped}
    return all(k in kept for k in keep_kinds if k in kinds)


def choose_blocks_to_drop(scores, n: int, mode: str = "lowest", keep_kinds: Sequence[str] = (),
                          never_kinds: Sequence[str] = ()) -> list[int]:
    """The ``n`` blocks to drop, sorted.

    Args:
        scores: a `BlockScores` (or a plain sequence of per-block scores; higher = more important).
        n: how many blocks to drop, 1 <= n < number of blocks.
        mode: ``lowest`` drops the n lowest-scored blocks (ties: the lower index goes first);
            ``contiguous`` drops the window of n consecutive blocks with the lowest summed score, or,
            for scores over windows of exactly n blocks (angular with ``window == n``), the window with
            the lowest score. Ties go to the earlier window.
        keep_kinds: kinds of which at least one block must survive (see `protected_kinds`).
        never_kinds: kinds that are never dropped (a family's ``undroppable(config)``).
    """
    result = _as_block_scores(scores)
    L = result.num_blocks
    n = _check_count(n, L)
    if mode not in MODES:
        raise HypruneError(f"Unknown depth mode '{mode}'. Use one of: {', '.join(MODES)}.")
    if any(math.isnan(s) for s in result.scores):
        raise HypruneError(f"The {result.method} block scores contain NaN; the model or data produced invalid values.")
    kinds = result.kinds
    if mode == "lowest":
        if result.window != 1:
            raise HypruneError(
                f"These {result.method} scores cover windows of {result.window} blocks; mode 'lowest' needs "
                "per-block scores (window 1). Use mode 'contiguous' with the same window, or rescore with window 1."
            )
        dropped: set[int] = set()
        for i in sorted(range(L), key=lambda j: (result.scores[j], j)):
            if len(dropped) == n:
                break
            if kinds[i] not in never_kinds and _keeps_protected(kinds, dropped | {i}, keep_kinds):
                dropped.add(i)
        if len(dropped) < n:
            raise HypruneError(f"Cannot drop {n} blocks while keeping one block of each of {list(keep_kinds)} "
                               f"and every block of kind {list(never_kinds)}.")
        return sorted(dropped)
    # contiguous
    if result.window == 1:
        window_score = [sum(result.scores[l : l + n]) for l in range(L - n + 1)]
    elif result.window == n:
        window_score = list(result.scores)
    else:
        raise HypruneError(
            f"These {result.method} scores cover windows of {result.window} blocks, but {n} contiguous blocks "
            f"are to be dropped. Rescore with window {n} (or 1)."
        )
    candidates = [l for l in range(L - n + 1) if _keeps_protected(kinds, set(range(l, l + n)), keep_kinds)
                  and not any(kinds[b] in never_kinds for b in range(l, l + n))]
    if not candidates:
        raise HypruneError(
            f"Every window of {n} consecutive blocks would remove the last {'/'.join(keep_kinds)} block or a "
            f"block of a kind that cannot be dropped ({'/'.join(never_kinds) or 'none'}). Drop fewer blocks, or use "
            "mode 'lowest'."
        )
    best = min(candidates, key=lambda l: (window_score[l], l))
    return list(range(best, best + n))


def drop_blocks_from_list(blocks: str | Iterable[int], num_blocks: int) -> list[int]:
    """Parse and check an explicit list (``"3,5,7"`` or ``[3, 5, 7]``); returns it sorted.

    Raises `HypruneError` for a non-integer, an out-of-range or a repeated index, an empty list, and
    a list that removes every block.
    """
    if isinstance(blocks, str):
        items = parse_block_list(blocks)
    else:
        items = list(blocks)
        for b in items:
            if isinstance(b, bool) or not isinstance(b, int):
                raise HypruneError(f"Block index {b!r} is not a whole number.")
    if not items:
        raise HypruneError("The list of blocks to drop is empty; name at least one block index.")
    bad = [b for b in items if not 0 <= b < num_blocks]
    if bad:
        raise HypruneError(
            f"Block indices {bad} do not exist: the model has {num_blocks} blocks (0..{num_blocks - 1})."
        )
    repeated = sorted({b for b in items if items.count(b) > 1})
    if repeated:
        raise HypruneError(f"Block indices {repeated} are listed more than once; list each block once.")
    if len(items) >= num_blocks:
        raise HypruneError(f"Dropping blocks {sorted(items)} would remove every block; keep at least one.")
    return sorted(items)


def with_dropped_blocks(plan: Plan | None, blocks: str | Iterable[int], family: Family, config) -> Plan:
    """A copy of ``plan`` (a width plan, or the identity plan when None) that also drops ``blocks``.

    Indices refer to the source model, like every index in a plan. Blocks the plan already drops are an
    error (say each block once). The result is validated against ``config``. Dropping the last
    attention block of a NemotronH warns: transformers cannot generate with a cache without one.
    """
    base = identity_plan(family, config) if plan is None else plan
    validate_plan(base, family, config)
    new = drop_blocks_from_list(blocks, len(base.layers))
    already = sorted(set(new) & set(base.drop_blocks))
    if already:
        raise HypruneError(f"The plan already drops blocks {already}; list only blocks it keeps.")
    result = base.model_copy(deep=True)
    result.drop_blocks = sorted(set(base.drop_blocks) | set(new))
    validate_plan(result, family, config)
    kinds = family.block_kinds(config)
    lost = [k for k in protected_kinds(family, config) if not _keeps_protected(kinds, set(result.drop_blocks), [k])]
    if lost:
        warnings.warn(
            f"The plan drops every {'/'.join(lost)} block. The pruned {family.name} model works with "
            "use_cache=False, but transformers cannot generate with a cache (or run with the config's "
            f"use_cache=True) without an attention block. Keep one {'/'.join(lost)} block to avoid this.",
            stacklevel=2,
        )
    return result


# ---------------------------------------------------------------------------------------------
# Saving, loading, printing
# ---------------------------------------------------------------------------------------------
def format_block_table(result: BlockScores) -> str:
    """The ranking table as plain text (rank 1 = most important)."""
    head = "window" if result.window > 1 else "block"
    lines = [f"{result.method} (higher = more important)", f"{head:>6}  {'kind':<22} {'score':>12}  rank"]
    for row in result.table():
        lines.append(f"{row['index']:>6}  {row['kind']:<22} {row['score']:>12.6g}  {row['rank']:>4}")
    return "\n".join(lines)


def save_block_scores(result: BlockScores, out_dir: str | Path) -> dict[str, Path]:
    """Write ``block_scores.json`` (the ranking table) and ``block_scores.png`` into ``out_dir``.

    The folder is created if missing; existing files of these names are replaced. Returns the paths
    written (no ``plot`` key when matplotlib is missing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / BLOCK_SCORES_FILE}
    atomic_write_json(written["json"], result.to_json())
    try:
        written["plot"] = block_scores_plot(result, out / BLOCK_PLOT_FILE)
    except ImportError:  # a broken or stripped matplotlib must not lose the scores
        warnings.warn("matplotlib is not installed: block_scores.png was not written "
                      "(pip install matplotlib to get the plot).", stacklevel=2)
    return written


def load_block_scores(path: str | Path, family: Family | None = None, config=None) -> BlockScores:
    """Read ``block_scores.json`` (or the folder holding it); check it against the model when given."""
    path = Path(path)
    file = path / BLOCK_SCORES_FILE if path.is_dir() else path
    if not file.is_file():
        raise HypruneError(
            f"No block scores at {path}: expected {BLOCK_SCORES_FILE} (written by `hyprune score --depth`)."
        )
    try:
        result = BlockScores.from_json(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise HypruneError(
            f"{file} is not a valid block-scores file ({e}). Rescore with `hyprune score --depth`."
        ) from None
    if family is not None and config is not None:
        kinds = family.block_kinds(config)
        if result.family != family.name or result.kinds != kinds:
            raise HypruneError(
                f"The block scores in {file} were made for another model ({result.family}, {len(result.kinds)} "
                f"blocks {result.kinds}); this model is {family.name} with {len(kinds)} blocks {kinds}. "
                "Score this model with `hyprune score --depth`."
            )
    return result


# ---------------------------------------------------------------------------------------------
# The public workflow (called by the CLI)
# ---------------------------------------------------------------------------------------------
def check_depth_request(family: Family, config, drop_blocks: int, method: str = "block_influence",
                        mode: str = "lowest", keep_kinds: Sequence[str] | None = None) -> None:
    """Everything about a depth request that can be checked from the config alone (before any weights)."""
    check_method(method)
    if mode not in MODES:
        raise HypruneError(f"Unknown depth mode '{mode}'. Use one of: {', '.join(MODES)}.")
    kinds = family.block_kinds(config)
    drop_blocks = _check_count(drop_blocks, len(kinds))
    keep = protected_kinds(family, config) if keep_kinds is None else tuple(keep_kinds)
    never = family.undroppable(config)
    free = sum(1 for k in kinds if k not in never)
    if free < drop_blocks:
        reasons = " ".join(f"{kind}: {why}" for kind, why in never.items())
        raise HypruneError(
            f"{family.name} can drop only its {', '.join(sorted(set(kinds) - set(never)))} blocks ({free} here), not "
            f"{drop_blocks}. {reasons}"
        )
    if family.depth_period is not None and family.depth_period(config) > 1:
        period = family.depth_period(config)
        if mode != "contiguous" or drop_blocks % period:
            raise HypruneError(
                f"{family.name} writes its layer pattern as a period of {period} layers, so only whole periods of "
                f"{period} consecutive layers can be dropped (every later layer must keep its kind). Use "
                f"--depth-mode contiguous with --drop-blocks a multiple of {period} (got {drop_blocks}, mode {mode}), "
                "or --drop-block-list with such runs."
            )
    if mode == "contiguous":
        ok = any(_keeps_protected(kinds, set(range(l, l + drop_blocks)), keep)
                 and not any(kinds[b] in never for b in range(l, l + drop_blocks))
                 for l in range(len(kinds) - drop_blocks + 1))
    else:
        droppable = sum(1 for k in kinds if k not in keep) + sum(kinds.count(k) - 1 for k in set(keep) if k in kinds)
        ok = droppable >= drop_blocks
    if not ok:
        raise HypruneError(
            f"Dropping {drop_blocks} {'contiguous ' if mode == 'contiguous' else ''}blocks of {kinds} would remove "
            f"the last {'/'.join(keep)} block, which {family.name} needs to generate with a cache. Drop fewer blocks"
            + (" or use --depth-mode lowest." if mode == "contiguous" else ".")
        )


def depth_plan(
    model,
    drop_blocks: int,
    method: str = "block_influence",
    mode: str = "lowest",
    windows: torch.Tensor | None = None,
    scores: BlockScores | str | Path | None = None,
    plan: Plan | None = None,
    batch_size: int = 8,
    keep_kinds: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[Plan, BlockScores]:
    """A validated plan that drops ``drop_blocks`` blocks of the loaded ``model`` (on top of ``plan``).

    Args:
        model: the loaded source model (the one ``plan`` and the scores were made for).
        drop_blocks: how many blocks to drop.
        method: depth importance method (`METHODS`); used when ``scores`` is None.
        mode: ``lowest`` or ``contiguous`` (see `choose_blocks_to_drop`). ``angular`` with
            ``contiguous`` scores windows of exactly ``drop_blocks`` blocks (Gromov et al.).
        windows: calibration token ids [num_samples, seq_len], needed when ``scores`` is None.
        scores: precomputed `BlockScores`, or a path to ``block_scores.json`` / its folder.
        plan: a width plan for this model; None starts from the identity plan. It must not drop blocks yet.
        keep_kinds: kinds that must keep a block; None = `protected_kinds` (NemotronH keeps one
            attention block so the result can generate with a cache); () = no protection.

    Scores are computed on the unpruned source model. Returns ``(plan, block_scores)``.
    """
    family = family_for_config(model.config)
    if scores is None:
        check_depth_request(family, model.config, drop_blocks, method, mode, keep_kinds)
        if windows is None:
            raise HypruneError("Depth scoring needs calibration text: pass --data FILE (or saved block scores).")
        scores = block_importance(model, windows, method, family, window=depth_window(method, mode, drop_blocks),
                                  batch_size=batch_size, progress=progress)
    return plan_from_block_scores(family, model.config, scores, drop_blocks, mode, plan, keep_kinds), scores


def depth_window(method: str, mode: str, drop_blocks: int) -> int:
    """Blocks per scored candidate: ``angular`` with ``contiguous`` scores windows of ``drop_blocks`` blocks."""
    return drop_blocks if (method == "angular" and mode == "contiguous") else 1


def plan_from_block_scores(family: Family, config, scores: BlockScores | str | Path, drop_blocks: int,
                           mode: str = "lowest", plan: Plan | None = None,
                           keep_kinds: Sequence[str] | None = None) -> Plan:
    """`depth_plan` from block scores already made (in memory, streamed, or a saved ``block_scores.json``)."""
    keep = protected_kinds(family, config) if keep_kinds is None else tuple(keep_kinds)
    if not isinstance(scores, BlockScores):
        scores = load_block_scores(scores, family, config)
    elif scores.kinds != family.block_kinds(config):
        raise HypruneError(f"The block scores were made for another layer pattern ({scores.kinds}).")
    check_depth_request(family, config, drop_blocks, scores.method, mode, keep)
    if plan is not None:
        validate_plan(plan, family, config)
        if plan.drop_blocks:
            raise HypruneError(f"The plan already drops blocks {plan.drop_blocks}; pass a plan without "
                               "drop_blocks together with --drop-blocks, or put every block into the plan.")
    blocks = choose_blocks_to_drop(scores, drop_blocks, mode, keep_kinds=keep,
                                   never_kinds=tuple(family.undroppable(config)))
    result = with_dropped_blocks(plan, blocks, family, config)
    base_method = "identity" if plan is None else plan.method
    depth = f"depth:{scores.method}/{mode}"
    result.method = depth if base_method == "identity" else f"{base_method}+{depth}"
    return result


__all__ = [
    "BLOCK_PLOT_FILE", "BLOCK_SCORES_FILE", "METHODS", "MODES", "BlockScores", "block_importance",
    "block_importance_all", "check_depth_request", "choose_blocks_to_drop", "depth_plan", "drop_blocks_from_list", "parse_block_list",
    "format_block_table", "load_block_scores", "protected_kinds", "removal_sweep",
    "RemovalSums", "check_method", "depth_window", "plan_from_block_scores", "removed_block", "save_block_scores", "SweepRecorder", "stream_sweep", "with_dropped_blocks",
]
