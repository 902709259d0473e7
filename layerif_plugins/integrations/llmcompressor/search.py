"""Calibration batches and in-place pruning passes: what the planner needs from llm-compressor per candidate.

The allocation planner (:mod:`layerif_plugins.plan`, glue in :mod:`.planning`) judges a
candidate per-layer list by pruning the model with it and measuring the held-out loss.
This module holds the llm-compressor side of one such pass:

* the calibration batches, once, as CPU tensors (:func:`materialize`), and an evenly spaced
  held-out slice of them when no separate held-out examples are given
  (:func:`holdout_positions`, :func:`split_batches`, :func:`batches_to_examples`);
* :func:`prune_in_session` — prune in place with llm-compressor's *stock*
  ``WandaPruningModifier`` / ``SparseGPTModifier`` and that list, through llm-compressor's own
  calibration pipeline in a separate :func:`~llmcompressor.core.session_functions.create_session`
  session, so an enclosing ``oneshot`` session is untouched (the upstream OWL test uses the
  same mechanism);
* :class:`WeightSnapshot` — CPU copies of the pruned modules' weights, to undo a candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


# ----------------------------------------------------------------------------- data

def materialize(dataloader: Any) -> list[Batch]:
    """The calibration batches, once, as dicts of CPU tensors (the order the dataloader gives)."""
    if dataloader is None:
        raise ConfigError("epsilon: auto prunes and evaluates candidates on calibration data, but oneshot got "
                          "none: pass dataset=…")
    return [dict(batch) for batch in dataloader]


def holdout_positions(n_batches: int, holdout: int | float) -> list[int]:
    """Evenly spaced batch positions to hold out (``holdout``: a count ≥ 1 or a fraction in (0, 1)).

    Evenly spaced rather than the last ones: oneshot's length-aware sampler orders the
    batches by length, so the tail would be the shortest examples only.
    """
    k = holdout if isinstance(holdout, int) else max(1, round(holdout * n_batches))
    if not 1 <= k < n_batches:
        raise DataError(f"epsilon: auto holds out {k} of {n_batches} calibration batches; it needs at least one "
                        "for the held-out perplexity and one to prune with: pass more calibration samples or "
                        "change holdout")
    return sorted({min(n_batches - 1, int((i + 0.5) * n_batches / k)) for i in range(k)})


def split_batches(batches: list[Batch], positions: Sequence[int]) -> tuple[list[Batch], list[Batch]]:
    """(batches to prune with, held-out batches): disjoint by position."""
    held = set(positions)
    return [b for i, b in enumerate(batches) if i not in held], [batches[i] for i in positions]


def batches_to_examples(batches: Sequence[Batch], source: str) -> Examples:
    """The unpadded token ids of every row (``attention_mask`` 1), as :class:`Examples`."""
    rows: list[tuple[int, ...]] = []
    for batch in batches:
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(ids)))
        for r in range(ids.shape[0]):
            rows.append(tuple(int(t) for t in ids[r][mask[r].bool()].tolist()))
    return Examples(tuple(rows), source=source)


def loader(batches: list[Batch]) -> DataLoader:
    """A dataloader that yields ``batches`` as they are (no re-batching, no shuffling)."""
    return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- pruning passes

class WeightSnapshot:
    """CPU copies of the given modules' weights, to undo a candidate prune."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.saved = [m.weight.detach().to("cpu", copy=True) for m in self.modules]

    def restore(self) -> None:
        from compressed_tensors.utils import update_offload_parameter

        with torch.no_grad():
            for module, weight in zip(self.modules, self.saved, strict=True):
                update_offload_parameter(module, "weight", weight.to(module.weight.device, module.weight.dtype))


def prune_in_session(model: torch.nn.Module, modifier: Any, batches: list[Batch],
                     sequential_targets: Any = None) -> None:
    """Run ``modifier`` on ``model`` with ``batches`` through llm-compressor's calibration pipeline.

    What ``oneshot`` does between loading and saving (``Oneshot.apply_recipe_modifiers``),
    in a fresh session so an enclosing ``oneshot`` session keeps its state.
    """
    from llmcompressor.args import DatasetArguments
    from llmcompressor.core.session_functions import create_session
    from llmcompressor.pipelines import CalibrationPipeline

    from layerif_plugins.integrations.llmcompressor.release import release_traced_forwards

    data = loader(batches)
    with create_session() as session:
        session.initialize(model=model, start=-1, recipe=[modifier], calib_data=data,
                           sequential_targets=sequential_targets)
        pipeline = CalibrationPipeline.from_modifiers(session.lifecycle.recipe.modifiers)
        try:
            pipeline(model, data, DatasetArguments(sequential_targets=sequential_targets))
            session.finalize()
        finally:
            release_traced_forwards(model)  # one torch.fx record per pass would pile up over a search
