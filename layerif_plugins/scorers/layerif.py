"""The LayerIF scorer: the influence engine's result as a :class:`LayerScores` file."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from layerif_plugins.engine import InfluenceConfig, compute_influence
from layerif_plugins.engine.config import aggregate_positive
from layerif_plugins.models import fingerprint
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection

logger = logging.getLogger(__name__)


@register_scorer("layerif", needs=("train", "val"), direction=ScoreDirection.HIGHER_PRUNES,
                 description="layer-wise DataInf influence of the train set on the validation loss")
def score_layerif(
    model: nn.Module,
    data: ScoringData,
    config: InfluenceConfig | None = None,
    per_example: bool = False,
    **config_kwargs: Any,
) -> LayerScores:
    """LayerIF: ``S^l = Σ_i max(0, −Σ_j IF_l(i, j))`` (higher = less well-trained layer).

    ``config`` (or its fields as keyword arguments) controls the engine; with
    ``per_example=True`` the file keeps ``s_i^l`` for every train example, and with
    ``config.pairwise`` the full ``IF_l(i, j)`` matrices go into ``extras["pairwise"]``.
    """
    config = config or InfluenceConfig(**config_kwargs)
    assert data.train is not None and data.val is not None
    result = compute_influence(model, data.train, data.val, data.pad_id, config)
    per_module = {name: float(aggregate_positive(s[:, None])[0]) for name, s in result.per_module.items()}
    extras: dict[str, Any] = {
        "lambdas": result.lambdas,
        "mean_train_loss": float(result.train_losses.mean()),
        "mean_val_loss": float(result.val_losses.mean()),
        "total_influence": result.per_example.sum(dim=0).tolist(),
        "timings_s": result.timings,
    }
    if result.pairwise is not None:
        extras["pairwise"] = result.pairwise.tolist()
    params = config.to_dict()
    params.pop("show_progress", None)
    params["loss"] = "mean token cross-entropy per example, padding excluded"
    params["aggregation"] = "S^l = sum_i max(0, -sum_j IF_l(i,j))"
    return LayerScores(
        scores=result.layer_scores,
        method="layerif",
        model=fingerprint(model),
        params=params,
        data=data.fingerprints(),
        per_module=per_module,
        per_example=result.per_example.tolist() if per_example else None,
        extras=extras,
    )
