"""The shared influence engine (knows nothing of pruning or PEFT)."""

from layerif_plugins.engine.config import InfluenceConfig, InfluenceResult, aggregate_positive
from layerif_plugins.engine.passes import compute_influence
from layerif_plugins.engine.reference import reference_influence

__all__ = ["InfluenceConfig", "InfluenceResult", "aggregate_positive", "compute_influence", "reference_influence"]
