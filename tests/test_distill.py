"""Distillation: losses against hand computations, the loop, resume after SIGKILL, corrupt and partial
checkpoints, NaN and full-disk handling, vocabulary checks, 2-process gloo == 1 process, top-k cache.

Models are tiny random NemotronH built from seeds (tests/distill_helpers.py), so a subprocess and the
test build the same ones. Every run uses one intra-op thread, which keeps CPU results reproducible
across processes and fast on a busy 2-core machine.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hyprune.distill import (DistillConfig, TopKCache, block_map_from_plan, cache_teacher_topk, check_vocab, distill,
                             run_distill, finetune, forward_kl, generalized_jsd, hidden_state_loss, reverse_kl,
                             make_config, topk_forward_kl, topk_loss)
from hyprune.distill import checkpoints as ckpt
from hyprune.distill import train as distill_train
from hyprune.errors import HypruneError

from distill_helpers import (DDP_CONFIG, KILL_CONFIG, VOCAB, random_windows, state_of, teacher_and_student,
                             tiny_model)

HELPERS = str(Path(__file__).with_name("distill_helpers.py"))
QUICK = dict(seq_len=16, batch=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(HELPERS).parent), env.get("PYTHONPATH", "")])
    return env


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------
def test_divergences_zero_on_identical_and_nonnegative():
    torch.manual_seed(0)
    a, b = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        assert fn(a, a).abs().item() < 1e-6
        assert fn(a, b).item() > 0
    # forward KL is the expectation under the teacher, reverse KL under the student
    p, q = F.softmax(b, -1), F.softmax(a, -1)
    torch.testing.assert_close(forward_kl(a, b), (p * (p.log() - q.log())).sum(-1).mean())
    torch.testing.assert_close(reverse_kl(a, b), (q * (q.log() - p.log())).sum(-1).mean())


def test_jsd_symmetry_and_bounds():
    torch.manual_seed(1)
    a, b = torch.randn(4, 7, 13) * 4, torch.randn(4, 7, 13) * 4
    torch.testing.assert_close(generalized_jsd(a, b, beta=0.5), generalized_jsd(b, a, beta=0.5))
    # swapping roles and beta <-> 1 - beta is the same divergence
    torch.testing.assert_close(generalized_jsd(a, b, beta=0.2), generalized_jsd(b, a, beta=0.8))
    for beta in (0.1, 0.5, 0.9):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))  # binary entropy <= ln 2
        assert 0 <= generalized_jsd(a, b, beta=beta).item() <= bound + 1e-6
    # disjoint supports reach the bound
    far_a = torch.tensor([[50.0, -50.0]]); far_b = torch.tensor([[-50.0, 50.0]])
    assert generalized_jsd(far_a, far_b).item() == pytest.approx(math.log(2), rel=1e-4)


def test_temperature_scaling_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    T = 2.0
    p = [math.exp(x / T) for x in t[0].tolist()]
    q = [math.exp(x / T) for x in s[0].tolist()]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    expected = T * T * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert forward_kl(s, t, temperature=T).item() == pytest.approx(expected, rel=1e-6)
    # the mask keeps only some tokens in the mean
    s2, t2 = torch.stack([s, t]), torch.stack([t, t])
    assert forward_kl(s2, t2, T, mask=torch.tensor([[1], [0]])).item() == pytest.approx(expected, rel=1e-6)


def test_fused_forward_kl_matches_autograd_in_float64():
    """The hand-written gradient (q - p) / T equals autograd through the plain formula."""
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 11) * 3, torch.randn(2, 5, 11) * 3
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    for T in (1.0, 2.0):
        s_fused = s.clone().requires_grad_()
        fused = forward_kl(s_fused, t, T, mask=mask)
        fused.backward()
        s_ref = s.double().requires_grad_()
        log_q, log_p = F.log_softmax(s_ref / T, -1), F.log_softmax(t.double() / T, -1)
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
        ref = (per_token * mask).sum() / mask.sum() * T**2
        ref.backward()
        assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
        torch.testing.assert_close(s_fused.grad, s_ref.grad.float(), rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(s_fused.grad[0, 2]) == 0  # masked token: no gradient
    # a teacher that requires grad takes the autograd path and gets its gradient
    t_req = t.clone().requires_grad_()
    forward_kl(s, t_req, 1.0).backward()
    assert t_req.grad is not None and t_req.grad.abs().sum() > 0


def test_topk_kl_with_full_support_equals_kl():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    top = F.log_softmax(t, -1).topk(9, dim=-1)
    for T in (1.0, 1.5):
        torch.testing.assert_close(topk_forward_kl(s, top.values, top.indices, T), forward_kl(s, t, T))


def test_topk_kl_keeps_the_rest_of_the_vocabulary_as_one_bucket():
    """Top-k KD = KL between k + 1 buckets: the teacher's top ids and 'everything else', with the
    student's probabilities taken from its full softmax (not renormalized over the k ids)."""
    torch.manual_seed(4)
    s, t = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)
    k = 4
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    top = p.log().topk(k, dim=-1)
    expected = 0.0
    for row in range(3):
        ids = top.indices[row].tolist()
        p_b = [p[row, i].item() for i in ids] + [1 - sum(p[row, i].item() for i in ids)]
        q_b = [q[row, i].item() for i in ids] + [1 - sum(q[row, i].item() for i in ids)]
        expected += sum(a * math.log(a / b) for a, b in zip(p_b, q_b)) / 3
    s_req = s.float().requires_grad_()
    loss = topk_forward_kl(s_req, top.values.float(), top.indices)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the student's mass outside the top-k matters: raising a non-top logit raises the loss
    other = next(i for i in range(10) if i not in top.indices[0].tolist())
    bumped = s.float().clone()
    bumped[0, other] += 3.0
    assert topk_forward_kl(bumped, top.values.float(), top.indices) > loss
    loss.backward()
    assert torch.isfinite(s_req.grad).all()


def test_topk_entries_marked_invalid_leave_the_support():
    """Teacher ids in padding rows (marked invalid) drop out, without NaN, like a smaller top-k."""
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    small = F.log_softmax(t, -1).topk(3, dim=-1)
    four = F.log_softmax(t, -1).topk(4, dim=-1)
    valid = torch.ones_like(four.indices, dtype=torch.bool)
    valid[..., 3] = False
    indices = four.indices.masked_fill(~valid, 0)  # what the trainer passes: clamped in range
    s_req = s.clone().requires_grad_()
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        masked = topk_loss(kind, s_req, four.values, indices, valid=valid)
        torch.testing.assert_close(masked, topk_loss(kind, s, small.values, small.indices))
        masked.backward()
        assert torch.isfinite(s_req.grad).all()


def test_hidden_state_loss_and_plan_block_map():
    from hyprune.plan import identity_plan
    from hyprune.arch import family_for_config

    teacher = tiny_model(0)
    plan = identity_plan(family_for_config(teacher.config), teacher.config)
    plan.drop_blocks = [1, 4]
    assert block_map_from_plan(plan) == {0: 0, 1: 2, 2: 3}
    assert block_map_from_plan(plan, [2]) == {2: 3}
    x = torch.randn(2, 5, 24)
    channels = torch.tensor([0, 3, 5, 7])
    assert hidden_state_loss([x[..., channels]], [x], "cosine", channels).item() < 1e-6
    assert hidden_state_loss([x[..., channels]], [x], "mse", channels).item() == 0
    assert hidden_state_loss([-x], [x], "cosine").item() == pytest.approx(2.0)
    with pytest.raises(HypruneError, match="teacher_channels"):
        hidden_state_loss([x[..., :4]], [x], "cosine")


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def test_distill_loss_decreases_and_writes_outputs(tmp_path):
    teacher, student = teacher_and_student()
    out = tmp_path / "run"
    summary = distill(teacher, student, random_windows(32, 16), dict(QUICK, tokens=24 * 4 * 16, checkpoint_every=8,
                                                                     eval_every=12, keep_last=2),
                      out, eval_windows=random_windows(4, 16, seed=9))
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 25))
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "kd_loss"):
        assert key in log[0]
    assert log[-1]["tokens"] == 24 * 4 * 16
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.8 * first
    evals = [r for r in log if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[0]["teacher_ppl"] == summary["teacher_ppl"]
    assert log[-1]["lr"] == pytest.approx(3e-4) and log[1]["lr"] == pytest.approx(3e-3)  # warmup, cosine end
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [16, 24]  # keep_last=2
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    _assert_same_weights(state_of(reloaded), state_of(student), 0, 0)
    # a second run into the same folder must not silently mix with the first
    with pytest.raises(HypruneError, match="resume"):
        distill(teacher, student, random_windows(32, 16), dict(QUICK, tokens=64), out)


def test_student_copy_of_teacher_starts_at_zero_loss(tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:  # stands in for TensorBoard, which is optional
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", type(sys)("fake_tensorboard"))
    sys.modules["torch.utils.tensorboard"].SummaryWriter = FakeWriter
    teacher = tiny_model(0)
    summary = distill(teacher, copy.deepcopy(teacher), random_windows(8, 16), dict(QUICK, tokens=2 * 4 * 16,
                      checkpoint_every=0), tmp_path / "run")
    assert _log(tmp_path / "run")[0]["loss"] < 1e-6
    assert summary["steps"] == 2
    assert ("train/loss", 1) in scalars and ("train/grad_norm", 2) in scalars


def test_finetune_and_hidden_state_loss_with_pruned_student(tmp_path):
    """Teacher correction runs the same loop; a depth+width-pruned student learns with the IS loss."""
    from hyprune.apply import apply_plan
    from hyprune.arch import family_for_config

    teacher = tiny_model(0)
    family = family_for_config(teacher.config)
    from hyprune.plan import identity_plan

    finetune(teacher, random_windows(16, 16), dict(QUICK, tokens=3 * 4 * 16, checkpoint_every=0, lr=1e-3),
             tmp_path / "corrected")
    ce = _log(tmp_path / "corrected")
    assert "ce_loss" in ce[0] and "kd_loss" not in ce[0]

    plan = identity_plan(family, teacher.config)
    plan.drop_blocks = [4]
    plan.hidden = list(range(0, 24, 2))
    student = apply_plan(teacher, plan, family)
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    distill(teacher, student, random_windows(16, 16), dict(QUICK, tokens=6 * 4 * 16, micro_batch=2, checkpoint_every=0,
            hidden_loss="cosine", plan=str(plan_file), activation_checkpointing=True, ce_weight=0.1),
            tmp_path / "is")
    log = _log(tmp_path / "is")
    assert all(math.isfinite(r["hidden_loss"]) and "ce_loss" in r for r in log)
    assert log[-1]["hidden_loss"] < log[0]["hidden_loss"]
    # without the plan the widths cannot be matched
    with pytest.raises(HypruneError, match="teacher_channels"):
        distill(teacher, student, random_windows(16, 16), dict(QUICK, tokens=64, hidden_loss="mse",
                block_map={0: 0}), tmp_path / "bad")


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume, failures
# ---------------------------------------------------------------------------------------------
def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, HELPERS, "kill", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        line = proc.stdout.readline()
        while line and "HANGING" not in line:
            line = proc.stdout.readline()
        assert "HANGING" in line, proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4]
    assert list(root.glob(".step-00000006.tmp-*")), "the kill should have left step 6 half-written"
    assert not (out / "final").exists()

    teacher, student = teacher_and_student()
    summary = distill(teacher, student, random_windows(12, 16), KILL_CONFIG, out, resume=True)
    assert summary["resumed_from"].endswith("step-00000004")
    assert not list(root.glob(".step-*"))  # leftovers removed
    assert [r["step"] for r in _log(out)] == list(range(1, 9))

    teacher, reference = teacher_and_student()
    distill(teacher, reference, random_windows(12, 16), KILL_CONFIG, tmp_path / "straight")
    _assert_same_weights(state_of(student), state_of(reference), rtol=1e-6, atol=1e-6)
    _assert_same_weights(load_file(out / "final" / "model.safetensors"),
                         load_file(tmp_path / "straight" / "final" / "model.safetensors"), rtol=1e-6, atol=1e-6)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    cfg = dict(QUICK, tokens=4 * 4 * 16, checkpoint_every=2, keep_last=3)
    teacher, student = teacher_and_student()
    distill(teacher, student, random_windows(8, 16), cfg, tmp_path / "run")
    expected = state_of(student)
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step-00000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, wrong checksum
    weights.write_bytes(bytes(data))
    assert "checksum" in ckpt.check_checkpoint(root / "step-00000004")

    teacher, student = teacher_and_student()
    with pytest.warns(UserWarning, match="step-00000004.*checksum"):
        summary = distill(teacher, student, random_windows(8, 16), cfg, tmp_path / "run", resume=True)
    assert summary["resumed_from"].endswith("step-00000002")
    _assert_same_weights(state_of(student), expected, rtol=1e-6, atol=1e-6)

    (root / "step-00000004" / "manifest.json").unlink()  # a partial write: no manifest
    with pytest.warns(UserWarning, match="no manifest"):
        path, manifest = ckpt.newest_valid_checkpoint(root)
    assert manifest["step"] == 2


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    teacher, student = teacher_and_student()
    calls = {"n": 0}

    def poison(_module, _inputs, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 5 else output

    student.lm_head.register_forward_hook(poison)
    out = tmp_path / "run"
    with pytest.raises(HypruneError, match=r"nan at step 5.*step-00000004"):
        distill(teacher, student, random_windows(8, 16), dict(QUICK, tokens=8 * 4 * 16, checkpoint_every=2), out)
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    assert ckpt.check_checkpoint(out / "checkpoints" / "step-00000004") is None
    assert not (out / "final").exists()
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the bad step was not applied


def test_full_disk_while_checkpointing_keeps_previous(tmp_path, monkeypatch):
    original = ckpt._torch_save

    def full_disk(obj, path):
        if "step-00000004" in str(path):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        original(obj, path)

    monkeypatch.setattr(ckpt, "_torch_save", full_disk)
    teacher, student = teacher_and_student()
    out = tmp_path / "run"
    with pytest.raises(HypruneError, match=r"step 4.*No space left.*step-00000002 is intact"):
        distill(teacher, student, random_windows(8, 16), dict(QUICK, tokens=6 * 4 * 16, checkpoint_every=2), out)
    root = out / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]
    assert ckpt.check_checkpoint(root / "step-00000002") is None
    assert not list(root.glob(".step-*"))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
class _Tokenizer:
    """Just enough tokenizer for the vocabulary checks."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def get_vocab(self):
        return {str(i): i for i in range(self.n)}

    def save_pretrained(self, path):
        (Path(path) / "tokenizer_stub.json").write_text(json.dumps({"tokens": self.n}))


def test_vocab_checks(tmp_path):
    teacher = tiny_model(0)
    padded = tiny_model(1, vocab_size=VOCAB + 8)
    windows = random_windows(8, 16)
    with pytest.raises(HypruneError, match="vocabulary"):
        distill(teacher, padded, windows, dict(QUICK, tokens=64), tmp_path / "a")
    with pytest.raises(HypruneError, match="tokenizer"):
        check_vocab(VOCAB, VOCAB, _Tokenizer(VOCAB), _Tokenizer(VOCAB - 1))
    with pytest.raises(HypruneError, match="more than the smaller table"):
        check_vocab(VOCAB, VOCAB + 8, _Tokenizer(VOCAB + 4))
    # only padding rows differ: the first len(tokenizer) logits are compared
    assert check_vocab(VOCAB, VOCAB + 8, _Tokenizer(VOCAB)) == VOCAB
    distill(teacher, padded, windows, dict(QUICK, tokens=64, checkpoint_every=0), tmp_path / "b",
            tokenizer=_Tokenizer(VOCAB))
    assert math.isfinite(_log(tmp_path / "b")[0]["loss"])
    with pytest.raises(HypruneError, match="token id"):
        distill(teacher, tiny_model(1), windows + VOCAB, dict(QUICK, tokens=64), tmp_path / "c")


def test_student_of_another_family_warns(tmp_path):
    from transformers import Mamba2Config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        other = AutoModelForCausalLM.from_config(Mamba2Config(
            vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, expand=2, n_groups=1, state_size=4,
            num_hidden_layers=1, chunk_size=8, use_cache=False))
    with pytest.warns(UserWarning, match="student is not derived from the teacher"):
        distill(tiny_model(0), other, random_windows(4, 16), dict(QUICK, tokens=64, checkpoint_every=0), tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# Distributed, top-k cache, CLI function
# ---------------------------------------------------------------------------------------------
def test_two_process_gloo_matches_one_process(tmp_path):
    """torchrun, 2 CPU processes on gloo: DDP, FSDP2 and an FSDP2 resume all equal one process, same global batch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", HELPERS, "ddp",
           str(tmp_path)]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    teacher, student = teacher_and_student()
    distill(teacher, student, random_windows(10, 16, seed=5), DDP_CONFIG, tmp_path / "single")
    one = state_of(student)
    one_loss = [r["loss"] for r in _log(tmp_path / "single")]
    for run in ("ddp", "fsdp", "fsdp_resumed"):
        final = state_of(AutoModelForCausalLM.from_pretrained(tmp_path / run / "final"))
        _assert_same_weights(final, one, rtol=1e-5, atol=1e-6)
        saved = load_file(tmp_path / run / "checkpoints" / "step-00000004" / "model.safetensors")
        _assert_same_weights(saved, one, rtol=1e-5, atol=1e-6)
        assert [r["loss"] for r in _log(tmp_path / run)] == pytest.approx(one_loss, rel=1e-5)  # rank 0 logs once
        assert [s for s, _ in ckpt.list_checkpoints(tmp_path / run / "checkpoints")] == [2, 4]
    summary = json.loads((tmp_path / "fsdp_resumed" / "final" / "hyprune_distill.json").read_text())["summary"]
    assert summary["world_size"] == 2 and summary["resumed_from"].endswith("step-00000002")


def test_topk_cache_trains_without_teacher(tmp_path):
    teacher, student = teacher_and_student()
    windows = random_windows(12, 16)
    cache_dir = cache_teacher_topk(teacher, windows, k=8, out_dir=tmp_path / "cache", shard_windows=5, progress=False)
    cache = TopKCache(cache_dir, verify=True)
    assert len(cache) == 12 and cache.k == 8 and len(list(cache_dir.glob("shard-*.safetensors"))) == 3
    ids, values, indices = cache.rows([11, 0])
    assert torch.equal(ids, windows[[11, 0]]) and values.dtype == torch.float16 and values.shape == (2, 16, 8)
    full = F.log_softmax(teacher(input_ids=windows[:1]).logits, -1)
    torch.testing.assert_close(cache.rows([0])[1].float(), full.topk(8, -1).values, atol=2e-3, rtol=1e-3)
    del teacher
    distill(None, student, cache_dir, dict(QUICK, tokens=20 * 4 * 16, checkpoint_every=0), tmp_path / "run")
    log = _log(tmp_path / "run")
    assert sum(r["loss"] for r in log[-3:]) < 0.8 * sum(r["loss"] for r in log[:3])


def test_distill_cli_from_files(tmp_path, nemotron_dir, calib_txt):
    out = tmp_path / "kd"
    summary = run_distill(str(nemotron_dir), str(nemotron_dir), str(calib_txt), tokens=3 * 2 * 32, seq_len=32,
                          batch=2, out=str(out), checkpoint_every=2, progress=False, eval_windows=2)
    assert (out / "final" / "tokenizer.json").exists() and (out / "log.jsonl").exists()
    assert summary["steps"] == 3 and summary["student_ppl"] is not None
    assert summary["student_ppl"] == pytest.approx(summary["teacher_ppl"], rel=1e-2)
    assert _log(out)[0]["loss"] < 1e-6  # the student is the teacher
    with pytest.raises(HypruneError, match="--resume"):
        run_distill(str(nemotron_dir), str(nemotron_dir), str(calib_txt), tokens=64, seq_len=32, batch=2, out=str(out))
    with pytest.raises(HypruneError, match="lr"):
        run_distill(str(nemotron_dir), str(nemotron_dir), str(calib_txt), tokens=64, seq_len=32, batch=2,
                    out=str(tmp_path / "x"), lr=-1)
    assert DistillConfig(tokens=10, seq_len=2).total_steps() == 1


# ---------------------------------------------------------------------------------------------
# Resume compares everything that shapes the result (issue 11)
# ---------------------------------------------------------------------------------------------
def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_resume_refuses_changed_settings_and_data_and_accepts_them_when_asked(tmp_path):
    cfg = dict(QUICK, tokens=4 * 4 * 16, checkpoint_every=2, keep_last=3)
    windows = random_windows(8, 16)
    out = tmp_path / "run"
    teacher, student = teacher_and_student()
    distill(teacher, student, windows, cfg, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # back to the middle of the run
    shutil.rmtree(out / "final")
    for change, key in ((dict(lr=1e-3), "lr"), (dict(betas=(0.8, 0.9)), "betas"), (dict(tokens=6 * 4 * 16), "tokens"),
                        (dict(loss="jsd"), "loss"), (dict(warmup_steps=1), "warmup_steps"),
                        (dict(weight_decay=0.1), "weight_decay")):
        teacher, student = teacher_and_student()
        with pytest.raises(HypruneError) as e:
            distill(teacher, student, windows, {**cfg, **change}, out, resume=True)
        message = _one_line_error(e)
        assert f"changed since the saved run: {key} (" in message and "--resume-changed" in message
    teacher, student = teacher_and_student()
    with pytest.raises(HypruneError) as e:  # other data, same shape
        distill(teacher, student, random_windows(8, 16, seed=5), cfg, out, resume=True)
    assert "data_windows" in _one_line_error(e)
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]  # nothing was touched by the refusals
    # settings that do not shape the weights may change freely
    teacher, student = teacher_and_student()
    summary = distill(teacher, student, windows, {**cfg, "log_every": 2, "keep_last": 2}, tmp_path / "run", resume=True)
    assert summary["resumed_from"].endswith("step-00000002") and summary["changed_on_resume"] is None
    # the flag that accepts a change: the new lr takes effect, and the change is on record
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    shutil.rmtree(out / "final")
    teacher, student = teacher_and_student()
    summary = distill(teacher, student, windows, {**cfg, "lr": 1e-3, "min_lr": 1e-4}, out, resume=True,
                      allow_changed=True)
    assert summary["changed_on_resume"]["lr"] == {"was": 3e-3, "now": 1e-3}
    log = _log(out)
    event = next(r for r in log if r.get("event") == "resume_changed")
    assert event["step"] == 2 and set(event["changed"]) == {"lr", "min_lr"}
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    factor = distill_train._lr_lambda(DistillConfig(**{**cfg, "lr": 1e-3, "min_lr": 1e-4}), 4)
    assert steps[2]["lr"] == pytest.approx(1e-3 * factor(2)) and steps[3]["lr"] == pytest.approx(1e-4)
    saved = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert saved["config"]["lr"] == 1e-3 and "data_windows" in saved["inputs"]
    from hyprune.report import write_run_report  # the report of the run still builds, and names the change

    write_run_report(out)
    assert "changed settings" in (out / "report.md").read_text()


def test_resume_without_a_checkpoint_refuses_like_search(tmp_path):
    teacher, student = teacher_and_student()
    with pytest.raises(HypruneError) as e:
        distill(teacher, student, random_windows(8, 16), dict(QUICK, tokens=64), tmp_path / "new", resume=True)
    message = _one_line_error(e)
    assert message.startswith("Nothing to resume") and "Drop --resume" in message
    assert not (tmp_path / "new" / "log.jsonl").exists()


def test_finetune_resume_compares_settings_too(tmp_path):
    cfg = dict(QUICK, tokens=4 * 4 * 16, checkpoint_every=2)
    _, model = teacher_and_student()
    finetune(model, random_windows(8, 16), cfg, tmp_path / "ft")
    shutil.rmtree(tmp_path / "ft" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "ft" / "final")
    _, model = teacher_and_student()
    with pytest.raises(HypruneError) as e:
        finetune(model, random_windows(8, 16), {**cfg, "seed": 3}, tmp_path / "ft", resume=True)
    assert "seed" in _one_line_error(e)
    _, model = teacher_and_student()
    summary = finetune(model, random_windows(8, 16), {**cfg, "seed": 3}, tmp_path / "ft", resume=True,
                       allow_changed=True)
    assert summary["changed_on_resume"] == {"seed": {"was": 0, "now": 3}}


def test_distill_settings_errors_are_one_line_naming_the_field():
    with pytest.raises(HypruneError) as e:
        make_config(tokens=0, seq_len=16)
    message = _one_line_error(e)
    assert message.startswith("Invalid distillation settings: field tokens: Input should be greater than 0")
    assert "(got 0)" in message
    with pytest.raises(HypruneError) as e:
        make_config(tokens=10, seq_len=16, batch=0, loss="kl")
    message = _one_line_error(e)
    assert "field batch: Input should be greater than or equal to 1 (got 0)" in message and "field loss:" in message
    with pytest.raises(HypruneError) as e:
        make_config(tokens=10, seq_len=16, lr=1e-5, min_lr=1e-4)
    assert _one_line_error(e) == "Invalid distillation settings: min_lr (0.0001) must not exceed lr (1e-05)"
