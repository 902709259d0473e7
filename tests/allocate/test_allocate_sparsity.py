"""Scores → per-layer sparsity: hand-computed cases, invariants, refusals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from layerif_plugins.allocate.sparsity import (
    layerwise_sparsity,
    owl_sparsity,
    sparsity_from_scores,
    weighted_mean,
)
from layerif_plugins.errors import AllocationError


def reference_alphapruning(scores, params, target, eps):
    """AlphaPruning's numpy mapping (no clipping), written independently of the library."""
    m = np.asarray(scores, dtype=np.float64)
    p = np.asarray(params, dtype=np.float64)
    r = (m - m.min()) / (m.max() - m.min()) * (eps * 2) + (1 - eps)
    return list(r * (np.sum(p) * target / np.sum(p * r)))


# ----------------------------------------------------------------------------- layerwise_sparsity

def test_hand_computed_case():
    # r = [0.9, 29/30, 31/30, 1.1]; Σ p r = 5.1 with p = [1,1,1,2]; scale = 0.5·5 / 5.1
    out = layerwise_sparsity([1, 2, 3, 4], [1, 1, 1, 2], 0.5, epsilon=0.1)
    scale = 2.5 / 5.1
    assert out == pytest.approx([0.9 * scale, 29 / 30 * scale, 31 / 30 * scale, 1.1 * scale], abs=1e-15)
    assert out[0] == pytest.approx(0.4411764705882353, abs=1e-15)


def test_matches_independent_numpy_reference():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        scores = [rng.gauss(0, 1) for _ in range(n)]
        params = [rng.randint(1, 10**6) for _ in range(n)]
        target, eps = rng.uniform(0.1, 0.7), rng.uniform(0.0, 0.25)
        got = layerwise_sparsity(scores, params, target, epsilon=eps)
        assert got == pytest.approx(reference_alphapruning(scores, params, target, eps), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_invariants_weighted_mean_monotone_cap(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 32)
    scores = [rng.expovariate(1.0) for _ in range(n)]
    params = [rng.randint(1000, 50000) for _ in range(n)]
    target, eps = rng.uniform(0.05, 0.95), rng.uniform(0.0, 1.0)
    out = layerwise_sparsity(scores, params, target, epsilon=eps)
    assert weighted_mean(out, params) == pytest.approx(target, abs=1e-12)
    assert max(out) <= 0.99 + 1e-15 and min(out) >= 0.0
    order = sorted(range(n), key=lambda i: scores[i])
    assert all(out[a] <= out[b] + 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_epsilon_zero_and_equal_scores_give_uniform():
    assert layerwise_sparsity([3, 1, 2], [5, 6, 7], 0.6, epsilon=0.0) == pytest.approx([0.6] * 3, abs=1e-15)
    assert layerwise_sparsity([2.5] * 4, [1, 2, 3, 4], 0.7, epsilon=0.3) == pytest.approx([0.7] * 4, abs=1e-15)


def test_no_params_means_equal_blocks():
    assert layerwise_sparsity([1, 2, 3], None, 0.5) == layerwise_sparsity([1, 2, 3], [7, 7, 7], 0.5)


def test_clip_redistributes_excess_exactly():
    # r = [0.5,0.5,0.5,1.5] → ×1.2 = [0.6,0.6,0.6,1.8]; 1.8 capped at 0.99, the rest carry 3.6 − 0.99 = 2.61
    out = layerwise_sparsity([0, 0, 0, 10], None, 0.9, epsilon=0.5)
    assert out == pytest.approx([0.87, 0.87, 0.87, 0.99], abs=1e-12)


def test_cascading_clips():
    # r = [0.1, 1.0, 1.9]: first pass caps layer 2, the second caps layer 1; layer 0 takes 2.7 − 1.98
    out = layerwise_sparsity([0, 5, 10], None, 0.9, epsilon=0.9)
    assert out == pytest.approx([0.72, 0.99, 0.99], abs=1e-12)
    assert sum(out) / 3 == pytest.approx(0.9, abs=1e-12)


def test_target_at_cap_is_all_cap():
    assert layerwise_sparsity([1, 2, 3], None, 0.99, epsilon=0.5) == pytest.approx([0.99] * 3, abs=1e-12)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_target_refused(target):
    with pytest.raises(AllocationError, match="sparsity"):
        layerwise_sparsity([1, 2], None, target)


def test_target_above_cap_refused():
    with pytest.raises(AllocationError, match="above the per-layer cap 0.99"):
        layerwise_sparsity([1, 2], None, 0.995)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("inf"), float("nan")])
def test_bad_epsilon_refused(eps):
    with pytest.raises(AllocationError, match="epsilon"):
        layerwise_sparsity([1, 2], None, 0.5, epsilon=eps)


def test_bad_scores_and_params_refused():
    with pytest.raises(AllocationError, match="non-finite"):
        layerwise_sparsity([1, math.nan], None, 0.5)
    with pytest.raises(AllocationError, match="one per decoder layer"):
        layerwise_sparsity([], None, 0.5)
    with pytest.raises(AllocationError, match="2 parameter counts for 3 layers"):
        layerwise_sparsity([1, 2, 3], [1, 2], 0.5)
    with pytest.raises(AllocationError, match="positive"):
        layerwise_sparsity([1, 2], [1, 0], 0.5)


# ----------------------------------------------------------------------------- owl_sparsity

def test_owl_hand_computed():
    # D̃ = [0, 0.08, 0.16], mean 0.08: s = 1 − (D̃ − 0.08 + 0.3)
    assert owl_sparsity([1, 2, 3], 0.7, lmbda=0.08) == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)


def test_owl_invariants():
    rng = random.Random(3)
    for _ in range(30):
        d = [rng.uniform(0, 10) for _ in range(rng.randint(2, 40))]
        target, lam = rng.uniform(0.3, 0.8), rng.uniform(0, 0.15)
        out = owl_sparsity(d, target, lmbda=lam)
        assert sum(out) / len(out) == pytest.approx(target, abs=1e-12)
        assert max(out) - min(out) == pytest.approx(2 * lam, abs=1e-12)
        # more outliers → less sparsity
        order = sorted(range(len(d)), key=lambda i: d[i])
        assert all(out[a] >= out[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_owl_uniform_cases():
    assert owl_sparsity([4, 4, 4], 0.5) == pytest.approx([0.5] * 3, abs=1e-15)
    assert owl_sparsity([1, 5, 2], 0.5, lmbda=0.0) == pytest.approx([0.5] * 3, abs=1e-15)


def test_owl_out_of_range_refused():
    with pytest.raises(AllocationError, match="outside"):
        owl_sparsity([1, 2, 3], 0.95, lmbda=0.08)
    with pytest.raises(AllocationError, match="outside"):
        owl_sparsity([1, 2, 3], 0.05, lmbda=0.08)
    with pytest.raises(AllocationError, match="lambda"):
        owl_sparsity([1, 2, 3], 0.5, lmbda=-0.1)


def test_dispatch_by_method():
    scores = [1.0, 2.0, 3.0]
    assert sparsity_from_scores(scores, "owl", None, 0.6, 0.05) == owl_sparsity(scores, 0.6, 0.05)
    lay = sparsity_from_scores(scores, "layerif", [1, 1, 1], 0.6, 0.05)
    assert lay == layerwise_sparsity(scores, [1, 1, 1], 0.6, 0.05)
    assert lay[0] < lay[2]  # opposite directions
    assert sparsity_from_scores(scores, "owl", None, 0.6, 0.05)[0] > sparsity_from_scores(
        scores, "owl", None, 0.6, 0.05)[2]


def test_dispatch_by_direction():
    """The mapping follows the scores' direction; a method name is read as its scorer's direction."""
    from layerif_plugins.allocate.sparsity import ALLOCATIONS, REFERENCE_EPSILON, default_epsilon
    from layerif_plugins.scores import ScoreDirection

    scores = [1.0, 2.0, 3.0]
    assert sparsity_from_scores(scores, ScoreDirection.HIGHER_PROTECTS, None, 0.6, 0.05) == owl_sparsity(
        scores, 0.6, 0.05)
    assert sparsity_from_scores(scores, "higher_protects", None, 0.6, 0.05) == owl_sparsity(scores, 0.6, 0.05)
    for direction in (ScoreDirection.HIGHER_PRUNES, ScoreDirection.LOWER_ADAPTS, "variability", "alpha_hill"):
        assert sparsity_from_scores(scores, direction, [1, 2, 3], 0.6, 0.05) == layerwise_sparsity(
            scores, [1, 2, 3], 0.6, 0.05)
    # one list of allocation names, with each reference's spread
    assert tuple(REFERENCE_EPSILON) == ("layerif", "owl", "alpha_hill", "depth_ramp", "uniform")
    assert ALLOCATIONS == (*REFERENCE_EPSILON, "atp", "sensitivity", "auto")  # + the planner's searched ones
    assert [default_epsilon(a) for a in REFERENCE_EPSILON] == [0.1, 0.08, 0.2, 0.1, 0.0]


# ----------------------------------------------------------------------------- inverted mapping, epsilon auto

def test_invert_reverses_both_mappings():
    scores, params = [1.0, 2.0, 4.0], [1, 1, 2]
    plain = sparsity_from_scores(scores, "layerif", params, 0.6, 0.2)
    inverted = sparsity_from_scores(scores, "layerif", params, 0.6, 0.2, invert=True)
    # negated scores: the same mapping with the layers' order reversed
    assert inverted == layerwise_sparsity([-s for s in scores], params, 0.6, 0.2)
    assert plain[0] < plain[2] and inverted[0] > inverted[2]
    assert weighted_mean(inverted, params) == pytest.approx(0.6, abs=1e-12)
    # by hand: minmax(−s) = [1, 2/3, 0], r = minmax · 2ε + (1 − ε) with ε = 0.2, scaled to Σ p s = 0.6 · Σ p
    r = [1.2, 0.8 + 0.4 * (2 / 3), 0.8]
    scale = 0.6 * 4 / (r[0] + r[1] + 2 * r[2])
    assert inverted == pytest.approx([x * scale for x in r], abs=1e-15)
    owl_plain = sparsity_from_scores(scores, "owl", None, 0.6, 0.05)
    owl_inv = sparsity_from_scores(scores, "owl", None, 0.6, 0.05, invert=True)
    assert owl_inv == owl_sparsity([-s for s in scores], 0.6, 0.05)
    assert owl_plain[0] > owl_plain[2] and owl_inv[0] < owl_inv[2]
    # epsilon 0 is uniform whichever way round
    assert sparsity_from_scores(scores, "layerif", params, 0.6, 0.0, invert=True) == pytest.approx([0.6] * 3)


def test_epsilon_values_and_auto_grid():
    from layerif_plugins.allocate.sparsity import AUTO_EPSILONS, check_epsilon, epsilon_or_auto, search_grid

    assert check_epsilon("auto") == "auto" and check_epsilon(None) is None and check_epsilon(0) == 0.0
    for bad in (-0.1, 1.5, math.nan, True, "0.1", "automatic"):
        with pytest.raises(AllocationError, match="epsilon"):
            check_epsilon(bad)
    assert epsilon_or_auto("AUTO") == "auto" and epsilon_or_auto("0.05") == 0.05
    with pytest.raises(ValueError):
        epsilon_or_auto("wide")
    with pytest.raises(AllocationError, match="'auto' is resolved by the pruning search"):
        layerwise_sparsity([1, 2], None, 0.5, epsilon="auto")  # type: ignore[arg-type]
    assert AUTO_EPSILONS == (0.0, 0.05, 0.1, 0.2, 0.3)
    assert search_grid("layerif") == [0.0, 0.05, 0.1, 0.2, 0.3]
    assert search_grid("owl") == [0.0, 0.05, 0.08, 0.1, 0.2, 0.3]  # OWL's reference λ is always tried
    assert search_grid("depth_ramp", [0.3, 0.1]) == [0.0, 0.1, 0.3]  # uniform always in the sweep
    with pytest.raises(AllocationError, match="epsilon_grid value"):
        search_grid("layerif", [0.1, 2.0])
