"""Reading evaluation documents: perplexity texts and multiple-choice items, validated, errors naming the line.

Shared by every backend (the project's own evaluator, lm-eval with hf or vllm, the vLLM
worker), so all of them score exactly the same documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerif_plugins.data import iter_jsonl_objects, read_records
from layerif_plugins.errors import ConfigError, DataError

MC_FIELDS = ("question", "choices", "label")


def read_perplexity_docs(path: str | Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """The documents of a text / JSONL file (the same split as the project's own evaluator)."""
    records = read_records(path, text_field)
    docs = [r for r in records if isinstance(r, str)]
    if len(docs) != len(records):
        raise DataError(f"{path}: perplexity needs text documents, not pre-tokenized 'input_ids'")
    return docs[:max_docs] if max_docs else docs


def read_mc_items(
    path: str | Path, fields: Mapping[str, str] | None = None, max_docs: int | None = None
) -> list[dict[str, Any]]:
    """Validated ``{"question", "choices", "label"}`` items of a JSONL file; errors name the line.

    ``fields`` maps our names to the file's (e.g. ``{"question": "ctx", "choices": "endings"}``);
    a string label must equal one of the choices and becomes its index.
    """
    path = Path(path)
    names = {k: k for k in MC_FIELDS}
    for key, val in (fields or {}).items():
        if key not in names:
            raise ConfigError(f"unknown multiple-choice field {key!r}; map only {', '.join(MC_FIELDS)}")
        names[key] = val
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    items: list[dict[str, Any]] = []
    for lineno, obj in iter_jsonl_objects(path):
        items.append(_mc_item(obj, names, f"{path}:{lineno}"))
        if max_docs and len(items) == max_docs:
            break
    if not items:
        raise DataError(f"{path} holds no multiple-choice items (empty file)")
    return items


def _mc_item(obj: dict[str, Any], names: Mapping[str, str], where: str) -> dict[str, Any]:
    missing = [names[k] for k in MC_FIELDS if names[k] not in obj]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing} (keys: {sorted(obj)}); "
            "name the fields with --mc-fields question=…,choices=…,label=…"
        )
    question, choices, label = (obj[names[k]] for k in MC_FIELDS)
    if not isinstance(question, str):
        raise DataError(f"{where}: {names['question']!r} must be a string, got {type(question).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: {names['choices']!r} must be a list of at least 2 non-empty strings")
    if isinstance(label, str):  # a string label is the text of a choice, "2" included
        if label not in choices:
            raise DataError(f"{where}: label {label!r} is not the text of any of the {len(choices)} choices "
                            "(a string label is a choice's text; write an index as a number, e.g. 1)")
        label = choices.index(label)
    elif isinstance(label, int) and not isinstance(label, bool):
        if not 0 <= label < len(choices):
            raise DataError(
                f"{where}: label {label} does not index the {len(choices)} choices (valid: 0..{len(choices) - 1})"
            )
    else:
        raise DataError(f"{where}: label must be a choice index or the text of a choice, got {label!r}")
    return {"question": question, "choices": choices, "label": label}
