"""Built-in evaluation tasks made from local data, for models too small for standard benchmarks.

``tinystories-mc``: a multiple-choice next-sentence task built deterministically from the
TinyStories validation split. Each item gives the beginning of a story (whole sentences)
and asks which of ``n_choices`` sentences comes next: the true next sentence, or
sentences of similar length taken from *other* stories. A model that tracks characters,
objects and the plot picks the true one; chance is ``1 / n_choices``. The items are
written as JSONL in the ``question`` / ``choices`` / ``label`` layout that
:mod:`layerif_plugins.integrations.lm_eval` reads, so any model can be scored on it with
lm-eval (``acc`` and the length-normalised ``acc_norm``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerif_plugins.data import read_records
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.io import atomic_write_text
from layerif_plugins.paths import shared_data

# split after ., ! or ? (optionally closed by a quote) followed by whitespace
_SENTENCE_END = re.compile(r'(?<=[.!?])\s+|(?<=[.!?]["\'”])\s+')


def split_sentences(text: str) -> list[str]:
    """Sentences of a story, whitespace collapsed (paragraph breaks become spaces)."""
    flat = " ".join(text.split())
    return [s for s in (p.strip() for p in _SENTENCE_END.split(flat)) if s]


def _n_words(s: str) -> int:
    return len(s.split())


def build_tinystories_mc(
    stories: Sequence[str] | str | Path | None = None,
    n: int = 200,
    n_choices: int = 4,
    seed: int = 1234,
    max_context_chars: int = 600,
    min_context_sentences: int = 2,
    min_words: int = 4,
    max_words: int = 30,
) -> list[dict[str, Any]]:
    """Items ``{"question", "choices", "label", "story"}``; the same arguments give the same items.

    Args:
        stories: story texts, or a TinyStories-format file (default: the shared validation split).
        n: number of items (at most one per story).
        n_choices: answer options per item (the true sentence + ``n_choices - 1`` distractors).
        seed: seeds the choice of stories, positions, distractors and label order.
        max_context_chars: the context keeps the latest whole sentences that fit in this many characters.
        min_context_sentences: sentences of context before the answer, at least.
        min_words / max_words: length bounds of answer and distractor sentences.
    """
    if n < 1 or n_choices < 2:
        raise DataError(f"tinystories-mc: need n >= 1 and n_choices >= 2, got n={n}, n_choices={n_choices}")
    if stories is None:
        stories = shared_data("tinystories", "valid.txt")
    if isinstance(stories, (str, Path)):
        texts = [r for r in read_records(stories) if isinstance(r, str)]
    else:
        texts = list(stories)
    split = [split_sentences(t) for t in texts]
    ok = [min_words <= _n_words(s) <= max_words for sents in split for s in sents]
    # pool of candidate distractors: (story index, sentence), bucketed by word count
    by_len: dict[int, list[tuple[int, str]]] = {}
    k = 0
    for i, sents in enumerate(split):
        for s in sents:
            if ok[k]:
                by_len.setdefault(_n_words(s), []).append((i, s))
            k += 1
    rng = random.Random(seed)
    order = list(range(len(split)))
    rng.shuffle(order)
    items: list[dict[str, Any]] = []
    for i in order:
        if len(items) == n:
            break
        sents = split[i]
        positions = [p for p in range(min_context_sentences, len(sents))
                     if min_words <= _n_words(sents[p]) <= max_words]
        if not positions:
            continue
        p = rng.choice(positions)
        answer = sents[p]
        context: list[str] = []
        for s in reversed(sents[:p]):
            if context and len(s) + 1 + sum(len(c) + 1 for c in context) > max_context_chars:
                break
            context.insert(0, s)
        distractors = _distractors(by_len, answer, i, n_choices - 1, rng)
        if distractors is None:
            continue
        label = rng.randrange(n_choices)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"question": " ".join(context), "choices": choices, "label": label, "story": i})
    if len(items) < n:
        raise DataError(
            f"tinystories-mc: only {len(items)} items could be built from {len(split)} stories (asked for {n}); "
            "ask for fewer items or give more stories"
        )
    return items


def _distractors(
    by_len: dict[int, list[tuple[int, str]]], answer: str, story: int, k: int, rng: random.Random
) -> list[str] | None:
    """``k`` distinct sentences from other stories whose word count is close to the answer's."""
    target = _n_words(answer)
    for spread in range(0, 6):
        pool = [s for w in range(target - spread, target + spread + 1) for (j, s) in by_len.get(w, ()) if j != story]
        pool = sorted(set(pool) - {answer})
        if len(pool) >= 4 * k:
            return rng.sample(pool, k)
    return None


def write_tinystories_mc(out: str | Path, **kwargs: Any) -> Path:
    """Build the task (see :func:`build_tinystories_mc`) and write it as JSONL, atomically."""
    items = build_tinystories_mc(**kwargs)
    return atomic_write_text(out, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))


#: built-in evaluation tasks: name → kind ("mc" or "perplexity")
BUILTIN_TASKS: dict[str, str] = {"tinystories-mc": "mc", "tinystories-ppl": "perplexity"}


def builtin_task_rows(name: str, max_docs: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The rows (``{"question", "choices", "label"}`` or ``{"text"}``) of a built-in task, and their source."""
    from layerif_plugins.evaluation.documents import MC_FIELDS, read_perplexity_docs

    stories = shared_data("tinystories", "valid.txt")
    if name == "tinystories-mc":
        rows = [{k: r[k] for k in MC_FIELDS} for r in build_tinystories_mc(n=max_docs or 200)]
        return rows, f"{stories} (tinystories-mc)"
    if name == "tinystories-ppl":
        return [{"text": d} for d in read_perplexity_docs(stories, max_docs=max_docs)], str(stories)
    raise ConfigError(f"unknown built-in task {name!r}; available: {', '.join(BUILTIN_TASKS)}")
