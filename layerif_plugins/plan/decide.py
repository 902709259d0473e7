"""Judging candidate allocations on held-out calibration data: paired per-example losses.

Why paired: every candidate is scored on the *same* held-out examples, and most of the
spread of a mean loss is which examples were drawn, not which allocation pruned the
model. The difference of two candidates, example by example, cancels that part; its
standard error (``sd(d) / sqrt(n)``) is the noise the decision must beat.

The rule of ``allocation: auto`` (:func:`choose_simplest`): candidates come in tiers of
simplicity (uniform; ATP; the one-knob heuristics OWL, AlphaPruning, LayerIF; the per-layer
search, sensitivity); the incumbent starts as the first and each tier's best in turn replaces
it only if its mean per-example loss is lower by more than ``sigmas`` paired standard errors.
Uniform therefore wins unless something beats it clearly; a win within the noise of the
held-out slice never moves the decision. Why a tier for the search: its list is the best of
many on the judging examples (knapsack, then moves kept because they lowered that loss), so
it must beat the best heuristic clearly, not only ATP (measured: a best-of-8 move that beat
LayerIF* by 0.03 nats on held-out lost to it on test, docs/quality.md §0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from layerif_plugins.errors import AllocationError


@dataclass(frozen=True)
class Paired:
    """``mean(a − b)`` over the examples and its standard error (negative mean: ``a`` is better)."""

    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        """Mean over standard error (±inf when the difference is exactly constant and non-zero)."""
        if self.se > 0:
            return self.mean / self.se
        return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)


def example_losses(sums: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Mean token loss of each example (``sum / count``): the unit of the paired test.

    Examples without a predicted token are left out (the same ones for every candidate: it
    depends on the data only, so the pairing holds).
    """
    if len(sums) != len(counts) or not sums:
        raise AllocationError(f"per-example losses: {len(sums)} sums for {len(counts)} counts")
    return [s / c for s, c in zip(sums, counts, strict=True) if c > 0]  # a 1-token example predicts nothing


def token_mean(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Token-weighted mean loss (what perplexity = exp of)."""
    return float(sum(sums)) / float(sum(counts))


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired difference ``a − b`` of per-example values: mean and standard error of the mean."""
    if len(a) != len(b) or len(a) < 2:
        raise AllocationError(f"a paired comparison needs the same >= 2 examples on both sides, got {len(a)}, {len(b)}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return Paired(mean=mean, se=math.sqrt(var / n), n=n)


def choose_simplest(names: Sequence[str], per_example: Sequence[Sequence[float]], sigmas: float = 2.0,
                    pick: Sequence[Sequence[float]] | None = None,
                    tiers: Sequence[int] | None = None) -> tuple[int, list[str]]:
    """Index of the kept candidate and the reasons, one line per step (see the module docstring).

    ``names`` and ``per_example`` are in order of simplicity (uniform first); ``tiers`` gives each
    candidate's simplicity rank (non-decreasing; default ``0, 1, 2, 2, …``: the first, the second
    — ATP in ``auto`` —, then the rest as one tier). The incumbent is the first; then, tier by
    tier, the tier's candidate with the lowest mean replaces the incumbent if it beats it by more
    than ``sigmas`` standard errors. ``pick`` (one list per candidate, other examples) chooses each
    tier's challenger instead of ``per_example``: with a confirmation slice the challenger is the
    search's best, and the slice only judges it (choosing it there too would bring back the
    winner's curse the slice is for).
    """
    if not names or len(names) != len(per_example) or (pick is not None and len(pick) != len(names)):
        raise AllocationError("choose_simplest needs one per-example loss list per candidate")
    if not (isinstance(sigmas, int | float) and math.isfinite(sigmas) and sigmas >= 0):
        raise AllocationError(f"sigmas must be a finite number >= 0, got {sigmas!r}")
    ranks = list(tiers) if tiers is not None else [min(i, 2) for i in range(len(names))]
    if len(ranks) != len(names) or any(b < a for a, b in itertools.pairwise(ranks)):
        raise AllocationError(f"choose_simplest needs one non-decreasing simplicity rank per candidate, got {ranks}")
    best = 0
    why = [f"start from {names[0]} (the simplest)"]

    def challenge(i: int) -> None:
        nonlocal best
        p = paired(per_example[i], per_example[best])
        if p.mean < 0 and -p.mean > sigmas * p.se:
            why.append(f"{names[i]} beats {names[best]} by {-p.mean:.5f} nats/example "
                       f"(> {sigmas:g} × paired SE {p.se:.5f}): keep {names[i]}")
            best = i
        else:
            verdict = "worse" if p.mean >= 0 else f"within {sigmas:g} paired SE ({p.se:.5f})"
            why.append(f"{names[i]} vs {names[best]}: {p.mean:+.5f} nats/example, {verdict}: keep {names[best]}")

    chooser = per_example if pick is None else pick
    for rank in sorted(set(ranks)):
        tier = [i for i in range(1, len(names)) if ranks[i] == rank]
        if tier:
            challenge(min(tier, key=lambda i: (sum(chooser[i]) / len(chooser[i]), i)))
    return best, why


__all__ = ["Paired", "choose_simplest", "example_losses", "paired", "token_mean"]
