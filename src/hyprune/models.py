"""Loading models, configs and tokenizers through the standard Hugging Face paths.

A local folder or a hub id both go through ``from_pretrained``. Weights are read from safetensors
only, unless the user passes ``allow_pickle``; remote code runs only with ``trust_remote_code``.
The config is loaded first, on its own, so every check can run before the weights are read.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hyprune.arch import Family, family_for_config
from hyprune.errors import HypruneError
from hyprune.parts import PARTS, components

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def parse_dtype(name: str | torch.dtype | None):
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise HypruneError(f"Unknown dtype '{name}'. Use one of: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load_config(model_id: str | os.PathLike, trust_remote_code: bool = False, gguf_file: str | None = None):
    """Load and check a config; returns (config, family). Fails fast on anything unsupported."""
    path = Path(model_id)
    if path.exists() and path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file() and gguf_file is None:
            raise HypruneError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
        if cfg.is_file():
            try:
                json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise HypruneError(f"{cfg} is not valid JSON ({e}). Restore the file from the original checkpoint.") from None
    elif looks_like_local_path(str(model_id)):
        raise HypruneError(f"Model folder {model_id} does not exist.")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(str(model_id), trust_remote_code=trust_remote_code, **extra)
    except HypruneError:
        raise
    except Exception as e:  # transformers raises many types here (OSError, ValueError, KeyError, ...)
        raise HypruneError(f"Could not read the config of {model_id}: {e}") from None
    family = family_for_config(config)
    if not trust_remote_code:
        drop_remote_code_map(config, model_id)
    return config, family


def drop_remote_code_map(config, model_id) -> None:
    """Without ``trust_remote_code`` a config's ``auto_map`` (classes in the checkpoint's own .py files) is unused.

    No remote code runs (transformers' built-in classes load the model); say so, and drop the map
    from the config, so a saved (pruned, distilled) model does not point at code files it lacks.
    """
    auto_map = getattr(config, "auto_map", None)
    if not auto_map:
        return
    warnings.warn(f"{model_id} names its own modeling code (auto_map: {', '.join(sorted(auto_map))}); without "
                  "--trust-remote-code it was not run: transformers' built-in "
                  f"{getattr(config, 'model_type', '?')} classes load the model, and the saved output drops auto_map.",
                  stacklevel=3)
    config.__dict__.pop("auto_map", None)


def looks_like_local_path(text: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing folder."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def check_weights_format(model_id: str | os.PathLike, allow_pickle: bool, gguf_file: str | None = None) -> None:
    """Refuse a local folder that holds only pickle weights, unless allowed."""
    path = Path(model_id)
    if not path.is_dir():
        return
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise HypruneError(f"--gguf-file {gguf_file} is not in {path}.")
        return
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safetensors and pickles and not allow_pickle:
        raise HypruneError(
            f"{path} holds only pickle weights ({pickles[0].name}); loading pickle can run arbitrary code. "
            "Convert the checkpoint to safetensors, or pass --allow-pickle if you trust it."
        )
    if not safetensors and not pickles and not list(path.glob("*.gguf")):
        raise HypruneError(f"{path} holds no weights (*.safetensors). Is the checkpoint complete?")


def load_model(
    model_id: str | os.PathLike,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    device_map: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
):
    """Load a causal LM for pruning; returns (model, family). The model is in eval mode.

    ``gguf_file`` names a GGUF file inside the ``model_id`` folder: transformers dequantizes it to
    plain float tensors (needs the ``gguf`` package), so it prunes like any other checkpoint.
    """
    config, family = load_config(model_id, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    check_weights_format(model_id, allow_pickle, gguf_file)
    kwargs = dict(dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    elif not allow_pickle:
        kwargs["use_safetensors"] = True
    if device_map:
        kwargs["device_map"] = device_map
    elif device:
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_id), **kwargs)
    except Exception as e:
        raise HypruneError(f"Could not load the weights of {model_id}: {e}") from None
    if not trust_remote_code:
        model.config.__dict__.pop("auto_map", None)  # see drop_remote_code_map (load_config above warned)
    model.eval()
    return model, family


def load_tokenizer(model_id: str | os.PathLike, trust_remote_code: bool = False, gguf_file: str | None = None):
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(model_id), trust_remote_code=trust_remote_code, **extra)
    except Exception as e:
        raise HypruneError(
            f"Could not load a tokenizer from {model_id}: {e}. Calibration data must be tokenized with the "
            "model's own tokenizer; make sure the checkpoint folder includes it."
        ) from None


def count_parameters(model, family: Family) -> dict[str, int]:
    """Parameters per component: embeddings, mamba, attention, mlp, moe, norms, lm_head, (other,) total.

    The lm_head is counted once even when tied to the embeddings.
    """
    kinds = family.block_kinds(model.config)
    out = {"embeddings": 0, **dict.fromkeys(components(), 0), "norms": 0, "lm_head": 0}
    seen = set()

    def add(key, params):
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out[key] += p.numel()

    backbone = getattr(model, family.base)
    add("embeddings", getattr(backbone, family.embeddings).parameters())
    for block, kind in zip(backbone.layers, kinds):
        for part, norm, mixer in family.block_parts(block, kind):
            add("norms", norm.parameters())
            add(PARTS[part.kind].component, mixer.parameters())
    add("norms", getattr(backbone, family.final_norm).parameters())
    add("lm_head", model.lm_head.parameters())
    other = [p for p in model.parameters() if id(p) not in seen]  # outside every part (Zamba2's shared attention)
    if other:
        out["other"] = 0
        add("other", other)
    out["total"] = sum(v for k, v in out.items())
    return out


def savable(model):
    """``model`` itself, or for a GGUF source an ordinary model around the same (dequantized) tensors.

    transformers marks a model loaded from GGUF as quantized and ``save_pretrained`` refuses it, although
    its tensors are plain floats; methods that edit weights in place (sparsity) must save it all the same.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(type(model.config)(**data))
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain.eval()
