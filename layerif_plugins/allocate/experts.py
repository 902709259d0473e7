"""Scores → per-layer LoRA expert counts (and top-k), plus the MoLA and uniform layouts.

Pure functions of plain lists, so they are trivial to test and reuse; the PEFT tuner and
the ``layerif moe`` command call them, never the engine.

* :func:`layerif_expert_counts` — the LayerIF reference mapping (docs/method.md §2a)::

      x_l = S_l − min S ;  w_l = x_l^β
      n_l = 1 + floor(w_l / Σw · (T − L))
      the remaining T − Σn handed out one by one to the largest fractional parts
      top_k_l = 2 if n_l > 1 else 1

  Ties between equal fractional parts go to the layer with the higher score, then to
  the lower layer index; this keeps the result monotone in ``S`` (a layer never gets
  fewer experts than a layer with a lower score). When every score is equal (``Σw = 0``)
  the ``T − L`` extra experts are shared equally (``w_l = 1``), which gives the uniform
  layout: ``floor(T/L)`` each, the ``T mod L`` left over to the lowest layers.

* ``rounding="alphalora"`` — AlphaLoRA's ``exponential_scaling`` (their
  ``expert_number.py``), reproduced on purpose with its quirks: ``w = S^β`` on the raw
  scores (no ``− min``), ``n = round(w/Σw · T)`` (numpy's round-half-to-even, no minimum
  of one expert per layer), then while ``Σn ≠ T`` one expert is added at
  ``argmin(w − n)`` or removed at ``argmax(w − n)`` — comparing the *unnormalised*
  ``w`` with the counts. A layer left with 0 experts is refused (AllocationError).

* :func:`mola_layout` — MoLA's fixed layouts (``2468``, ``8642``, ``2882``, ``8228``):
  layer ``l`` takes the pattern value of the quarter that holds its centre,
  ``q = floor((l + ½) · 4 / L)`` (a centre exactly on the first or last quarter boundary
  goes to the outer quarter), so any depth works and symmetric patterns stay symmetric;
  the values are then scaled to the budget by largest-remainder apportionment with at
  least one expert per layer (at ``L = 32, T = 160`` this is exactly MoLA's
  8 × {2, 4, 6, 8}). :func:`uniform_layout` is the same with equal weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from layerif_plugins.errors import AllocationError

MOLA_PATTERNS: dict[str, tuple[int, int, int, int]] = {
    "2468": (2, 4, 6, 8),
    "8642": (8, 6, 4, 2),
    "2882": (2, 8, 8, 2),
    "8228": (8, 2, 2, 8),
}
ROUNDINGS: tuple[str, ...] = ("layerif", "alphalora")


@dataclass(frozen=True)
class ExpertLayout:
    """Per-layer expert counts and router top-k (layer 0 first), with where they came from."""

    experts: list[int]
    top_k: list[int]
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_layout(self.experts, self.top_k)

    @property
    def budget(self) -> int:
        return sum(self.experts)

    def to_dict(self) -> dict[str, Any]:
        return {"experts": list(self.experts), "top_k": list(self.top_k), "method": self.method,
                "budget": self.budget, "params": dict(self.params)}


def default_top_k(experts: Sequence[int], max_top_k: int = 2) -> list[int]:
    """``top_k_l = min(max_top_k, n_l)``; with the default 2 this is the reference's ``2 if n > 1 else 1``."""
    if max_top_k < 1:
        raise AllocationError(f"max_top_k must be >= 1, got {max_top_k}")
    return [min(max_top_k, int(n)) for n in experts]


def check_layout(experts: Sequence[int], top_k: Sequence[int]) -> None:
    """Refuse a layout that cannot be built: < 1 expert, top-k outside ``1..n``, length mismatch."""
    if len(experts) != len(top_k):
        raise AllocationError(f"{len(experts)} expert counts but {len(top_k)} top-k values; give one per layer")
    for layer, (n, k) in enumerate(zip(experts, top_k, strict=True)):
        if int(n) != n or n < 1:
            raise AllocationError(f"layer {layer}: {n!r} experts; every layer needs a whole number >= 1")
        if int(k) != k or k < 1:
            raise AllocationError(f"layer {layer}: top_k={k!r}; top-k must be a whole number >= 1")
        if k > n:
            raise AllocationError(
                f"layer {layer}: top_k={k} is larger than its {n} expert(s); lower top_k for that layer "
                f"(at most {n}) or give it more experts"
            )


def _check_inputs(scores: Sequence[float], budget: int) -> list[float]:
    values = [float(s) for s in scores]
    if not values:
        raise AllocationError("no scores: need one score per decoder layer")
    bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise AllocationError(f"non-finite scores at layers {bad}")
    if int(budget) != budget:
        raise AllocationError(f"budget must be a whole number of experts, got {budget!r}")
    if budget < len(values):
        raise AllocationError(
            f"budget T={budget} is smaller than the number of layers L={len(values)}: every layer needs at "
            f"least one expert, so use --budget >= {len(values)}"
        )
    return values


def _hand_out(base: list[int], frac: list[float], keys: list[float], remaining: int) -> list[int]:
    """Give ``remaining`` experts, one each, to the largest fractional parts (ties: higher key, lower index)."""
    order = sorted(range(len(base)), key=lambda i: (-frac[i], -keys[i], i))
    out = list(base)
    for i in order[:remaining]:
        out[i] += 1
    return out


def layerif_expert_counts(
    scores: Sequence[float],
    budget: int,
    beta: float = 2.5,
    rounding: str = "layerif",
    max_top_k: int = 2,
) -> tuple[list[int], list[int]]:
    """Expert count and top-k per layer from layer scores (higher score → more experts).

    Args:
        scores: one score per decoder layer, layer 0 first (``LayerScores.scores``).
        budget: total number of experts ``T`` over all layers (``T >= L``).
        beta: exponent β (2.5 in the LayerIF / AlphaLoRA scripts, 3 in the paper's example).
        rounding: ``"layerif"`` (docs/method.md §2a, the default) or ``"alphalora"`` (AlphaLoRA's
            ``exponential_scaling``; see the module docstring for what differs).
        max_top_k: router top-k of layers with more than one expert (2 in the reference).

    Returns:
        ``(experts, top_k)``: two lists of ints, layer 0 first, ``sum(experts) == budget``.
    """
    values = _check_inputs(scores, budget)
    if beta < 0 or not math.isfinite(beta):
        raise AllocationError(f"beta must be a finite number >= 0, got {beta}")
    if rounding not in ROUNDINGS:
        raise AllocationError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    experts = _alphalora_rounding(values, budget, beta) if rounding == "alphalora" else (
        _layerif_rounding(values, budget, beta))
    top_k = default_top_k(experts, max_top_k)
    check_layout(experts, top_k)
    return experts, top_k


def _layerif_rounding(values: list[float], budget: int, beta: float) -> list[int]:
    n_layers = len(values)
    low = min(values)
    x = [s - low for s in values]
    top = max(x)
    # (x / max x)^β has the same ratios as x^β and cannot overflow for large β
    w = [(xi / top) ** beta for xi in x] if top > 0 else [1.0] * n_layers
    total = sum(w)  # >= 1: the top layer has w = 1
    extra = budget - n_layers
    raw = [wi / total * extra for wi in w]
    base = [1 + math.floor(r) for r in raw]
    frac = [r - math.floor(r) for r in raw]
    return _hand_out(base, frac, values, budget - sum(base))


def _alphalora_rounding(values: list[float], budget: int, beta: float) -> list[int]:
    import numpy as np

    if any(v <= 0 for v in values):
        raise AllocationError(
            "AlphaLoRA rounding raises the raw scores to the power β and needs every score > 0 "
            f"(got {values}); use the default rounding='layerif', which shifts by min(S)"
        )
    w = np.power(np.asarray(values, dtype=np.float64), beta)
    counts = np.round(w / w.sum() * budget).astype(int)
    for _ in range(10 * budget + 10 * len(values)):
        diff = budget - int(counts.sum())
        if diff == 0:
            break
        if diff > 0:
            counts[int(np.argmin(w - counts))] += 1
        else:
            counts[int(np.argmax(w - counts))] -= 1
    experts = [int(c) for c in counts]
    if sum(experts) != budget:  # pragma: no cover - the loop above always converges
        raise AllocationError("AlphaLoRA rounding did not converge")
    zero = [i for i, n in enumerate(experts) if n < 1]
    if zero:
        raise AllocationError(
            f"AlphaLoRA rounding left layers {zero} with {[experts[i] for i in zero]} experts (it has no minimum "
            f"of one per layer): raise the budget T={budget}, lower beta={beta}, or use rounding='layerif'"
        )
    return experts


def apportion(weights: Sequence[float], budget: int, minimum: int = 1) -> list[int]:
    """Largest-remainder apportionment of ``budget`` proportional to ``weights``, at least ``minimum`` each.

    Layers whose proportional quota is below ``minimum`` are fixed at ``minimum`` and the
    rest is re-apportioned among the others (repeated until stable); ties in the
    fractional parts go to the larger weight, then to the lower index.
    """
    w = [float(x) for x in weights]
    if any(x < 0 or not math.isfinite(x) for x in w):
        raise AllocationError(f"weights must be finite and >= 0, got {w}")
    if budget < minimum * len(w):
        raise AllocationError(
            f"budget T={budget} is smaller than {minimum} expert(s) × {len(w)} layers; use --budget >= "
            f"{minimum * len(w)}"
        )
    if sum(w) == 0:
        w = [1.0] * len(w)
    fixed: set[int] = set()
    while True:
        free = [i for i in range(len(w)) if i not in fixed]
        left = budget - minimum * len(fixed)
        total = sum(w[i] for i in free)
        quota = {i: (w[i] / total * left if total > 0 else left / len(free)) for i in free}
        low = {i for i in free if quota[i] < minimum}
        if not low or len(low) == len(free):
            break
        fixed |= low
    base = [minimum] * len(w)
    frac = [0.0] * len(w)
    for i in free:
        base[i] = max(minimum, math.floor(quota[i]))
        frac[i] = quota[i] - math.floor(quota[i]) if quota[i] >= minimum else 0.0
    remaining = budget - sum(base)
    if remaining < 0:  # only when every free quota was < minimum: take back from the largest weights
        raise AllocationError(f"cannot apportion budget {budget} over {len(w)} layers with minimum {minimum}")
    return _hand_out(base, frac, [w[i] for i in range(len(w))], remaining)


def mola_pattern(pattern: str, num_layers: int) -> list[int]:
    """MoLA's unscaled per-layer values for any depth (the quarter holding each layer's centre)."""
    key = pattern.removeprefix("mola-").replace("-", "")
    if key not in MOLA_PATTERNS:
        raise AllocationError(f"unknown MoLA layout {pattern!r}; choose one of {sorted(MOLA_PATTERNS)}")
    if num_layers < 1:
        raise AllocationError(f"num_layers must be >= 1, got {num_layers}")
    values = MOLA_PATTERNS[key]
    out = []
    for layer in range(num_layers):
        # centre c = (l + ½)·4/L = (4l + 2)/L, in exact integers; a centre on the first boundary (c = 1)
        # goes to the outer quarter, like c = 3 does by flooring, so symmetric patterns stay symmetric
        num = 4 * layer + 2
        q = num // num_layers
        if num % num_layers == 0 and q == 1:
            q = 0
        out.append(values[q])
    return out


def mola_layout(
    pattern: str, num_layers: int, budget: int | None = None, max_top_k: int = 2
) -> tuple[list[int], list[int]]:
    """MoLA layout (``"2468"``, ``"8642"``, ``"2882"``, ``"8228"``) for ``num_layers`` layers.

    ``budget=None`` keeps MoLA's own counts (e.g. 8 × {2,4,6,8} = 160 for 32 layers);
    a budget scales them by largest-remainder apportionment (at least one per layer).
    """
    values = mola_pattern(pattern, num_layers)
    experts = values if budget is None else apportion(values, _check_budget(budget, num_layers))
    top_k = default_top_k(experts, max_top_k)
    check_layout(experts, top_k)
    return experts, top_k


def uniform_layout(num_layers: int, budget: int, max_top_k: int = 2) -> tuple[list[int], list[int]]:
    """``floor(T/L)`` experts per layer, the ``T mod L`` left over to the lowest layers."""
    experts = apportion([1.0] * num_layers, _check_budget(budget, num_layers))
    top_k = default_top_k(experts, max_top_k)
    return experts, top_k


def _check_budget(budget: int, num_layers: int) -> int:
    if num_layers < 1:
        raise AllocationError(f"num_layers must be >= 1, got {num_layers}")
    _check_inputs([0.0] * num_layers, budget)
    return int(budget)


def max_budget(num_layers: int, hidden_size: int, r: int) -> int:
    """The most experts ``num_layers`` layers can use: ``max(1, hidden_size // r)`` rank-``r`` experts per layer.

    A layer's experts read the same ``hidden_size``-dimensional input: past ``n · r =
    hidden_size`` their down-projections are linearly dependent, so a larger budget adds
    parameters (and memory: a budget of a million experts is tens of GB) but no direction
    the layer can use. ``layerif moe`` refuses it before building anything.
    """
    if num_layers < 1 or hidden_size < 1 or r < 1:
        raise AllocationError(f"num_layers, hidden_size and r must be >= 1, got {num_layers}, {hidden_size}, {r}")
    return num_layers * max(1, hidden_size // r)


def check_budget_fits(budget: int, num_layers: int, hidden_size: int, r: int) -> None:
    """Refuse a budget below one expert per layer or above :func:`max_budget`, naming the bound and the fix."""
    _check_budget(budget, num_layers)
    most = max_budget(num_layers, hidden_size, r)
    if budget > most:
        raise AllocationError(
            f"budget T={budget} is more than the {num_layers} layers can hold: at most {most} "
            f"({max(1, hidden_size // r)} rank-{r} experts per layer of hidden size {hidden_size}); "
            f"use --budget <= {most}, or a smaller --r"
        )


LAYOUTS: tuple[str, ...] = ("layerif", "alphalora", "uniform", *(f"mola-{k}" for k in MOLA_PATTERNS))
#: the layouts computed from layer scores, and the scoring method each reference uses
SCORED_LAYOUTS: dict[str, str] = {"layerif": "layerif", "alphalora": "alpha_hill"}


def expert_layout(
    layout: str,
    num_layers: int,
    budget: int,
    scores: Sequence[float] | None = None,
    beta: float = 2.5,
    max_top_k: int = 2,
    source: dict[str, Any] | None = None,
) -> ExpertLayout:
    """One entry point for every layout name the CLI and the benchmark use.

    ``layerif`` and ``alphalora`` need ``scores`` (one per layer); ``uniform`` and the
    ``mola-*`` layouts ignore them. ``source`` (e.g. the scores' method and fingerprint) is
    kept in the result's ``params`` for provenance.
    """
    params: dict[str, Any] = {"budget": int(budget), "max_top_k": max_top_k, **(source or {})}
    if layout in SCORED_LAYOUTS:
        if scores is None:
            raise AllocationError(f"layout {layout!r} needs per-layer scores (a LayerScores file)")
        if len(scores) != num_layers:
            raise AllocationError(f"{len(scores)} scores for a model with {num_layers} decoder layers")
        experts, top_k = layerif_expert_counts(scores, budget, beta=beta, rounding=layout, max_top_k=max_top_k)
        params.update(beta=beta, rounding=layout, scores=[float(s) for s in scores])
    elif layout == "uniform":
        experts, top_k = uniform_layout(num_layers, budget, max_top_k)
    elif layout.startswith("mola-"):
        experts, top_k = mola_layout(layout, num_layers, budget, max_top_k)
        params["pattern"] = layout.removeprefix("mola-")
    else:
        raise AllocationError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    return ExpertLayout(experts, top_k, layout, params)
