"""Held-out losses of a model changed in one decoder layer only, run from that layer on.

The planner's sensitivity table (``allocation: sensitivity``) prunes one layer at a time and
measures the held-out loss, L × levels times. Everything before the pruned layer is the dense
model's, so its output — the pruned layer's input — is the same for every level: capturing each
layer's input once (one dense forward) and running only layers ``l … L-1``, the final norm and
the head gives the same numbers as a full forward at about half the cost on average.

Exact only for families whose causal-LM head is ``lm_head(norm(last block output))`` with no
extra scaling (Llama, Mistral, Qwen2/3); :func:`resumable` says which, and callers fall back
to a full forward for the others.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from layerif_plugins.data import Examples
from layerif_plugins.data.text import batches
from layerif_plugins.evaluation.perplexity import token_losses_from_logits
from layerif_plugins.models.families import decoder_blocks

#: model types whose logits are ``lm_head(model.norm(h_L))`` (no soft-cap, no logit scale)
RESUMABLE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def resumable(model: nn.Module) -> bool:
    """Whether :class:`LayerResume` reproduces this model's forward exactly."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (getattr(cfg, "model_type", None) in RESUMABLE_TYPES and isinstance(getattr(inner, "norm", None), nn.Module)
            and model.get_output_embeddings() is not None)


def _record_input(into: list[Any], _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook: keep a block's hidden-state input (a copy) and its other arguments."""
    hidden = args[0] if args else kwargs["hidden_states"]
    kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    into.append((hidden.detach().clone(), args[1:], kw))


class LayerResume:
    """Per-example losses of ``examples`` with layers ``< start`` as they were at :meth:`capture` time."""

    def __init__(self, model: nn.Module, examples: Examples, pad_id: int = 0, batch_size: int = 16):
        if not resumable(model):
            raise ValueError(f"LayerResume needs a model type in {sorted(RESUMABLE_TYPES)}; use a full forward")
        self.model, self.examples, self.pad_id, self.batch_size = model, examples, pad_id, batch_size
        self.blocks = decoder_blocks(model)
        # per batch: its labels, and per layer the (hidden input, other args, kwargs) of the dense forward
        self._cache: list[tuple[torch.Tensor, list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]]]] = []

    def _batches(self) -> Iterator[Any]:
        device = next(self.model.parameters()).device
        for batch in batches(self.examples, self.batch_size, self.pad_id):
            yield batch.to(device)

    @torch.no_grad()
    def capture(self) -> tuple[list[float], list[int]]:
        """One full forward: record every layer's inputs; returns the (dense) per-example losses."""
        self._cache.clear()
        sums: list[float] = []
        counts: list[int] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for b in self._batches():
                inputs: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]] = []
                record = functools.partial(_record_input, inputs)
                handles = [blk.register_forward_pre_hook(record, with_kwargs=True) for blk in self.blocks]
                try:
                    logits = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                        use_cache=False).logits
                finally:
                    for h in handles:
                        h.remove()
                if len(inputs) != len(self.blocks):
                    raise RuntimeError(f"captured {len(inputs)} layer inputs for {len(self.blocks)} layers")
                self._cache.append((b.labels, inputs))
                s, c = token_losses_from_logits(logits, b.labels)
                sums += s
                counts += c
        finally:
            self.model.train(was_training)
        return sums, counts

    @torch.no_grad()
    def losses(self, start: int) -> tuple[list[float], list[int]]:
        """Per-example (summed loss, token count) running layers ``start …`` from the captured inputs."""
        if not self._cache:
            raise RuntimeError("call capture() on the unchanged model first")
        was_training = self.model.training
        self.model.eval()
        sums: list[float] = []
        counts: list[int] = []
        try:
            for labels, inputs in self._cache:
                hidden = inputs[start][0]
                for k in range(start, len(self.blocks)):
                    _, rest, kw = inputs[k]
                    out = self.blocks[k](hidden, *rest, **kw)
                    hidden = out[0] if isinstance(out, tuple) else out
                logits = self.model.get_output_embeddings()(self.model.model.norm(hidden))
                s, c = token_losses_from_logits(logits, labels)
                sums += s
                counts += c
        finally:
            self.model.train(was_training)
        return sums, counts

    def clear(self) -> None:
        self._cache.clear()


__all__ = ["RESUMABLE_TYPES", "LayerResume", "resumable"]
