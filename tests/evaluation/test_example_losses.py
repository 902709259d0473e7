"""example_token_losses: the per-example held-out losses every planner candidate is judged by."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.evaluation.perplexity import example_token_losses


def _slow_losses(model: torch.nn.Module, held: Examples) -> list[tuple[float, int]]:
    """Independent reference: one example at a time, no padding, float64 log-softmax of each next token."""
    out = []
    for ids in held.input_ids:
        x = torch.tensor([ids])
        lp = F.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
        out.append((-sum(float(lp[t, ids[t + 1]].detach()) for t in range(len(ids) - 1)), len(ids) - 1))
    return out


def test_losses_are_each_examples_summed_next_token_nll_and_keep_no_graph(stories, tinystories_valid):
    """Equal to a one-example-at-a-time float64 reference; and no autograd graph is recorded, even when the
    weights require gradients (as a model loaded for llm-compressor does): the planner calls this 36+ times."""
    model, tok = stories
    model.requires_grad_(True)
    full = load_examples(tinystories_valid, tok, max_length=40, n=6)
    held = Examples(tuple(x[:12 + 5 * i] for i, x in enumerate(full.input_ids)))  # uneven: padding in a batch
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sums, counts = example_token_losses(model, held, pad_id=0, batch_size=4)
    assert saved == []  # nothing kept for a backward pass
    ref = _slow_losses(model, held)
    assert counts == [n for _, n in ref]
    assert sums == pytest.approx([s for s, _ in ref], abs=1e-4, rel=1e-6)
    assert all(math.isfinite(s) and s > 0 for s in sums)
    # the reference itself does record a graph here: the check above can fail
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _slow_losses(model, Examples(held.input_ids[:1]))
    assert saved
