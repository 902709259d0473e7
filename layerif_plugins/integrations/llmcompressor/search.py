"""``epsilon: auto``: choose the spread (ε, OWL's λ) and the mapping direction by held-out perplexity.

Why: on SmolLM2-135M the §2b mapping of LayerIF scores lost to uniform at every sparsity
while the *inverted* mapping won, and the best ε differs by task and sparsity
(docs/METHOD.md §5). A search over the candidates that always includes ε = 0 (uniform)
and lets uniform win every tie can only match or beat uniform on its held-out data.

How it runs inside ``oneshot``: a modifier's ``on_initialize`` holds the model
(``state.model``) and the calibration dataloader (``state.data.calib``) before any
weight changes. For each candidate (ε, as scored / inverted) the search

1. computes the per-layer list (candidates whose list equals an earlier one are not rerun);
2. prunes the model in place with llm-compressor's *stock* ``WandaPruningModifier`` /
   ``SparseGPTModifier`` and that list, through llm-compressor's own calibration pipeline
   in a separate :func:`~llmcompressor.core.session_functions.create_session` session, so
   the outer ``oneshot`` session is untouched (the upstream OWL test uses the same
   mechanism);
3. measures the token perplexity on the held-out calibration examples;
4. restores the original weights (kept on the CPU).

The candidate with the lowest perplexity wins; a later candidate must be *strictly*
better to replace an earlier one, and ε = 0 comes first, so ties go to uniform (then to
the smaller ε, then to the scores as given). The outer ``oneshot`` then prunes once more
with the winner. Cost: one pruning pass per distinct candidate (9 for the default grid,
11 for OWL's, whose reference λ = 0.08 is added) plus the final one, and two copies of the
prunable weights in CPU memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from layerif_plugins.data import Examples
from layerif_plugins.errors import AllocationError, ConfigError, DataError

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
#: (ε, invert) → per-layer sparsities; raises AllocationError for an infeasible candidate
Allocator = Callable[[float, bool], list[float]]


@dataclass
class Candidate:
    """One point of the sweep and what it measured on the held-out slice."""

    epsilon: float
    invert: bool
    layer_sparsity: list[float] | None = None
    loss: float | None = None
    perplexity: float | None = None
    seconds: float = 0.0
    same_as: int | None = None  # index of the earlier candidate with the same per-layer list
    error: str | None = None  # why it could not run (e.g. OWL λ pushing a layer above the cap)

    @property
    def ok(self) -> bool:
        return self.error is None and self.perplexity is not None and math.isfinite(self.perplexity)


def candidates(grid: Sequence[float]) -> list[tuple[float, bool]]:
    """``(0, as scored)`` first, then every ε > 0 of ``grid`` ascending, as scored before inverted."""
    return [(0.0, False)] + [(e, inv) for e in sorted(set(grid)) if e > 0 for inv in (False, True)]


def choose(sweep: Sequence[Candidate]) -> int:
    """Index of the winner: the lowest perplexity; a later candidate must be strictly lower.

    The sweep starts with ε = 0 (uniform), so uniform wins every tie and the choice is
    never worse than uniform on the held-out data. Candidates that failed never win.
    """
    ok = [i for i, c in enumerate(sweep) if c.ok]
    if not ok:
        raise AllocationError("no candidate of the epsilon search could be evaluated: "
                              + "; ".join(f"eps={c.epsilon} invert={c.invert}: {c.error}" for c in sweep))
    best = ok[0]
    for i in ok[1:]:
        if sweep[i].perplexity < sweep[best].perplexity:  # type: ignore[operator]
            best = i
    return best


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


def heldout_loss(model: torch.nn.Module, examples: Examples) -> float:
    """Token-weighted mean next-token loss of ``model`` on ``examples`` (padding excluded)."""
    from layerif_plugins.evaluation.perplexity import mean_token_loss

    return mean_token_loss(model, examples, pad_id=0)[0]


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

    data = loader(batches)
    with create_session() as session:
        session.initialize(model=model, start=-1, recipe=[modifier], calib_data=data,
                           sequential_targets=sequential_targets)
        pipeline = CalibrationPipeline.from_modifiers(session.lifecycle.recipe.modifiers)
        pipeline(model, data, DatasetArguments(sequential_targets=sequential_targets))
        session.finalize()


def run_search(
    model: torch.nn.Module,
    modules: Sequence[torch.nn.Module],
    allocate: Allocator,
    make_modifier: Callable[[list[float]], Any],
    prune_batches: list[Batch],
    holdout: Examples,
    grid: Sequence[float],
    sequential_targets: Any = None,
) -> dict[str, Any]:
    """Prune, evaluate and undo every candidate; return the sweep and the winner (see the module docstring).

    ``modules`` are the weights the pruning changes (restored after each candidate);
    ``make_modifier(list)`` builds the stock modifier for one per-layer list.
    """
    t0 = time.perf_counter()
    snapshot = WeightSnapshot(modules)
    dense_loss = heldout_loss(model, holdout)
    sweep: list[Candidate] = []
    try:
        for eps, inv in candidates(grid):
            cand = Candidate(eps, inv)
            sweep.append(cand)
            try:
                cand.layer_sparsity = allocate(eps, inv)
            except AllocationError as exc:
                cand.error = str(exc)
                logger.info("epsilon search: eps=%s invert=%s infeasible (%s)", eps, inv, exc)
                continue
            twin = next((i for i, c in enumerate(sweep[:-1]) if c.ok and c.layer_sparsity is not None
                         and max(abs(a - b) for a, b in zip(c.layer_sparsity, cand.layer_sparsity, strict=True))
                         < 1e-12), None)
            if twin is not None:
                cand.same_as, cand.loss, cand.perplexity = twin, sweep[twin].loss, sweep[twin].perplexity
                continue
            t = time.perf_counter()
            prune_in_session(model, make_modifier(cand.layer_sparsity), prune_batches, sequential_targets)
            cand.loss = heldout_loss(model, holdout)
            cand.perplexity = math.exp(cand.loss)
            cand.seconds = time.perf_counter() - t
            snapshot.restore()
            logger.info("epsilon search: eps=%s invert=%s held-out perplexity %.4f (%.1f s)", eps, inv,
                        cand.perplexity, cand.seconds)
    finally:
        snapshot.restore()
    best = choose(sweep)
    win, uniform = sweep[best], sweep[0]
    logger.info("epsilon search chose eps=%s invert=%s: held-out perplexity %.4f vs uniform %.4f (%d pruning "
                "passes, %.1f s)", win.epsilon, win.invert, win.perplexity, uniform.perplexity,
                sum(c.perplexity is not None and c.same_as is None for c in sweep), time.perf_counter() - t0)
    return {
        "chosen": {"epsilon": win.epsilon, "invert": win.invert, "index": best},
        "uniform_perplexity": uniform.perplexity,
        "chosen_perplexity": win.perplexity,
        "gain_vs_uniform": (uniform.perplexity or 0.0) - (win.perplexity or 0.0),
        "dense_perplexity": math.exp(dense_loss),
        "grid": sorted(set(grid)),
        "pruning_passes": sum(c.perplexity is not None and c.same_as is None for c in sweep),
        "tie_rule": "lowest held-out perplexity; a later candidate must be strictly lower; eps=0 (uniform) first",
        "sweep": [asdict(c) for c in sweep],
        "seconds": time.perf_counter() - t0,
    }
