"""One-pass mode: the held factors give the four-pass engine's scores with one train pass; budgets fall back."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.engine import InfluenceConfig, compute_influence, reference_influence
from layerif_plugins.engine.factors import (
    CPU_RESERVE_MIN_BYTES,
    default_factor_budget,
    free_memory,
    parse_bytes,
    release_freed_memory,
)
from layerif_plugins.engine.passes import factor_budget
from layerif_plugins.errors import ConfigError


@pytest.fixture(scope="module")
def task(stories_dir, tinystories_train, tinystories_valid):
    """12 train examples of 12 different lengths (padding exercised), 6 validation examples."""
    from layerif_plugins.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(stories_dir)
    train = load_examples(tinystories_train, tok, max_length=80, n=12)
    train = Examples(tuple(ids[: 20 + 5 * i] for i, ids in enumerate(train.input_ids)), train.source)
    val = load_examples(tinystories_valid, tok, max_length=48, n=6)
    return train, val


def _cfg(**kw) -> InfluenceConfig:
    return InfluenceConfig(batch_size=4, show_progress=False, **kw)


@pytest.mark.parametrize("params", ["attn", "mlp", "all"])
@pytest.mark.parametrize("grad_mode", ["ghost", "materialize"])
def test_one_pass_equals_four_pass_float64(stories, task, params, grad_mode):
    model, _ = stories
    model = model.double()
    train, val = task
    four = compute_influence(model, train, val, 0, _cfg(params=params, grad_mode=grad_mode, mode="four-pass"))
    one = compute_influence(model, train, val, 0, _cfg(params=params, grad_mode=grad_mode, mode="one-pass",
                                                       max_factor_memory="1GB"))
    rel = float((one.per_example - four.per_example).abs().max() / four.per_example.abs().max())
    assert rel < 1e-6
    assert torch.equal(one.per_example, four.per_example)  # same batches, same order, same representation
    assert one.layer_scores == four.layer_scores
    assert one.lambdas == four.lambdas
    train_batches, val_batches = math.ceil(len(train) / 4), math.ceil(len(val) / 4)
    assert one.model_batches == val_batches + train_batches  # the train set went through the model once
    assert four.model_batches == val_batches + 3 * train_batches


def test_one_pass_matches_the_oracle_pairwise(stories, task):
    model, _ = stories
    model = model.double()
    train, val = task
    ref = reference_influence(model, train, val, params="all")
    one = compute_influence(model, train, val, 0, _cfg(params="all", pairwise=True, mode="one-pass"))
    assert float((one.pairwise - ref).abs().max() / ref.abs().max()) < 1e-6


def test_budget_fallback_keeps_scores_and_logs_why(stories, task, caplog):
    model, _ = stories
    model = model.double()
    train, val = task
    four = compute_influence(model, train, val, 0, _cfg(params="attn", mode="four-pass"))
    # nothing fits: the four-pass cost, with a warning naming the budget
    with caplog.at_level(logging.WARNING, logger="layerif_plugins.engine.runner"):
        none = compute_influence(model, train, val, 0, _cfg(params="attn", mode="one-pass", max_factor_memory="1KB"))
    assert "0 of 3 train batches fit in max_factor_memory" in caplog.text
    assert none.model_batches == four.model_batches
    assert torch.equal(none.per_example, four.per_example)
    # the budget holds some batches: fewer model passes than four-pass, more than one-pass
    full = compute_influence(model, train, val, 0, _cfg(params="attn", mode="one-pass"))
    assert 0 < full.factor_bytes and none.factor_bytes == 0
    part = compute_influence(model, train, val, 0, _cfg(params="attn", mode="auto",
                                                        max_factor_memory=full.factor_bytes // 2))
    assert 0 < part.factor_bytes <= full.factor_bytes // 2
    assert full.model_batches < part.model_batches < four.model_batches
    assert torch.equal(part.per_example, four.per_example)
    assert torch.equal(full.per_example, four.per_example)


def test_one_pass_resume_after_the_train_pass_is_bit_identical(stories, task, tmp_path):
    """A resumed run has lost the held factors: it finishes with model passes and the same bits."""
    model, _ = stories
    train, val = task
    clean = compute_influence(model, train, val, 0, _cfg(mode="one-pass"))

    def crash_after_pass1(name: str) -> None:
        if name == "pass1":
            raise KeyboardInterrupt("simulated kill")

    cfg = _cfg(mode="one-pass", checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(KeyboardInterrupt):
        compute_influence(model, train, val, 0, cfg, on_pass_end=crash_after_pass1)
    resumed = compute_influence(model, train, val, 0, cfg)
    assert resumed.model_batches == 2 * math.ceil(len(train) / 4)  # pass 2 and 3 ran the model
    assert torch.equal(resumed.per_example, clean.per_example)


def test_parse_bytes_and_bad_mode(stories, task):
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(" 1.5e3 ") == 1500
    assert parse_bytes(1000) == 1000
    assert parse_bytes(None) is None
    with pytest.raises(ConfigError, match="4 gigs"):
        parse_bytes("4 gigs")
    model, _ = stories
    train, val = task
    with pytest.raises(ConfigError, match="mode must be"):
        compute_influence(model, train, val, 0, _cfg(mode="two-pass"))  # type: ignore[arg-type]


def test_default_budget_cpu_keeps_a_reserve_cuda_half():
    gib = 2**30
    # CPU: the available memory less max(2 GiB, a quarter); the 2-core machine's case: 19.2 GiB free → 14.4 GiB,
    # enough for the 10.6 GB of factors of SmolLM2's 256 train examples (half, 9.6 GiB, was not)
    assert default_factor_budget(int(19.2 * gib), "cpu") == int(19.2 * gib) - int(0.25 * int(19.2 * gib))
    assert default_factor_budget(6 * gib, "cpu") == 4 * gib  # the 2 GiB floor of the reserve
    assert default_factor_budget(CPU_RESERVE_MIN_BYTES, "cpu") == 0
    assert default_factor_budget(gib, "cpu") == 0  # less free memory than the reserve: hold nothing (four-pass)
    assert default_factor_budget(-5, "cpu") == 0
    assert default_factor_budget(100 * gib, "cuda") == 50 * gib


def test_factor_budget_reads_the_option_or_the_free_memory():
    cpu = torch.device("cpu")
    assert factor_budget(_cfg(mode="four-pass", max_factor_memory="1GB"), cpu) == 0
    assert factor_budget(_cfg(mode="one-pass", max_factor_memory="512MiB"), cpu) == 512 * 2**20
    assert release_freed_memory() in (True, False)  # glibc: trims; elsewhere a no-op
    free = free_memory(cpu)
    got = factor_budget(_cfg(mode="auto"), cpu)
    # the free memory moves between the two reads; the rule holds within that drift
    assert abs(got - default_factor_budget(free, "cpu")) <= max(64 * 2**20, free // 20)
