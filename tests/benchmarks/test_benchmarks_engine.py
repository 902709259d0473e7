"""benchmarks/engine.py: the config-built GPU shapes are the named models, built in bf16; a cell runs
end to end with ``--batch-size auto`` and ``--stats-precision bf16`` (on CPU: batch 8)."""

from __future__ import annotations

import argparse

import pytest
import torch
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("engine", "engine_bench")


@pytest.mark.parametrize("name,params", [("qwen15b", 1_543_714_304), ("llama8b", 8_030_261_248)])
def test_gpu_shapes_are_the_named_models_built_in_bf16(bench, name, params):
    """Qwen2-1.5B and Llama-3-8B parameter counts (on the meta device: nothing is allocated), every tensor
    created in bf16 (no fp32 copy of an 8B model ever exists)."""
    model, _, provenance = bench.config_built(name, "meta", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert provenance == "config-built, random weights"


def test_batch_size_argument(bench):
    assert bench.batch_size_arg("auto") == "auto"
    assert bench.batch_size_arg("16") == 16
    for bad in ("0", "-2", "eight"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a batch size"):
            bench.batch_size_arg(bad)


def test_cell_with_auto_batch_and_bf16_statistics(bench, shared):
    args = argparse.Namespace(
        model="stories260k", model_path=None, device="cpu", dtype="bfloat16", n=8, m=4, length=32, data="synthetic",
        params="attn", modes="one-pass,four-pass", batch_size="auto", stats_precision="bf16", repeats=1,
        max_factor_memory=None, reference=False)
    out = bench.cell(args)
    assert out["batch_size"] == 8 and out["stats_precision"] == "bf16"  # CPU: the probe is for CUDA
    assert out["tokens"] == (8 + 4) * 32
    one, four = out["results"]["one-pass"], out["results"]["four-pass"]
    assert one["model_batches"] == 1 + 1 and four["model_batches"] == 1 + 3
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in out["results"].values())
