"""Scores → per-layer LoRA ranks at exactly the trainable-parameter budget of a uniform-rank LoRA.

Pure functions of plain lists (no torch, no PEFT), so they are trivial to test and reuse;
:mod:`layerif_plugins.integrations.peft_lora` turns the ranks into a stock ``peft.LoraConfig``.

**Cost of a layer.** A LoRA of rank ``r`` on a linear ``d_in → d_out`` trains
``r · (d_in + d_out)`` parameters (``A: r × d_in``, ``B: d_out × r``, no bias), so layer ``l``
with the targeted modules ``M_l`` costs ``r_l · c_l`` with ``c_l = Σ_{m ∈ M_l} (d_in + d_out)``.
The budget is the uniform config's: ``B = r · Σ_l c_l``.

**Mapping** (docs/method.md §2b's linear spread, applied to ranks): with the scores oriented so
that a higher value means *more rank* (``x = S`` when the direction is ``higher_prunes`` — a less
well-trained layer — else ``x = −S``; ``invert`` flips it once more)::

    q_l = (x_l − min x) / (max x − min x) · 2ε + (1 − ε)          ∈ [1 − ε, 1 + ε]
    ρ_l = max(1, λ · q_l)     with λ the one value where Σ_l c_l ρ_l = B

``ε`` is the spread (``spread``; 0 or equal scores → every ``ρ_l = r``). ``λ`` is found by
fixing the layers whose ``λ q_l`` falls below one rank at 1 and re-scaling the others (repeated
until stable, as the sparsity cap in §2b); it is computed in exact rational arithmetic.

**Integer ranks, exact budget.** Each layer starts at ``⌊ρ_l⌋`` (1 for the fixed ones); the
``R = B − Σ c_l ⌊ρ_l⌋`` parameters left over are handed out as ``+1`` rank to a set of layers
whose costs sum to exactly ``R``. The layers are ordered by priority — largest fractional part
``ρ_l − ⌊ρ_l⌋`` first, ties to the higher oriented score, then to the lower layer index — and the
set is the lexicographically first in that order: walk the order, take a layer whenever the
rest of the order can still make up the remainder exactly (subset sums as bitsets). So:

* ``Σ_l r_l c_l = B`` exactly, ``r_l ≥ 1``, and ``r_l ∈ {⌊ρ_l⌋, ⌊ρ_l⌋ + 1}``;
* when every layer costs the same (a Llama: all blocks alike), ``R`` is a whole number of
  layers and this is largest-remainder apportionment of ``r · L`` ranks: it minimises
  ``Σ (r_l − ρ_l)²`` over all integer ranks ≥ 1 with the budget, and is monotone in the
  oriented score (a layer never gets less rank than a layer scored below it);
* when layers cost different amounts, no set of ``+1`` may add up to ``R`` exactly: then
  :class:`AllocationError` is raised with the nearest budgets that *are* reachable — this
  module never returns a layout whose budget differs from the uniform one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from layerif_plugins.errors import AllocationError
from layerif_plugins.scores import ScoreDirection

#: default spread ε of the rank mapping: ranks span about [r/2, 3r/2] before rounding
DEFAULT_SPREAD = 0.5


@dataclass(frozen=True)
class RankLayout:
    """Per-layer LoRA ranks (layer 0 first) at the budget of a uniform rank ``base_r``.

    Attributes:
        ranks: integer rank of every decoder layer, each >= 1.
        costs: trainable parameters per unit of rank of every layer (``Σ (d_in + d_out)``).
        base_r: the uniform rank whose budget the layout matches.
        ideal: the real-valued ranks ``ρ_l`` before rounding.
        spread: the spread ε used.
        params: provenance (scores method, direction, invert, ...), stored with the config.
    """

    ranks: list[int]
    costs: list[int]
    base_r: int
    ideal: list[float]
    spread: float
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        """Trainable LoRA parameters of the layout: ``Σ r_l c_l`` (equals :attr:`uniform_budget`)."""
        return sum(r * c for r, c in zip(self.ranks, self.costs, strict=True))

    @property
    def uniform_budget(self) -> int:
        """``base_r · Σ c_l``: the trainable parameters of the uniform-rank config."""
        return self.base_r * sum(self.costs)

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), "costs": list(self.costs), "base_r": self.base_r,
                "ideal": list(self.ideal), "spread": self.spread, "budget": self.budget, "params": dict(self.params)}


def layer_costs(shapes: Sequence[Sequence[tuple[int, int]]]) -> list[int]:
    """``c_l = Σ (d_in + d_out)`` over the targeted modules of each layer (one list of shapes per layer)."""
    costs = []
    for layer, modules in enumerate(shapes):
        if not modules:
            raise AllocationError(f"layer {layer} has no targeted modules; every layer needs at least one")
        total = 0
        for d_in, d_out in modules:
            if int(d_in) != d_in or int(d_out) != d_out or d_in < 1 or d_out < 1:
                raise AllocationError(f"layer {layer}: module shape ({d_in}, {d_out}) is not two whole numbers >= 1")
            total += int(d_in) + int(d_out)
        costs.append(total)
    return costs


def more_rank_is_higher(direction: ScoreDirection | str, invert: bool = False) -> bool:
    """True when a higher score gets more rank: ``higher_prunes`` scores (LayerIF, Hill α, ramp), unless inverted.

    ``direction`` is a :class:`ScoreDirection` or its value (``"higher_protects"``); anything else is refused
    (:class:`~layerif_plugins.errors.ScoresError`) rather than guessed, since a wrong guess silently inverts ranks.
    """
    return (ScoreDirection.parse(direction) is ScoreDirection.HIGHER_PRUNES) != bool(invert)


def spread_ratios(scores: Sequence[float], spread: float, higher_more: bool = True) -> list[Fraction]:
    """``q_l ∈ [1 − ε, 1 + ε]``, min-max of the oriented scores (exact rationals); all 1 for equal scores."""
    x = [Fraction(s) if higher_more else -Fraction(s) for s in scores]
    low, high = min(x), max(x)
    eps = Fraction(spread)
    if high == low:
        return [Fraction(1)] * len(x)
    return [(xi - low) / (high - low) * 2 * eps + (1 - eps) for xi in x]


def ideal_ranks(ratios: Sequence[Fraction], costs: Sequence[int], budget: int) -> list[Fraction]:
    """``ρ_l = max(1, λ q_l)`` with ``Σ c_l ρ_l = budget`` (exact), by fixing layers below one rank at 1."""
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(ratios)) if i not in fixed]
        left = budget - sum(costs[i] for i in fixed)
        weight = sum(costs[i] * ratios[i] for i in free)
        scale = Fraction(left) / weight
        low = {i for i in free if ratios[i] * scale < 1}
        if not low:
            break
        fixed |= low
    return [Fraction(1) if i in fixed else ratios[i] * scale for i in range(len(ratios))]


def _check(scores: Sequence[float], costs: Sequence[int], r: int, spread: float) -> list[float]:
    values = [float(s) for s in scores]
    if not values:
        raise AllocationError("no scores: need one score per decoder layer")
    if len(values) != len(costs):
        raise AllocationError(f"{len(values)} scores but {len(costs)} layers of module shapes; give one per layer")
    bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise AllocationError(f"non-finite scores at layers {bad}")
    if isinstance(r, bool) or int(r) != r or r < 1:
        raise AllocationError(f"r must be a whole number >= 1 (the uniform rank whose budget is kept), got {r!r}")
    if any(isinstance(c, bool) or int(c) != c or c < 1 for c in costs):
        raise AllocationError(f"layer costs must be whole numbers >= 1, got {list(costs)}")
    if isinstance(spread, bool) or not isinstance(spread, int | float) or not math.isfinite(spread) \
            or not 0.0 <= spread <= 1.0:
        raise AllocationError(
            f"spread must be a number in [0, 1] (ratios span [1-ε, 1+ε]; 0 = uniform ranks), got {spread!r}")
    return values


def check_budget(budget: int | None, costs: Sequence[int], r: int) -> int:
    """The budget to spend: ``r · Σ c`` when None; refuses one that cannot give every layer rank 1."""
    if budget is None:
        return int(r) * sum(costs)
    if isinstance(budget, bool) or int(budget) != budget:
        raise AllocationError(f"budget must be a whole number of trainable parameters, got {budget!r}")
    if budget < sum(costs):
        raise AllocationError(
            f"budget of {budget} trainable parameters cannot give every one of the {len(costs)} layers rank >= 1: "
            f"rank 1 everywhere already costs {sum(costs)}; use a budget >= {sum(costs)} (or r >= 1)"
        )
    return int(budget)


def _subset_sums(costs: Sequence[int], limit: int) -> list[int]:
    """``reach[k]``: bitset of the sums (≤ ``limit``) of subsets of ``costs[k:]`` (bit ``s`` set = reachable)."""
    mask = (1 << (limit + 1)) - 1
    reach = [1] * (len(costs) + 1)
    for k in range(len(costs) - 1, -1, -1):
        reach[k] = (reach[k + 1] | (reach[k + 1] << costs[k])) & mask
    return reach


def _hand_out(base: list[int], costs: Sequence[int], order: list[int], remaining: int) -> list[int]:
    """``+1`` rank to the lexicographically first set (in ``order``) of layers whose costs sum to ``remaining``."""
    g = math.gcd(*costs)
    if remaining % g:  # pragma: no cover - B and Σ c ⌊ρ⌋ are both multiples of every common divisor
        raise AllocationError(f"remainder {remaining} is not a multiple of the layer costs' gcd {g}")
    units = [costs[i] // g for i in order]
    target = remaining // g
    reach = _subset_sums(units, target)
    if not (reach[0] >> target) & 1:
        below = target - next(t for t in range(target, -1, -1) if (reach[0] >> t) & 1)
        full = _subset_sums(units, sum(units))[0]
        above = next((t for t in range(target, sum(units) + 1) if (full >> t) & 1), None)
        nearest = f"-{below * g}" + ("" if above is None else f" or +{(above - target) * g}")
        raise AllocationError(
            f"no integer ranks near the target hit the uniform budget exactly: the layers cost different amounts "
            f"per rank ({sorted(set(costs))} parameters) and the nearest reachable budgets are {nearest} parameters "
            "away; use spread=0 (uniform ranks), another spread, or target the same modules in every layer"
        )
    out = list(base)
    for k, i in enumerate(order):
        if target >= units[k] and (reach[k + 1] >> (target - units[k])) & 1:
            out[i] += 1
            target -= units[k]
    return out


def rank_layout(
    scores: Sequence[float],
    costs: Sequence[int],
    r: int,
    spread: float = DEFAULT_SPREAD,
    direction: ScoreDirection | str = ScoreDirection.HIGHER_PRUNES,
    invert: bool = False,
    source: dict[str, Any] | None = None,
    budget: int | None = None,
) -> RankLayout:
    """Per-layer LoRA ranks from layer scores at exactly the budget ``r · Σ c_l`` (see the module docstring).

    Args:
        scores: one score per decoder layer, layer 0 first (``LayerScores.scores``).
        costs: trainable parameters per unit of rank of each layer (:func:`layer_costs`).
        r: the uniform rank whose total trainable parameters are kept.
        spread: ε in [0, 1]: ranks before rounding span ``[1 − ε, 1 + ε] × λ`` (0 → uniform ranks).
        direction: the scores' :class:`ScoreDirection` (or its value): ``higher_prunes``
            gives a higher score more rank; ``higher_protects`` / ``lower_adapts`` give a lower score more.
        invert: reverse the mapping once more (more rank to the better-trained layers).
        source: provenance kept in the result's ``params``.
        budget: total trainable parameters to spend instead of ``r · Σ c_l`` (``r`` is then only the reference
            rank, e.g. for alpha); must be at least ``Σ c_l`` (rank 1 everywhere).

    Returns:
        a :class:`RankLayout` with ``budget == r · Σ c_l`` (or the given ``budget``) and every rank >= 1.
    """
    values = _check(scores, costs, r, spread)
    costs = [int(c) for c in costs]
    budget = check_budget(budget, costs, r)
    higher_more = more_rank_is_higher(direction, invert)
    ideal = ideal_ranks(spread_ratios(values, spread, higher_more), costs, budget)
    base = [math.floor(x) for x in ideal]
    oriented = values if higher_more else [-v for v in values]
    order = sorted(range(len(values)), key=lambda i: (-(ideal[i] - base[i]), -oriented[i], i))
    ranks = _hand_out(base, costs, order, budget - sum(b * c for b, c in zip(base, costs, strict=True)))
    if sum(x * c for x, c in zip(ranks, costs, strict=True)) != budget or min(ranks) < 1:  # pragma: no cover
        raise AllocationError("internal error: rank layout misses the budget")
    params = {"direction": ScoreDirection.parse(direction).value, "invert": bool(invert), **(source or {})}
    if budget != int(r) * sum(costs):
        params["budget"] = budget
    return RankLayout(ranks, costs, int(r), [float(x) for x in ideal], float(spread), params)


def layer_ranks(scores: Sequence[float], costs: Sequence[int], r: int, **options: Any) -> list[int]:
    """Just the ranks of :func:`rank_layout` (same options: ``spread``, ``direction``, ``invert``, ``budget``)."""
    return rank_layout(scores, costs, r, **options).ranks
