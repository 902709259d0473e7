"""Data parallelism (torchrun, gloo), kill-and-resume, token budgets, activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from layerif_plugins.data import Examples, load_examples, plan_batches
from layerif_plugins.engine import InfluenceConfig, compute_influence
from layerif_plugins.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def task(stories_dir, tinystories_train, tinystories_valid, shakespeare):
    from layerif_plugins.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(stories_dir)
    return (load_examples(tinystories_train, tok, max_length=48, n=12),
            load_examples(tinystories_valid, tok, max_length=40, n=6),
            load_examples(shakespeare, tok, max_length=40, n=6))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_gloo_equals_one_process(tmp_path, stories_bin, tinystories_train, tinystories_valid):
    common = ["--model", str(stories_bin), "--train", str(tinystories_train), "--val", str(tinystories_valid),
              "--n-train", "12", "--n-val", "6", "--max-length", "40", "--dtype", "float64", "--quiet",
              "--params", "all", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "-m", "layerif_plugins.cli", "score", *common, "--out", str(two)], check=True, env=env,
                   capture_output=True)
    one = tmp_path / "one.json"
    from layerif_plugins.cli import main

    assert main(["score", *common, "--out", str(one)]) == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["params"]["world_size"] == 2
    for x, y in zip(a["scores"], b["scores"], strict=True):
        assert abs(x - y) <= 1e-6 * abs(x)


def test_kill_and_resume_is_bit_identical(stories, task, tmp_path):
    model, _ = stories
    train, val, _ = task
    cfg = InfluenceConfig(params="attn", batch_size=4, show_progress=False, checkpoint_dir=str(tmp_path / "ck"))
    clean = compute_influence(model, train, val, 0, InfluenceConfig(params="attn", batch_size=4,
                                                                     show_progress=False))

    def crash_after_pass1(name: str) -> None:
        if name == "pass1":
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        compute_influence(model, train, val, 0, cfg, on_pass_end=crash_after_pass1)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["meta.json", "pass0.pt", "pass1.pt"]
    done: list[str] = []
    resumed = compute_influence(model, train, val, 0, cfg, on_pass_end=done.append)
    assert done == ["pass0", "pass1", "pass2", "pass3"]
    assert resumed.layer_scores == clean.layer_scores
    assert torch.equal(resumed.per_example, clean.per_example)


def test_resume_refuses_a_changed_command(stories, task, tmp_path):
    model, _ = stories
    train, val, other_val = task
    cfg = InfluenceConfig(show_progress=False, checkpoint_dir=str(tmp_path / "ck"))
    compute_influence(model, train, val, 0, cfg)
    with pytest.raises(ConfigError, match="different run: val"):
        compute_influence(model, train, other_val, 0, cfg)
    with pytest.raises(ConfigError, match="different run: damping"):
        compute_influence(model, train, val, 0, InfluenceConfig(damping=0.2, show_progress=False,
                                                                 checkpoint_dir=str(tmp_path / "ck")))


def test_token_budget_and_checkpointing_keep_scores(stories, task):
    model, _ = stories
    model = model.double()
    train, val, _ = task
    base = compute_influence(model, train, val, 0, InfluenceConfig(show_progress=False))
    budget = compute_influence(model, train, val, 0, InfluenceConfig(max_tokens_per_batch=100, show_progress=False))
    ckpt = compute_influence(model, train, val, 0, InfluenceConfig(gradient_checkpointing=True, show_progress=False))
    assert torch.allclose(budget.per_example, base.per_example, rtol=1e-9, atol=0)
    assert torch.allclose(ckpt.per_example, base.per_example, rtol=1e-9, atol=0)
    assert not getattr(model, "is_gradient_checkpointing", False)


def test_plan_batches():
    ex = Examples(((1,) * 10, (1,) * 30, (1,) * 20, (1,) * 5))
    assert plan_batches(ex, range(4), batch_size=3) == [[0, 1, 2], [3]]
    assert plan_batches(ex, range(4), batch_size=8, max_tokens=60) == [[0, 1], [2, 3]]
    with pytest.raises(DataError, match="max_tokens=25"):
        plan_batches(ex, range(4), batch_size=8, max_tokens=25)
