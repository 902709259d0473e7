"""The uniform baseline: every layer scores the same, so every allocation is uniform."""

from __future__ import annotations

from torch import nn

from layerif_plugins.models import fingerprint
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection


@register_scorer("uniform", direction=ScoreDirection.HIGHER_PRUNES,
                 description="all layers equal (allocations degenerate to uniform)")
def score_uniform(model: nn.Module, data: ScoringData) -> LayerScores:
    """All layers equal (allocations degenerate to uniform)."""
    fp = fingerprint(model)
    return LayerScores(scores=[1.0] * fp.num_layers, method="uniform", model=fp, data=data.fingerprints())
