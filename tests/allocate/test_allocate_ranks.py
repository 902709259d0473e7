"""Per-layer LoRA ranks at an exact budget (allocate/ranks.py) against slow independent implementations.

The oracles share no code with the module: the ideal ranks ``ρ`` come from solving
``Σ c max(1, λ q) = B`` over every candidate set of layers above one rank, and the integer ranks
from enumerating every rank vector (all compositions of the budget for equal layer costs; every
``+1`` subset otherwise).
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from layerif_plugins.allocate.experts import apportion
from layerif_plugins.allocate.ranks import layer_costs, layer_ranks, rank_layout
from layerif_plugins.errors import AllocationError, LayerIFError
from layerif_plugins.scores import ScoreDirection

# ----------------------------------------------------------------------------- slow oracles


def slow_ratios(scores, spread, higher_more):
    x = [Fraction(s) * (1 if higher_more else -1) for s in scores]
    if max(x) == min(x):
        return [Fraction(1)] * len(x)
    return [1 - Fraction(spread) + 2 * Fraction(spread) * (v - min(x)) / (max(x) - min(x)) for v in x]


def slow_ideal(q, costs, budget):
    """Solve Σ c max(1, λ q) = B: try every set of layers kept above one rank, keep the consistent one."""
    n = len(q)
    for active_mask in itertools.product([False, True], repeat=n):
        active = [i for i in range(n) if active_mask[i]]
        if not active or sum(costs[i] * q[i] for i in active) == 0:
            continue
        lam = Fraction(budget - sum(costs[i] for i in range(n) if not active_mask[i])) / sum(
            costs[i] * q[i] for i in active)
        if all((q[i] * lam >= 1) == active_mask[i] for i in range(n)):
            return [q[i] * lam if active_mask[i] else Fraction(1) for i in range(n)]
    raise AssertionError("no consistent λ")


def compositions(total, parts, low=1):
    """Every tuple of ``parts`` integers >= low summing to ``total``."""
    if parts == 1:
        if total >= low:
            yield (total,)
        return
    for first in range(low, total - low * (parts - 1) + 1):
        for rest in compositions(total - first, parts - 1, low):
            yield (first, *rest)


def priority(ideal, oriented):
    return sorted(range(len(ideal)), key=lambda i: (-(ideal[i] - math.floor(ideal[i])), -oriented[i], i))


def slow_equal_cost(scores, r, spread, higher_more=True):
    """Equal layer costs: the rank vector (sum r·L, each >= 1) closest to ρ in squared error over ALL vectors;
    among equally close ones, the one giving +1 to the earliest layers in priority order."""
    n = len(scores)
    ideal = slow_ideal(slow_ratios(scores, spread, higher_more), [1] * n, r * n)
    oriented = [s if higher_more else -s for s in scores]
    order = priority(ideal, oriented)
    best = None
    for ranks in compositions(r * n, n):
        err = sum((ranks[i] - ideal[i]) ** 2 for i in range(n))
        key = (err, [-(ranks[i] - math.floor(ideal[i])) for i in order])
        if best is None or key < best[0]:
            best = (key, list(ranks))
    return best[1]


def slow_any_cost(scores, costs, r, spread):
    """Any layer costs: every subset of layers given +1 over ⌊ρ⌋; the exact-budget one first in priority order."""
    n = len(scores)
    budget = r * sum(costs)
    ideal = slow_ideal(slow_ratios(scores, spread, True), costs, budget)
    base = [math.floor(x) for x in ideal]
    order = priority(ideal, scores)
    hits = []
    for plus in itertools.product([0, 1], repeat=n):
        ranks = [base[i] + plus[i] for i in range(n)]
        if sum(x * c for x, c in zip(ranks, costs, strict=True)) == budget:
            hits.append([plus[i] for i in order])
    if not hits:
        return None
    best = max(hits)  # lexicographically first in priority order = most +1 at the front
    out = list(base)
    for k, i in enumerate(order):
        out[i] += best[k]
    return out


# ----------------------------------------------------------------------------- against the oracles


@pytest.mark.parametrize("case", range(120))
def test_equal_costs_match_brute_force_over_all_rank_vectors(case):
    rng = random.Random(case)
    n = rng.randint(1, 4)
    r = rng.randint(1, 4)
    scores = [rng.choice([0.0, 1.0, 2.0, 2.0, 3.5, rng.random() * 10]) for _ in range(n)]
    spread = rng.choice([0.0, 0.25, 0.5, 0.9, 1.0])
    cost = rng.randint(1, 50)
    layout = rank_layout(scores, [cost] * n, r, spread)
    assert layout.ranks == slow_equal_cost(scores, r, spread)
    assert layout.budget == layout.uniform_budget == r * cost * n
    assert layout.ideal == [float(x) for x in slow_ideal(slow_ratios(scores, spread, True), [cost] * n, r * cost * n)]


@pytest.mark.parametrize("case", range(120))
def test_unequal_costs_match_brute_force_or_refuse(case):
    rng = random.Random(1000 + case)
    n = rng.randint(1, 5)
    r = rng.randint(1, 6)
    scores = [round(rng.random() * 5, 2) for _ in range(n)]
    costs = [rng.choice([4, 6, 8, 10, 12]) for _ in range(n)]
    spread = rng.choice([0.0, 0.3, 0.5, 1.0])
    expected = slow_any_cost(scores, costs, r, spread)
    if expected is None:
        with pytest.raises(AllocationError, match="hit the uniform budget exactly"):
            rank_layout(scores, costs, r, spread)
        return
    layout = rank_layout(scores, costs, r, spread)
    assert layout.ranks == expected
    assert sum(x * c for x, c in zip(layout.ranks, costs, strict=True)) == r * sum(costs)


def test_equal_costs_are_largest_remainder_apportionment():
    """The existing apportionment helper (experts.py, in floats) gives the same ranks when no layer is clipped at 1
    (cases whose fractional parts tie within float rounding are left out: there the exact rationals decide)."""
    rng = random.Random(7)
    compared = 0
    for _ in range(200):
        n, r = rng.randint(2, 30), rng.randint(2, 32)
        scores = [rng.random() for _ in range(n)]
        spread = rng.choice([0.1, 0.3, 0.5])
        q = slow_ratios(scores, spread, True)
        fracs = sorted(float(x * r * n / sum(q)) % 1 for x in q)
        if any(b - a < 1e-9 for a, b in itertools.pairwise(fracs)):
            continue
        compared += 1
        assert rank_layout(scores, [1] * n, r, spread).ranks == apportion([float(x) for x in q], r * n)
    assert compared > 150


def test_worked_example():
    """q = [0, .5, 1, 1.5, 2] (ε = 1): layer 0 is fixed at 1, λ = 390/50 = 7.8, ρ = [1, 3.9, 7.8, 11.7, 15.6],
    ⌊ρ⌋ sums to 37 of 40: the three largest fractional parts (.9, .8, .7) get +1."""
    layout = rank_layout([1, 2, 3, 4, 5], [10] * 5, 8, spread=1.0)
    assert layout.ideal == pytest.approx([1, 3.9, 7.8, 11.7, 15.6], abs=1e-12)
    assert layout.ranks == [1, 4, 8, 12, 15]
    assert layout.budget == 400
    assert rank_layout([1, 2, 3, 4, 5], [10] * 5, 8).ranks == [4, 6, 8, 10, 12]  # ε = 0.5: exact 8·[.5 … 1.5]


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("case", range(60))
def test_invariants_budget_minimum_and_monotone(case):
    rng = random.Random(5000 + case)
    n = rng.randint(1, 40)
    r = rng.randint(1, 64)
    scores = [rng.choice([rng.random(), 0.5]) * 1e7 for _ in range(n)]
    spread = rng.random()
    cost = rng.randint(1, 5000)
    ranks = layer_ranks(scores, [cost] * n, r, spread=spread)
    assert sum(ranks) * cost == r * n * cost
    assert min(ranks) >= 1
    for a in range(n):
        for b in range(n):
            if scores[a] > scores[b]:
                assert ranks[a] >= ranks[b], (scores, ranks)


def test_direction_and_invert():
    scores = [1.0, 2.0, 3.0]
    up = layer_ranks(scores, [1] * 3, 4)
    assert up == [2, 4, 6]
    assert layer_ranks(scores, [1] * 3, 4, direction=ScoreDirection.HIGHER_PROTECTS) == [6, 4, 2]
    assert layer_ranks(scores, [1] * 3, 4, direction="lower_adapts") == [6, 4, 2]
    assert layer_ranks(scores, [1] * 3, 4, invert=True) == [6, 4, 2]
    assert layer_ranks(scores, [1] * 3, 4, direction="higher_protects", invert=True) == up


def test_equal_scores_or_zero_spread_give_uniform_ranks():
    assert layer_ranks([3.0] * 6, [7] * 6, 8) == [8] * 6
    assert layer_ranks([1, 9, 2, 8], [5, 6, 7, 8], 8, spread=0.0) == [8] * 4


def test_layer_costs():
    assert layer_costs([[(64, 64), (64, 32)], [(64, 172)]]) == [224, 236]
    with pytest.raises(AllocationError, match="layer 1 has no targeted modules"):
        layer_costs([[(4, 4)], []])
    with pytest.raises(AllocationError, match=r"module shape \(0, 4\)"):
        layer_costs([[(0, 4)]])


def test_explicit_budget():
    layout = rank_layout([1, 2, 3], [10, 10, 10], 8, budget=300)
    assert layout.budget == 300 and layout.ranks == [5, 10, 15]
    with pytest.raises(AllocationError, match="cannot give every one of the 3 layers rank >= 1.*budget >= 30"):
        rank_layout([1, 2, 3], [10, 10, 10], 8, budget=29)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": []}, "no scores"),
        ({"scores": [1.0, float("nan")]}, "non-finite scores at layers \\[1\\]"),
        ({"costs": [1, 1, 1]}, "2 scores but 3 layers"),
        ({"r": 0}, "r must be a whole number >= 1"),
        ({"r": 2.5}, "r must be a whole number >= 1"),
        ({"spread": 1.5}, "spread must be a number in \\[0, 1\\]"),
        ({"spread": float("inf")}, "spread must be a number in \\[0, 1\\]"),
        ({"costs": [0, 4]}, "layer costs must be whole numbers >= 1"),
        ({"direction": "sideways"}, "unknown score direction 'sideways'"),
    ],
)
def test_bad_input(kwargs, message):
    args = {"scores": [1.0, 2.0], "costs": [4, 4], "r": 4, **kwargs}
    with pytest.raises(LayerIFError, match=message):
        rank_layout(**args)


def test_refusal_names_the_nearest_budgets():
    with pytest.raises(AllocationError, match=r"nearest reachable budgets are -6 or \+2 parameters away"):
        rank_layout([1, 2, 3], [10, 14, 22], 8, spread=0.5)
