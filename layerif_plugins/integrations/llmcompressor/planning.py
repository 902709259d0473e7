"""The allocation planner on llm-compressor: candidates pruned by the stock modifiers, judged on held-out data.

Host glue for :func:`layerif_plugins.plan.planner.plan_allocation` (the pure search):

* :func:`make_evaluator` — a candidate per-layer list is pruned in place by llm-compressor's
  *stock* ``WandaPruningModifier`` / ``SparseGPTModifier`` through its own calibration
  pipeline (:func:`.search.prune_in_session`, a separate session), the per-example
  held-out loss is measured, and the weights are restored;
* :func:`measure_sensitivity` — the per-layer table of ``allocation: sensitivity``: one
  dense forward pass collects llm-compressor's own calibration statistics per module
  (Wanda's row scalars, SparseGPT's Hessians, with its ``accumulate_*`` functions); then,
  for every layer and level, only that layer is pruned with llm-compressor's own
  ``sparsify_weight`` and the held-out loss is measured. With every other layer dense, the
  layer's inputs are the dense model's, so these are exactly the masks (and SparseGPT
  updates) the stock modifier would make for that layer alone. ``around="uniform"`` measures
  the table at the operating point instead: the model pruned uniformly at the target layer by
  layer (:func:`sequential_prune`, what the stock modifier's sequential pipeline does), and
  each entry moves one layer from the target to another level;
* :func:`make_plan` — options → providers → search → :class:`~layerif_plugins.plan.AllocationPlan`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from layerif_plugins.allocate.sparsity import AUTO, REFERENCE_EPSILON, search_grid, sparsity_from_scores
from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError
from layerif_plugins.evaluation.perplexity import example_token_losses
from layerif_plugins.evaluation.resume import LayerResume, resumable
from layerif_plugins.integrations.llmcompressor.search import (
    Batch,
    WeightSnapshot,
    batches_to_examples,
    prune_in_session,
)
from layerif_plugins.models import fingerprint, num_layers
from layerif_plugins.plan import knapsack
from layerif_plugins.plan.artifact import AllocationPlan
from layerif_plugins.plan.decide import token_mean
from layerif_plugins.plan.options import SENSITIVITY_AROUND, AllocationOptions
from layerif_plugins.plan.planner import Budget, Evaluation, Journal, SearchResult, TableJournal, plan_allocation
from layerif_plugins.plan.providers import (
    ATP,
    OWL,
    OWL_LAMBDAS,
    SPREADS,
    Provider,
    Sensitivity,
    SensitivityTable,
    Spread,
    Uniform,
)
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)

Module = tuple[int, str, torch.nn.Module]
ModifierFactory = Callable[[list[float]], Any]


def _held_out_losses(model: torch.nn.Module, held: Examples) -> tuple[list[float], list[int]]:
    return example_token_losses(model, held, pad_id=0)


def calibration_order(batches: list[Batch], order: int) -> list[Batch]:
    """The calibration batches in their ``order``-th order: the first ``order`` moved to the end.

    The same data, so the same statistics in exact arithmetic; only the floating-point order in which
    llm-compressor accumulates them (SparseGPT's Hessians, Wanda's row norms) differs — what the
    ``judge_orders`` rechecks vary.
    """
    if not 0 <= order < max(len(batches), 1):
        raise ConfigError(f"calibration order {order} needs more than {order} calibration batches, got "
                          f"{len(batches)}: lower judge_orders or pass more calibration data")
    return batches[order:] + batches[:order]


def make_evaluator(model: torch.nn.Module, modules: Sequence[Module], make_modifier: ModifierFactory,
                   prune_batches: list[Batch], held: Examples, sequential_targets: Any = None
                   ) -> Callable[..., Evaluation]:
    """``evaluate(layer_sparsity, order=0)``: prune with the stock modifier (calibration batches in their
    ``order``-th order, :func:`calibration_order`), measure per-example held-out loss, undo."""
    snapshot = WeightSnapshot([m for _, _, m in modules])

    def evaluate(layer_sparsity: list[float], order: int = 0) -> Evaluation:
        batches = calibration_order(prune_batches, order)
        t = time.perf_counter()
        try:
            prune_in_session(model, make_modifier(layer_sparsity), batches, sequential_targets)
            sums, counts = _held_out_losses(model, held)
        finally:
            snapshot.restore()
        return Evaluation(sums, counts, time.perf_counter() - t)

    return evaluate


# ----------------------------------------------------------------------------- sensitivity

@torch.no_grad()
def calibration_statistics(model: torch.nn.Module, modules: Sequence[Module], batches: Sequence[Batch],
                           algorithm: str) -> dict[torch.nn.Module, torch.Tensor]:
    """llm-compressor's own per-module calibration statistics of the dense model (Wanda row scalars / Hessians)."""
    if algorithm == "wanda":
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import accumulate_row_scalars as accumulate
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import make_empty_row_scalars as empty
    else:
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import accumulate_hessian as accumulate
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import make_empty_hessian as empty
    stats: dict[torch.nn.Module, torch.Tensor] = {}
    seen: dict[torch.nn.Module, int] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        if module not in stats:
            stats[module], seen[module] = empty(module), 0
        stats[module], seen[module] = accumulate(args[0], module, stats[module], seen[module])

    handles = [m.register_forward_hook(hook) for _, _, m in modules]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            model(**{k: torch.as_tensor(v).to(device) for k, v in batch.items()
                     if k in ("input_ids", "attention_mask")}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def sequential_prune(model: torch.nn.Module, modules: Sequence[Module], batches: Sequence[Batch], algorithm: str,
                     levels: Sequence[float], fields: dict[str, Any]) -> dict[torch.nn.Module, torch.Tensor]:
    """Prune layer by layer at ``levels[layer]``, each from the statistics of its inputs through the layers already
    pruned before it, in place; returns those statistics.

    What llm-compressor's sequential pipeline does (calibrate a layer, compress it, propagate its pruned
    outputs to the next), with its own ``accumulate_*`` and ``sparsify_weight`` (equal to a stock
    ``oneshot`` of the same list: tested). One forward over the calibration batches per layer.
    """
    from compressed_tensors.utils import update_offload_parameter

    by_layer: dict[int, list[Module]] = {}
    for entry in modules:
        by_layer.setdefault(entry[0], []).append(entry)
    stats: dict[torch.nn.Module, torch.Tensor] = {}
    for layer in range(len(levels)):
        mods = by_layer.get(layer, [])
        if not mods:
            continue
        got = calibration_statistics(model, mods, batches, algorithm)
        with torch.no_grad():
            for _, _, m in mods:
                update_offload_parameter(m, "weight", _sparsify(algorithm, m, got[m], levels[layer], fields))
        stats.update(got)
    return stats


def _sparsify(algorithm: str, module: torch.nn.Module, stat: torch.Tensor, level: float,
              fields: dict[str, Any]) -> torch.Tensor:
    """llm-compressor's own ``sparsify_weight`` for one module at one level (unstructured)."""
    if algorithm == "wanda":
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight

        return sparsify_weight(module=module, row_scalars_dict={module: stat}, sparsity=level, prune_n=0, prune_m=0)
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight

    _, weight = sparsify_weight(module=module, hessians_dict={module: stat.clone()}, sparsity=level, prune_n=0,
                                prune_m=0, block_size=fields.get("block_size", 128),
                                dampening_frac=fields.get("dampening_frac", 0.01),
                                preserve_sparsity_mask=fields.get("preserve_sparsity_mask", False))
    return weight


#: most bytes the cached per-layer inputs of the table's examples may take (else: full forwards)
RESUME_CACHE_BYTES = 2 * 2**30


def _layer_resume(model: torch.nn.Module, held: Examples) -> LayerResume | None:
    """A :class:`LayerResume` for the table (layers before the pruned one are dense), when exact and affordable."""
    if not resumable(model):
        return None
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    longest = max((len(x) for x in held.input_ids), default=0)
    cache = num_layers(model) * len(held) * longest * hidden * 4
    if not hidden or cache > RESUME_CACHE_BYTES:
        logger.info("sensitivity table: full forwards (layer inputs would take %.1f GiB)", cache / 2**30)
        return None
    return LayerResume(model, held, pad_id=0)


def measure_sensitivity(model: torch.nn.Module, modules: Sequence[Module], params: Sequence[int], target: float,
                        algorithm: str, fields: dict[str, Any], batches: Sequence[Batch], held: Examples,
                        step: float, half_width: int, show_progress: bool = False, around: str = "dense",
                        journal: TableJournal | None = None) -> SensitivityTable:
    """The held-out loss increase of moving each layer alone to each level of a grid centred on ``target``.

    ``around="dense"``: every other layer dense, the increase over the dense model. ``"uniform"``: every
    other layer pruned at ``target`` (:func:`sequential_prune`), the increase over that uniform model — a
    local model of the loss at the operating point, where the layers' costs interact (at 70 % the dense
    table's additive prediction did not carry over: docs/quality.md §0). The model is left as it came.
    With a ``journal`` each finished layer's row is saved, and rows measured against the same base loss
    are read back instead of pruned again: an interrupted table resumes at the next layer.
    """
    from compressed_tensors.utils import update_offload_parameter

    if around not in SENSITIVITY_AROUND:
        raise ConfigError(f"sensitivity_around must be one of {list(SENSITIVITY_AROUND)}, got {around!r}")
    t0 = time.perf_counter()
    grid = knapsack.level_grid(target, step, half_width)
    allowed = set(knapsack.feasible_levels(grid))
    by_layer: dict[int, list[torch.nn.Module]] = {}
    for layer, _, m in modules:
        by_layer.setdefault(layer, []).append(m)
    dense = {layer: WeightSnapshot(mods) for layer, mods in by_layer.items()} if around == "uniform" else {}
    resume = None
    costs: list[list[float | None]] = []
    prunes = resumed = 0
    resumed_seconds = 0.0
    per_layer = len(allowed) - (1 if around == "uniform" and half_width in allowed else 0)  # the point itself: 0
    bar = tqdm(total=len(params) * per_layer, desc="planning: sensitivity", unit="layer-prune",
               disable=not show_progress)
    try:
        if around == "uniform":
            stats = sequential_prune(model, modules, batches, algorithm, [target] * len(params), fields)
        else:
            stats = calibration_statistics(model, modules, batches, algorithm)
        resume = _layer_resume(model, held)
        base = token_mean(*(resume.capture() if resume is not None else _held_out_losses(model, held)))
        for layer in range(len(params)):
            done = journal.get(layer, base) if journal is not None else None
            if done is not None:
                costs.append(done)
                resumed += 1
                resumed_seconds += journal.seconds(layer) if journal is not None else 0.0
                bar.update(per_layer)
                continue
            mods = by_layer.get(layer, [])
            started = time.perf_counter()
            current = WeightSnapshot(mods)  # dense, or at the target
            row: list[float | None] = []
            for k, level in enumerate(grid):
                if k not in allowed:
                    row.append(None)
                    continue
                if around == "uniform" and k == half_width:
                    row.append(0.0)  # the operating point itself
                    continue
                try:
                    if layer in dense:
                        dense[layer].restore()  # sparsify_weight prunes the dense weights
                    with torch.no_grad():
                        for m in mods:
                            update_offload_parameter(m, "weight", _sparsify(algorithm, m, stats[m], level, fields))
                    losses = resume.losses(layer) if resume is not None else _held_out_losses(model, held)
                    row.append(token_mean(*losses) - base)
                finally:
                    current.restore()
                prunes += 1
                bar.update(1)
            costs.append(row)
            if journal is not None:
                journal.add(layer, base, row, seconds=time.perf_counter() - started)
    finally:
        bar.close()
        if resume is not None:
            resume.clear()
        for snapshot in dense.values():
            snapshot.restore()
    return SensitivityTable(grid=grid, costs=costs, center=half_width, base_loss=base,
                            seconds=time.perf_counter() - t0, layer_prunes=prunes, resumed_layers=resumed,
                            resumed_layer_prunes=resumed * per_layer, resumed_seconds=resumed_seconds)


# ----------------------------------------------------------------------------- providers

def owl_scores_factory(model: torch.nn.Module, batches: Sequence[Batch]) -> Callable[[float], LayerScores]:
    """OWL outlier ratios for any M from one pass of activation norms (cached per M)."""
    from layerif_plugins.models import block_linears
    from layerif_plugins.scorers.owl import input_feature_sq_norms, outlier_ratios
    from layerif_plugins.scores import ScoreDirection

    linears = block_linears(model, "all")
    cache: dict[float, LayerScores] = {}
    norms: dict[str, torch.Tensor] = {}

    def scores_for(m: float) -> LayerScores:
        if m not in cache:
            if not norms:
                norms.update(input_feature_sq_norms(model, linears, ({k: torch.as_tensor(v) for k, v in b.items()}
                                                                     for b in batches)))
            ratios, per_module = outlier_ratios(linears, norms, m)
            cache[m] = LayerScores(scores=ratios, method="owl", model=fingerprint(model), params={"m": m},
                                   per_module=per_module, direction=ScoreDirection.HIGHER_PROTECTS)
        return cache[m]

    return scores_for


def build_providers(options: AllocationOptions, *, num_layers: int, params: list[int], target: float,
                    scores: LayerScores | None, score_for: Callable[[str], LayerScores],
                    owl_for: Callable[[float], LayerScores], table_for: Callable[[], SensitivityTable]
                    ) -> tuple[list[Provider], str]:
    """The providers of one request and the decision rule (``lowest`` or ``auto``)."""
    p = [float(x) for x in params]
    alloc = options.allocation
    uniform = Uniform(num_layers, target)
    if alloc == "uniform":
        return [uniform], "lowest"
    if alloc == "atp":
        return ([uniform, ATP(p, target)] if options.beta is None else [ATP(p, target, beta=options.beta)]), "lowest"
    if alloc in REFERENCE_EPSILON:  # score-mapped: fixed spread, or epsilon auto's sweep (ε grid × direction)
        source = scores if scores is not None else (owl_for(5.0) if alloc == "owl" else score_for(alloc))
        if options.epsilon != AUTO:
            return [Spread(alloc, source, p, target, (options.spread,), (options.invert,))], "lowest"
        grid = tuple(e for e in search_grid(alloc, options.epsilon_grid) if e > 0)
        return [uniform, Spread(alloc, source, p, target, grid, (False, True))], "lowest"
    sens = Sensitivity(table_for, p, target, step=options.sensitivity_step, max_moves=options.max_moves)
    if alloc == "sensitivity":
        return [uniform, sens], "lowest"
    # auto: every baseline at its best (its own knob searched), then sensitivity, the simplest kept
    providers: list[Provider] = [uniform, ATP(p, target), OWL(owl_for, p, target, lambdas=OWL_LAMBDAS),
                                 Spread("alpha_hill", score_for("alpha_hill"), p, target, SPREADS, (False,))]
    if scores is not None and scores.method == "layerif":
        providers.append(Spread("layerif", scores, p, target, SPREADS, (False, True)))
    providers.append(sens)
    return providers, "auto"


def fixed_plan_sparsity(options: AllocationOptions, num_layers: int, params: list[int], target: float,
                        scores: LayerScores | None) -> list[float] | None:
    """The per-layer list of a request that needs no search (uniform, a fixed spread, a fixed β), else None."""
    from layerif_plugins.plan.providers import atp_sparsity

    if options.searched:
        return None
    if options.allocation == "uniform":
        return [target] * num_layers
    if options.allocation == "atp":
        return atp_sparsity([float(x) for x in params], target, float(options.beta))  # type: ignore[arg-type]
    assert scores is not None
    return sparsity_from_scores(scores.scores, scores.direction, params, target, epsilon=options.spread,
                                invert=options.invert)


def plan_from_search(result: SearchResult, *, options: AllocationOptions, model: torch.nn.Module, algorithm: str,
                     target: float, params: list[int], scores: LayerScores | None, data: dict[str, Any],
                     extras: dict[str, Any]) -> AllocationPlan:
    win = result.winner
    return AllocationPlan(
        layer_sparsity=list(win.layer_sparsity or []), target=target, algorithm=algorithm,
        allocation=options.allocation,
        chosen={"provider": win.provider, "knobs": win.knobs, "index": result.chosen,
                "perplexity": win.perplexity, "vs_uniform": win.vs_uniform},
        model=fingerprint(model), params_per_layer=list(params),
        candidates=[c.to_dict() for c in result.candidates], decision=result.decision, cost=result.cost,
        scores=_scores_info(scores), data=data, options=options.to_dict(), extras=extras)


def _scores_info(scores: LayerScores | None) -> dict[str, Any]:
    if scores is None:
        return {}
    return {"path": scores._source or None, "method": scores.method, "direction": scores.direction.value,
            "scores": scores.scores}


def table_examples_for(options: AllocationOptions, table_held: Examples | None,
                       prune_batches: Sequence[Batch]) -> Examples:
    """The sensitivity table's examples: the first ``sensitivity_examples`` of ``table_held``, else of calibration."""
    source = table_held if table_held is not None else batches_to_examples(
        prune_batches, "calibration examples (no separate table examples given)")
    if len(source) == 0:
        raise ConfigError("the sensitivity table needs at least one example: pass table examples or calibration data")
    return source.subset(range(min(options.sensitivity_examples, len(source))))


def make_plan(
    model: torch.nn.Module,
    *,
    options: AllocationOptions,
    algorithm: str,
    target: float,
    modules: Sequence[Module],
    params: list[int],
    scores: LayerScores | None,
    make_modifier: ModifierFactory,
    fields: dict[str, Any],
    prune_batches: list[Batch] | None,
    held: Examples | None,
    table_held: Examples | None = None,
    data: dict[str, Any] | None = None,
    sequential_targets: Any = None,
    journal_path: Any = None,
    show_progress: bool = False,
) -> AllocationPlan:
    """Options → providers → search on held-out data (or the fixed list) → :class:`AllocationPlan`.

    The sensitivity table is measured on ``table_held`` (its first ``sensitivity_examples``), or,
    without it, on the first calibration examples — never on ``held``, the examples that judge
    the candidates: a table fitted to the judge's own examples would favour its candidates.
    """
    from layerif_plugins.scorers import resolve_scores

    num_layers = len(params)
    data = dict(data or {})
    fixed = fixed_plan_sparsity(options, num_layers, params, target, scores)
    if fixed is not None:
        return AllocationPlan(layer_sparsity=fixed, target=target, algorithm=algorithm, allocation=options.allocation,
                              chosen={"provider": options.allocation, "knobs": {
                                  "epsilon": options.spread if options.allocation in REFERENCE_EPSILON else None,
                                  "invert": options.invert, "beta": options.beta}, "index": 0},
                              model=fingerprint(model), params_per_layer=list(params),
                              decision={"rule": "fixed (no search)", "why": []},
                              cost={"seconds": 0.0, "prunes": 0}, scores=_scores_info(scores), data=data,
                              options=options.to_dict())
    if prune_batches is None or held is None:
        raise ConfigError(f"allocation {options.allocation!r}{' with epsilon auto' if options.epsilon == AUTO else ''} "
                          "judges candidates on held-out calibration data, but none was given: pass calibration "
                          "data (dataset=… / --calib)")
    if options.judge_orders > len(prune_batches):
        raise ConfigError(f"judge_orders={options.judge_orders} needs at least as many calibration batches to prune "
                          f"with, got {len(prune_batches)}: lower judge_orders or pass more calibration data")
    left = len(held) - options.confirm_examples
    if options.confirm_examples and left < 2:
        raise ConfigError(f"confirm_examples={options.confirm_examples} leaves {max(left, 0)} of the {len(held)} "
                          "held-out examples to judge the search (at least 2): hold out more (n_holdout / holdout) "
                          "or lower confirm_examples")
    context = (f"{fingerprint(model).config_hash}|{algorithm}|{target}|{held.fingerprint()}|{len(prune_batches)}"
               f"|{fields}")
    t0 = time.perf_counter()
    extras: dict[str, Any] = {}

    def table_for() -> SensitivityTable:
        table_examples = table_examples_for(options, table_held, prune_batches)
        rows = TableJournal(journal_path, f"{context}|{table_examples.fingerprint()}|{options.sensitivity_step}"
                                          f"|{options.sensitivity_levels}|{options.sensitivity_around}")
        table = measure_sensitivity(model, modules, params, target, algorithm, fields, prune_batches, table_examples,
                                    options.sensitivity_step, options.sensitivity_levels, show_progress,
                                    around=options.sensitivity_around, journal=rows)
        extras["sensitivity"] = {**table.to_dict(), "examples": table_examples.fingerprint(),
                                 "around": options.sensitivity_around}
        return table

    def score_for(method: str) -> LayerScores:
        return resolve_scores(model, method)

    providers, decision = build_providers(options, num_layers=num_layers, params=params, target=target,
                                          scores=scores, score_for=score_for,
                                          owl_for=owl_scores_factory(model, prune_batches), table_for=table_for)
    evaluate = make_evaluator(model, modules, make_modifier, prune_batches, held, sequential_targets)
    journal = Journal(journal_path, context)
    result = plan_allocation(providers, evaluate, budget=Budget(options.budget_prunes, options.budget_seconds),
                             decision=decision, sigmas=options.sigmas, journal=journal, show_progress=show_progress,
                             confirm_examples=options.confirm_examples, orders=options.judge_orders,
                             evaluate_at=evaluate)
    data.setdefault("holdout", held.fingerprint())
    data.setdefault("pruning_batches", len(prune_batches))
    plan = plan_from_search(result, options=options, model=model, algorithm=algorithm, target=target, params=params,
                            scores=scores, data=data, extras=extras)
    plan.cost["seconds"] = time.perf_counter() - t0
    plan.cost["layer_prunes"] = extras.get("sensitivity", {}).get("layer_prunes", 0)
    plan.cost["resumed_layers"] = extras.get("sensitivity", {}).get("resumed_layers", 0)
    plan.cost["resumed_layer_prunes"] = extras.get("sensitivity", {}).get("resumed_layer_prunes", 0)
    plan.cost["resumed_seconds"] = (result.cost.get("resumed_seconds", 0.0)
                                    + extras.get("sensitivity", {}).get("resumed_seconds", 0.0))
    win = result.winner
    logger.info("plan (%s): chose %s %s, held-out perplexity %.4f (%d pruning passes, %.0f s)", options.allocation,
                win.provider, {k: v for k, v in win.knobs.items() if k != "levels"}, win.perplexity,
                result.cost["prunes"], plan.cost["seconds"])
    return plan


def summary_rows(plan: AllocationPlan) -> list[list[Any]]:
    """One row per candidate: provider, knobs, status, held-out perplexity (a finalist rechecked at other
    calibration orders: one per order, ``judge_orders``), paired Δ vs uniform ± SE."""
    from layerif_plugins.plan.providers import spread_knobs

    rows = []
    for i, c in enumerate(plan.candidates):
        ppl = c.get("perplexity")
        vs = c.get("vs_uniform") or {}
        mark = " ←" if i == plan.chosen.get("index") else ""
        shown = f"{ppl:.4f}" if ppl is not None and math.isfinite(ppl) else (c.get("error") or "–")
        if c.get("order_losses"):
            shown = " / ".join(f"{math.exp(x):.4f}" for x in c["order_losses"]) + " (per calibration order)"
        rows.append([c["provider"] + mark, spread_knobs(c.get("knobs") or {}), c.get("status"), shown,
                     f"{vs['mean']:+.4f} ± {vs['se']:.4f}" if vs else "–"])
    return rows


__all__ = ["build_providers", "calibration_order", "calibration_statistics", "fixed_plan_sparsity", "make_evaluator",
           "make_plan", "measure_sensitivity", "owl_scores_factory", "sequential_prune", "summary_rows",
           "table_examples_for"]
