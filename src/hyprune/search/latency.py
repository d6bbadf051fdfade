"""A latency model fitted on the current device: measure a handful of shapes, predict the rest.

Every shape's latency is modelled as a sum of per-component costs::

    ms = c0 + c_mamba * mamba blocks + c_attention * attention blocks + c_mlp * MLP blocks
            + c_param * parameters outside the embedding table (millions)

The block terms carry what a block costs whatever its width (kernel launches, Python, the scan's
sequential work); the parameter term carries the matrix products, whose cost grows with the weights
read (decode) or the FLOPs (prefill). The coefficients come from non-negative least squares over shapes measured
with `hyprune.evaluate.bench` (random weights: speed does not depend on their values), all in one
interleaved run so background load hits every shape alike. A third of the measured shapes are held
out of the fit and predicted, which gives the model's error; the final model is fitted on all of them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from hyprune.arch.family import ATTENTION, MAMBA, MLP, Family
from hyprune.errors import HypruneError
from hyprune.evaluate import bench
from hyprune.search.counting import count_parameters, shaped_config
from hyprune.search.space import Candidate, blocks_to_drop

FEATURES = ("constant", "mamba_blocks", "attention_blocks", "mlp_blocks", "parameters_millions")
METRICS = ("decode", "prefill")


def features(family: Family, config, candidate: Candidate) -> list[float]:
    """The model's inputs for one shape (see the module docstring)."""
    kinds = family.block_kinds(config)
    dropped = set(blocks_to_drop(kinds, candidate.drop))
    kept = [k for i, k in enumerate(kinds) if i not in dropped]
    parts = [part.kind for kind in kept for part in family.parts(kind)]
    params = count_parameters(family, config, candidate.sizes, kept)
    return [1.0, parts.count(MAMBA), parts.count(ATTENTION), parts.count(MLP),
            (params["total"] - params["embeddings"]) / 1e6]


@dataclass
class LatencyModel:
    """Fitted per-component costs (ms) and how well they predicted held-out shapes."""

    metric: str
    batch: int
    context: int
    coefficients: list[float]
    measured: list[dict] = field(default_factory=list)  # id, features, measured_ms, held_out, predicted_ms
    held_out_error: dict = field(default_factory=dict)  # mean / max absolute relative error
    device: str = ""

    def predict(self, x: list[float]) -> float:
        return float(np.dot(self.coefficients, x))

    def to_json(self) -> dict:
        data = asdict(self)
        data["features"] = list(FEATURES)
        data["costs_ms"] = dict(zip(FEATURES, self.coefficients))
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LatencyModel":
        return cls(**{k: data[k] for k in ("metric", "batch", "context", "coefficients", "measured",
                                           "held_out_error", "device")})


def fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares (a cost cannot be negative), over the features that vary among the
    measured shapes; a feature that does not vary is folded into the constant (coefficient 0)."""
    from scipy.optimize import nnls  # scipy loads in ~0.5 s; only a latency fit needs it

    varies = np.ptp(x, axis=0) > 0
    varies[0] = True  # the constant
    coefficients = np.zeros(x.shape[1])
    coefficients[varies], _ = nnls(x[:, varies], y)
    return coefficients


def pick_shapes(candidates: list[Candidate], count: int) -> list[Candidate]:
    """``count`` shapes that span the space: the drop patterns in turn, each evenly spread in size."""
    if count < 3:
        raise HypruneError(f"--latency-shapes must be at least 3 (fit and held-out), got {count}.")
    groups: dict[str, list[Candidate]] = {}
    for c in sorted(candidates, key=lambda c: (c.parameters, c.id)):
        groups.setdefault(json.dumps(c.drop, sort_keys=True), []).append(c)
    per_group = -(-count // len(groups))
    spread = []
    for members in groups.values():
        idx = np.unique(np.linspace(0, len(members) - 1, min(per_group, len(members))).round().astype(int))
        spread.append([members[i] for i in idx])
    interleaved = [c for row in itertools.zip_longest(*spread) for c in row if c is not None]
    return interleaved[:count]


def measure(family: Family, config, shapes: list[Candidate], metric: str = "decode", batch: int = 1,
            context: int = 128, decode_tokens: int = 16, repeats: int = 3, dtype: str = "float32",
            device: str | None = None, workdir: str | Path | None = None,
            progress: bool = True) -> tuple[list[float], str]:
    """Milliseconds per decode step (or per prefill) of every shape, in one interleaved `bench` run."""
    if metric not in METRICS:
        raise HypruneError(f"--latency-metric must be one of {', '.join(METRICS)}, got '{metric}'.")
    kinds = family.block_kinds(config)
    tmp = Path(tempfile.mkdtemp(prefix="hyprune-latency-", dir=workdir))
    try:
        paths = []
        for i, c in enumerate(shapes):
            dropped = set(blocks_to_drop(kinds, c.drop))
            shaped = shaped_config(family, config, c.sizes, [b for b in range(len(kinds)) if b not in dropped])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(i)
                model = AutoModelForCausalLM.from_config(shaped)
            path = tmp / f"shape-{i}"
            model.save_pretrained(path)
            paths.append(str(path))
            del model
        result = bench(paths, batch_sizes=[batch], context_lengths=[context], decode_tokens=decode_tokens,
                       repeats=repeats, device=device, dtype=dtype, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    key = "decode_ms_per_token" if metric == "decode" else "prefill_s"
    scale = 1.0 if metric == "decode" else 1000.0
    values = [m["runs"][0][key] * scale for m in result["models"]]
    return values, f"{result['device']} ({result['device_name']}), {result['dtype']}, {result['threads']} threads"


def build(family: Family, config, candidates: list[Candidate], shapes: int = 10, metric: str = "decode",
          batch: int = 1, context: int = 128, hold_out_every: int = 3, progress: bool = True,
          **measure_kwargs) -> LatencyModel:
    """Measure ``shapes`` shapes picked from ``candidates``, fit, and report the held-out error.

    Every ``hold_out_every``-th measured shape is left out of a first fit and predicted (the error
    report); the returned model is refitted on all of them.
    """
    picked = pick_shapes(candidates, shapes)
    times, device = measure(family, config, picked, metric, batch, context, progress=progress, **measure_kwargs)
    x = np.array([features(family, config, c) for c in picked])
    y = np.array(times)
    # picked shapes run through the drop patterns in turn: hold out along a diagonal, so that every
    # pattern keeps shapes in the fit (a pattern held out whole would leave its block counts unfitted)
    patterns = len({json.dumps(c.drop, sort_keys=True) for c in picked})
    held = np.array([(i // patterns + i % patterns) % hold_out_every == hold_out_every - 1
                     for i in range(len(picked))])
    model = LatencyModel(metric, batch, context, [], device=device)
    if held.any() and (~held).sum() >= 2:
        partial = fit(x[~held], y[~held])
        predicted = x @ partial
        errors = np.abs(predicted[held] - y[held]) / y[held]
        model.held_out_error = {"shapes": int(held.sum()), "fitted_on": int((~held).sum()),
                                "mean_abs_rel_error": float(errors.mean()), "max_abs_rel_error": float(errors.max())}
    else:
        predicted = np.full(len(y), np.nan)
    model.coefficients = [float(v) for v in fit(x, y)]
    model.measured = [{"id": c.id, "features": x[i].tolist(), "measured_ms": float(y[i]), "held_out": bool(held[i]),
                       "predicted_ms_held_out_fit": None if np.isnan(predicted[i]) else float(predicted[i])}
                      for i, c in enumerate(picked)]
    return model


def add_latency(model: LatencyModel, family: Family, config, candidates: list[Candidate]) -> None:
    for c in candidates:
        c.metrics["latency_ms"] = model.predict(features(family, config, c))
