"""`hyprune bench`: speed, memory and cache size of one model, or of two side by side.

What is measured, for every (batch size, context length), ``repeats`` times after ``warmup`` runs:

* **prefill**: one forward over ``[batch, context]`` random token ids with ``use_cache=True`` (the
  cache is built as in real generation; only the last position's logits are computed when the
  model accepts ``logits_to_keep``). Throughput = ``batch * context / seconds``.
* **decode**: ``decode_tokens`` greedy steps, one token per sequence per step, each a forward of
  ``[batch, 1]`` with the cache from the prefill. Throughput = ``batch * decode_tokens / seconds``;
  latency = ``seconds / decode_tokens`` (one step, i.e. one new token for every sequence).
* **peak memory** of one prefill + decode run, above what was allocated before it (activations,
  cache, workspace): on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
  on CPU the growth of the process's resident-set high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each run; without it, ``ru_maxrss``, which only shows new highs).
  ``peak_bytes = weights_bytes + peak_run_bytes`` is the model's own footprint, fair even when two
  models share the device. CPU figures are coarse: the allocator reuses freed pages, so they can
  read low.
* **cache bytes per sequence**, both computed from the config (`cache_bytes`, at every context
  length asked for) and summed over the real cache object's tensors after the prefill and after the
  decode (the two must agree; the report says whether they do).

Timings are medians over the repeats. With two models every measurement alternates between them
(A, B, A, B, ...) so drifting clocks, thermal state and background load hit both alike, and the
ratios ``B / A`` are taken within the same run.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from hyprune.compat import CachedDecoding
from hyprune.config import BenchConfig, LoadConfig, resolve
from hyprune.errors import HypruneError
from hyprune.io import atomic_write_json, check_output
from hyprune.kv import CompressedCache, enable
from hyprune.kv.model import Compressing
from hyprune.models import count_parameters, load_config, load_model, parse_dtype
from hyprune.parts import PARTS
from hyprune.parts.attention import kv_cache_bytes

CACHE_FORMULA = (
    "per sequence and layer: attention 2 (K and V) x kv_heads x head_dim x tokens x bytes(dtype), tokens = "
    "context (min(context, sliding_window - 1) for sliding-window layers); Mamba conv state (heads x head_dim "
    "+ 2 x groups x state) x conv_kernel x bytes(dtype), constant in context (transformers keeps the last "
    "conv_kernel inputs, not conv_kernel - 1); Mamba SSM state heads x head_dim x state x bytes(ssm_dtype), "
    "constant in context (float32, whatever the model dtype); Mamba-1 (Jamba) conv state inner x conv_kernel x "
    "bytes(dtype) and SSM state inner x state x bytes(ssm_dtype), inner = mamba_expand x hidden_size; a Zamba2 "
    "hybrid layer also caches K and V of its use of the shared attention. With --kv the attention layers hold "
    "what their DMC / DMS decisions kept: per KV head, its slots rounded up to pages of config.hyprune_kv.page, "
    "2 x head_dim x bytes(dtype) each (+ 4 bytes of DMC weight), and DMS's last window + 1 tokens; the "
    "uncompressed count is kept next to it"
)


# ---------------------------------------------------------------------------------------------
# Cache size: from the config, and from a real cache object
# ---------------------------------------------------------------------------------------------
def cache_bytes(config, family, context: int, dtype: torch.dtype | str = torch.float32,
                ssm_dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes of the generation cache of ONE sequence after ``context`` tokens, from the config alone.

    Returns ``{"attention", "mamba_conv", "mamba_ssm", "total"}``; see ``CACHE_FORMULA``. Attention
    KV grows linearly with ``context``; the Mamba conv and SSM states do not grow at all. The SSM
    state is kept in float32 by transformers' Mamba-2 scan (``ssm_dtype``), even in a bf16 model.
    """
    dtype = parse_dtype(dtype)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    size, ssm_size = _itemsize(dtype), _itemsize(ssm_dtype)
    out = {"attention": 0, "mamba_conv": 0, "mamba_ssm": 0}
    for i, kind in enumerate(family.block_kinds(config)):
        present = {part.kind for part in family.parts(kind)}
        for part_kind in (k for k in PARTS if k in present):
            for key, value in PARTS[part_kind].cache_bytes(config, family, i, context, size, ssm_size).items():
                out[key] += value
        if kind in family.shared_attention_kinds:  # an attention outside the parts (Zamba2's shared one)
            out["attention"] += kv_cache_bytes(config, family, i, context, size)
    out["total"] = sum(out.values())
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def measured_cache_bytes(cache) -> int:
    """Bytes held by every tensor of a real cache object (each storage counted once), all sequences."""
    seen, total = set(), 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.dim() > 0 and obj.numel() and obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for layer in getattr(cache, "layers", None) or [cache]:
        fields = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
        if isinstance(layer, Compressing):  # its keys and values live in the state's paged pools
            total += layer.bytes_allocated()
            fields.pop("state")  # the rest: a hybrid layer's own Mamba states
        walk(fields)
    return total


def kv_used_bytes(cache) -> int:
    """Bytes the compressed attention layers' decisions imply (pages in use, DMS rings), all sequences."""
    return sum(layer.bytes_used() for layer in getattr(cache, "layers", []) if isinstance(layer, Compressing))


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
class _PeakMemory:
    """Peak bytes allocated during a ``with`` block, above the level before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak = 0

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated (reset before each run), minus memory allocated before it"
        if _can_reset_hwm():
            return "CPU resident-set high-water mark VmHWM (reset via /proc/self/clear_refs), minus VmRSS before it"
        return "CPU ru_maxrss growth (cannot be reset: only runs that set a new process high show)"

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif _can_reset_hwm():
            _reset_hwm()
            self.base = _proc_status("VmRSS")
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif _can_reset_hwm():
            self.peak = _proc_status("VmHWM") - self.base
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        self.peak = max(0, int(self.peak))


_HWM_OK: bool | None = None


def _can_reset_hwm() -> bool:
    global _HWM_OK
    if _HWM_OK is None:
        try:
            _reset_hwm()
            _proc_status("VmHWM")
            _HWM_OK = True
        except (OSError, ValueError, AttributeError):
            _HWM_OK = False
    return _HWM_OK


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _measure_once(model, ids: torch.Tensor, decode_tokens: int, kv: bool = False) -> dict:
    """One prefill + greedy decode of ``ids`` ([batch, context] on the model's device); ``kv``: with the
    compressed cache."""
    device = ids.device
    decoding = CachedDecoding(model, (lambda: CompressedCache(model)) if kv else None)
    with _PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        token = decoding.prefill(ids).argmax(-1, keepdim=True)  # [batch, 1]
        _sync(device)
        t1 = time.perf_counter()
        after_prefill = measured_cache_bytes(decoding.cache)
        kv_prefill = kv_used_bytes(decoding.cache)
        _sync(device)
        t2 = time.perf_counter()
        for _ in range(decode_tokens):
            token = decoding.step(token).argmax(-1, keepdim=True)
        _sync(device)
        t3 = time.perf_counter()
        after_decode = measured_cache_bytes(decoding.cache)
        kv_decode = kv_used_bytes(decoding.cache)
        del decoding
    return {"prefill_s": t1 - t0, "decode_s": t3 - t2, "peak_run_bytes": mem.peak,
            "cache_after_prefill": after_prefill, "cache_after_decode": after_decode,
            "kv_after_prefill": kv_prefill, "kv_after_decode": kv_decode}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------
def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise HypruneError(f"--device '{device}' is not a device name (cpu, cuda, cuda:1, ...).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HypruneError(f"--device {device}: no CUDA device is available here. Use --device cpu.")
    return dev


def _weights_bytes(model) -> int:
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench(model_ids: str | Sequence[str], config: BenchConfig | None = None, *, out: str | os.PathLike | None = None,
          load: LoadConfig | None = None, overwrite: bool = False, progress: bool = False, **fields) -> dict:
    """Benchmark one model, or compare several (the first is the baseline), in one process.

    Returns (and writes as JSON to ``out``) ``{"models": [...], "ratios": [...], ...}``: per model its
    parameters (`hyprune.models.count_parameters`), weight bytes, analytic cache bytes per sequence at
    every context length, and one row per (batch size, context) with median prefill tokens/s, decode
    tokens/s, ms per decode step, peak memory, and measured vs analytic cache bytes; per later model,
    its ratios to the first measured in the same run. See the module docstring for the methods.
    ``fields`` are `BenchConfig` fields (batch_sizes, context_lengths, decode_tokens, repeats, warmup,
    seed) and `LoadConfig` fields (dtype, device, allow_pickle, trust_remote_code, gguf_file).
    """
    model_ids = [model_ids] if isinstance(model_ids, (str, os.PathLike)) else list(model_ids)
    if not model_ids:
        raise HypruneError("Pass at least one MODEL to benchmark.")
    config, load = resolve("bench", fields, (BenchConfig, config), (LoadConfig, load))
    config = config.model_copy(update={"batch_sizes": list(dict.fromkeys(config.batch_sizes)),
                                       "context_lengths": list(dict.fromkeys(config.context_lengths))})
    torch_dtype, dev, vocab = _check_request(model_ids, config, load, out, overwrite)
    models, entries = _load_models(model_ids, config, load, torch_dtype, dev)
    _measure_all(models, entries, config, vocab, dev, torch_dtype, progress)
    names = [entry["name"] for entry in entries]
    for entry in entries:
        entry.pop("_family")
        if names.count(entry["name"]) > 1:  # two folders of the same name: the table needs the full paths
            entry["name"] = entry["model"]
    result = {
        "device": str(dev), "device_name": _device_name(dev), "dtype": str(torch_dtype).replace("torch.", ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_sizes": config.batch_sizes,
        "context_lengths": config.context_lengths, "decode_tokens": config.decode_tokens,
        "repeats": config.repeats, "warmup": config.warmup,
        "schedule": "interleaved: for each (batch, context), warmup then repeats, each visiting every model in turn",
        "memory_method": _PeakMemory.method(dev), "cache_formula": CACHE_FORMULA,
        "models": entries, "ratios": [_ratios(entries[0], other) for other in entries[1:]],
    }
    if out is not None:
        atomic_write_json(out, result)
    return result


def _check_request(model_ids: list, config: BenchConfig, load: LoadConfig, out, overwrite: bool):
    """dtype, device, configs and output, before any weights: (torch dtype, device, shared vocabulary size)."""
    torch_dtype = parse_dtype(load.dtype)
    if not isinstance(torch_dtype, torch.dtype):
        raise HypruneError("bench needs an explicit --dtype (float32, bfloat16 or float16), not 'auto'.")
    dev = _resolve_device(load.device)
    configs = [load_config(m, **load.source()) for m in model_ids]
    vocab = min(int(c.vocab_size) for c, _ in configs)
    longest = max(config.context_lengths) + config.decode_tokens
    for m, (model_config, _) in zip(model_ids, configs):
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit and longest > limit:
            warnings.warn(f"{m}: context {max(config.context_lengths)} + {config.decode_tokens} decode tokens "
                          f"exceeds its max_position_embeddings ({limit}); timings there describe an untrained "
                          "range.", stacklevel=3)
    if out is not None:
        check_output(out, "file", overwrite, inputs=tuple(model_ids))
    return torch_dtype, dev, vocab


def _load_models(model_ids: list, config: BenchConfig, load: LoadConfig, torch_dtype, dev):
    """Every model, all resident at once so that runs can alternate, and its entry of the result."""
    models, entries = [], []
    load_kwargs = load.model_dump(exclude={"model", "dtype", "device", "device_map", "stream"})
    for m in model_ids:
        # on the CPU from_pretrained's default placement is right; device_map="cpu" would need accelerate
        model, family = load_model(m, dtype=torch_dtype, device=None if dev.type == "cpu" else str(dev),
                                   **load_kwargs)
        model.eval()
        if config.kv:
            enable(model)  # refuses a model without config.hyprune_kv, before any measurement
        models.append(model)
        contexts = sorted(set(config.context_lengths) | {c + config.decode_tokens for c in config.context_lengths})
        cache_rows = [{"context": c, **cache_bytes(model.config, family, c, torch_dtype)} for c in contexts]
        entries.append({"model": str(m), "name": Path(str(m)).name or str(m), "family": family.name,
                        "parameters": count_parameters(model, family), "weights_bytes": _weights_bytes(model),
                        "cache_bytes_per_sequence": cache_rows, "runs": [], "_family": family,
                        **({"kv": model.config.hyprune_kv} if config.kv else {})})
    return models, entries


def _measure_all(models: list, entries: list, config: BenchConfig, vocab: int, dev, torch_dtype,
                 progress: bool) -> None:
    """The measurements, interleaved: for each (batch, context), warmup then repeats, each visiting every model."""
    generator = torch.Generator().manual_seed(config.seed)
    warmup, repeats = config.warmup, config.repeats
    for batch in config.batch_sizes:
        for context in config.context_lengths:
            ids = torch.randint(0, vocab, (batch, context), generator=generator).to(dev)
            samples: list[list[dict]] = [[] for _ in models]
            for r in range(warmup + repeats):
                for i, model in enumerate(models):
                    if progress:
                        print(f"bench {entries[i]['name']} batch={batch} context={context} "
                              f"{'warmup' if r < warmup else f'repeat {r - warmup + 1}/{repeats}'}",
                              file=sys.stderr, flush=True)
                    sample = _measure_once(model, ids, config.decode_tokens, config.kv)
                    if r >= warmup:
                        samples[i].append(sample)
            for entry, model, runs in zip(entries, models, samples):
                entry["runs"].append(_summarize(runs, entry, model, batch, context, config.decode_tokens,
                                                torch_dtype))
            del ids


def _summarize(runs: list[dict], entry: dict, model, batch: int, context: int, decode_tokens: int, dtype) -> dict:
    prefill = statistics.median(r["prefill_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    peak_run = max(r["peak_run_bytes"] for r in runs)
    family = entry["_family"]
    formula_prefill = cache_bytes(model.config, family, context, dtype)
    formula_decode = cache_bytes(model.config, family, context + decode_tokens, dtype)
    analytic_prefill, analytic_decode = formula_prefill["total"], formula_decode["total"]
    kv = {}
    if entry.get("kv"):
        # compressed: the attention part is what the decisions kept (the last run's), the rest the formula's
        analytic_prefill += runs[-1]["kv_after_prefill"] // batch - formula_prefill["attention"]
        analytic_decode += runs[-1]["kv_after_decode"] // batch - formula_decode["attention"]
        kv = {"uncompressed_analytic": formula_prefill["total"],
              "uncompressed_after_decode_analytic": formula_decode["total"]}
    measured_prefill = runs[-1]["cache_after_prefill"] // batch
    measured_decode = runs[-1]["cache_after_decode"] // batch
    return {
        "batch_size": batch, "context": context,
        "prefill_s": prefill, "prefill_tokens_per_s": batch * context / prefill,
        "decode_s": decode, "decode_tokens_per_s": batch * decode_tokens / decode,
        "decode_ms_per_token": 1000 * decode / decode_tokens,
        "peak_run_bytes": peak_run, "peak_bytes": entry["weights_bytes"] + peak_run,
        "cache_bytes_per_sequence": {
            "context": context, "analytic": analytic_prefill, "measured": measured_prefill,
            "after_decode_analytic": analytic_decode, "after_decode_measured": measured_decode,
            "match": analytic_prefill == measured_prefill and analytic_decode == measured_decode, **kv,
        },
        "samples": {"prefill_s": [r["prefill_s"] for r in runs], "decode_s": [r["decode_s"] for r in runs]},
    }


RATIO_KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "peak_bytes", "peak_run_bytes")


def _ratios(base: dict, other: dict) -> dict:
    """``other / base`` for every number measured in the same run (above 1: other is larger)."""
    def div(a, b):
        return a / b if b else None

    runs = []
    for r_base, r_other in zip(base["runs"], other["runs"]):
        row = {"batch_size": r_base["batch_size"], "context": r_base["context"]}
        row.update({k: div(r_other[k], r_base[k]) for k in RATIO_KEYS})
        row["cache_bytes_per_sequence"] = div(r_other["cache_bytes_per_sequence"]["analytic"],
                                              r_base["cache_bytes_per_sequence"]["analytic"])
        runs.append(row)
    cache = [{"context": a["context"], "total": div(b["total"], a["total"])}
             for a, b in zip(base["cache_bytes_per_sequence"], other["cache_bytes_per_sequence"])]
    return {"model": other["model"], "baseline": base["model"],
            "parameters": div(other["parameters"]["total"], base["parameters"]["total"]),
            "weights_bytes": div(other["weights_bytes"], base["weights_bytes"]),
            "cache_bytes_per_sequence": cache, "runs": runs}


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _num(value: float) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def format_bench_table(result: dict) -> str:
    """A markdown table: one column per model, then one ``B/A`` ratio column per later model."""
    models, ratios = result["models"], result["ratios"]
    names = [m["name"] for m in models]
    header = ["metric", *names, *(f"{n} / {names[0]}" for n in names[1:])]
    rows = [["parameters", *(_num(m["parameters"]["total"]) for m in models),
             *(f"{r['parameters']:.3f}" for r in ratios)],
            ["weights", *(_bytes(m["weights_bytes"]) for m in models), *(f"{r['weights_bytes']:.3f}" for r in ratios)]]
    for i, point in enumerate(models[0]["cache_bytes_per_sequence"]):
        rows.append([f"cache / sequence @ {point['context']}", *(_bytes(m["cache_bytes_per_sequence"][i]["total"])
                                                                 for m in models),
                     *(_ratio(r["cache_bytes_per_sequence"][i]["total"]) for r in ratios)])
    metrics = (("prefill tok/s", "prefill_tokens_per_s", _num), ("decode tok/s", "decode_tokens_per_s", _num),
               ("decode ms/token", "decode_ms_per_token", lambda v: f"{v:.3g}"), ("peak memory", "peak_bytes", _bytes))
    for j, run in enumerate(models[0]["runs"]):
        where = f"(batch {run['batch_size']}, context {run['context']})"
        for label, key, fmt in metrics:
            rows.append([f"{label} {where}", *(fmt(m["runs"][j][key]) for m in models),
                         *(_ratio(r["runs"][j][key]) for r in ratios)])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = (f"{result['device']} ({result['device_name']}), {result['dtype']}, {result['threads']} threads; "
             f"medians of {result['repeats']} repeats after {result['warmup']} warmup, models interleaved; "
             f"{result['decode_tokens']} decode tokens. Peak memory: weights + {result['memory_method']}.")
    mismatched = [f"{m['name']} (batch {r['batch_size']}, context {r['context']})" for m in models for r in m["runs"]
                  if not r["cache_bytes_per_sequence"]["match"]]
    if mismatched:
        notes += " Measured cache differs from the formula for: " + ", ".join(mismatched) + "."
    return "\n".join(lines) + "\n\n" + notes


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
