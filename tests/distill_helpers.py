"""Tiny models and windows for tests/test_distill.py, and the scripts its subprocess tests run.

    python tests/distill_helpers.py kill OUT        train, then hang half-way through writing step 6
    torchrun --nproc-per-node 2 tests/distill_helpers.py ddp OUT   DDP, FSDP2 and an FSDP2 resume

Models and data are rebuilt from seeds in every process, so a subprocess and the test agree on them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402

VOCAB = 64
HYBRID = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]

# Settings shared by the in-process and subprocess halves of the resume and distributed tests.
KILL_CONFIG = dict(tokens=8 * 4 * 16, seq_len=16, batch=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                   checkpoint_every=2, keep_last=2, eval_every=0, seed=7, progress=False)
DDP_CONFIG = dict(tokens=4 * 4 * 16, seq_len=16, batch=4, micro_batch=2, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                  checkpoint_every=2, keep_last=2, eval_every=0, seed=3, progress=False)


def tiny_config(**overrides) -> transformers.NemotronHConfig:
    kwargs = dict(vocab_size=VOCAB, hidden_size=24, layers_block_type=HYBRID, mamba_num_heads=4, mamba_head_dim=4,
                  n_groups=2, ssm_state_size=6, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, chunk_size=8, use_cache=False, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    return transformers.NemotronHConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides):
    """A seeded random tiny NemotronH (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(**overrides))
    return model.eval()


def teacher_and_student():
    """Teacher (hidden 24) and a different, narrower random student (hidden 16, fewer FFN neurons)."""
    return tiny_model(0), tiny_model(1, hidden_size=16, intermediate_size=24)


def random_windows(n: int, seq_len: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=g)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _kill_mode(out: str) -> None:
    """Train; when step 6 is half-written, say so and wait to be killed (SIGKILL from the test)."""
    import time

    from hyprune.distill import checkpoints as ckpt
    from hyprune.distill import distill

    original = ckpt._torch_save

    def save_then_hang(obj, path):
        original(obj, path)
        if "step-00000006" in str(path):
            print("HANGING", flush=True)
            time.sleep(600)

    ckpt._torch_save = save_then_hang
    teacher, student = teacher_and_student()
    distill(teacher, student, random_windows(12, 16), KILL_CONFIG, out)


def _ddp_mode(out: str) -> None:
    """DDP (distill creates the process group from torchrun's environment), then FSDP2 and an FSDP2 resume."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from hyprune.distill import distill

    windows = random_windows(10, 16, seed=5)
    teacher, student = teacher_and_student()
    distill(teacher, student, windows, DDP_CONFIG, f"{out}/ddp")
    assert dist.is_initialized() and dist.get_world_size() == 2  # kept for the next runs
    teacher, student = teacher_and_student()
    distill(teacher, student, windows, {**DDP_CONFIG, "fsdp": True}, f"{out}/fsdp")
    if dist.get_rank() == 0:  # roll a copy back to step 2 and resume it under FSDP2
        shutil.copytree(f"{out}/fsdp", f"{out}/fsdp_resumed")
        shutil.rmtree(f"{out}/fsdp_resumed/checkpoints/step-00000004")
        shutil.rmtree(f"{out}/fsdp_resumed/final")
        assert (Path(out) / "fsdp_resumed" / "checkpoints" / "step-00000002").is_dir()
    dist.barrier()
    teacher, student = teacher_and_student()
    distill(teacher, student, windows, {**DDP_CONFIG, "fsdp": True}, f"{out}/fsdp_resumed", resume=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "kill":
        _kill_mode(out)
    elif mode == "ddp":
        _ddp_mode(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
