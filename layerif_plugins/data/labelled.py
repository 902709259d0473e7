"""Labelled JSONL (one ``{"text": …, "label": …}`` object per line) → tokenized examples + class ids.

Used by the ``variability`` scorer. Labels may be strings or integers (not both in one
file; booleans are refused); they are mapped to class ids ``0 … |Y|−1`` in sorted order
of the label values, and the names are kept in :attr:`LabelledExamples.classes`. Every
malformed line (bad JSON, bad UTF-8) is reported with its line number; an example longer
than the model's positions after truncation is refused as in :func:`~layerif_plugins.data.load_examples`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerif_plugins.data.text import Examples, check_example, iter_jsonl_objects, model_positions, select
from layerif_plugins.errors import DataError


@dataclass(frozen=True)
class LabelledExamples:
    """Examples with one class id each; ``classes[id]`` is the label as written in the file."""

    examples: Examples
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, Any]]:
    """``(text, label)`` for every non-blank line; labels are ``str`` or ``int`` (one kind per file)."""
    return [(text, label) for _, text, label in _read_labelled(path, text_field, label_field)]


def _read_labelled(path: str | Path, text_field: str, label_field: str) -> list[tuple[int, str, Any]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"labelled data file not found: {path}")
    rows: list[tuple[int, str, Any]] = []
    kind: type | None = None
    for lineno, obj in iter_jsonl_objects(path):
        text = obj.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{lineno}: no non-empty {text_field!r} string (keys: {sorted(obj)}); "
                            "pass --text-field to name the text field")
        if label_field not in obj:
            raise DataError(f"{path}:{lineno}: no {label_field!r} field (keys: {sorted(obj)}); "
                            "pass --label-field to name the label field")
        label = obj[label_field]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{path}:{lineno}: label {label!r} must be a string or an integer")
        if kind is None:
            kind = type(label)
        elif type(label) is not kind:
            raise DataError(f"{path}:{lineno}: label {label!r} is a {type(label).__name__} but earlier labels "
                            f"are {kind.__name__}s; use one kind of label per file")
        rows.append((lineno, text, label))
    if not rows:
        raise DataError(f"{path} holds no labelled examples")
    return rows


def load_labelled(
    path: str | Path,
    tokenizer: Any,
    max_length: int = 128,
    n: int | None = None,
    seed: int | None = None,
    text_field: str = "text",
    label_field: str = "label",
) -> LabelledExamples:
    """Read, select (first ``n`` or a seeded sample), tokenize with BOS and truncate to ``max_length``."""
    rows = _read_labelled(path, text_field, label_field)
    idx = select(len(rows), n, seed, str(path))
    chosen = [rows[i] for i in idx]
    classes = sorted({label for _, _, label in chosen})
    class_id = {c: k for k, c in enumerate(classes)}
    positions = model_positions(tokenizer)
    ids = []
    for lineno, text, _ in chosen:
        toks = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if len(toks) < 1:
            raise DataError(f"{path}:{lineno}: the text tokenizes to no tokens")
        check_example(toks, f"{path}:{lineno}", max_length, positions)
        ids.append(tuple(int(t) for t in toks))
    return LabelledExamples(
        examples=Examples(tuple(ids), source=str(path)),
        labels=tuple(class_id[label] for _, _, label in chosen),
        classes=tuple(str(c) for c in classes),
    )
