"""``plan_allocation``: try candidate allocations within a budget, judge them on held-out data, keep one.

The pure core of the allocation planner (docs/pruning.md, "Planning"). It knows nothing
of llm-compressor: the host passes ``evaluate(layer_sparsity) → Evaluation`` (prune a
copy of the model with that list, measure the per-example held-out loss, undo the prune)
and the providers (:mod:`.providers`). What it does:

1. asks every provider for its next stage of candidates, round after round, until none
   proposes more (OWL's second stage and the sensitivity moves come after everyone's
   first stage, so local search starts from the best heuristic);
2. evaluates each new per-layer list once (an equal list reuses the earlier result; a
   journal file makes an interrupted search resume from its last finished candidate);
3. stops proposing when the budget (pruning passes, seconds) is spent;
4. decides: ``lowest`` — the lowest held-out loss, ties to the earlier candidate
   (uniform comes first, so it keeps every tie); ``auto`` — :func:`~.decide.choose_simplest`
   on uniform, the best ATP, the best one-knob heuristic (OWL, AlphaPruning, LayerIF) and the
   best sensitivity list, each tier challenging the one kept so far (two paired standard
   errors by default).

**Confirmation slice** (``confirm_examples``): the evaluator measures every held-out example; the
last ``confirm_examples`` of them are kept out of everything the search sees (each candidate's
loss, the providers' choices, the sensitivity moves) and judge only ``auto``'s final rule. Why: the
finalists are each the best of several candidates on the search's examples, so their margin there
is biased upwards (measured on SmolLM2 Wanda 60 %: 21 % held-out gain over ATP, 3.6 % on test).

**Calibration orders** (``orders``): ``auto``'s finalists are pruned again at ``orders - 1`` other
orders of the calibration batches (``evaluate_at(list, order)``; the same data, so only the floating-point
order of the accumulated statistics differs) and judged on their per-example losses averaged over the
orders. Why: SparseGPT at 70 % is numerically chaotic — the same list, one rounding apart, moved the
test perplexity of SmolLM2 by up to 27 % (docs/quality.md §0) — so a finalist that wins at one order
only is luck the delivered model may not have. The search itself (which candidates, which knobs) stays
at order 0; the rechecks are reserved from ``budget.prunes`` ((orders − 1) per provider).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from layerif_plugins.errors import AllocationError, ConfigError
from layerif_plugins.plan.decide import choose_simplest, example_losses, paired, token_mean
from layerif_plugins.plan.providers import ATP, Proposal, Provider, Sensitivity, Tried, Uniform, _key

logger = logging.getLogger(__name__)

Decision = Literal["lowest", "auto"]


@dataclass(frozen=True)
class Evaluation:
    """Per-example held-out loss sums and token counts of one pruned candidate, and what it cost."""

    sums: list[float]
    counts: list[int]
    seconds: float = 0.0

    def split(self, confirm: int) -> tuple[Evaluation, Evaluation | None]:
        """``(search part, confirmation part)``: the last ``confirm`` examples apart (None when 0)."""
        if confirm == 0:
            return self, None
        cut = len(self.sums) - confirm
        if cut < 2:
            raise AllocationError(f"confirm_examples={confirm} leaves {max(cut, 0)} of the {len(self.sums)} held-out "
                                  "examples to the search (at least 2 are needed): hold out more examples "
                                  "(n_holdout) or lower confirm_examples")
        return (Evaluation(self.sums[:cut], self.counts[:cut], self.seconds),
                Evaluation(self.sums[cut:], self.counts[cut:], 0.0))


Evaluator = Callable[[list[float]], Evaluation]
#: ``evaluate_at(layer_sparsity, order)``: the same pruning pass at another calibration order (0 = ``evaluate``)
OrderedEvaluator = Callable[[list[float], int], Evaluation]


@dataclass(frozen=True)
class Budget:
    """The most a search may spend: pruning passes (``prunes``) and wall seconds (``seconds``); None = no limit."""

    prunes: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.prunes is not None and (isinstance(self.prunes, bool) or not isinstance(self.prunes, int)
                                        or self.prunes < 1):
            raise ConfigError(f"budget prunes must be an integer >= 1, got {self.prunes!r}")
        if self.seconds is not None and (isinstance(self.seconds, bool) or not isinstance(self.seconds, int | float)
                                         or not math.isfinite(self.seconds) or self.seconds <= 0):
            raise ConfigError(f"budget seconds must be a finite number > 0, got {self.seconds!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"prunes": self.prunes, "seconds": self.seconds}


@dataclass
class Candidate:
    """One candidate of the plan and what it measured (the JSON rows of ``AllocationPlan.candidates``)."""

    provider: str
    knobs: dict[str, Any]
    layer_sparsity: list[float] | None
    status: str = "pending"  # evaluated | resumed | duplicate | infeasible | skipped (budget)
    loss: float | None = None  # token-weighted mean held-out loss (nats/token)
    perplexity: float | None = None
    example_losses: list[float] | None = None
    vs_uniform: dict[str, float] | None = None  # paired mean difference and its standard error
    confirm_loss: float | None = None  # on the confirmation slice (``confirm_examples``), when there is one
    confirm_example_losses: list[float] | None = None
    order_losses: list[float] | None = None  # finalists with ``orders`` > 1: the search-part loss at each order
    order_example_losses: list[list[float]] | None = None  # … and the per-example losses at each order
    order_confirm_example_losses: list[list[float]] | None = None
    seconds: float = 0.0
    same_as: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.loss is not None and math.isfinite(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Journal:
    """Evaluated candidates on disk (JSON lines), so a search resumes after an interruption.

    Keyed by the per-layer list, the calibration order (0 unless ``orders`` > 1; rows written
    before orders existed are order 0) and a context string (model, algorithm, target, held-out
    and calibration fingerprints): a journal of another search is never reused.
    """

    def __init__(self, path: str | Path | None, context: str):
        self.path = Path(path) if path is not None else None
        self.context = context
        self.rows: dict[tuple[int, tuple[int, ...]], Evaluation] = {}
        for row in _read_rows(self.path, context):
            key = (int(row.get("order", 0)), _key(row["layer_sparsity"]))
            self.rows[key] = Evaluation(row["sums"], row["counts"], row["seconds"])

    def get(self, layer_sparsity: Sequence[float], order: int = 0) -> Evaluation | None:
        return self.rows.get((order, _key(layer_sparsity)))

    def add(self, layer_sparsity: Sequence[float], ev: Evaluation, order: int = 0) -> None:
        self.rows[(order, _key(layer_sparsity))] = ev
        _append_row(self.path, {"context": self.context, "layer_sparsity": list(layer_sparsity), "sums": ev.sums,
                                "counts": ev.counts, "seconds": ev.seconds, **({"order": order} if order else {})})


class TableJournal:
    """Finished rows of a sensitivity table on disk, so an interrupted table resumes at the next layer.

    The table is the costly part of ``allocation: sensitivity`` (one prune per layer and level:
    210 on SmolLM2-135M, most of a search's time). It shares the search's journal file; its rows
    carry their own context (model, algorithm, target, table examples, grid, ``sensitivity_around``)
    and the base loss they were measured against: a row is reused only when both match, so a
    journal of another table, or of other weights under the same config, is never read back.
    """

    def __init__(self, path: str | Path | None, context: str):
        self.path = Path(path) if path is not None else None
        self.context = f"sensitivity-table|{context}"
        self._rows: dict[int, tuple[float, list[float | None], float]] = {}
        for row in _read_rows(self.path, self.context):
            self._rows[int(row["layer"])] = (float(row["base_loss"]), list(row["costs"]),
                                             float(row.get("seconds", 0.0)))  # rows before 2026-12-07: no time

    def get(self, layer: int, base_loss: float) -> list[float | None] | None:
        """The layer's finished row, if it was measured against this base loss (to float noise)."""
        got = self._rows.get(layer)
        if got is None or abs(got[0] - base_loss) > TABLE_BASE_TOLERANCE:
            return None
        return list(got[1])

    def seconds(self, layer: int) -> float:
        """What measuring the layer's saved row took (0 when unknown), so a resumed table still reports its cost."""
        got = self._rows.get(layer)
        return got[2] if got is not None else 0.0

    def add(self, layer: int, base_loss: float, costs: Sequence[float | None], seconds: float = 0.0) -> None:
        self._rows[layer] = (base_loss, list(costs), seconds)
        _append_row(self.path, {"context": self.context, "layer": layer, "base_loss": base_loss,
                                "costs": list(costs), "seconds": seconds})


#: most a resumed table row's base loss may differ from the re-measured one (nats; float noise only)
TABLE_BASE_TOLERANCE = 1e-6


def _read_rows(path: Path | None, context: str) -> list[dict[str, Any]]:
    """The JSON rows of a journal file written under ``context`` (a line cut by a kill is skipped)."""
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("context") == context:
            rows.append(row)
    return rows


def _append_row(path: Path | None, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it: a finished row survives a kill right after.

    A line a kill cut short has no newline; the row starts on a line of its own, not glued to it.
    """
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    cut = False
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            cut = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(("\n" if cut else "") + json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class SearchResult:
    """What :func:`plan_allocation` returns: every candidate, the chosen index, the reasons, the cost."""

    candidates: list[Candidate]
    chosen: int
    decision: dict[str, Any]
    cost: dict[str, Any]

    @property
    def winner(self) -> Candidate:
        return self.candidates[self.chosen]


def min_prunes(decision: Decision, providers: Sequence[Provider]) -> int:
    """The smallest budget that can try anything: one candidate, two for ``auto`` (something to compare)."""
    return 2 if decision == "auto" and len(providers) > 1 else 1


def plan_allocation(
    providers: Sequence[Provider],
    evaluate: Evaluator,
    *,
    budget: Budget | None = None,
    decision: Decision = "lowest",
    sigmas: float = 2.0,
    journal: Journal | None = None,
    show_progress: bool = False,
    on_candidate: Callable[[Candidate], None] | None = None,
    confirm_examples: int = 0,
    orders: int = 1,
    evaluate_at: OrderedEvaluator | None = None,
) -> SearchResult:
    """Try the providers' candidates within ``budget`` and choose one (see the module docstring)."""
    if not providers:
        raise ConfigError("plan_allocation needs at least one provider")
    if decision not in ("lowest", "auto"):
        raise ConfigError(f"decision must be 'lowest' or 'auto', got {decision!r}")
    if isinstance(confirm_examples, bool) or not isinstance(confirm_examples, int) or confirm_examples < 0:
        raise ConfigError(f"confirm_examples must be an integer >= 0, got {confirm_examples!r}")
    if isinstance(orders, bool) or not isinstance(orders, int) or orders < 1:
        raise ConfigError(f"judge_orders must be an integer >= 1, got {orders!r}")
    if orders > 1 and (decision != "auto" or evaluate_at is None):
        raise ConfigError("judge_orders > 1 rechecks the finalists of allocation 'auto' at other calibration orders; "
                          + ("it needs evaluate_at(layer_sparsity, order)" if decision == "auto" else
                             f"decision {decision!r} has no finalists: leave judge_orders at 1"))
    budget = budget or Budget()
    need = min_prunes(decision, providers)
    reserve = recheck_prunes(orders, providers)
    if budget.prunes is not None and budget.prunes < need + reserve:
        raise AllocationError(f"a budget of {budget.prunes} pruning pass(es) cannot try the candidates: "
                              f"{decision} needs at least {need}"
                              + (f" plus {reserve} to recheck its finalists at {orders - 1} other calibration "
                                 f"order(s)" if reserve else "") + "; raise the budget")
    journal = journal or Journal(None, "")
    t0 = time.perf_counter()
    cands: list[Candidate] = []
    mine: dict[str, list[Tried]] = {p.name: [] for p in providers}
    everything: list[Tried] = []
    passes = resumed = 0
    exhausted = False
    bar = tqdm(total=budget.prunes, desc="planning: candidates", unit="prune", disable=not show_progress)

    def spent() -> bool:
        if budget.prunes is not None and passes >= budget.prunes - reserve:
            return True
        return budget.seconds is not None and time.perf_counter() - t0 >= budget.seconds

    def run(prop: Proposal) -> None:
        nonlocal passes, resumed, exhausted
        cand = Candidate(prop.provider, dict(prop.knobs), prop.layer_sparsity, error=prop.error)
        cands.append(cand)
        if prop.layer_sparsity is None:
            cand.status = "infeasible"
        else:
            twin = next((i for i, c in enumerate(cands[:-1]) if c.ok and c.layer_sparsity is not None
                         and _key(c.layer_sparsity) == _key(prop.layer_sparsity)), None)
            if twin is not None:
                src = cands[twin]
                cand.status, cand.same_as = "duplicate", twin
                cand.loss, cand.perplexity, cand.example_losses = src.loss, src.perplexity, src.example_losses
                cand.confirm_loss, cand.confirm_example_losses = src.confirm_loss, src.confirm_example_losses
            else:
                ev = journal.get(prop.layer_sparsity)
                if ev is not None:
                    cand.status = "resumed"
                    resumed += 1
                elif spent():
                    cand.status = "skipped (budget)"
                    exhausted = True
                else:
                    ev = evaluate(list(prop.layer_sparsity))
                    journal.add(prop.layer_sparsity, ev)
                    cand.status = "evaluated"
                    passes += 1
                    bar.update(1)
                if ev is not None:
                    ev, held_back = ev.split(confirm_examples)
                    cand.loss = token_mean(ev.sums, ev.counts)
                    cand.perplexity = math.exp(cand.loss)
                    cand.example_losses = example_losses(ev.sums, ev.counts)
                    cand.seconds = ev.seconds
                    if held_back is not None:
                        cand.confirm_loss = token_mean(held_back.sums, held_back.counts)
                        cand.confirm_example_losses = example_losses(held_back.sums, held_back.counts)
        tried = Tried(prop.provider, dict(prop.knobs), prop.layer_sparsity, cand.loss)
        mine[prop.provider].append(tried)
        everything.append(tried)
        if cand.ok:
            logger.info("plan: %s %s → held-out perplexity %.4f (%s)", cand.provider, cand.knobs,
                        cand.perplexity, cand.status)
        if on_candidate is not None:
            on_candidate(cand)

    try:
        progress = True
        while progress and not exhausted:
            progress = False
            for p in providers:
                for prop in p.propose(mine[p.name], everything):
                    progress = True
                    run(prop)
                    if exhausted:
                        break
                if exhausted:
                    break
        ok = [i for i, c in enumerate(cands) if c.ok]
        if not ok:
            raise AllocationError("no candidate of the plan could be evaluated: " + "; ".join(
                f"{c.provider} {c.knobs}: {c.error or c.status}" for c in cands))
        if orders > 1:
            assert evaluate_at is not None
            new, again = _recheck_finalists(cands, _finalists(cands, providers)[0], evaluate_at, orders, journal,
                                            confirm_examples, bar)
            passes, resumed = passes + new, resumed + again
    finally:
        bar.close()
    _paired_vs_uniform(cands)
    chosen, why, rule = _decide(cands, providers, decision, sigmas, confirm_examples, orders)
    cost = {"seconds": time.perf_counter() - t0, "prunes": passes, "resumed": resumed,
            "evaluated_seconds": sum(c.seconds for c in cands if c.status in ("evaluated", "resumed")),
            "resumed_seconds": sum(c.seconds for c in cands if c.status == "resumed"),
            "budget": budget.to_dict(), "budget_exhausted": exhausted}
    return SearchResult(cands, chosen, {"rule": rule, "why": why}, cost)


def recheck_prunes(orders: int, providers: Sequence[Provider]) -> int:
    """Pruning passes reserved for ``auto``'s rechecks: one per finalist (a provider) and extra order."""
    return (orders - 1) * len({p.name for p in providers}) if orders > 1 else 0


def _finalists(cands: list[Candidate], providers: Sequence[Provider]) -> tuple[list[int], list[int]]:
    """``auto``'s finalists: the lowest-loss candidate of each provider, in order of simplicity; and their tiers."""
    rank = {p.name: (p.simplicity, k) for k, p in enumerate(providers)}
    best: dict[str, int] = {}
    for i, c in enumerate(cands):
        if c.ok and (c.provider not in best or c.loss < cands[best[c.provider]].loss):  # type: ignore[operator]
            best[c.provider] = i
    names = sorted(best, key=lambda n: rank.get(n, (9, 0)))
    return [best[n] for n in names], [rank.get(n, (9, 0))[0] for n in names]


def _recheck_finalists(cands: list[Candidate], idx: Sequence[int], evaluate_at: OrderedEvaluator, orders: int,
                       journal: Journal, confirm_examples: int, bar: Any) -> tuple[int, int]:
    """Prune each finalist again at calibration orders ``1 … orders - 1``; ``(new passes, resumed)``."""
    passes = resumed = 0
    for i in idx:
        c = cands[i]
        assert c.layer_sparsity is not None and c.example_losses is not None and c.loss is not None
        losses, per_example, confirm = [c.loss], [c.example_losses], [c.confirm_example_losses or []]
        for order in range(1, orders):
            ev = journal.get(c.layer_sparsity, order)
            if ev is None:
                ev = evaluate_at(list(c.layer_sparsity), order)
                journal.add(c.layer_sparsity, ev, order)
                passes += 1
                bar.update(1)
            else:
                resumed += 1
            search, held_back = ev.split(confirm_examples)
            losses.append(token_mean(search.sums, search.counts))
            per_example.append(example_losses(search.sums, search.counts))
            confirm.append(example_losses(held_back.sums, held_back.counts) if held_back is not None else [])
            logger.info("plan: %s %s at calibration order %d → held-out perplexity %.4f", c.provider, c.knobs, order,
                        math.exp(losses[-1]))
        c.order_losses, c.order_example_losses = losses, per_example
        c.order_confirm_example_losses = confirm if confirm_examples else None
    return passes, resumed


def _over_orders(c: Candidate, confirm: bool) -> list[float] | None:
    """A finalist's per-example losses, averaged over the calibration orders it was pruned at."""
    lists = c.order_confirm_example_losses if confirm else c.order_example_losses
    if lists is None:
        return c.confirm_example_losses if confirm else c.example_losses
    return [sum(v) / len(v) for v in zip(*lists, strict=True)]


def _paired_vs_uniform(cands: list[Candidate]) -> None:
    base = next((c for c in cands if c.provider == "uniform" and c.ok), None)
    if base is None or base.example_losses is None:
        return
    for c in cands:
        if c.ok and c.example_losses is not None and len(c.example_losses) >= 2:
            p = paired(c.example_losses, base.example_losses)
            c.vs_uniform = {"mean": p.mean, "se": p.se}


def _label(c: Candidate) -> str:
    """``provider(knob=value, …)`` for the decision's reasons."""
    shown = ("beta", "epsilon", "invert", "m", "source")
    knobs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in c.knobs.items() if k in shown)
    return f"{c.provider}({knobs})"


def _decide(cands: list[Candidate], providers: Sequence[Provider], decision: Decision, sigmas: float,
            confirm_examples: int = 0, orders: int = 1) -> tuple[int, list[str], str]:
    ok = [i for i, c in enumerate(cands) if c.ok]
    if decision == "lowest":
        best = ok[0]
        for i in ok[1:]:
            if cands[i].loss < cands[best].loss:  # type: ignore[operator]
                best = i
        return best, [f"lowest held-out loss: {cands[best].provider} {cands[best].knobs} "
                      f"(perplexity {cands[best].perplexity:.4f})"], \
            "lowest held-out loss; a later candidate must be strictly lower (uniform first keeps ties)"
    # auto: the best candidate of each provider, tier by tier (uniform, ATP, the heuristics, the search)
    idx, tiers = _finalists(cands, providers)
    labels = [_label(cands[i]) for i in idx]
    rule = (f"keep the simpler candidate (uniform, then ATP, then the best one-knob heuristic, then the per-layer "
            f"search) unless the next tier's best beats it by more than {sigmas:g} paired standard errors of the "
            "per-example held-out loss")
    notes = []
    if orders > 1:
        rule += f", averaged over {orders} calibration orders"
        notes.append(f"each finalist pruned at {orders} calibration orders; per-example losses averaged over them")
    search_losses = [_over_orders(cands[i], confirm=False) for i in idx]
    if not confirm_examples:
        k, why = choose_simplest(labels, search_losses, sigmas, tiers=tiers)  # type: ignore[arg-type]
        return idx[k], [*notes, *why], rule
    # the finalists and the challenger come from the search's examples; the slice it never saw judges them
    k, why = choose_simplest(labels, [_over_orders(cands[i], confirm=True) for i in idx], sigmas,  # type: ignore[misc]
                             pick=search_losses, tiers=tiers)  # type: ignore[arg-type]
    return idx[k], [f"judged on the {confirm_examples} confirmation examples (the search never saw them)", *notes,
                    *why], rule + f", judged on the last {confirm_examples} held-out examples, which the search did " \
                                  "not see"


@dataclass(frozen=True)
class _Tier:
    """A provider's name and simplicity tier: all ``_decide`` needs of a provider."""

    name: str
    simplicity: int


#: the planner's providers in the order ``plan_pruning`` passes them, with their tiers (for saved plans)
_SAVED_ORDER = ("uniform", "atp", "owl", "alpha_hill", "layerif", "sensitivity")


def decide_saved(candidates: Sequence[dict[str, Any]], options: dict[str, Any]) -> tuple[int, list[str], str]:
    """``auto``'s decision taken again, under the current rule, on a saved plan's candidates.

    ``(index, why, rule)`` from the plan's ``candidates`` and ``options`` (``sigmas``,
    ``confirm_examples``, ``judge_orders``); no pruning pass. Why: a plan records every candidate's
    per-example held-out losses, so a change of the decision rule can be measured on plans made
    before it (``benchmarks/retest_plans.py --report`` shows both choices beside the test results).
    """
    known = {Uniform.name: Uniform.simplicity, ATP.name: ATP.simplicity, Sensitivity.name: Sensitivity.simplicity}
    tiers = [_Tier(n, known.get(n, Provider.simplicity)) for n in _SAVED_ORDER]
    cands = [Candidate(**c) for c in candidates]
    return _decide(cands, tiers, "auto", float(options.get("sigmas", 2.0)),  # type: ignore[arg-type]
                   int(options.get("confirm_examples") or 0), int(options.get("judge_orders") or 1))


__all__ = ["Budget", "Candidate", "Decision", "Evaluation", "Evaluator", "Journal", "OrderedEvaluator", "SearchResult",
           "TableJournal", "decide_saved", "min_prunes", "plan_allocation", "recheck_prunes"]
