"""The engine on CUDA (bf16 weights, fp32 accumulation) against CPU float32: runs where a GPU exists."""

from __future__ import annotations

import pytest
import torch

from layerif_plugins.data import load_examples
from layerif_plugins.engine import InfluenceConfig, compute_influence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(stories, tinystories_train, tinystories_valid, dtype):
    model, tok = stories
    train = load_examples(tinystories_train, tok, max_length=64, n=16)
    val = load_examples(tinystories_valid, tok, max_length=64, n=8)
    cfg = InfluenceConfig(params="all", show_progress=False)
    cpu = torch.tensor(compute_influence(model, train, val, 0, cfg).layer_scores)
    gpu = torch.tensor(compute_influence(model.to("cuda", dtype), train, val, 0, cfg).layer_scores)
    tol = 1e-3 if dtype == torch.float32 else 0.1
    assert torch.allclose(gpu, cpu, rtol=tol)
    assert torch.argsort(gpu).tolist() == torch.argsort(cpu).tolist() or dtype == torch.bfloat16


def test_one_pass_equals_four_pass_on_cuda(stories, tinystories_train, tinystories_valid):
    model, tok = stories
    train = load_examples(tinystories_train, tok, max_length=64, n=16)
    val = load_examples(tinystories_valid, tok, max_length=64, n=8)
    model = model.to("cuda", torch.bfloat16)
    four = compute_influence(model, train, val, 0, InfluenceConfig(params="all", mode="four-pass", show_progress=False))
    one = compute_influence(model, train, val, 0, InfluenceConfig(params="all", mode="one-pass", show_progress=False))
    scale = four.per_example.abs().max()
    assert float((one.per_example - four.per_example).abs().max() / scale) < 1e-5
    assert one.model_batches == 1 + 2 and four.model_batches == 1 + 3 * 2 and one.factor_bytes > 0
