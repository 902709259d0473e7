"""Task data: text / JSONL files → tokenized examples → padded batches with masked labels.

Supported inputs (chosen by file suffix):

* ``.txt`` (or any other suffix): examples separated by lines that are exactly
  ``<|endoftext|>``; when the file has none, by blank lines;
* ``.jsonl``: one JSON object per line with a text field (default ``"text"``) or with
  pre-tokenized ``"input_ids"``.

Selection is deterministic: the first N examples, or a seeded sample of N.
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


def read_records(path: str | Path, text_field: str = "text") -> list[str | list[int]]:
    """Raw examples of a file: strings, or token-id lists for pre-tokenized JSONL."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field)
    text = path.read_text(encoding="utf-8")
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
    return records


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; bad JSON or a non-object names the line."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _read_jsonl(path: Path, text_field: str) -> list[str | list[int]]:
    records: list[str | list[int]] = []
    for lineno, obj in iter_jsonl_objects(path):
        if "input_ids" in obj:
            ids = obj["input_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise DataError(f"{path}:{lineno}: 'input_ids' must be a list of integers")
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
    return records


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


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 128,
    n: int | None = None,
    seed: int | None = None,
    text_field: str = "text",
    min_tokens: int = 2,
) -> Examples:
    """Read, select, tokenize (with the tokenizer's BOS) and truncate to ``max_length`` tokens."""
    if max_length < 2:
        raise DataError(f"max_length={max_length}: need at least 2 tokens per example for a causal-LM loss")
    records = read_records(path, text_field)
    idx = select(len(records), n, seed, str(path))
    out: list[tuple[int, ...]] = []
    for i in idx:
        rec = records[i]
        if isinstance(rec, list):
            ids = list(rec)[:max_length]
        else:
            ids = tokenizer(rec, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) < min_tokens:
            raise DataError(
                f"{path}: example {i} has {len(ids)} token(s); a causal-LM loss needs at least {min_tokens}. "
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
