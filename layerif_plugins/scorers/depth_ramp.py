"""The depth-ramp control: score = layer index (docs/method.md §5).

On SmolLM2-135M a plain linear ramp over depth allocates Wanda sparsity as well as the
best LayerIF variant (deeper layers pruned harder, early ones spared). It needs neither
data nor a forward pass, so it is the free baseline every quality table must include and
beat before a data-driven score can claim value beyond depth.

The direction is ``HIGHER_PRUNES``: the deepest layer gets the most sparsity under the
§2b mapping, the most LoRA experts, and is dropped first; ``layerif prune --epsilon auto``
also tries the inverted ramp.
"""

from __future__ import annotations

from torch import nn

from layerif_plugins.models import fingerprint
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection


@register_scorer("depth_ramp", direction=ScoreDirection.HIGHER_PRUNES,
                 description="score = layer index (the depth control: deeper layers pruned harder)")
def score_depth_ramp(model: nn.Module, data: ScoringData | None = None) -> LayerScores:
    """Layer ``l`` scores ``l``: a linear ramp over depth, needing no data."""
    fp = fingerprint(model)
    return LayerScores(
        scores=[float(i) for i in range(fp.num_layers)],
        method="depth_ramp",
        model=fp,
        params={"score": "layer index (0 = first decoder block)"},
        data=data.fingerprints() if data is not None else {},
        higher_is="deeper layer (more sparsity, more experts, dropped first): the depth control of docs/method.md §5",
    )
