"""Perplexity of a causal LM on a local text file: token-weighted, batched, deterministic.

Each document is scored on its own, preceded by the BOS token (EOS when the tokenizer
has no BOS), with lm-eval's rolling-window scheme (``loglikelihood_rolling``): windows
predict disjoint chunks of at most ``context_length`` tokens, and every window after the
first conditions on the ``context_length`` tokens before its last prediction. The result
carries the total NLL and the token, word and byte counts, so token perplexity, lm-eval's
word/byte perplexity and bits per byte all come from one pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import IGNORE_INDEX, Examples, batches
from layerif_plugins.errors import DataError
from layerif_plugins.evaluation.documents import read_perplexity_docs


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # total negative log-likelihood (nats)
    tokens: int
    words: int
    bytes: int
    docs: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(perplexity=self.perplexity, word_perplexity=self.word_perplexity,
                 byte_perplexity=self.byte_perplexity, bits_per_byte=self.bits_per_byte)
        return d


def rolling_windows(n_tokens: int, context_length: int) -> list[tuple[int, int, int]]:
    """``(input_start, input_end, n_pred)`` over ``seq = [prefix] + tokens`` (lm-eval's scheme).

    The window's input is ``seq[input_start:input_end]`` (at most ``context_length`` ids) and
    the outputs at its last ``n_pred`` positions predict ``tokens[input_end - n_pred : input_end]``
    (= ``seq[input_end - n_pred + 1 : input_end + 1]``); the windows' predictions are disjoint.
    """
    if context_length < 1:
        raise DataError(f"context_length={context_length}: a window needs at least 1 token of context")
    out = []
    start = 0
    while start < n_tokens:
        end = min(start + context_length, n_tokens)
        in_start = max(0, end - context_length)
        out.append((in_start, end, end - start))
        start = end
    return out


@dataclass(frozen=True)
class Window:
    """One rolling window: the model reads ``ids``; its last ``len(targets)`` outputs predict ``targets``.

    ``prompt`` (``ids`` plus the last target) is the same window for an engine that scores
    prompt log-probabilities (vLLM): the log-probabilities of its last ``len(targets)``
    tokens are the window's score.
    """

    ids: list[int]
    targets: list[int]

    @property
    def prompt(self) -> list[int]:
        return [*self.ids, self.targets[-1]]


def perplexity_documents(texts: str | Path | Sequence[str], max_docs: int | None = None) -> list[str]:
    """The documents every backend scores: a text / JSONL file's (first ``max_docs``), or the list given."""
    docs = read_perplexity_docs(texts, max_docs=max_docs) if isinstance(texts, (str, Path)) else list(texts)
    if max_docs and not isinstance(texts, (str, Path)):
        docs = docs[:max_docs]
    if not docs:
        raise DataError(f"no documents to evaluate in {texts if isinstance(texts, (str, Path)) else 'the list given'}")
    return docs


def document_windows(tokenizer: Any, docs: Sequence[str], context_length: int) -> tuple[list[Window], int]:
    """The rolling windows of every document (each scored on its own after BOS) and the token count.

    The one windowing scheme of the project: :func:`perplexity` runs these windows through an
    HF model, :mod:`layerif_plugins.integrations.vllm_backend` sends their ``prompt`` to vLLM.
    """
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise DataError("the tokenizer has neither a BOS nor an EOS token to start each document with")
    windows: list[Window] = []
    n_tokens = 0
    for text in docs:
        toks = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        seq = [prefix, *toks]
        n_tokens += len(toks)
        for s, e, n_pred in rolling_windows(len(toks), context_length):
            windows.append(Window(ids=seq[s:e], targets=toks[e - n_pred : e]))
    return windows, n_tokens


def perplexity_result(nll: float, n_tokens: int, docs: Sequence[str]) -> PerplexityResult:
    """Total NLL of ``docs`` → :class:`PerplexityResult` with lm-eval's word and byte counts."""
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return PerplexityResult(nll=nll, tokens=n_tokens, words=words, bytes=n_bytes, docs=len(docs))


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Path | Sequence[str],
    context_length: int | None = None,
    batch_size: int = 8,
    max_docs: int | None = None,
    show_progress: bool = False,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on a text file (or a list of documents)."""
    docs = perplexity_documents(texts, max_docs)
    ctx = context_length or int(getattr(model.config, "max_position_embeddings", 512))
    device = next(model.parameters()).device
    pieces, n_tokens = document_windows(tokenizer, docs, ctx)
    total = 0.0
    was_training = model.training
    model.eval()
    order = sorted(range(len(pieces)), key=lambda k: -len(pieces[k].ids))  # similar lengths together
    bar = tqdm(total=len(pieces), desc="perplexity", disable=not show_progress, leave=False)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            chunk = [pieces[k] for k in order[b : b + batch_size]]
            width = max(len(w.ids) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, : len(w.ids)] = torch.tensor(w.ids)
                mask[r, : len(w.ids)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
            for r, w in enumerate(chunk):
                n = len(w.ids)
                lp = F.log_softmax(logits[r, n - len(w.targets) : n], dim=-1)
                tgt = torch.tensor(w.targets, device=device)
                total -= float(lp.gather(1, tgt[:, None]).double().sum())
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return perplexity_result(total, n_tokens, docs)


@torch.no_grad()
def token_losses_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[int]]:
    """Per row: summed next-token cross-entropy (fp32, ``IGNORE_INDEX`` excluded) and its token count."""
    logits = logits.float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    return [float(x) for x in nll.sum(dim=1)], [int(x) for x in (target != IGNORE_INDEX).sum(dim=1)]


@torch.no_grad()
def example_token_losses(model: nn.Module, examples: Examples, pad_id: int, batch_size: int = 16
                         ) -> tuple[list[float], list[int]]:
    """Per example: the summed next-token cross-entropy (nats, padding excluded) and its token count.

    The unit of paired comparisons between pruned candidates (layerif_plugins/plan/decide.py):
    every candidate is scored on the same examples, so differences can be taken example by example.
    Without gradients: a model loaded for llm-compressor keeps ``requires_grad`` on its weights, and
    a forward that records its graph held ≈ 3 GiB more on SmolLM2-135M (16 × 128-token batches) for
    the planner's whole search (benchmarks/README.md, *Planner memory*).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for batch in batches(examples, batch_size, pad_id):
        b = batch.to(device)
        s, c = token_losses_from_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                              use_cache=False).logits, b.labels)
        sums += s
        counts += c
    model.train(was_training)
    if sum(counts) == 0:
        raise DataError("the examples hold no predictable tokens")
    return sums, counts


def mean_token_loss(model: nn.Module, examples: Examples, pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Token-weighted mean next-token cross-entropy (nats/token, padding excluded) and the token count.

    The held-out metric of fine-tuning and healing runs (examples as given, no rolling windows).
    """
    sums, counts = example_token_losses(model, examples, pad_id, batch_size)
    return sum(sums) / sum(counts), sum(counts)
