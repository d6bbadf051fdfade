"""Shared fixtures: tiny random checkpoints, a tiny tokenizer and calibration files.

Everything is built here, on the CPU, in seconds; nothing reads ``/work/shared`` or the network.

* ``make_nemotron_config(**overrides)`` / ``make_mamba2_config(**overrides)``: tiny configs.
* ``save_tiny_model(config, path, tokenizer)``: a seeded random model + tokenizer saved as an HF folder.
* session fixtures ``tiny_tokenizer``, ``nemotron_dir``, ``mamba2_dir``, ``llama_dir``, ``unsupported_dir`` (an unsupported
  family), ``calibration_documents``, ``calib_txt``, ``calib_jsonl``, ``calib_parquet``.
* ``tree_digest(path)``: sha256 of every file under a folder (to prove a folder was not touched).

The session-scoped folders are shared by many tests: treat them as read-only (copy them to
``tmp_path`` before changing anything).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

# Must be set before transformers / huggingface_hub are imported: no network on the test machines,
# and an offline hub lookup otherwise spends many seconds on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

EOS = "<|endoftext|>"
TOKENIZER_VOCAB = 320  # 1 special token + 256 byte-level symbols + 63 merges
SEED = 0


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
def _stdlib_documents() -> list[str]:
    """Source of a few stdlib functions and classes, one per document (no EOS string inside)."""
    import shlex
    import string
    import textwrap

    docs = []
    for module in (textwrap, shlex, string):
        for name, obj in sorted(vars(module).items()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            try:
                src = inspect.getsource(obj)
            except (OSError, TypeError):
                continue
            if EOS not in src and src.strip():
                docs.append(src)
    return docs


def _tokenizer_training_text() -> str:
    import json as json_module
    import textwrap

    return inspect.getsource(textwrap) + inspect.getsource(json_module.decoder)


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on stdlib source; ``<|endoftext|>`` is id 0 and plays every special role."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_tokenizer_training_text()], trainer)
    assert tok.token_to_id(EOS) == 0
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


# ---------------------------------------------------------------------------------------------
# Configs and model folders
# ---------------------------------------------------------------------------------------------
def make_nemotron_config(**overrides) -> transformers.NemotronHConfig:
    """Tiny NemotronH: pattern M - * M - (Mamba, MLP, attention, Mamba, MLP)."""
    kwargs = dict(
        vocab_size=TOKENIZER_VOCAB,
        hidden_size=32,
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
        mamba_num_heads=8,
        mamba_head_dim=4,
        n_groups=2,
        ssm_state_size=6,
        intermediate_size=40,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        chunk_size=8,
        initializer_range=0.1,  # clearly separated logits, so greedy decoding is stable
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.NemotronHConfig(**kwargs)


def make_mamba2_config(**overrides) -> transformers.Mamba2Config:
    """Tiny Mamba2: 2 blocks, width num_heads * head_dim = expand * hidden_size = 64."""
    kwargs = dict(
        vocab_size=TOKENIZER_VOCAB,
        hidden_size=32,
        num_heads=8,
        head_dim=8,
        expand=2,
        n_groups=2,
        state_size=6,
        num_hidden_layers=2,
        chunk_size=8,
        initializer_range=0.1,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.Mamba2Config(**kwargs)


def make_llama_config(**overrides) -> transformers.LlamaConfig:
    """Tiny dense Llama (the original Minitron setting)."""
    kwargs = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def build_model(config, seed: int = SEED):
    """A seeded random causal LM for ``config`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_tiny_model(config, path: str | Path, tokenizer=None, seed: int = SEED) -> Path:
    """Save a seeded random model for ``config`` (safetensors) and ``tokenizer`` into ``path``."""
    path = Path(path)
    build_model(config, seed).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def tree_digest(path: str | Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path``."""
    root = Path(path)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (far faster on a busy machine), and the tests then leave the
    machine's other cores alone; restored after the module. Use with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    tok = build_tokenizer()
    assert len(tok) == TOKENIZER_VOCAB
    return tok


@pytest.fixture
def nemotron_config():
    """The ``make_nemotron_config`` factory, for tests that need a variant."""
    return make_nemotron_config


@pytest.fixture(scope="session")
def nemotron_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random NemotronH checkpoint folder (built once per session; do not modify)."""
    return save_tiny_model(make_nemotron_config(), tmp_path_factory.mktemp("models") / "nemotron", tiny_tokenizer)


@pytest.fixture(scope="session")
def mamba2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Mamba2 checkpoint folder (built once per session; do not modify)."""
    return save_tiny_model(make_mamba2_config(), tmp_path_factory.mktemp("models") / "mamba2", tiny_tokenizer)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama checkpoint folder (dense Transformer)."""
    return save_tiny_model(make_llama_config(), tmp_path_factory.mktemp("models") / "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny GPT-2 checkpoint folder: an architecture hyprune must refuse."""
    config = transformers.GPT2Config(vocab_size=TOKENIZER_VOCAB, n_embd=32, n_layer=1, n_head=4,
                                     eos_token_id=0, bos_token_id=0)
    return save_tiny_model(config, tmp_path_factory.mktemp("models") / "gpt2", tiny_tokenizer)


@pytest.fixture(scope="session")
def calibration_documents() -> list[str]:
    return _stdlib_documents()


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory, calibration_documents) -> Path:
    """Documents joined by the EOS string (how hyprune splits a .txt into documents)."""
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(EOS.join(calibration_documents), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory, calibration_documents) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(calibration_documents):
            f.write(json.dumps({"id": i, "text": doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def calib_parquet(tmp_path_factory, calibration_documents) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path_factory.mktemp("data") / "calib.parquet"
    table = pa.table({"id": list(range(len(calibration_documents))), "text": calibration_documents})
    pq.write_table(table, path)
    return path
