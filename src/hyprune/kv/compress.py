"""``hyprune kv-compress``: retrofit DMC or DMS into a model by distillation from its uncompressed self.

The teacher is the model as given; the student is the same model with its attention switched to the
method (`hyprune.kv.model.attach`), trained through `hyprune.distill.run_distill` (resume, DDP/FSDP,
logs, report) with the ratio term of `hyprune.kv.train.RatioTerm` added to the distillation loss. The
result, ``OUT/final``, is an ordinary checkpoint (same tensor shapes; ``config.hyprune_kv`` names the
method) that `hyprune.kv.enable` turns into compressed inference.
"""

from __future__ import annotations

from dataclasses import asdict

from hyprune.data import calibration_windows
from hyprune.distill import run_distill
from hyprune.kv.model import KVSpec, attach, calibrate
from hyprune.kv.train import RatioTerm
from hyprune.models import load_tokenizer


def compress(model: str, data: str, out: str, *, method: str = "dms", ratio: float = 4.0, tokens: int,
             seq_len: int, batch: int = 8, window: int = 16, offset: float = 3.0, ratio_weight: float = 10.0,
             ramp: float = 0.5, decisions_only: bool = False, calibration: int = 8, resume: bool = False,
             **fields) -> dict:
    """Train ``model`` to compress its KV cache ``ratio``-fold with ``method``; ``fields`` as `run_distill`'s.

    The decisions' inputs are standardized per head on ``calibration`` windows of ``data`` before training
    (`hyprune.kv.model.calibrate`; ``offset`` is then in units of each head's spread). ``decisions_only``
    trains only the key projections that carry the decisions (the rest frozen), as DMS offers; by default
    the whole model trains.
    """
    spec = KVSpec(method=method, window=window, offset=offset)
    term = RatioTerm(ratio, weight=ratio_weight, ramp=ramp)
    windows = calibration_windows(load_tokenizer(model, fields.get("trust_remote_code", False)), data, seq_len,
                                  calibration, seed=0, text_field=fields.get("text_field", "text"),
                                  split=fields.get("split", "train"))

    def prepare(student):
        spec.centers, spec.scales = calibrate(student, windows)
        attach(student, spec)
        if decisions_only:
            for name, param in student.named_parameters():
                param.requires_grad = "k_proj" in name
        settings = {**asdict(spec), "ratio": ratio, "ratio_weight": ratio_weight, "ramp": ramp,
                    "decisions_only": decisions_only, "calibration": calibration}
        settings.pop("inner")
        return term, settings

    summary = run_distill(model, model, data, tokens, seq_len, batch, out, resume, prepare=prepare, **fields)
    summary["kv_kept_share"] = term.kept
    return summary


__all__ = ["compress"]
