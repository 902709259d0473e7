"""Exact per-layer sparsity levels from a sensitivity table: a multiple-choice knapsack solved by dynamic programming.

Why a DP and not a greedy: the measured cost of pruning one layer at one level is neither
convex nor monotone on real models (noise, and layers whose loss barely moves until a
threshold), so exchanging one level at a time can stall. With a level grid centred on the
target, ``g_k = target + (k − K)·step``, the global constraint

    Σ_l p_l · g_{k_l} = target · Σ_l p_l      (the parameter-weighted mean, exactly)

becomes ``Σ_l u_l · (k_l − K) = 0`` in integer units ``u_l = p_l / gcd(p)`` — a
multiple-choice knapsack with an equality constraint, solved exactly over the reachable
integer sums. When the units are too large to enumerate (blocks of very different sizes),
they are rounded to a coarser quantum, the solution is exact in those units and the
result says so (``exact: False``); the planner then rescales it to the target.

Pure functions of lists: no model, no host library (docs/pruning.md, "sensitivity").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

from layerif_plugins.errors import AllocationError

#: at most this many distinct reachable sums per layer step before the units are coarsened
MAX_STATES = 200_000


@dataclass(frozen=True)
class KnapsackResult:
    """The chosen level index per layer, its summed cost, and whether the constraint holds exactly."""

    levels: list[int]
    cost: float
    exact: bool
    units: list[int]


def level_grid(target: float, step: float, half_width: int, max_sparsity: float = 0.99) -> list[float]:
    """``target + k·step`` for ``k = −half_width … half_width``, keeping only levels in ``[0, max_sparsity]``.

    Returns the full symmetric grid; levels outside the range are left out by
    :func:`feasible_levels` (their index keeps its place so ``k − half_width`` is the offset).
    """
    if not (isinstance(half_width, int) and half_width >= 1):
        raise AllocationError(f"sensitivity levels: half_width must be an integer >= 1, got {half_width!r}")
    if not (isinstance(step, int | float) and math.isfinite(step) and 0 < step < 1):
        raise AllocationError(f"sensitivity step must be a number in (0, 1), got {step!r}")
    return [target + (k - half_width) * step for k in range(2 * half_width + 1)]


def feasible_levels(grid: Sequence[float], max_sparsity: float = 0.99) -> list[int]:
    """Indices of the grid levels a layer may take: ``0 <= level <= max_sparsity``."""
    return [k for k, g in enumerate(grid) if -1e-12 <= g <= max_sparsity + 1e-12]


def integer_units(params: Sequence[int | float], max_unit: int = 64) -> tuple[list[int], bool]:
    """Per-layer weights as small integers: exact (divided by their gcd) when small enough, else rounded.

    Returns ``(units, exact)``. Blocks of equal size (every Llama-family model) give all ones.
    """
    ints = [int(round(p)) for p in params]
    if any(i <= 0 for i in ints):
        raise AllocationError(f"parameter counts must be positive integers, got {list(params)}")
    g = reduce(math.gcd, ints)
    units = [i // g for i in ints]
    if max(units) <= max_unit and all(abs(i - float(p)) < 1e-9 for i, p in zip(ints, params, strict=True)):
        return units, True
    quantum = max(ints) / max_unit
    return [max(1, int(round(i / quantum))) for i in ints], False


def solve(costs: Sequence[Sequence[float | None]], params: Sequence[int | float], center: int) -> KnapsackResult:
    """Minimise ``Σ_l costs[l][k_l]`` subject to ``Σ_l u_l (k_l − center) = 0``.

    Args:
        costs: ``costs[l][k]`` — the measured cost (e.g. held-out loss increase) of layer ``l``
            at grid level ``k``; ``None`` or a non-finite value marks a level the layer may not take.
        params: prunable parameters per layer (the weights of the mean).
        center: the index of the target level in every row (``half_width`` of :func:`level_grid`).

    Ties are broken towards the smaller sum of ``|k − center|`` (closer to uniform), then
    towards lower level indices, so equal costs give the uniform allocation.
    """
    n = len(costs)
    if n == 0:
        raise AllocationError("no layers to allocate")
    if len(params) != n:
        raise AllocationError(f"{len(params)} parameter counts for {n} layers")
    units, exact = integer_units(params)
    # dp: reachable offset sum → (cost, distance from uniform, choices so far)
    dp: dict[int, tuple[float, int, tuple[int, ...]]] = {0: (0.0, 0, ())}
    for layer, row in enumerate(costs):
        allowed = [(k, float(c)) for k, c in enumerate(row) if c is not None and math.isfinite(float(c))]
        if not allowed:
            raise AllocationError(f"layer {layer} has no feasible sensitivity level")
        nxt: dict[int, tuple[float, int, tuple[int, ...]]] = {}
        for total, (cost, dist, picks) in dp.items():
            for k, c in allowed:
                key = total + units[layer] * (k - center)
                cand = (cost + c, dist + abs(k - center), (*picks, k))
                old = nxt.get(key)
                if old is None or cand[:2] < old[:2] or (cand[:2] == old[:2] and cand[2] < old[2]):
                    nxt[key] = cand
        if len(nxt) > MAX_STATES:
            raise AllocationError(f"sensitivity knapsack: {len(nxt)} states after layer {layer}; use fewer levels")
        dp = nxt
    if 0 not in dp:
        raise AllocationError("no combination of the sensitivity levels meets the target exactly; widen the grid")
    cost, _, picks = dp[0]
    return KnapsackResult(levels=list(picks), cost=cost, exact=exact, units=units)


__all__ = ["KnapsackResult", "feasible_levels", "integer_units", "level_grid", "solve"]
