"""The allocation planner: per-layer sparsity chosen on held-out calibration data, saved as a plan file.

Pure (no host library): the options (:class:`AllocationOptions`), the providers (uniform,
ATP, OWL, AlphaPruning, LayerIF, the depth ramp, the measured sensitivity), the exact
knapsack, the paired decision rule, the search loop (:func:`plan_allocation`) and the
artifact (:class:`AllocationPlan`). The llm-compressor glue that prunes and measures each
candidate lives in :mod:`layerif_plugins.integrations.llmcompressor.planning`.
"""

from layerif_plugins.plan.artifact import PLAN_FORMAT_VERSION, AllocationPlan
from layerif_plugins.plan.options import AllocationOptions, check_field
from layerif_plugins.plan.planner import Budget, Candidate, Evaluation, Journal, SearchResult, plan_allocation

__all__ = ["PLAN_FORMAT_VERSION", "AllocationOptions", "AllocationPlan", "Budget", "Candidate", "Evaluation",
           "Journal", "SearchResult", "check_field", "plan_allocation"]
