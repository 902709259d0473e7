"""AlphaPruning / AlphaLoRA baseline: heavy-tail exponent of each layer's weight spectrum.

For every linear weight ``W`` the eigenvalues of ``WᵀW`` are ``λ = svdvals(W)²``; a
power law ``p(λ) ∝ λ^{-α}`` is fitted to the tail above ``xmin`` with the Hill
(maximum-likelihood) estimator ``α = 1 + n / (Σ_{k≥i} ln λ_k − n ln λ_i)``, ``n = N − i``.
``xmin`` is the candidate with the smallest Kolmogorov–Smirnov distance
``D = max_k |1 − (λ_k/xmin)^{1−α} − (k−i)/n|`` among the eigenvalues up to 1.5 × the
peak of a 100-bin histogram of ``log10 λ`` (AlphaPruning's ``fix_fingers="xmin_peak"``).
Block score = mean α of its linear modules; a higher α (a less heavy-tailed, less
well-trained layer) gets more sparsity.

Reproduced reference details: the lower bound on the candidates is
``log10(0.95 · peak)`` compared with λ itself (a unit mix-up in the reference that makes
it almost always inactive); candidates whose α ≤ 1 keep ``D = 1``; ties go to the
smallest candidate; when no candidate qualifies the reference returns α = 0 (candidate 0
skipped) — we keep that too, and log it. The fit itself runs in float64 (the reference
uses float32) so that the argmin does not depend on rounding.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.models import block_linears, fingerprint
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection

logger = logging.getLogger(__name__)

BINS = 100
XMAX_FACTOR = 1.5
_CHUNK = 256  # candidates per vectorized KS block (memory O(chunk × N))


@dataclass(frozen=True)
class HillFit:
    alpha: float
    xmin: float
    ks_distance: float
    num_eigs: int
    num_candidates: int


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``WᵀW`` (squared singular values, float32 SVD as the reference), ascending, float64."""
    eigs = torch.linalg.svdvals(weight.detach().to(torch.float32).cpu()).pow(2).to(torch.float64)
    return torch.sort(eigs).values


def hill_fit(eigs: torch.Tensor, bins: int = BINS, xmax_factor: float = XMAX_FACTOR) -> HillFit:
    """Hill α with the KS-chosen ``xmin`` of AlphaPruning's ``xmin_peak`` mode.

    ``eigs``: ascending positive eigenvalues (zeros are dropped: their log is −∞).
    """
    eigs = eigs.to(torch.float64)
    eigs = eigs[eigs > 0]
    n_total = eigs.numel()
    if n_total < 2:
        return HillFit(float("nan"), float("nan"), float("nan"), n_total, 0)
    log_e = torch.log(eigs)
    log10_e = torch.log10(eigs)
    lo, hi = log10_e.min(), log10_e.max()
    counts = torch.histc(log10_e, bins=bins, min=float(lo), max=float(hi))
    boundaries = torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64)
    peak = 10 ** boundaries[int(torch.argmax(counts))]
    xmin_lo = math.log10(0.95 * float(peak))  # sic: the reference compares λ with a log10 value
    xmin_hi = xmax_factor * float(peak)
    cand = eigs[:-1]
    idx = torch.nonzero((cand >= xmin_lo) & (cand <= xmin_hi)).flatten()
    alphas = torch.zeros(n_total - 1, dtype=torch.float64)
    ds = torch.ones(n_total - 1, dtype=torch.float64)
    if idx.numel():
        # reverse cumulative sums: tail_sum[i] = Σ_{k≥i} ln λ_k
        tail_sum = torch.flip(torch.cumsum(torch.flip(log_e, [0]), 0), [0])
        k = torch.arange(n_total, dtype=torch.float64)
        for start in range(0, idx.numel(), _CHUNK):
            i = idx[start:start + _CHUNK]
            n = (n_total - i).to(torch.float64)
            alpha = 1.0 + n / (tail_sum[i] - n * log_e[i])
            alphas[i] = alpha
            ratio = eigs.unsqueeze(0) / eigs[i].unsqueeze(1)  # (c, N): λ_k / xmin
            emp = (k.unsqueeze(0) - i.unsqueeze(1).to(torch.float64)) / n.unsqueeze(1)
            dist = (1.0 - ratio.pow(1.0 - alpha.unsqueeze(1)) - emp).abs()
            dist = torch.where(k.unsqueeze(0) >= i.unsqueeze(1), dist, torch.zeros_like(dist))
            d = dist.max(dim=1).values
            ds[i] = torch.where(alpha > 1.0, d, torch.ones_like(d))
    best = int(torch.argmin(ds))
    if alphas[best] == 0:
        logger.warning("no xmin candidate qualified (N=%d eigenvalues); alpha = 0 as in the reference", n_total)
    return HillFit(float(alphas[best]), float(eigs[best]), float(ds[best]), n_total, int(idx.numel()))


@register_scorer("alpha_hill", direction=ScoreDirection.HIGHER_PRUNES,
                 description="AlphaPruning heavy-tail Hill exponent of each block's weight spectra")
def score_alpha_hill(
    model: nn.Module, data: ScoringData | None = None, bins: int = BINS, show_progress: bool = False
) -> LayerScores:
    """Mean Hill α of each block's linear weights (higher α → more sparsity). Needs no data."""
    linears = block_linears(model, "all")
    per_module: dict[str, float] = {}
    fits: dict[str, dict[str, float]] = {}
    sums = [0.0] * (max(lin.layer for lin in linears) + 1)
    counts = [0] * len(sums)
    for lin in tqdm(linears, desc="ESD alpha", disable=not show_progress):
        fit = hill_fit(esd(lin.module.weight), bins=bins)
        per_module[lin.name] = fit.alpha
        fits[lin.name] = {"xmin": fit.xmin, "ks_distance": fit.ks_distance, "num_eigs": fit.num_eigs}
        sums[lin.layer] += fit.alpha
        counts[lin.layer] += 1
    return LayerScores(
        scores=[s / c for s, c in zip(sums, counts, strict=True)],
        method="alpha_hill",
        model=fingerprint(model),
        params={"bins": bins, "xmin": f"min KS distance among eigenvalues <= {XMAX_FACTOR} x histogram peak",
                "eigenvalues": "svdvals(W)^2", "block_score": "mean alpha of the block's linear modules"},
        data=data.fingerprints() if data is not None else {},
        per_module=per_module,
        extras={"fits": fits},
        higher_is="less heavy-tailed spectrum = less well-trained layer (more sparsity)",
    )
