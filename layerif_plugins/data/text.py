"""Task data: text / JSONL files → tokenized examples → padded batches with masked labels.

Supported inputs (chosen by file suffix):

* ``.txt`` (or any other suffix): examples separated by lines that are exactly
  ``<|endoftext|>``; when the file has none, by blank lines;
* ``.jsonl``: one JSON object per line with a text field (default ``"text"``) or with
  pre-tokenized ``"input_ids"``.

Selection is deterministic: the first N examples, or a seeded sample of N.

Refused with one :class:`DataError` naming the file (and line where there is one): a file
that is not UTF-8 text (invalid bytes, NUL bytes of a binary file), an unreadable file,
no examples, pre-tokenized ``input_ids`` that are not integers (booleans included) or lie
outside the tokenizer's vocabulary, and an example longer than the model's positions.

Lengths: every example is truncated to ``max_length`` tokens (the ``--max-length`` option);
when ``max_length`` is larger than the model's positions (``tokenizer.model_max_length``,
which :func:`~layerif_plugins.models.load_model_and_tokenizer` sets to the config's
``max_position_embeddings``) and an example is still longer than the positions after that
truncation, it is refused, naming the example and the largest ``--max-length`` that works —
rather than scored past the positions the model was trained on (or crashing in a learned
position embedding).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.errors import DataError

EOT_SEPARATOR = "<|endoftext|>"
IGNORE_INDEX = -100


#: ``tokenizer.model_max_length`` at or above this means "no limit" (transformers uses 1e30)
_UNLIMITED = 10**9


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a data file, newlines normalised to ``\\n`` (as text-mode reading does).

    Not found, unreadable, invalid UTF-8 or binary → one DataError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data file {path} is not a file (a directory?); pass a .txt or .jsonl file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    return decode_text(raw, path).replace("\r\n", "\n").replace("\r", "\n")


def decode_text(raw: bytes, path: str | Path, first_line: int = 1) -> str:
    """``raw`` as UTF-8 text; invalid bytes or a NUL byte (a binary file) → DataError naming ``path:line``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw[: exc.start].count(b"\n")
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start:,}); "
            "data files must be UTF-8 text: convert it (e.g. iconv -t utf-8) or pass another file"
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line = first_line + text.count("\n", 0, nul)
        raise DataError(f"{path}:{line}: a NUL byte: this is a binary file, not text; pass a .txt or .jsonl file")
    return text


def read_records(path: str | Path, text_field: str = "text") -> list[str | list[int]]:
    """Raw examples of a file: strings, or token-id lists for pre-tokenized JSONL."""
    return _read_records(path, text_field)[0]


def _read_records(path: str | Path, text_field: str = "text") -> tuple[list[str | list[int]], list[int | None]]:
    """Raw examples and, for JSONL, the line each came from (None for text files)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    text = read_text_file(path)
    lines = text.split("\n")
    if any(line.strip() == EOT_SEPARATOR for line in lines):
        chunks, cur = [], []
        for line in lines:
            if line.strip() == EOT_SEPARATOR:
                chunks.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        chunks.append("\n".join(cur))
    else:
        chunks = re.split(r"\n\s*\n", text)
    records: list[str | list[int]] = [c.strip() for c in chunks if c.strip()]
    if not records:
        raise DataError(f"{path} holds no examples (empty, or only separators)")
    return records, [None] * len(records)


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; bad JSON, bad UTF-8 or a non-object names the line."""
    path = Path(path)
    text = read_text_file(path)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _read_jsonl(path: Path, text_field: str) -> tuple[list[str | list[int]], list[int | None]]:
    records: list[str | list[int]] = []
    lines: list[int | None] = []
    for lineno, obj in iter_jsonl_objects(path):
        lines.append(lineno)
        if "input_ids" in obj:
            ids = obj["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)), ids) \
                    if isinstance(ids, list) else ids
                kind = "a boolean" if isinstance(bad, bool) else type(bad).__name__
                raise DataError(f"{path}:{lineno}: 'input_ids' must be a list of integer token ids; found "
                                f"{json.dumps(bad)[:60]} ({kind})")
            negative = [t for t in ids if t < 0]
            if negative:
                raise DataError(f"{path}:{lineno}: 'input_ids' holds the negative token id {negative[0]}; "
                                "token ids are >= 0")
            records.append(ids)
        elif isinstance(obj.get(text_field), str):
            records.append(obj[text_field])
        else:
            raise DataError(
                f"{path}:{lineno}: no {text_field!r} string and no 'input_ids' list "
                f"(keys: {sorted(obj)}); pass --text-field to name the text field"
            )
    if not records:
        raise DataError(f"{path} holds no examples")
    return records, lines


@dataclass(frozen=True)
class Examples:
    """Tokenized examples (unpadded id lists) plus where they came from."""

    input_ids: tuple[tuple[int, ...], ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    def digest(self) -> str:
        h = hashlib.sha256()
        for ids in self.input_ids:
            h.update(json.dumps(ids).encode())
            h.update(b"\n")
        return h.hexdigest()[:16]

    def fingerprint(self) -> dict[str, Any]:
        return {"source": self.source, "n": len(self), "num_tokens": self.num_tokens, "sha256": self.digest()}

    def subset(self, idx: Sequence[int]) -> Examples:
        return Examples(tuple(self.input_ids[i] for i in idx), self.source)


def select(n_total: int, n: int | None, seed: int | None, what: str) -> list[int]:
    """Indices of the first ``n`` examples, or a seeded sample of ``n``, in order."""
    if n is None:
        return list(range(n_total))
    if n < 1:
        raise DataError(f"{what}: asked for {n} examples; ask for at least 1")
    if n > n_total:
        raise DataError(f"{what}: asked for {n} examples but the file holds only {n_total}")
    if seed is None:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n_total), n))


def model_positions(tokenizer: Any) -> int | None:
    """The model's positions as its tokenizer states them (``model_max_length``); None when unlimited / unknown."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _UNLIMITED:
        return limit
    return None


def vocab_size_of(tokenizer: Any) -> int | None:
    """Number of token ids the tokenizer knows (``len(tokenizer)``), or None when it cannot say."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_example(ids: Sequence[int], where: str, max_length: int, positions: int | None,
                  vocab: int | None = None) -> None:
    """Refuse token ids outside the vocabulary and an example (already truncated) longer than the positions."""
    if vocab is not None:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise DataError(f"{where}: token id {bad} is outside the tokenizer's vocabulary (ids 0 … {vocab - 1}); "
                            "pre-tokenize with this model's tokenizer")
    if positions is not None and len(ids) > positions:
        raise DataError(
            f"{where}: {len(ids)} tokens (after truncation to max_length / --max-length {max_length}), more than the "
            f"model's {positions} positions (max_position_embeddings); use --max-length {positions} or less"
        )


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 128,
    n: int | None = None,
    seed: int | None = None,
    text_field: str = "text",
    min_tokens: int = 2,
    max_positions: int | None = None,
) -> Examples:
    """Read, select, tokenize (with the tokenizer's BOS) and truncate to ``max_length`` tokens.

    Pre-tokenized ids must lie in the tokenizer's vocabulary; an example still longer than
    the model's positions after the truncation is refused (``max_positions``, default: the
    tokenizer's ``model_max_length``; see the module docstring).
    """
    if max_length < 2:
        raise DataError(f"max_length={max_length}: need at least 2 tokens per example for a causal-LM loss")
    positions = max_positions if max_positions is not None else model_positions(tokenizer)
    vocab = vocab_size_of(tokenizer)
    records, lines = _read_records(path, text_field)
    idx = select(len(records), n, seed, str(path))
    out: list[tuple[int, ...]] = []
    for i in idx:
        rec = records[i]
        where = f"{path}:{lines[i]}" if lines[i] is not None else f"{path}: example {i}"
        if isinstance(rec, list):
            check_example(rec, where, max_length, None, vocab)
            ids = list(rec)[:max_length]
        else:
            ids = tokenizer(rec, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        check_example(ids, where, max_length, positions)
        if len(ids) < min_tokens:
            raise DataError(
                f"{where} has {len(ids)} token(s); a causal-LM loss needs at least {min_tokens}. "
                "Remove it from the file."
            )
        out.append(tuple(int(t) for t in ids))
    return Examples(tuple(out), source=str(path))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX at padding
    index: list[int]  # positions of these examples in the Examples

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.index)


def collate(examples: Examples, index: Sequence[int], pad_id: int) -> Batch:
    """Right-pad the chosen examples; labels are the input ids with padding masked out."""
    seqs = [examples.input_ids[i] for i in index]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return Batch(ids, mask, labels, list(index))


def batches(examples: Examples, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Consecutive batches in order (deterministic)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield collate(examples, range(start, min(start + batch_size, len(examples))), pad_id)


def pad_id_of(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        val = getattr(tokenizer, attr, None)
        if val is not None:
            return int(val)
    return 0


def plan_batches(
    examples: Examples, index: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Split ``index`` (in order) into batches of at most ``batch_size`` examples and, when
    ``max_tokens`` is given, at most ``max_tokens`` padded tokens (batch × longest example)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in index:
        length = len(examples.input_ids[i])
        if max_tokens is not None and length > max_tokens:
            raise DataError(f"example {i} has {length} tokens, more than max_tokens={max_tokens}; raise it")
        grow = max(longest, length) * (len(cur) + 1)
        if cur and (len(cur) >= batch_size or (max_tokens is not None and grow > max_tokens)):
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, length)
    if cur:
        out.append(cur)
    return out
