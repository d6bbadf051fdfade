#!/usr/bin/env python
"""Write a random-weight NemotronH checkpoint with the shape of Nemotron-H-8B-Base (or a smaller preset) as
safetensors shards, without ever building the model in memory (issue 13: models larger than memory).

Why: the streamed path (``hyprune.stream``) must score and prune an 8B model in <= 3 GB of RSS. Downloading
the real 16 GB checkpoint is not possible on a CI machine, and its weights do not matter for memory and time,
only its tensor names, shapes and dtype do. So this script takes the names and shapes from a
``NemotronHForCausalLM`` built on the meta device, draws every tensor with its own seeded generator (the same
bytes whatever the shard size) and writes one shard at a time: the peak RSS is about one shard plus the largest
tensor in float32 (~7.5 GB for the 8B shape with 5 GB shards).

The 8B shape is the published ``nvidia/Nemotron-H-8B-Base-8K`` config: 52 blocks with
``hybrid_override_pattern`` ``M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-`` (24 Mamba-2, 24 MLP,
4 attention), hidden 4096, FFN 21504 (relu2), 128 Mamba heads x 64 in 8 groups, SSM state 128, conv kernel 4,
32 attention heads / 8 KV heads of 128, vocab 131072, untied lm_head: 8,100,852,736 parameters (16.2 GB bf16).
Tensors are named as in the published checkpoints (``backbone.layers.N...``, ``backbone.norm_f``, ``lm_head``),
not as the transformers module (``model.``), which renames them on load.

Presets (all with the same 52-block pattern, 8 B/C groups, state 128, Mamba head_dim 64, attention head_dim 128,
vocab 131072, so only the widths differ):

* ``8b``:   the shape above.
* ``1b``:   hidden 1536, FFN 3072, 48 Mamba heads, 12 attention heads / 3 KV (~1.07B; gpu_check.py uses it).
* ``500m``: hidden 768, FFN 4032, 24 Mamba heads, 6 attention heads / 2 KV (~0.48B).

``--scale F`` (or ``--hidden H``, which sets F = H / preset hidden) shrinks a preset: FFN, Mamba heads and
attention / KV heads scale by F (Mamba heads rounded to a multiple of the groups, at least one per group);
``--layers N`` keeps the first N characters of the pattern. Any single field can be overridden too.

The tokenizer is the reference teacher's (``../shared/models/tiny-nemotron-h``, 4096 BPE tokens): its ids
are all < 4096 <= vocab_size, so every window it produces is a valid input of the random model.

    python benchmarks/make_nemotron_8b.py --out benchmarks/out/nemotron-h-8b-random          # 16.2 GB, 4 shards
    python benchmarks/make_nemotron_8b.py --preset 500m --out benchmarks/out/nemotron-h-500m-random
    python benchmarks/make_nemotron_8b.py --hidden 256 --layers 8 --vocab 8192 --out /tmp/tiny --check
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / ".." / "shared" / "models" / "tiny-nemotron-h"
PATTERN_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

COMMON = dict(hybrid_override_pattern=PATTERN_8B, n_groups=8, ssm_state_size=128, mamba_head_dim=64,
              head_dim=128, vocab_size=131072, conv_kernel=4, max_position_embeddings=8192,
              tie_word_embeddings=False, mlp_hidden_act="relu2", layer_norm_epsilon=1e-5)
PRESETS: dict[str, dict] = {
    "8b": dict(COMMON, hidden_size=4096, intermediate_size=21504, mamba_num_heads=128,
               num_attention_heads=32, num_key_value_heads=8),
    "1b": dict(COMMON, hidden_size=1536, intermediate_size=3072, mamba_num_heads=48,
               num_attention_heads=12, num_key_value_heads=3),
    "500m": dict(COMMON, hidden_size=768, intermediate_size=4032, mamba_num_heads=24,
                 num_attention_heads=6, num_key_value_heads=2),
}
# command-line override -> NemotronHConfig field
OVERRIDES = {"intermediate": "intermediate_size", "mamba_heads": "mamba_num_heads", "mamba_head_dim": "mamba_head_dim",
             "n_groups": "n_groups", "ssm_state": "ssm_state_size", "attn_heads": "num_attention_heads",
             "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab": "vocab_size"}


def _round_to(x: float, multiple: int, least: int) -> int:
    """``x`` rounded to a multiple of ``multiple``, at least ``least``."""
    return max(least, multiple * round(x / multiple))


def shape_fields(preset: str, scale: float = 1.0, hidden: int | None = None, layers: int | None = None,
                 **overrides: int | None) -> dict:
    """The ``NemotronHConfig`` keyword arguments of ``preset`` shrunk by ``scale`` (or to ``hidden``) and cut to
    the first ``layers`` blocks of its pattern; ``overrides`` (names of `OVERRIDES`) win over everything."""
    fields = dict(PRESETS[preset])
    base = fields["hidden_size"]
    if hidden is not None:
        scale = hidden / base
    if scale != 1.0:
        groups = int(overrides.get("n_groups") or fields["n_groups"])
        kv = max(1, round(fields["num_key_value_heads"] * scale))
        q_per_kv = fields["num_attention_heads"] // fields["num_key_value_heads"]
        fields.update(hidden_size=hidden or _round_to(base * scale, 64, 64),
                      intermediate_size=_round_to(fields["intermediate_size"] * scale, 64, 64),
                      mamba_num_heads=_round_to(fields["mamba_num_heads"] * scale, groups, groups),
                      num_key_value_heads=kv, num_attention_heads=kv * q_per_kv)
    if layers is not None:
        if not 1 <= layers <= len(fields["hybrid_override_pattern"]):
            raise SystemExit(f"--layers must be 1..{len(fields['hybrid_override_pattern'])}, got {layers}")
        fields["hybrid_override_pattern"] = fields["hybrid_override_pattern"][:layers]
    for option, field in OVERRIDES.items():
        if overrides.get(option) is not None:
            fields[field] = int(overrides[option])
    fields["num_hidden_layers"] = len(fields["hybrid_override_pattern"])
    return fields


def teacher_token_ids(teacher: Path = TEACHER) -> dict[str, int]:
    """bos / eos / pad ids of the reference teacher's config (they go with its tokenizer); {} if it is absent."""
    try:
        config = json.loads((teacher / "config.json").read_text())
    except OSError:
        return {}
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}


def make_config(fields: dict):
    """A ``transformers.NemotronHConfig`` from `shape_fields` output (bfloat16 recorded as the checkpoint dtype)."""
    from transformers import NemotronHConfig

    config = NemotronHConfig(**fields, **teacher_token_ids())
    config.architectures = ["NemotronHForCausalLM"]
    config.dtype = "bfloat16"
    return config


def checkpoint_name(name: str) -> str:
    """The name a tensor has in a published NemotronH checkpoint: ``backbone.`` where the transformers module
    says ``model.`` (transformers renames on load and back on save; the reference teacher and
    nvidia/Nemotron-H-8B-Base-8K store ``backbone.*``, so the streamed path must read those names)."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of every tensor, in state-dict order, from a model on the meta device (no
    memory): exactly the keys ``from_pretrained`` expects, as a published checkpoint spells them."""
    from transformers import NemotronHForCausalLM

    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    return [(checkpoint_name(name), tuple(t.shape)) for name, t in model.state_dict().items()]


def parameter_count(specs: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in specs)


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed of its own for every tensor, so that its values do not depend on the shard layout."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def init_tensor(name: str, shape: tuple[int, ...], config, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One tensor as a trained-looking init would draw it (float32 drawn, then cast to ``dtype``).

    Norm weights and D are ones; A_log = log(1..heads) (HF's init); dt_bias = softplus^-1 of a log-uniform dt
    in [time_step_min, time_step_max]; conv1d uniform +-1/sqrt(kernel); the projections that write into the
    residual stream (out_proj, o_proj, down_proj) normal with std 0.02/sqrt(2 layers) (GPT-2 scheme), every
    other matrix normal with std 0.02, biases zero.
    """
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
    if leaf == "A_log":
        out = torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
    elif leaf == "D" or (leaf.endswith("norm") or leaf == "norm_f") and name.endswith(".weight"):
        out = torch.ones(shape)
    elif leaf == "dt_bias":
        lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
        dt = torch.exp(torch.rand(shape, generator=g) * (hi - lo) + lo).clamp(min=config.time_step_floor)
        out = dt + torch.log(-torch.expm1(-dt))
    elif leaf == "conv1d":
        bound = 1.0 / math.sqrt(config.conv_kernel)
        out = torch.rand(shape, generator=g).mul_(2 * bound).sub_(bound)
    elif name.endswith(".bias"):
        out = torch.zeros(shape)
    else:
        std = 0.02 / math.sqrt(2 * config.num_hidden_layers) if leaf in ("out_proj", "o_proj", "down_proj") else 0.02
        out = torch.randn(shape, generator=g).mul_(std)
    return out.to(dtype)


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int,
                itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors cut into consecutive shards of at most ``shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_shards(out: Path, config, specs, seed: int, shard_bytes: int, dtype: torch.dtype,
                 progress: bool = True) -> dict:
    """Draw and write the shards one at a time, then ``model.safetensors.index.json``; returns the index."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(specs, shard_bytes, itemsize)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        t0 = time.perf_counter()
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: init_tensor(name, shape, config, seed, dtype) for name, shape in shard}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        nbytes = sum(t.numel() * itemsize for t in tensors.values())
        total += nbytes
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
        if progress:
            print(f"  {file}: {len(shard)} tensors, {nbytes / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total, "total_parameters": parameter_count(specs)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def copy_tokenizer(out: Path, teacher: Path = TEACHER) -> list[str]:
    """The reference teacher's tokenizer files (ids < 4096, inside any vocab of this script's presets)."""
    copied = []
    for name in TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copyfile(teacher / name, out / name)
            copied.append(name)
    return copied


def check_loads(out: Path) -> dict:
    """``from_pretrained`` of the written folder: missing / unexpected / mismatched keys (all must be empty),
    and every loaded tensor equal to the file's (nothing re-initialised). Loads every weight: small models only."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    state = {checkpoint_name(k): v for k, v in model.state_dict().items()}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            changed = [k for k in f.keys() if not torch.equal(f.get_tensor(k), state[k])]
        if changed:
            problems.setdefault("changed_on_load", []).extend(changed)
    return {"parameters": model.num_parameters(), "problems": problems}


def generate(out: str | Path, fields: dict, seed: int = 0, shard_gb: float = 5.0, dtype: torch.dtype = torch.bfloat16,
             overwrite: bool = False, progress: bool = True) -> dict:
    """Write the whole checkpoint (config, shards, index, tokenizer) to ``out``; returns a summary.

    The other benchmarks (bench_stream.py, gpu_check.py) call this to make their random models.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = make_config(fields)
    config.save_pretrained(out)
    specs = tensor_specs(config)
    index = write_shards(out, config, specs, seed, int(shard_gb * 1e9), dtype, progress)
    tokenizer = copy_tokenizer(out)
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"out": str(out), "parameters": index["metadata"]["total_parameters"], "tensors": len(specs),
            "shards": len(set(index["weight_map"].values())), "bytes_on_disk": disk, "seconds": time.perf_counter() - t0,
            "dtype": str(dtype).removeprefix("torch."), "seed": seed, "tokenizer_files": tokenizer,
            "config": {k: fields[k] for k in sorted(fields)}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (created; must be empty unless --overwrite)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="8b")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (1e9 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--scale", type=float, default=1.0, help="width multiplier of the preset (see the docstring)")
    p.add_argument("--hidden", type=int, help="hidden size (sets --scale to hidden / preset hidden)")
    p.add_argument("--layers", type=int, help="keep the first N blocks of the pattern")
    for option in OVERRIDES:
        p.add_argument("--" + option.replace("_", "-"), type=int, help=f"override {OVERRIDES[option]}")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--check", action="store_true", help="from_pretrained the result (small models only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    fields = shape_fields(args.preset, args.scale, args.hidden, args.layers,
                          **{k: getattr(args, k) for k in OVERRIDES})
    summary = generate(args.out, fields, args.seed, args.shard_gb, getattr(torch, args.dtype), args.overwrite)
    print(f"wrote {summary['out']}: {summary['parameters']:,} parameters ({summary['dtype']}), {summary['tensors']} "
          f"tensors in {summary['shards']} shards, {summary['bytes_on_disk'] / 1e9:.2f} GB on disk, "
          f"{summary['seconds']:.1f} s ({torch.get_num_threads()} threads); tokenizer: "
          f"{', '.join(summary['tokenizer_files']) or 'none found'}")
    if args.check:
        check = check_loads(Path(args.out))
        summary["check"] = check
        print(f"from_pretrained: {check['parameters']:,} parameters; "
              f"{'no missing / unexpected / mismatched keys' if not check['problems'] else check['problems']}")
        if check["problems"]:
            sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
