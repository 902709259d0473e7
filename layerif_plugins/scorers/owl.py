"""OWL baseline: per-layer outlier ratio of Wanda scores on calibration data.

Wanda's score of a weight is ``A = |W_ij| · sqrt(s_j)`` with ``s_j`` the squared norm of
input feature ``j`` summed over the calibration tokens and divided by the number of
calibration sequences (Wanda's ``scaler_row``; padding excluded). OWL counts, per decoder
block, the share of weights whose score exceeds ``M`` times the block's mean score,
``D_l = 100 · mean(1[A > M · mean(A_l)])`` over all linear modules of the block (M = 5).

Unlike every other scorer, a *higher* OWL score means *less* sparsity (outlier-rich
layers are protected): the scorer declares ``ScoreDirection.HIGHER_PROTECTS``, the file
stores it as ``direction``, and :func:`layerif_plugins.allocate.sparsity.sparsity_from_scores`
applies :func:`~layerif_plugins.allocate.sparsity.owl_sparsity` to it.

llm-compressor's own OWL (``sparsity_profile="owl"``) accumulates
``Σ_batches ||x_j||_batch / 128`` instead of ``sqrt(s_j)``: identical up to a constant
(the ratio is scale-free) when the calibration set is one batch, slightly different
otherwise (mean of norms vs root of mean squares); we follow the OWL / Wanda papers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import batches
from layerif_plugins.errors import DataError
from layerif_plugins.models import LinearModule, block_linears, fingerprint, linear_weight_is_transposed
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection

logger = logging.getLogger(__name__)

OWL_M = 5.0
OWL_LAMBDA = 0.08
HIGHER_IS = "more outliers = better-trained layer (LESS sparsity: allocate with owl_sparsity)"


@torch.no_grad()
def input_feature_sq_norms(
    model: nn.Module,
    linears: list[LinearModule],
    batch_iter: Iterable[Mapping[str, torch.Tensor]],
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Wanda's ``scaler_row`` per linear: ``Σ_tokens x_j² / n_sequences`` (float32, padding excluded).

    ``batch_iter`` yields dicts with ``input_ids`` and optionally ``attention_mask`` (an
    llm-compressor calibration dataloader does).
    """
    sums = {lin.name: torch.zeros(_in_features(lin.module), dtype=torch.float32) for lin in linears}
    mask_holder: dict[str, torch.Tensor | None] = {"mask": None}
    n_seq = 0

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float32)
            mask = mask_holder["mask"]
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x * mask.to(x.device, x.dtype).unsqueeze(-1)
            sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0).cpu()

        return fn

    handles = [lin.module.register_forward_pre_hook(hook(lin.name)) for lin in linears]
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batch_iter, desc="OWL activations", disable=not show_progress):
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = mask.to(device) if mask is not None else None
            mask_holder["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
            n_seq += ids.shape[0]
    finally:
        for h in handles:
            h.remove()
        mask_holder["mask"] = None
    if n_seq == 0:
        raise DataError("OWL needs calibration data, but the calibration set is empty")
    return {name: s / n_seq for name, s in sums.items()}


def _in_features(module: nn.Module) -> int:
    w = module.weight
    return w.shape[0] if linear_weight_is_transposed(module) else w.shape[1]


def wanda_scores(module: nn.Module, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W| · sqrt(s_j)`` in (out, in) layout, float32."""
    w = module.weight.detach().to(torch.float32).cpu()
    if linear_weight_is_transposed(module):
        w = w.t()
    return w.abs() * sq_norm.to(torch.float32).sqrt().unsqueeze(0)


def outlier_ratios(
    linears: list[LinearModule], sq_norms: Mapping[str, torch.Tensor], m: float = OWL_M
) -> tuple[list[float], dict[str, float]]:
    """Per-block ``D_l`` (percent) over all its linears, and the same ratio per module."""
    num_layers = max(lin.layer for lin in linears) + 1
    per_block: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    per_module: dict[str, float] = {}
    for lin in linears:
        a = wanda_scores(lin.module, sq_norms[lin.name]).flatten()
        per_block[lin.layer].append(a)
        per_module[lin.name] = float(100.0 * (a > m * a.mean()).sum().item() / a.numel())
    ratios = []
    for parts in per_block:
        a = torch.cat(parts)
        ratios.append(float(100.0 * (a > m * a.mean()).sum().item() / a.numel()))
    return ratios, per_module


def owl_layer_scores(
    model: nn.Module,
    batch_iter: Iterable[Mapping[str, torch.Tensor]],
    m: float = OWL_M,
    show_progress: bool = False,
    data: dict[str, Any] | None = None,
) -> LayerScores:
    """OWL outlier ratios from any iterable of token batches (used by the scorer and the adapter)."""
    if m <= 0:
        raise DataError(f"OWL outlier multiplier M must be > 0, got {m}")
    linears = block_linears(model, "all")
    sq_norms = input_feature_sq_norms(model, linears, batch_iter, show_progress)
    ratios, per_module = outlier_ratios(linears, sq_norms, m)
    logger.info("OWL outlier ratios (%%): %s", [round(r, 4) for r in ratios])
    return LayerScores(
        scores=ratios,
        method="owl",
        model=fingerprint(model),
        params={
            "m": m,
            "lmbda_reference": OWL_LAMBDA,
            "allocation": "owl_sparsity",
            "wanda_score": "|W| * sqrt(sum_tokens x^2 / n_sequences), padding excluded",
            "unit": "percent of block weights with score > m * block mean",
        },
        data=data or {},
        per_module=per_module,
        direction=ScoreDirection.HIGHER_PROTECTS,
        higher_is=HIGHER_IS,
    )


@register_scorer("owl", needs=("calib",), direction=ScoreDirection.HIGHER_PROTECTS,
                 description="OWL outlier ratio of Wanda scores on calibration data (more outliers → less sparsity)")
def score_owl(
    model: nn.Module, data: ScoringData, m: float = OWL_M, batch_size: int = 8, show_progress: bool = False
) -> LayerScores:
    """OWL: ``D_l = 100 · mean(A > M · mean(A_l))`` with Wanda scores on ``data.calib`` (M = 5)."""
    assert data.calib is not None
    model.eval()
    it = ({"input_ids": b.input_ids, "attention_mask": b.attention_mask}
          for b in batches(data.calib, batch_size, data.pad_id))
    return owl_layer_scores(model, it, m=m, show_progress=show_progress, data=data.fingerprints())
