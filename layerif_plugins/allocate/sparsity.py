"""Per-layer scores → per-layer sparsity ratios for one-shot pruning (Wanda, SparseGPT).

Two mappings, both pure functions of plain lists (docs/method.md §2b and §3):

* :func:`layerwise_sparsity` — the LayerIF / AlphaPruning mapping: a higher score gets
  more sparsity. Scores are min-max mapped into ``[1-ε, 1+ε]``, then scaled so that the
  parameter-weighted mean sparsity equals the global target exactly. A layer that would
  exceed ``max_sparsity`` (0.99) is clipped and the excess is redistributed over the
  other layers (multiplicatively, so their order and ratios are kept) — the weighted
  mean stays exact. The reference code only clips, which silently lowers the mean.
* :func:`owl_sparsity` — OWL (outlier-weighed layerwise sparsity): a higher outlier
  ratio gets *less* sparsity, ``s_l = 1 − (D̃_l − mean D̃ + (1 − s))`` with
  ``D̃ = (D − min)/(max − min) · 2λ``. The reference uses the plain (unweighted) mean;
  for models whose blocks all have the same size that is also the weighted mean.

:func:`sparsity_from_scores` picks the mapping from the scores' :class:`ScoreDirection`.
:data:`ALLOCATIONS` is the one list of allocation names (the modifiers, ``prune_model``
and ``layerif prune`` derive theirs from it), with each reference's spread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from layerif_plugins.errors import AllocationError
from layerif_plugins.scores import ScoreDirection, as_direction

logger = logging.getLogger(__name__)

MAX_SPARSITY = 0.99
#: Every per-layer sparsity allocation (name = the scoring method behind it, ``uniform``: none)
#: with the spread its reference uses: LayerIF's Wanda/SparseGPT scripts ε = 0.1, OWL's
#: λ = 0.08, AlphaPruning's ε = 0.2 (docs/method.md §2b, §3); the depth-ramp control
#: (score = layer index, docs/method.md §5) was measured with ε = 0.1; uniform has none.
REFERENCE_EPSILON: dict[str, float] = {"layerif": 0.1, "owl": 0.08, "alpha_hill": 0.2, "depth_ramp": 0.1,
                                       "uniform": 0.0}
#: allocations whose per-layer list comes from a scores file through a spread (§2b or OWL's mapping)
SCORE_ALLOCATIONS: tuple[str, ...] = ("layerif", "owl", "alpha_hill", "depth_ramp")
#: allocations that are always chosen by evaluating candidates on held-out calibration data (the planner,
#: layerif_plugins/plan): the measured per-layer sensitivity, and ``auto`` (every provider, the simplest kept
#: unless another wins beyond the noise)
SEARCHED_ALLOCATIONS: tuple[str, ...] = ("sensitivity", "auto")
#: every allocation name, in the order the CLI and docs list them (``atp``: ATP's arithmetic progression over
#: depth, its slope searched unless given)
ALLOCATIONS: tuple[str, ...] = (*REFERENCE_EPSILON, "atp", *SEARCHED_ALLOCATIONS)


#: ``epsilon: auto``: the spreads tried (0 = uniform, always tried first; the allocation's
#: reference spread is added when missing), each with the scores as given and inverted.
AUTO_EPSILONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)
AUTO = "auto"


def default_epsilon(method: str) -> float:
    """The reference spread (ε, or OWL's λ) of an allocation method; 0.1 for methods without one."""
    return REFERENCE_EPSILON.get(method, 0.1)


def check_epsilon(epsilon: float | str | None, what: str = "epsilon") -> float | str | None:
    """A spread in [0, 1], ``"auto"`` (search it) or None (the reference's); refuses anything else."""
    if epsilon is None or epsilon == AUTO:
        return epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon):
        raise AllocationError(f"{what} must be a number in [0, 1] or 'auto', got {epsilon!r}")
    if not 0.0 <= epsilon <= 1.0:
        raise AllocationError(
            f"{what} must be in [0, 1] (relative ratios span [1-ε, 1+ε]; above 1 a layer would get negative "
            f"sparsity) or 'auto', got {epsilon}"
        )
    return float(epsilon)


def epsilon_or_auto(text: str) -> float | str:
    """Command-line ``--epsilon``: ``auto`` or a finite number in [0, 1] (argparse reports a ValueError in one line)."""
    return check_epsilon(AUTO if text.strip().lower() == AUTO else float(text), "--epsilon")  # type: ignore[return-value]


def search_grid(method: str, grid: Sequence[float] | None = None) -> list[float]:
    """The spreads ``epsilon: auto`` tries for ``method``, ascending, 0 (uniform) first.

    ``grid`` (default :data:`AUTO_EPSILONS`) plus 0 and the method's reference spread, so
    the search can only match or beat both uniform and the reference setting on its
    held-out data.
    """
    values = [check_epsilon(float(e), "epsilon_grid value") for e in (AUTO_EPSILONS if grid is None else grid)]
    return sorted({0.0, default_epsilon(method), *values})  # type: ignore[arg-type]


def check_target(target: float, max_sparsity: float = MAX_SPARSITY) -> float:
    """Validate a global sparsity target: a number in (0, 1), at most ``max_sparsity``."""
    if isinstance(target, bool) or not isinstance(target, int | float) or not math.isfinite(target):
        raise AllocationError(f"sparsity must be a number in (0, 1), got {target!r}")
    if not 0.0 < target < 1.0:
        raise AllocationError(f"sparsity must be in (0, 1) (a fraction of weights to zero), got {target}")
    if not 0.0 < max_sparsity <= 1.0:
        raise AllocationError(f"max_sparsity must be in (0, 1], got {max_sparsity}")
    if target > max_sparsity:
        raise AllocationError(
            f"target sparsity {target} is above the per-layer cap {max_sparsity}: no allocation can reach it; "
            f"lower the target or raise max_sparsity"
        )
    return float(target)


def _check_scores(scores: Sequence[float], what: str = "scores") -> list[float]:
    values = [float(s) for s in scores]
    if not values:
        raise AllocationError(f"no {what}: need one per decoder layer")
    bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise AllocationError(f"non-finite {what} at layers {bad}: {[values[i] for i in bad]}")
    return values


def _check_params(params_per_layer: Sequence[float] | None, n: int) -> list[float]:
    if params_per_layer is None:
        return [1.0] * n
    params = [float(p) for p in params_per_layer]
    if len(params) != n:
        raise AllocationError(f"{len(params)} parameter counts for {n} layers; give one per layer")
    if any(not math.isfinite(p) or p <= 0 for p in params):
        raise AllocationError(f"parameter counts must be positive, got {params}")
    return params


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


def _minmax(values: list[float]) -> list[float]:
    """Map to [0, 1]; all-equal values map to 0.5 (the middle: uniform allocation)."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(abs(hi), abs(lo), 1e-300):
        return [0.5] * len(values)
    return [(v - lo) / (hi - lo) for v in values]


def rescale_to_target(
    ratios: Sequence[float], params: Sequence[float], target: float, max_sparsity: float = MAX_SPARSITY
) -> tuple[list[float], list[int]]:
    """Scale ``ratios`` so that ``Σ p r / Σ p == target``, capping at ``max_sparsity``.

    Layers that would exceed the cap are fixed at it and the rest are rescaled again to
    carry the excess (repeat until no new layer hits the cap). Returns the sparsities and
    the indices of the clipped layers. Ratios must be non-negative with a positive sum.
    """
    r = [float(x) for x in ratios]
    if any(x < 0 for x in r) or weighted_mean(r, params) <= 0:
        raise AllocationError(f"cannot rescale non-positive relative ratios {r}")
    total = target * sum(params)
    clipped: set[int] = set()
    out = list(r)
    while True:
        free = [i for i in range(len(r)) if i not in clipped]
        budget = total - sum(params[i] * max_sparsity for i in clipped)
        mass = sum(params[i] * r[i] for i in free)
        if not free or mass <= 0:
            raise AllocationError(
                f"target {target} cannot be met with every layer at most {max_sparsity}; lower epsilon or the target"
            )
        scale = budget / mass
        new = {i for i in free if r[i] * scale > max_sparsity}
        for i in free:
            out[i] = r[i] * scale
        if not new:
            break
        clipped |= new
        for i in clipped:
            out[i] = max_sparsity
    for i in clipped:
        out[i] = max_sparsity
    return out, sorted(clipped)


def layerwise_sparsity(
    scores: Sequence[float],
    params_per_layer: Sequence[float] | None,
    target: float,
    epsilon: float = 0.1,
    max_sparsity: float = MAX_SPARSITY,
) -> list[float]:
    """LayerIF / AlphaPruning per-layer sparsity (docs/method.md §2b); higher score → more sparsity.

    ``r_l = minmax(m)_l · 2ε + (1 − ε)``, then ``r ← r · s Σp / Σ p r`` so the
    parameter-weighted mean equals ``target`` exactly; ratios above ``max_sparsity``
    are clipped and the excess redistributed to the other layers. ``ε = 0`` or equal
    scores give the uniform allocation.

    Args:
        scores: one score per decoder layer (layer 0 first).
        params_per_layer: prunable parameters of each layer (``None``: all equal).
        target: global sparsity in (0, 1).
        epsilon: half-width of the relative range, in [0, 1] (0.1: the LayerIF reference for Wanda/SparseGPT).
        max_sparsity: per-layer cap (0.99 in the reference).
    """
    values = _check_scores(scores)
    params = _check_params(params_per_layer, len(values))
    target = check_target(target, max_sparsity)
    if epsilon is None or epsilon == AUTO:
        raise AllocationError(f"epsilon must be a number in [0, 1] here, got {epsilon!r} ('auto' is resolved by "
                              "the pruning search, not by the mapping)")
    epsilon = check_epsilon(epsilon)  # type: ignore[assignment]
    relative = [m * 2.0 * epsilon + (1.0 - epsilon) for m in _minmax(values)]
    out, clipped = rescale_to_target(relative, params, target, max_sparsity)
    if clipped:
        logger.warning(
            "sparsity of layers %s capped at %s; the excess was redistributed to the other layers so the "
            "weighted mean stays %s (a smaller epsilon avoids the cap)", clipped, max_sparsity, target,
        )
    return out


def owl_sparsity(
    outlier_ratios: Sequence[float],
    target: float,
    lmbda: float = 0.08,
    max_sparsity: float = MAX_SPARSITY,
) -> list[float]:
    """OWL per-layer sparsity (docs/method.md §3): more outliers → less sparsity.

    ``D̃ = (D − min D)/(max D − min D) · 2λ``; ``s_l = 1 − (D̃_l − mean D̃ + (1 − target))``,
    i.e. sparsities span ``[target − λ, target + λ]`` around a plain mean of ``target``.
    Equal outlier ratios or ``λ = 0`` give the uniform allocation. A sparsity outside
    ``[0, max_sparsity]`` (a target within λ of 0 or of the cap) is refused.
    """
    values = _check_scores(outlier_ratios, "outlier ratios")
    target = check_target(target, max_sparsity)
    if isinstance(lmbda, bool) or not isinstance(lmbda, int | float) or not math.isfinite(lmbda) or lmbda < 0:
        raise AllocationError(f"OWL lambda must be a number >= 0, got {lmbda!r}")
    scaled = [d * 2.0 * lmbda for d in _minmax(values)]
    mean = sum(scaled) / len(scaled)
    out = [1.0 - (d - mean + (1.0 - target)) for d in scaled]
    low, high = min(out), max(out)
    if low < 0.0 or high > max_sparsity:
        raise AllocationError(
            f"OWL with lambda={lmbda} around target {target} gives per-layer sparsities in [{low:.4f}, {high:.4f}], "
            f"outside [0, {max_sparsity}]; use a smaller lambda (epsilon)"
        )
    return out


def sparsity_from_scores(
    scores: Sequence[float],
    direction: ScoreDirection | str,
    params_per_layer: Sequence[float] | None,
    target: float,
    epsilon: float = 0.1,
    max_sparsity: float = MAX_SPARSITY,
    invert: bool = False,
) -> list[float]:
    """Per-layer sparsity for scores of this direction: OWL's mapping for protect scores, §2b otherwise.

    ``direction`` is the scores' :class:`ScoreDirection` (``LayerScores.direction``); a
    method name is accepted too and read as that method's direction. ``invert`` reverses
    the mapping (the scores are negated): more sparsity where the scores say less. On
    SmolLM2 the inverted LayerIF mapping beat the §2b one (docs/method.md §5), so
    ``epsilon: auto`` tries both.
    """
    direction = as_direction(direction)
    if invert:
        scores = [-float(s) for s in _check_scores(scores)]
    if direction.sparsity_mapping == "owl":
        return owl_sparsity(scores, target, lmbda=epsilon, max_sparsity=max_sparsity)
    return layerwise_sparsity(scores, params_per_layer, target, epsilon=epsilon, max_sparsity=max_sparsity)


__all__ = [
    "ALLOCATIONS",
    "SCORE_ALLOCATIONS",
    "SEARCHED_ALLOCATIONS",
    "AUTO",
    "AUTO_EPSILONS",
    "MAX_SPARSITY",
    "REFERENCE_EPSILON",
    "default_epsilon",
    "check_epsilon",
    "check_target",
    "layerwise_sparsity",
    "owl_sparsity",
    "epsilon_or_auto",
    "rescale_to_target",
    "search_grid",
    "sparsity_from_scores",
    "weighted_mean",
]
