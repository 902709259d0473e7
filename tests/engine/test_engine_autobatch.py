"""``auto_batch_size``: the pure sizing rule, its statistics bound, and the CPU path (batch_size kept)."""

from __future__ import annotations

import pytest
import torch

from layerif_plugins.data import load_examples
from layerif_plugins.engine import InfluenceConfig, compute_influence
from layerif_plugins.engine.autobatch import SAFETY, batch_from_memory, probe_capture_bytes, stats_bytes
from layerif_plugins.engine.capture import frozen_parameters
from layerif_plugins.engine.stats import Precision
from layerif_plugins.errors import ConfigError
from layerif_plugins.models import block_linears

GIB = 2**30


def test_batch_from_memory():
    # fixed + b · per ≤ safety · free: (0.5 · 1000 − 100) // 10 = 40
    assert batch_from_memory(10, 1000, fixed_bytes=100, safety=0.5) == 40
    assert batch_from_memory(10, 1000, fixed_bytes=100, safety=0.5, cap=16) == 16
    assert batch_from_memory(10, 1000) == int(SAFETY * 1000) // 10
    # an H200-like case: 100 GiB left, 1.5 GiB fixed, 300 MiB per example → (50 − 1.5) GiB / 300 MiB = 165
    assert batch_from_memory(300 * 2**20, 100 * GIB, fixed_bytes=int(1.5 * GIB)) == 165
    # nothing fits (or negative free memory): one example at a time, never 0
    assert batch_from_memory(10**9, 10**9, fixed_bytes=10**9) == 1
    assert batch_from_memory(10, -5) == 1
    with pytest.raises(ValueError, match="per_example_bytes"):
        batch_from_memory(0, 1000)
    with pytest.raises(ValueError, match="safety"):
        batch_from_memory(10, 1000, safety=1.5)


def test_stats_bytes_bound():
    shapes = [(4096, 4096), (1024, 4096), (14336, 4096)]
    fixed, per = stats_bytes(shapes, 512, 1, Precision(torch.float32, torch.bfloat16), 512 * 2**20)
    assert fixed == 3 * 512 * 2**20
    assert per == 4 * 2 * 512 * 512 + 512 * 1 * 14336 * (4 + 2)  # AAᵀ, BBᵀ + A·Xᵀ (widest output) and its cast
    _, per_pairwise = stats_bytes(shapes, 512, 8, Precision(torch.float32, torch.float32), 512 * 2**20)
    assert per_pairwise == 4 * 2 * 512 * 512 + 512 * 8 * 14336 * 8


def test_cpu_keeps_batch_size(stories, tinystories_train, tinystories_valid, caplog):
    model, tok = stories
    train = load_examples(tinystories_train, tok, max_length=48, n=20)
    val = load_examples(tinystories_valid, tok, max_length=48, n=6)
    fixed = compute_influence(model, train, val, 0, InfluenceConfig(batch_size=5, show_progress=False))
    with caplog.at_level("INFO", logger="layerif_plugins.engine.autobatch"):
        auto = compute_influence(model, train, val, 0, InfluenceConfig(batch_size=5, auto_batch_size=True,
                                                                       show_progress=False))
    assert "keeping batch_size=5" in caplog.text
    assert auto.batch_size == fixed.batch_size == 5
    assert auto.model_batches == fixed.model_batches
    assert torch.equal(auto.per_example, fixed.per_example)
    assert compute_influence(model, train, val, 0, InfluenceConfig(show_progress=False)).batch_size == 8
    with pytest.raises(ConfigError, match="auto_batch_size must be True or False"):
        InfluenceConfig(auto_batch_size="yes")  # type: ignore[arg-type]


class ScriptedMeter:
    """Stands in for the CUDA allocator's counters (this machine has no GPU): resting 1000 bytes, peaks given."""

    def __init__(self, peaks: list[int]):
        self.peaks = list(peaks)

    def allocated(self) -> int:
        return 1000

    def reset_peak(self) -> None:
        pass

    def peak(self) -> int:
        return 1000 + self.peaks.pop(0)


def test_probe_arithmetic_and_factor_bytes(stories):
    """The probe's bookkeeping on a real capture: per example = peak(2) − peak(1), fixed = the rest, and the
    one-pass bytes per example = T · (4·hidden + 2·kv) fp32 numbers per layer for attn (q/k/v share one input)."""
    model, _ = stories
    cfg = model.config
    ids = tuple(range(1, 41))
    with frozen_parameters(model):
        fixed, per, factors = probe_capture_bytes(model.eval(), block_linears(model, "attn"), ids, 0,
                                                  ScriptedMeter([500, 800]))
    assert (fixed, per) == (200, 300)
    kv = cfg.hidden_size // cfg.num_attention_heads * cfg.num_key_value_heads
    assert factors == len(ids) * (4 * cfg.hidden_size + 2 * kv) * 4 * cfg.num_hidden_layers
