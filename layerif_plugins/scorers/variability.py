"""Hidden-state variability per layer (variability collapse, NC1), for choosing layers to fine-tune.

For layer ``l`` take the output of block ``l`` (pre final norm, see
:mod:`layerif_plugins.scorers.hidden_states`), mean-pooled over each example's non-pad
tokens: ``x_i ∈ R^d`` with class ``y_i ∈ Y``. With class means ``μ_c`` and their
(unweighted) mean ``μ_G = (1/|Y|) Σ_c μ_c``::

    Σ_w = (1/N)   Σ_i (x_i − μ_{y_i})(x_i − μ_{y_i})ᵀ        within-class covariance
    Σ_b = (1/|Y|) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ                 between-class covariance
    ν_l = trace(Σ_w Σ_b⁺) / |Y|

A low ``ν`` means examples of one class sit tightly around their mean relative to the
distance between classes: the layer's representation is specialised for the task.
``scores[l] = ν_l`` (higher = more variable = less task-specialised, in line with the
project convention); the scorer declares ``ScoreDirection.LOWER_ADAPTS``, so
:func:`layerif_plugins.allocate.layers.layers_to_adapt` picks the *lowest* ``ν``.

Numerics: ``Σ_b`` has rank ≤ ``|Y| − 1``, so ``Σ_b⁺`` comes from the SVD of the
centred-means matrix ``M = [μ_c − μ_G]`` (d × |Y|): with ``M = U S Vᵀ``,
``Σ_b⁺ = |Y| · U S⁻² Uᵀ`` and ``trace(Σ_w Σ_b⁺) = |Y| Σ_k (u_kᵀ Σ_w u_k) / s_k²`` — no
``d × d`` inverse, float64 throughout. Singular values below
``max(d, |Y|) · eps · s_max`` count as zero (``numpy.linalg.pinv``'s rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerif_plugins.errors import DataError, NumericsError
from layerif_plugins.models import fingerprint
from layerif_plugins.scorers.hidden_states import iter_block_states, masked_mean
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection


def check_labels(labels: Sequence[int] | None, n_examples: int) -> list[int]:
    """Refuse missing labels, a count that differs from the examples, or fewer than two classes."""
    if labels is None:
        raise DataError("variability needs one class label per calibration example; load the data with "
                        "layerif_plugins.data.labelled.load_labelled (JSONL with a text and a label field)")
    labels = [int(y) for y in labels]
    if len(labels) != n_examples:
        raise DataError(f"variability: {len(labels)} labels for {n_examples} calibration examples")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"variability: all {n_examples} examples have the same label {classes}; "
                        "the between-class covariance needs at least two classes")
    return labels


def variability(features: torch.Tensor, labels: Sequence[int]) -> float:
    """``ν = trace(Σ_w Σ_b⁺) / |Y|`` for ``(N, d)`` features and N integer labels (see module docstring)."""
    x = features.double()
    y = torch.as_tensor(list(labels))
    classes = torch.unique(y)
    n_classes = len(classes)
    if n_classes < 2:
        raise DataError("variability needs at least two classes")
    means = torch.stack([x[y == c].mean(dim=0) for c in classes])  # (|Y|, d)
    centred = x - means[torch.searchsorted(classes, y)]  # x_i − μ_{y_i}
    m = (means - means.mean(dim=0)).T  # (d, |Y|)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    if s.numel() == 0 or float(s.max()) == 0.0:
        raise NumericsError("variability: all class means are identical (zero between-class covariance); "
                            "the classes are not distinguishable at this layer")
    keep = s > max(m.shape) * torch.finfo(torch.float64).eps * s.max()
    u, s = u[:, keep], s[keep]
    quad = ((centred @ u) ** 2).mean(dim=0)  # u_kᵀ Σ_w u_k
    trace = n_classes * float((quad / s**2).sum())
    return trace / n_classes


@register_scorer("variability", needs=("calib", "labels"), direction=ScoreDirection.LOWER_ADAPTS,
                 description="hidden-state variability trace(Sigma_w Sigma_b^+)/|Y| of mean-pooled block outputs")
def score_variability(
    model: nn.Module, data: ScoringData, batch_size: int = 8, show_progress: bool = False
) -> LayerScores:
    """Hidden-state variability ``ν_l`` of each block's output (lower = more task-specialised)."""
    assert data.calib is not None
    labels = check_labels(data.labels, len(data.calib))
    pooled: list[list[torch.Tensor]] = []
    for batch, states in iter_block_states(model, data.calib, data.pad_id, batch_size, "variability", show_progress):
        pooled.append([masked_mean(h, batch.attention_mask).cpu() for h in states])
    feats = [torch.cat([p[i] for p in pooled]) for i in range(len(pooled[0]))]  # L+1 × (N, d)
    nus = [variability(f, labels) for f in feats]
    counts = {str(c): labels.count(c) for c in sorted(set(labels))}
    return LayerScores(
        scores=nus[1:],
        method="variability",
        model=fingerprint(model),
        params={
            "batch_size": batch_size,
            "pooling": "mean over non-pad tokens",
            "states": "output of block l (pre final norm)",
            "formula": "trace(Sigma_w pinv(Sigma_b)) / |Y|, Sigma_b over unweighted class means",
        },
        data=data.fingerprints(),
        extras={"nu_embeddings": nus[0], "class_counts": counts},
        higher_is="more within-class variability relative to between-class (less task-specialised); "
                  "layer selection adapts the lowest",
    )
