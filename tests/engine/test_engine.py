"""The engine against the slow per-pair oracle, on the real stories260K and real data."""

from __future__ import annotations

import pytest
import torch

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.engine import InfluenceConfig, aggregate_positive, compute_influence, reference_influence
from layerif_plugins.errors import ConfigError, DataError, NumericsError


def _varied(examples: Examples, base: int, step: int) -> Examples:
    """Different lengths per example, so padding is exercised."""
    return Examples(tuple(ids[: base + step * i] for i, ids in enumerate(examples.input_ids)), examples.source)


@pytest.fixture(scope="module")
def task(stories_dir, tinystories_train, tinystories_valid):
    from layerif_plugins.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(stories_dir)
    train = _varied(load_examples(tinystories_train, tok, max_length=96, n=16), 24, 4)
    val = _varied(load_examples(tinystories_valid, tok, max_length=64, n=8), 12, 6)
    return train, val


@pytest.mark.parametrize("params", ["attn", "mlp", "all"])
def test_engine_equals_reference_float64(stories, task, params):
    model, _ = stories
    model = model.double()
    train, val = task
    assert len({len(x) for x in train.input_ids}) == len(train)  # all lengths differ
    ref = reference_influence(model, train, val, params=params)
    for mode in ("materialize", "ghost"):
        cfg = InfluenceConfig(params=params, batch_size=5, pairwise=True, grad_mode=mode, show_progress=False)
        res = compute_influence(model, train, val, pad_id=0, config=cfg)
        scale = ref.abs().max()
        assert float((res.pairwise - ref).abs().max() / scale) < 1e-6
        # the aggregated path (no pairwise) gives s_i^l = Σ_j IF_l(i, j)
        cfg_sum = InfluenceConfig(params=params, batch_size=3, grad_mode=mode, show_progress=False)
        summed = compute_influence(model, train, val, pad_id=0, config=cfg_sum)
        expected = ref.sum(dim=2).T  # (n, L)
        assert float((summed.per_example - expected).abs().max() / expected.abs().max()) < 1e-6
        s_ref = torch.clamp(-expected, min=0).sum(dim=0)
        assert torch.allclose(torch.tensor(summed.layer_scores, dtype=torch.float64), s_ref, rtol=1e-6)


def test_engine_equals_reference_float32(stories, task):
    model, _ = stories
    train, val = task
    ref = reference_influence(model, train, val, params="all")
    res = compute_influence(model, train, val, pad_id=0,
                            config=InfluenceConfig(params="all", batch_size=4, pairwise=True, show_progress=False))
    assert float((res.pairwise - ref).abs().max() / ref.abs().max()) < 1e-4


def test_aggregation_is_positive_part():
    s = torch.tensor([[1.0, -2.0], [-3.0, 4.0], [-0.5, -0.5]])
    assert aggregate_positive(s).tolist() == [3.5, 2.5]


def test_lambda_matches_formula(stories, task):
    """λ_w = 0.1 · Σ_i ||g_i||² / (n · numel(w)) with per-example grads from batch-size-1 passes."""
    model, _ = stories
    model = model.double()
    train, val = task
    res = compute_influence(model, train, val, pad_id=0,
                            config=InfluenceConfig(params="attn", batch_size=8, show_progress=False))
    name = "model.layers.2.self_attn.v_proj"
    weight = dict(model.named_modules())[name].weight
    total = 0.0
    for ids in train.input_ids:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:])
        (g,) = torch.autograd.grad(loss, weight)
        total += float(g.pow(2).sum())
    assert res.lambdas[name] == pytest.approx(0.1 * total / (len(train) * weight.numel()), rel=1e-9)


def test_bit_identical_across_runs(stories, task):
    model, _ = stories
    train, val = task
    cfg = InfluenceConfig(params="attn", batch_size=4, show_progress=False)
    a = compute_influence(model, train, val, pad_id=0, config=cfg)
    b = compute_influence(model, train, val, pad_id=0, config=cfg)
    assert a.layer_scores == b.layer_scores
    assert torch.equal(a.per_example, b.per_example)


def test_batch_size_does_not_change_scores(stories, task):
    model, _ = stories
    model = model.double()
    train, val = task
    a = compute_influence(model, train, val, 0, InfluenceConfig(batch_size=1, show_progress=False))
    b = compute_influence(model, train, val, 0, InfluenceConfig(batch_size=16, show_progress=False))
    assert torch.allclose(a.per_example, b.per_example, rtol=1e-9, atol=0)


def test_parameters_restored_and_grads_untouched(stories, task):
    model, _ = stories
    train, val = task
    flags = [p.requires_grad for p in model.parameters()]
    compute_influence(model, train, val, 0, InfluenceConfig(show_progress=False))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_names_layer_and_example(stories, task):
    model, _ = stories
    train, val = task
    with torch.no_grad():
        model.model.layers[3].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericsError, match=r"non-finite .*example 0"):
        compute_influence(model, train, val, 0, InfluenceConfig(show_progress=False))


def test_bad_config_and_empty_data(stories, task):
    model, _ = stories
    train, val = task
    with pytest.raises(ConfigError, match="params"):
        compute_influence(model, train, val, 0, InfluenceConfig(params="ffn", show_progress=False))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="damping"):
        compute_influence(model, train, val, 0, InfluenceConfig(damping=0, show_progress=False))
    with pytest.raises(DataError, match="at least one"):
        compute_influence(model, Examples(()), val, 0, InfluenceConfig(show_progress=False))


def test_task_specific_profiles(stories, tinystories_train, tinystories_valid, shakespeare):
    """TinyStories and Shakespeare validation sets give different layer profiles."""
    model, tok = stories
    train = load_examples(tinystories_train, tok, max_length=64, n=24)
    stories_val = load_examples(tinystories_valid, tok, max_length=64, n=12)
    shakes_val = load_examples(shakespeare, tok, max_length=64, n=12)
    cfg = InfluenceConfig(params="attn", show_progress=False)
    a = torch.tensor(compute_influence(model, train, stories_val, 0, cfg).layer_scores)
    b = torch.tensor(compute_influence(model, train, shakes_val, 0, cfg).layer_scores)
    a, b = a / a.sum(), b / b.sum()
    assert float((a - b).abs().max()) > 0.02
    assert torch.argsort(a).tolist() != torch.argsort(b).tolist()


def test_thread_defaults_respect_the_user(monkeypatch):
    """PASSIVE and all available CPUs unless the user chose; in-process the policy only reaches subprocesses."""
    from layerif_plugins.engine.threads import available_cpus, configure_threads, threads_env

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        s = configure_threads()
        assert (s.wait_policy, s.wait_policy_source, s.num_threads_source) == ("PASSIVE", "default", "default")
        assert s.num_threads == available_cpus() == torch.get_num_threads()
        assert not s.wait_policy_effective  # torch (and its OpenMP runtime) was loaded before
        monkeypatch.setenv("OMP_WAIT_POLICY", "active")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        s = configure_threads()
        assert (s.wait_policy, s.num_threads, s.num_threads_source) == ("ACTIVE", 1, "OMP_NUM_THREADS")
        assert s.wait_policy_effective
        assert configure_threads(num_threads=1, wait_policy="passive").wait_policy_source == "argument"
        assert threads_env(2, "PASSIVE", base={})["OMP_WAIT_POLICY"] == "PASSIVE"
        with pytest.raises(ConfigError, match="wait_policy"):
            configure_threads(wait_policy="spin")
    finally:
        torch.set_num_threads(before)
