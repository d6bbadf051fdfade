"""Calibration and evaluation text: reading, tokenizing, packing into fixed windows.

Sources: a local ``.txt`` (optionally ``.gz``; documents separated by the tokenizer's EOS string when
it appears, else the whole file is one document), ``.jsonl`` (a ``text`` field, configurable),
``.parquet`` (same field), or a ``datasets`` name (streamed, ``split`` configurable).

Documents are tokenized, each followed by the EOS token, joined into one stream and cut into
consecutive windows of ``seq_len`` tokens. The window length always comes from the user or the data,
never from ``max_position_embeddings``.
"""

from __future__ import annotations

import gzip
import json
import random
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

from hyprune.errors import HypruneError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".py", ".rst"}


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _open_text(path: Path):
    """Strict UTF-8: bytes that do not decode raise (see `_not_utf8`), they are never replaced."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError) -> HypruneError:
    """One line: where the first undecodable byte is and how many there are (random bytes, another encoding)."""
    bad = data.decode("utf-8", errors="replace").count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    line = data.count(b"\n", 0, error.start) + 1
    return HypruneError(
        f"{path} is not UTF-8 text: byte {error.start} (0x{data[error.start]:02x}, line {line}) does not decode "
        f"({max(bad, 1)} undecodable byte sequence(s) in {len(data):,} bytes). Calibrating on it would use noise: convert "
        "it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass another file.")


def _read_text(path: Path) -> str:
    """The whole file as strict UTF-8; a file that does not decode, or holds NUL bytes, is refused."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e) from None
    if "\x00" in text:
        raise HypruneError(f"{path} holds {text.count(chr(0)):,} NUL bytes (the first at character {text.index(chr(0))}): "
                           "it is binary, not text. Pass a text file.")
    return text


def check_source(source: str | Path) -> None:
    """Cheap checks before any heavy work: the file exists, is not empty and has a known format."""
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise HypruneError(f"Data path {path} is a folder; pass a .txt, .jsonl or .parquet file.")
        if path.stat().st_size == 0:
            raise HypruneError(f"Data file {path} is empty. Pass a file with text in it.")
        if _suffix(path) not in TEXT_SUFFIXES | {".jsonl", ".json", ".parquet"}:
            raise HypruneError(
                f"Data file {path} has an unknown format '{_suffix(path)}'. Use .txt(.gz), .jsonl(.gz) or .parquet."
            )
        return
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or Path(text).suffix in TEXT_SUFFIXES | {".jsonl", ".parquet"}:
        raise HypruneError(f"Data file {source} does not exist. Check the path, or pass a datasets name.")


def read_documents(
    source: str | Path, text_field: str = "text", split: str = "train", separator: str | None = None
) -> Iterator[str]:
    """Yield the documents of a local file or a ``datasets`` dataset, in order."""
    check_source(source)
    path = Path(source)
    if not path.exists():
        yield from _dataset_documents(str(source), text_field, split)
        return
    kind = _suffix(path)
    if kind in (".jsonl", ".json"):
        yield from _jsonl_documents(path, text_field)
    elif kind == ".parquet":
        import pyarrow.parquet as pq  # optional (hyprune[data]); only parquet input needs it

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise HypruneError(f"{path} has no '{text_field}' column ({table.column_names}). Pass --text-field NAME.")
        yield from (str(t) for t in table.column(text_field).to_pylist())
    else:
        text = _read_text(path)
        if separator and separator in text:
            yield from (doc for doc in text.split(separator) if doc.strip())
        else:
            yield text


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise HypruneError(f"{path} line {n} is not JSON; .jsonl needs one object per line.") from None
                if not isinstance(row, dict) or text_field not in row:
                    fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                    raise HypruneError(
                        f"{path} line {n} has no '{text_field}' field (fields: {fields}). "
                        "Pass --text-field NAME."
                    )
                yield str(row[text_field])
    except UnicodeDecodeError as e:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        raise _not_utf8(path, data, _first_error(data) or e) from None


def _first_error(data: bytes) -> UnicodeDecodeError | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    return None


def _dataset_documents(name: str, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets  # optional (hyprune[data]) and slow to import; only hub datasets need it
    except ImportError:
        raise HypruneError(f"'{name}' is not a local file; loading a dataset needs `pip install datasets`.") from None
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise HypruneError(f"Could not load dataset '{name}' (split {split}): {e}") from None
    for row in ds:
        if text_field not in row:
            raise HypruneError(f"Dataset '{name}' has no '{text_field}' field ({', '.join(row)}). Pass --text-field.")
        yield str(row[text_field])


def token_stream(tokenizer, documents: Iterable[str], max_tokens: int | None = None, chunk_chars: int = 1 << 16) -> list[int]:
    """Tokenize documents into one stream, each followed by EOS; stop once ``max_tokens`` are reached.

    Long documents are tokenized in line-aligned pieces of ~``chunk_chars`` characters so memory and
    time stay bounded (a split at a newline changes nothing for byte-level BPE tokenizers).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HypruneError("The tokenizer has no EOS token; hyprune joins documents with it.")
    ids: list[int] = []
    for doc in documents:
        for piece in _pieces(doc, chunk_chars):
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids[:max_tokens]
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def _pieces(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        yield text[start:end]
        start = end


def pack_windows(ids: list[int], seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream into consecutive non-overlapping windows: [num_windows, seq_len]."""
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def calibration_windows(
    tokenizer,
    source: str | Path,
    seq_len: int,
    num_samples: int,
    seed: int = 0,
    text_field: str = "text",
    split: str = "train",
) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens from shuffled documents (seeded): [num_samples, seq_len]."""
    if seq_len < 2:
        raise HypruneError(f"--seq-len must be at least 2, got {seq_len}.")
    if num_samples < 1:
        raise HypruneError(f"--num-samples must be at least 1, got {num_samples}.")
    docs = list(read_documents(source, text_field, split, separator=tokenizer.eos_token))
    random.Random(seed).shuffle(docs)
    ids = token_stream(tokenizer, docs, max_tokens=seq_len * num_samples)
    if len(ids) < seq_len:
        raise HypruneError(
            f"{source} holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}. "
            "Pass more text or a shorter --seq-len."
        )
    windows = pack_windows(ids, seq_len, num_samples)
    if len(windows) < num_samples:
        warnings.warn(f"{source} holds only {len(windows)} windows of {seq_len} tokens; using those "
                      f"instead of the {num_samples} asked for.", stacklevel=2)
    return windows


def heldout_windows(tokenizer, source: str | Path, seq_len: int = 256, num_windows: int = 128, **kw) -> torch.Tensor:
    """Consecutive windows from the start of the source, in order (the benchmark convention)."""
    docs = read_documents(source, separator=tokenizer.eos_token, **kw)
    ids = token_stream(tokenizer, docs, max_tokens=seq_len * num_windows)
    windows = pack_windows(ids, seq_len, num_windows)
    if len(windows) == 0:
        raise HypruneError(f"{source} holds fewer tokens than one window of {seq_len}.")
    return windows
