"""LayerResume: losses run from a changed layer on equal a full forward of the changed model."""

from __future__ import annotations

import pytest
import torch

from layerif_plugins.data import load_examples
from layerif_plugins.evaluation.perplexity import example_token_losses
from layerif_plugins.evaluation.resume import LayerResume, resumable


def _prune_half(block: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w[w.abs() < w.abs().median()] = 0.0


def test_resumed_losses_equal_a_full_forward_of_the_changed_model(stories, tinystories_valid):
    model, tok = stories
    from layerif_plugins.data import Examples

    full = load_examples(tinystories_valid, tok, max_length=48, n=7)
    held = Examples(tuple(x[:20 + 4 * i] for i, x in enumerate(full.input_ids)))  # uneven: padding in a batch
    resume = LayerResume(model, held, pad_id=0, batch_size=4)
    dense = resume.capture()
    full_sums, full_counts = example_token_losses(model, held, pad_id=0, batch_size=4)
    assert dense[0] == pytest.approx(full_sums, abs=1e-6) and dense[1] == full_counts
    blocks = model.model.layers
    for layer in (3, 0, 4):
        saved = {n: p.detach().clone() for n, p in blocks[layer].named_parameters()}
        _prune_half(blocks[layer])
        full_sums, full_counts = example_token_losses(model, held, pad_id=0, batch_size=4)
        sums, counts = resume.losses(layer)
        assert counts == full_counts
        assert sums == pytest.approx(full_sums, abs=1e-5)
        assert max(abs(a - b) for a, b in zip(sums, dense[0], strict=True)) > 1e-3  # the change is visible
        with torch.no_grad():
            for n, p in blocks[layer].named_parameters():
                p.copy_(saved[n])
    assert resume.losses(0)[0] == pytest.approx(dense[0], abs=1e-6)  # restored: the dense losses again


def test_other_families_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from layerif_plugins.data import Examples

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    assert not resumable(model)
    with pytest.raises(ValueError, match="model type"):
        LayerResume(model, Examples(((1, 2, 3),)))
