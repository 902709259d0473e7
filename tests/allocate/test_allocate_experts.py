"""Scores → per-layer LoRA expert counts: hand-computed cases, invariants, an independent re-implementation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from layerif_plugins.allocate.experts import (
    ExpertLayout,
    apportion,
    check_layout,
    expert_layout,
    layerif_expert_counts,
    mola_layout,
    mola_pattern,
    uniform_layout,
)
from layerif_plugins.errors import AllocationError

# ----------------------------------------------------------------------------- hand-computed references


def test_reference_example_by_hand():
    # S = [1,2,3,4,5], T = 20, β = 2.5:
    # x = [0,1,2,3,4]; w = x^2.5 = [0, 1, 5.657, 15.588, 32] (Σ = 54.245); T − L = 15
    # w/Σw·15 = [0, 0.277, 1.564, 4.310, 8.849] → n = 1 + floor = [1, 1, 2, 5, 9] (Σ 18)
    # 2 left → largest fractional parts 0.849 (layer 4), 0.564 (layer 2) → [1, 1, 3, 5, 10]
    experts, top_k = layerif_expert_counts([1, 2, 3, 4, 5], 20, beta=2.5)
    assert experts == [1, 1, 3, 5, 10]
    assert top_k == [1, 1, 2, 2, 2]


def test_reference_example_exact_shares():
    # S = [0,1,2], T = 9, β = 1: x = w = [0,1,2], T − L = 6 → shares [0, 2, 4] (no remainder) → [1, 3, 5]
    assert layerif_expert_counts([0.0, 1.0, 2.0], 9, beta=1.0) == ([1, 3, 5], [1, 2, 2])


def test_fractional_tie_goes_to_higher_score_then_lower_layer():
    # S = [0, 1, 1], T = 6, β = 1: shares [0, 1.5, 1.5] → [1, 2, 2] + 1 left, tie of 0.5 → lower layer (1)
    assert layerif_expert_counts([0, 1, 1], 6, beta=1.0)[0] == [1, 3, 2]
    # S = [0, 1, 3], β = 1, T = 7: shares of 4 → [0, 1, 3] exactly
    assert layerif_expert_counts([0, 1, 3], 7, beta=1.0)[0] == [1, 2, 4]


def test_equal_scores_give_uniform_layout():
    experts, top_k = layerif_expert_counts([0.7] * 5, 22)
    assert experts == [5, 5, 4, 4, 4]  # floor(22/5) = 4 each, the 2 left over to the lowest layers
    assert experts == uniform_layout(5, 22)[0]
    assert layerif_expert_counts([3.0] * 4, 4) == ([1, 1, 1, 1], [1, 1, 1, 1])


def test_beta_zero_is_uniform_and_scale_invariance():
    assert layerif_expert_counts([1, 5, 2, 9], 12, beta=0.0)[0] == [3, 3, 3, 3]
    s = [0.3, 0.1, 0.9, 0.5, 0.2, 0.7]
    base = layerif_expert_counts(s, 30)
    assert layerif_expert_counts([10 * v + 4 for v in s], 30) == base  # shift/scale of S changes nothing


# ----------------------------------------------------------------------------- invariants + independent implementation


def _numpy_reference(scores, budget, beta):
    """The §2a mapping written independently with numpy (lexsort for the hand-out order)."""
    s = np.asarray(scores, dtype=np.float64)
    x = s - s.min()
    w = np.ones_like(x) if x.max() == 0 else np.power(x, beta)
    raw = w / w.sum() * (budget - len(s))
    n = 1 + np.floor(raw).astype(int)
    frac = raw - np.floor(raw)
    order = np.lexsort((np.arange(len(s)), -s, -frac))  # last key sorts first
    n[order[: budget - n.sum()]] += 1
    return n.tolist()


@pytest.mark.parametrize("seed", range(40))
def test_invariants_and_matches_numpy_reference(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 40)
    scores = [rng.choice([rng.random(), rng.expovariate(1.0), round(rng.random(), 1)]) for _ in range(n_layers)]
    budget = rng.randint(n_layers, 8 * n_layers)
    beta = rng.choice([0.5, 1.0, 2.5, 3.0])
    experts, top_k = layerif_expert_counts(scores, budget, beta=beta)
    assert sum(experts) == budget
    assert min(experts) >= 1
    assert top_k == [2 if n > 1 else 1 for n in experts]
    for i in range(n_layers):  # monotone in S
        for j in range(n_layers):
            if scores[i] > scores[j]:
                assert experts[i] >= experts[j], (scores, experts)
    assert experts == _numpy_reference(scores, budget, beta)


def test_budget_equal_to_layers_gives_one_each():
    assert layerif_expert_counts([5, 1, 3], 3) == ([1, 1, 1], [1, 1, 1])


def test_large_beta_does_not_overflow():
    experts, _ = layerif_expert_counts([1e3, 2e3, 3e3], 30, beta=400.0)
    assert experts == [1, 1, 28]


# ----------------------------------------------------------------------------- AlphaLoRA rounding


def test_alphalora_rounding_by_hand_and_where_it_differs():
    # S = [1,1,2], β = 1, T = 5: w/Σw·T = [1.25, 1.25, 2.5] → round (half to even) = [1, 1, 2] (Σ 4);
    # one short → AlphaLoRA adds at argmin(w − n) = argmin([0, 0, 0]) = layer 0 → [2, 1, 2]
    assert layerif_expert_counts([1, 1, 2], 5, beta=1.0, rounding="alphalora")[0] == [2, 1, 2]
    # the reference mapping shifts by min S, so layers 0 and 1 keep one expert and layer 2 takes the rest
    assert layerif_expert_counts([1, 1, 2], 5, beta=1.0)[0] == [1, 1, 3]


def test_alphalora_rounding_sums_to_budget():
    rng = random.Random(3)
    for _ in range(30):
        # α-like scores in [3, 5] with T >= 4L: every share is >= 4·3^2.5/5^2.5 > 1, so no layer rounds to 0
        scores = [rng.uniform(3.0, 5.0) for _ in range(rng.randint(2, 32))]
        budget = rng.randint(4 * len(scores), 8 * len(scores))
        experts, top_k = layerif_expert_counts(scores, budget, beta=2.5, rounding="alphalora")
        assert sum(experts) == budget and min(experts) >= 1
        check_layout(experts, top_k)


def test_alphalora_rounding_refuses_zero_experts_and_nonpositive_scores():
    with pytest.raises(AllocationError, match="no minimum"):
        layerif_expert_counts([1, 1, 10], 3, beta=2.5, rounding="alphalora")
    with pytest.raises(AllocationError, match="> 0"):
        layerif_expert_counts([0.0, 1.0], 4, rounding="alphalora")


# ----------------------------------------------------------------------------- MoLA and uniform


def test_mola_at_32_layers_is_molas_own_layout():
    for budget in (None, 160):
        experts, top_k = mola_layout("2468", 32, budget)
        assert experts == [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
        assert top_k == [2] * 32
    assert mola_layout("8642", 32, 160)[0] == [8] * 8 + [6] * 8 + [4] * 8 + [2] * 8
    assert mola_layout("2882", 32, 160)[0] == [2] * 8 + [8] * 16 + [2] * 8
    assert mola_layout("mola-8228", 8, 40)[0] == [8, 8, 2, 2, 2, 2, 8, 8]


@pytest.mark.parametrize("n_layers", [1, 2, 3, 5, 7, 12, 26, 40])
@pytest.mark.parametrize("pattern", ["2468", "8642", "2882", "8228"])
def test_mola_any_depth(pattern, n_layers):
    values = mola_pattern(pattern, n_layers)
    assert len(values) == n_layers
    if pattern in ("2882", "8228"):
        assert values == values[::-1]  # symmetric patterns stay symmetric at any depth
    budget = 3 * n_layers + 1
    experts, top_k = mola_layout(pattern, n_layers, budget)
    assert sum(experts) == budget and min(experts) >= 1
    check_layout(experts, top_k)
    for i in range(n_layers):  # apportionment keeps the pattern's order
        for j in range(n_layers):
            if values[i] > values[j]:
                assert experts[i] >= experts[j]


def test_mola_scaled_by_hand():
    # 5 layers: quarter of each layer's centre → [2, 4, 6, 6, 8] (Σ 26); T = 13 halves them exactly
    assert mola_pattern("2468", 5) == [2, 4, 6, 6, 8]
    assert mola_layout("2468", 5, 13)[0] == [1, 2, 3, 3, 4]


def test_apportion_minimum_one_reapportions():
    # quotas of [1, 1, 18]·5/20 = [0.25, 0.25, 4.5]: the two small layers are fixed at 1, the rest gets 3
    assert apportion([1, 1, 18], 5) == [1, 1, 3]
    assert apportion([0, 0, 0], 7) == [3, 2, 2]


def test_uniform_layout():
    assert uniform_layout(4, 8) == ([2, 2, 2, 2], [2, 2, 2, 2])
    assert uniform_layout(3, 4) == ([2, 1, 1], [2, 1, 1])


# ----------------------------------------------------------------------------- errors


def test_budget_smaller_than_layers():
    with pytest.raises(AllocationError, match="budget T=3 is smaller than the number of layers L=5"):
        layerif_expert_counts([1, 2, 3, 4, 5], 3)
    with pytest.raises(AllocationError, match="smaller than"):
        mola_layout("2468", 8, 7)
    with pytest.raises(AllocationError, match="smaller than"):
        uniform_layout(4, 2)


def test_bad_inputs():
    with pytest.raises(AllocationError, match="non-finite"):
        layerif_expert_counts([1.0, math.nan], 4)
    with pytest.raises(AllocationError, match="no scores"):
        layerif_expert_counts([], 4)
    with pytest.raises(AllocationError, match="rounding"):
        layerif_expert_counts([1, 2], 4, rounding="nearest")
    with pytest.raises(AllocationError, match="unknown MoLA layout"):
        mola_layout("1234", 8, 20)
    with pytest.raises(AllocationError, match="unknown layout"):
        expert_layout("random", 4, 8)
    with pytest.raises(AllocationError, match="needs per-layer scores"):
        expert_layout("layerif", 4, 8)
    with pytest.raises(AllocationError, match="3 scores for a model with 4"):
        expert_layout("layerif", 4, 8, scores=[1, 2, 3])


def test_top_k_larger_than_experts():
    with pytest.raises(AllocationError, match="layer 1: top_k=3 is larger than its 2 expert"):
        check_layout([4, 2], [2, 3])
    with pytest.raises(AllocationError, match="layer 0"):
        ExpertLayout([0, 2], [1, 1], "custom")
    # experts [1, 2, 6] (w = [0, 1, 5.66] → shares [0, 0.9, 5.1] of 6, +1 to layer 1) → top-k min(3, n)
    assert layerif_expert_counts([1, 2, 3], 9, max_top_k=3) == ([1, 2, 6], [1, 2, 3])


def test_expert_layout_records_provenance():
    lay = expert_layout("layerif", 3, 9, scores=[0, 1, 2], beta=1.0, source={"scores_method": "layerif"})
    assert lay.experts == [1, 3, 5] and lay.budget == 9
    assert lay.to_dict()["params"]["scores"] == [0.0, 1.0, 2.0]
    assert lay.params["scores_method"] == "layerif"
