"""LayerIF-aware Wanda and SparseGPT modifiers for llm-compressor.

They are llm-compressor's own ``WandaPruningModifier`` / ``SparseGPTModifier`` with one
change: the global ``sparsity`` becomes a per-decoder-layer list, computed at
initialisation from a :class:`~layerif_plugins.scores.LayerScores` file (or, for the
data-free and calibration-only baselines, from the model itself).

Sample yaml::

    pruning_stage:
      sparsity_modifiers:
        LayerIFWandaPruningModifier:
          sparsity: 0.7                    # global target: parameter-weighted mean over the blocks
          allocation: layerif              # layerif | owl | alpha_hill | depth_ramp | uniform
                                           # | atp | sensitivity | auto (docs/pruning.md §4)
          scores: $LAYERIF_SCORES          # LayerScores JSON (env vars and ~ expanded)
          epsilon: 0.1                     # spread [1-ε, 1+ε] (OWL's λ for owl); default: the reference's
                                           # or `auto`: searched on held-out calibration data (search.py)

What happens in ``on_initialize`` (before any weight is touched) is host glue only, as in
llm-compressor's own ``wanda/base.py``: the decision is a plan (:mod:`layerif_plugins.plan`).

* ``targets`` left out (``None``, also in a dumped recipe, which drops ``None`` fields) or
  given as llm-compressor's own default ``Linear`` means the model's decoder-block class
  (``LlamaDecoderLayer``, ``Qwen2DecoderLayer`` … from
  :func:`layerif_plugins.models.block_class_name`): a per-layer list only lines up with
  block targets; ``re:.*lm_head`` is always ignored. The resolved value is stored, so the
  ``recipe.yaml`` written after the run names it.
* the per-layer list comes from a plan given beforehand (:meth:`use_plan`, ``plan:`` a
  file), an explicit ``layer_sparsity``, or a plan made here by
  :func:`~layerif_plugins.integrations.llmcompressor.planning.make_plan` from the
  allocation options: a fixed mapping of the scores (read through
  :func:`~layerif_plugins.scorers.resolve_scores` and checked against the model; ``owl``
  from the calibration batches, ``alpha_hill`` from the weights, ``depth_ramp`` = the layer
  index) needs no search; ``epsilon: auto``, ``atp`` without ``beta``, ``sensitivity`` and
  ``auto`` judge candidates on ``holdout`` calibration batches, each pruned by the stock
  modifier in a separate session and undone;
* the plan is checked (model, target, algorithm, pruned modules) and its list stored in
  ``layer_sparsity`` (and the chosen ε / direction in ``epsilon`` / ``invert``), so the saved
  recipe reruns the choice in one pass.

Field values are checked by pydantic validators, so a bad value raises pydantic's
``ValidationError`` (a ``ValueError``) at construction, like every upstream modifier;
what depends on the model (targets, scores file) raises a
:class:`~layerif_plugins.errors.LayerIFError` (also a ``ValueError``) at initialisation.

N:M ``mask_structure`` ignores per-layer ratios upstream, so it is refused, as is
``sparsity_profile="owl"`` (broken in llm-compressor 0.14.0.1: use ``allocation: owl``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.utils import match_named_modules, match_targets
from llmcompressor.core import Event, State
from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import PRUNABLE_LAYER_TYPES, SparsityModifierBase
from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
from pydantic import PrivateAttr, ValidationError, field_validator, model_validator

from layerif_plugins.allocate.sparsity import (
    ALLOCATIONS,
    AUTO,
    REFERENCE_EPSILON,
    SEARCHED_ALLOCATIONS,
    check_target,
    default_epsilon,
    weighted_mean,
)
from layerif_plugins.data import Examples
from layerif_plugins.errors import AllocationError, ConfigError, LayerIFError
from layerif_plugins.integrations.llmcompressor import search
from layerif_plugins.integrations.llmcompressor.planning import make_plan
from layerif_plugins.models import block_class_name, blocks_prefix, decoder_blocks, fingerprint
from layerif_plugins.plan import AllocationOptions, AllocationPlan, check_field
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)

# the pydantic field type, from the one list of allocation names in allocate/sparsity.py
Allocation = Literal[ALLOCATIONS]  # type: ignore[valid-type]
LM_HEAD_IGNORE = "re:.*lm_head"
#: llm-compressor's own ``targets`` default: every Linear, which inside decoder blocks is what a block target prunes
UPSTREAM_TARGETS = ("Linear",)
#: the modifier fields that are AllocationOptions' fields (validated by the same checks)
OPTION_FIELDS: tuple[str, ...] = tuple(AllocationOptions.__dataclass_fields__)


def resolve_scores_path(value: str, what: str = "scores") -> Path:
    """Expand ``~`` and environment variables (``$LAYERIF_SCORES``) in a recipe's scores / plan path."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise ConfigError(
            f"{what} path {value!r} names an environment variable that is not set; "
            f"export it (e.g. LAYERIF_SCORES=path/to/scores.json) or write the path in the recipe"
        )
    return Path(expanded).resolve()


def prunable_modules(
    model: torch.nn.Module, targets: str | list[str], ignore: list[str]
) -> list[tuple[int, str, torch.nn.Module]]:
    """(layer index, full name, module) of every module llm-compressor will prune under block targets.

    Mirrors ``SparsityModifierBase.on_calibration_start``: every Linear/Conv inside a
    matched target layer, minus ``ignore``. Raises :class:`ConfigError` unless the
    targets are exactly the decoder blocks, in order (the only layout a per-layer
    list lines up with).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    blocks = list(decoder_blocks(model))
    matched = list(match_named_modules(model, targets))
    if [id(m) for _, m in matched] != [id(b) for b in blocks]:
        names = [n for n, _ in matched][:4]
        raise ConfigError(
            f"targets {targets} match {len(matched)} modules ({names}{' …' if len(matched) > 4 else ''}) but a "
            f"per-layer sparsity list needs exactly the {len(blocks)} decoder blocks: leave targets out (the "
            f"default: the decoder blocks, here [{block_class_name(model)}]) or set targets: "
            f"[{block_class_name(model)}] or ['re:{blocks_prefix(model)}\\.\\d+$']"
        )
    out = []
    for layer, (layer_name, block) in enumerate(matched):
        for name, module in match_named_modules(block, PRUNABLE_LAYER_TYPES):
            full = f"{layer_name}.{name}"
            if match_targets(full, module, ignore) or isinstance(module, torch.nn.Embedding):
                continue
            out.append((layer, full, module))
    return out


def params_per_layer(modules: Iterable[tuple[int, str, torch.nn.Module]], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for layer, _, module in modules:
        counts[layer] += module.weight.numel()
    return counts


def _compute_owl(model: torch.nn.Module, batches: list[search.Batch] | None, show_progress: bool = False
                 ) -> LayerScores:
    from layerif_plugins.scorers.owl import owl_layer_scores

    if not batches:
        raise ConfigError(
            "allocation 'owl' without a scores file computes outlier ratios from the calibration data, but "
            "oneshot got none: pass dataset=…, or a scores file from `layerif score --method owl`"
        )
    was_training = model.training
    model.eval()
    try:
        source = {"calib": {"source": "llm-compressor calibration dataloader", "batches": len(batches)}}
        it = ({k: torch.as_tensor(v) for k, v in b.items()} for b in batches)
        return owl_layer_scores(model, it, show_progress=show_progress, data=source)
    finally:
        model.train(was_training)


def explicit_plan(model: torch.nn.Module, layer_sparsity: list[float], params: list[int], target: float,
                  algorithm: str, allocation: str) -> AllocationPlan:
    """A plan holding a per-layer list given as is (a saved recipe's ``layer_sparsity``), checked on the way."""
    if len(layer_sparsity) != len(params):
        raise ConfigError(f"layer_sparsity has {len(layer_sparsity)} entries for a model with {len(params)} decoder "
                          "layers; give one per layer")
    mean = weighted_mean(layer_sparsity, params)
    if abs(mean - target) > 1e-6:
        raise ConfigError(f"layer_sparsity averages {mean:.6f} (parameter-weighted) but sparsity is {target}; "
                          "they must agree")
    return AllocationPlan(layer_sparsity=[float(x) for x in layer_sparsity], target=target, algorithm=algorithm,
                          allocation=allocation, chosen={"provider": "explicit", "knobs": {}, "index": 0},
                          model=fingerprint(model), params_per_layer=params,
                          decision={"rule": "explicit layer_sparsity (no search)", "why": []})


def allocation_info(modifier: LayerIFSparsityModifierBase, plan: AllocationPlan, params: list[int],
                    seconds: float) -> dict[str, Any]:
    """What ``prune_model`` reports about the allocation (and the pre-planner ``epsilon_search`` view)."""
    searched = None
    if plan.candidates and plan.options.get("epsilon") == AUTO:
        sweep = [{"epsilon": (c.get("knobs") or {}).get("epsilon", 0.0) if c["provider"] != "uniform" else 0.0,
                  "invert": bool((c.get("knobs") or {}).get("invert", False)), "layer_sparsity": c["layer_sparsity"],
                  "loss": c.get("loss"), "perplexity": c.get("perplexity"), "seconds": c.get("seconds", 0.0),
                  "same_as": c.get("same_as"), "error": c.get("error")} for c in plan.candidates]
        chosen = plan.chosen["index"]
        searched = {
            "chosen": {"epsilon": sweep[chosen]["epsilon"], "invert": sweep[chosen]["invert"], "index": chosen},
            "uniform_perplexity": sweep[0]["perplexity"], "chosen_perplexity": sweep[chosen]["perplexity"],
            "gain_vs_uniform": (sweep[0]["perplexity"] or 0.0) - (sweep[chosen]["perplexity"] or 0.0),
            "pruning_passes": plan.cost.get("prunes"), "tie_rule": plan.decision.get("rule"), "sweep": sweep,
            "grid": sorted({c["epsilon"] for c in sweep}),
            "holdout": {"from": plan.data.get("holdout_from"), **(plan.data.get("holdout") or {}),
                        **(plan.data.get("holdout_file") or {})},
            "pruning_batches": plan.data.get("pruning_batches"),
            "seconds": plan.cost.get("seconds"),
        }
    scores = plan.scores or {}
    return {
        "allocation": modifier.allocation,
        "epsilon": modifier.epsilon,
        "invert": modifier.invert,
        "target": float(modifier.sparsity),
        "scores_path": modifier.scores,
        "scores_method": scores.get("method", "uniform" if modifier.allocation == "uniform" else modifier.allocation),
        "scores": scores.get("scores"),
        "params_per_layer": params,
        "layer_sparsity": list(plan.layer_sparsity),
        "weighted_mean": weighted_mean(plan.layer_sparsity, params),
        "epsilon_search": searched,
        "plan": plan.to_dict(),
        "seconds": seconds,
    }


def build_modifier(cls: type[SparsityModifierBase], **fields: Any) -> SparsityModifierBase:
    """``cls(**fields)``, re-raising the project's own error when a validator refused a value.

    Pydantic wraps a validator's ``ValueError`` into a ``ValidationError``; callers that
    build a modifier from their own options (``prune_model``, the CLI) want the
    :class:`LayerIFError` that names the value and the fix, as every other refusal.
    """
    try:
        return cls(**fields)
    except ValidationError as exc:
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, LayerIFError):
                raise cause from None
        raise ConfigError(f"invalid {cls.__name__} options: {exc}") from exc


class LayerIFSparsityModifierBase(SparsityModifierBase):
    """Shared logic of the LayerIF Wanda / SparseGPT modifiers (see the module docstring).

    The allocation options are :class:`~layerif_plugins.plan.AllocationOptions`' fields
    (one set of checks for the CLI, ``prune_model`` and these modifiers):

    :param sparsity: global target sparsity in (0, 1): the parameter-weighted mean over the blocks
    :param allocation: ``layerif`` | ``owl`` | ``alpha_hill`` | ``depth_ramp`` | ``uniform`` | ``atp`` |
        ``sensitivity`` | ``auto``
    :param scores: LayerScores JSON path (``~`` and ``$VARS`` expanded); required for
        ``layerif``, optional for the others (``owl`` from the calibration data,
        ``alpha_hill`` from the weights, ``depth_ramp`` = the layer index); for ``auto`` a
        LayerIF file adds LayerIF as one more candidate
    :param plan: an :class:`~layerif_plugins.plan.AllocationPlan` JSON (``layerif plan``): its
        per-layer list is used as is, after checking model, target, algorithm and modules
    :param layer_sparsity: an explicit per-layer list (what a plan chose; the saved recipe of
        a planned run records it, so the recipe reruns without searching)
    :param epsilon: spread ``[1-ε, 1+ε]`` (OWL's λ); default: the reference's; ``auto``: searched
    :param invert: reverse the mapping (more sparsity where the scores say less)
    :param epsilon_grid: the spreads ``epsilon: auto`` tries (0 and the reference's always added)
    :param beta: ATP's slope; None = searched
    :param budget_prunes / budget_seconds: the most a search may spend
    :param sigmas: ``auto``'s margin in paired standard errors
    :param judge_orders: ``auto``: calibration orders each finalist is pruned at (the decision averages
        them; for SparseGPT at high sparsity, whose result moves with the floating-point order)
    :param holdout: calibration batches a search holds out for the held-out loss: a count, or
        a fraction of the batches (evenly spaced); the other batches prune the candidates
    :param targets: ``None`` (default) or ``Linear``: the model's decoder blocks
    """

    _stock: ClassVar[type[SparsityModifierBase]]  # the upstream modifier the planner runs per candidate
    _algorithm: ClassVar[str]

    targets: str | list[str] | None = None
    # upstream's default False turns into True on every reload (its deprecation validator), so
    # model_validate(model_dump()) would differ from the instance; True is what runs anyway
    sequential_update: bool | None = True
    allocation: Allocation = "layerif"
    scores: str | None = None
    plan: str | None = None
    layer_sparsity: list[float] | None = None
    epsilon: float | Literal["auto"] | None = None
    invert: bool = False
    epsilon_grid: list[float] | None = None
    beta: float | None = None
    budget_prunes: int | None = None
    budget_seconds: float | None = None
    sigmas: float = 2.0
    sensitivity_step: float = 0.05
    sensitivity_levels: int = 3
    sensitivity_examples: int = 16
    max_moves: int = 8
    sensitivity_around: Literal["dense", "uniform"] = "dense"
    confirm_examples: int = 0
    judge_orders: int = 1
    holdout: int | float = 0.125

    _allocation_info: dict[str, Any] = PrivateAttr(default_factory=dict)
    _show_progress: bool = PrivateAttr(default=False)
    _holdout_examples: Examples | None = PrivateAttr(default=None)
    _plan: AllocationPlan | None = PrivateAttr(default=None)
    _journal: str | None = PrivateAttr(default=None)

    @field_validator("sparsity", mode="after")
    @classmethod
    def validate_global_sparsity(cls, value: Any) -> float:
        if isinstance(value, list | dict) or value is None:
            raise AllocationError(
                f"LayerIF modifiers take one global sparsity (the per-layer list is computed), got {value!r}"
            )
        return check_target(value)

    @field_validator(*OPTION_FIELDS, mode="after")
    @classmethod
    def validate_option(cls, value: Any, info: Any) -> Any:
        return check_field(info.field_name, value)

    @field_validator("holdout", mode="after")
    @classmethod
    def validate_holdout(cls, value: int | float) -> int | float:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1) or (
                isinstance(value, float) and not 0.0 < value < 1.0):
            raise ConfigError(f"holdout must be a number of calibration batches >= 1 or a fraction in (0, 1), "
                              f"got {value!r}")
        return value

    @model_validator(mode="after")
    def validate_layerif_options(self) -> LayerIFSparsityModifierBase:
        if self.mask_structure != "0:0":
            raise ConfigError(
                f"mask_structure={self.mask_structure!r}: N:M masks give every layer the same N/M sparsity, so "
                "per-layer ratios cannot apply; use the plain WandaPruningModifier/SparseGPTModifier for N:M"
            )
        if self.sparsity_profile is not None:
            raise ConfigError(
                f"sparsity_profile={self.sparsity_profile!r} is llm-compressor's own OWL (broken in 0.14.0.1); "
                "use allocation: owl instead"
            )
        if self.allocation == "uniform" and self.scores is not None:
            raise ConfigError("allocation 'uniform' uses no scores; remove `scores` or choose another allocation")
        self.options()  # cross-field checks, once
        if self.epsilon is None and self.allocation in REFERENCE_EPSILON:
            self.epsilon = default_epsilon(self.allocation)
        return self

    def options(self) -> AllocationOptions:
        """The allocation options of this modifier (validated by :class:`AllocationOptions`)."""
        return AllocationOptions(**{name: getattr(self, name) for name in OPTION_FIELDS})

    # ----------------------------------------------------------------- results

    def show_progress(self, enabled: bool = True) -> LayerIFSparsityModifierBase:
        """Progress bars of the planning this modifier runs itself (scores, candidates, sensitivity)."""
        self._show_progress = enabled
        return self

    def use_holdout(self, examples: Examples) -> LayerIFSparsityModifierBase:
        """Held-out examples for a search instead of batches taken out of the calibration data."""
        self._holdout_examples = examples
        return self

    def use_plan(self, plan: AllocationPlan) -> LayerIFSparsityModifierBase:
        """A plan made beforehand (``prune_model`` plans before its one ``oneshot``); checked at initialisation."""
        self._plan = plan
        return self

    def journal(self, path: str | None) -> LayerIFSparsityModifierBase:
        """A file where the search records finished candidates, so an interrupted run resumes."""
        self._journal = path
        return self

    @property
    def allocation_plan(self) -> AllocationPlan | None:
        return self._plan

    @property
    def allocation_info(self) -> dict[str, Any]:
        """Where the allocation came from: scores method/path/values, block sizes, timing, the plan."""
        return dict(self._allocation_info)

    # ----------------------------------------------------------------- lifecycle

    def resolve_targets(self, model: torch.nn.Module) -> tuple[list[tuple[int, str, torch.nn.Module]], list[int]]:
        """Block targets and ``lm_head`` ignored (see the module docstring); the pruned modules and block sizes."""
        if self.targets is None or self.targets in (UPSTREAM_TARGETS[0], list(UPSTREAM_TARGETS)):
            self.targets = [block_class_name(model)]
        if not any(str(i).endswith("lm_head") for i in self.ignore):
            self.ignore = [*self.ignore, LM_HEAD_IGNORE]
        modules = prunable_modules(model, self.targets, self.ignore)
        params = params_per_layer(modules, len(decoder_blocks(model)))
        if any(p == 0 for p in params):
            raise ConfigError(f"decoder layers {[i for i, p in enumerate(params) if p == 0]} have nothing to prune "
                              f"after ignore={self.ignore}")
        return modules, params

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        t0 = time.perf_counter()
        modules, params = self.resolve_targets(state.model)
        plan = self._plan or self._read_or_make_plan(state, modules, params, kwargs.get("sequential_targets"))
        plan.check(state.model, target=float(self.sparsity), algorithm=self._algorithm, params_per_layer=params)
        if (note := plan.numerics_warning()) is not None:
            logger.warning(note)
        self._plan = plan
        self.layer_sparsity = list(plan.layer_sparsity)  # the saved recipe reruns this list without searching
        knobs = plan.chosen.get("knobs") or {}
        if self.epsilon == AUTO:  # as before: the recipe records the chosen ε / direction (0: uniform won)
            self.epsilon, self.invert = float(knobs.get("epsilon") or 0.0), bool(knobs.get("invert"))
        self._allocation_info = allocation_info(self, plan, params, time.perf_counter() - t0)
        logger.info("%s allocation, target %.4f: per-layer sparsity %s", self.allocation, float(self.sparsity),
                    [round(s, 4) for s in self.layer_sparsity])
        return super().on_initialize(state, **kwargs)

    def _read_or_make_plan(self, state: State, modules: list[tuple[int, str, torch.nn.Module]], params: list[int],
                           sequential_targets: Any) -> AllocationPlan:
        if self.plan is not None:
            return AllocationPlan.load(resolve_scores_path(self.plan, "plan"))
        if self.layer_sparsity is not None:
            return explicit_plan(state.model, self.layer_sparsity, params, float(self.sparsity), self._algorithm,
                                 self.allocation)
        needs_data = self.options().searched or (self.allocation == "owl" and self.scores is None)
        dataloader = state.data.calib if state.data is not None else None
        batches = search.materialize(dataloader) if needs_data else None
        return self.plan_for_model(state.model, batches, self._holdout_examples, sequential_targets)

    def plan_for_model(self, model: torch.nn.Module, batches: list[search.Batch] | None,
                       held: Examples | None = None, sequential_targets: Any = None,
                       table_held: Examples | None = None) -> AllocationPlan:
        """This modifier's plan on ``model`` (weights restored after every candidate), without a ``oneshot``.

        ``batches`` are the calibration batches; a search prunes its candidates with them
        and measures on ``held`` (or, without it, on ``holdout`` batches taken out of them).
        The sensitivity table is measured on ``table_held`` (else on calibration examples), never on ``held``.
        """
        modules, params = self.resolve_targets(model)
        options = self.options()
        prune_batches, held, data = self._split_for_search(batches, held) if options.searched else (batches, None, {})
        return make_plan(model, options=options, algorithm=self._algorithm, target=float(self.sparsity),
                         modules=modules, params=params, scores=self._layer_scores(model, batches),
                         make_modifier=self.stock_modifier, fields=self.algorithm_fields(),
                         prune_batches=prune_batches, held=held, table_held=table_held, data=data,
                         sequential_targets=sequential_targets, journal_path=self._journal,
                         show_progress=self._show_progress)

    def _split_for_search(self, batches: list[search.Batch] | None, held: Examples | None
                          ) -> tuple[list[search.Batch], Examples, dict[str, Any]]:
        if not batches:
            raise ConfigError(f"allocation {self.allocation!r} judges candidates on held-out calibration data, but "
                              "got no calibration data: pass dataset=… (oneshot) or calib (prune_model)")
        if held is not None:
            return batches, held, {"holdout_from": held.source or "held-out examples (not calibration batches)"}
        positions = search.holdout_positions(len(batches), self.holdout)
        prune_batches, held_batches = search.split_batches(batches, positions)
        held = search.batches_to_examples(held_batches, "held-out calibration batches")
        return prune_batches, held, {"holdout_from": "calibration batches", "positions": positions,
                                     "of_batches": len(batches)}

    def algorithm_fields(self) -> dict[str, Any]:
        """The stock modifier's own fields (SparseGPT's block_size, dampening_frac …) as set here."""
        names = set(self._stock.model_fields) - set(SparsityModifierBase.model_fields)
        return {k: getattr(self, k) for k in sorted(names)}

    def stock_modifier(self, layer_sparsity: list[float]) -> SparsityModifierBase:
        """llm-compressor's own modifier with this per-layer list (what the planner prunes each candidate with)."""
        return self._stock(sparsity=list(layer_sparsity), targets=self.targets, ignore=self.ignore,
                           **self.algorithm_fields())

    def _layer_scores(self, model: torch.nn.Module, batches: list[search.Batch] | None) -> LayerScores | None:
        from layerif_plugins.scorers import get_scorer, resolve_scores

        if self.allocation in ("uniform", "atp"):
            return None
        if self.scores is not None:
            path = resolve_scores_path(self.scores)
            method = "layerif" if self.allocation in SEARCHED_ALLOCATIONS else self.allocation
            scores = resolve_scores(model, method, path, role="allocation")
            self.scores = str(path)  # the saved recipe records the resolved file
            return scores
        if self.allocation in SEARCHED_ALLOCATIONS:
            return None
        if self.allocation == "owl":  # OWL's outlier ratios from llm-compressor's calibration data
            return _compute_owl(model, batches, self._show_progress)
        spec = get_scorer(self.allocation)
        if spec.needs:
            raise ConfigError(
                f"allocation {self.allocation!r} needs a scores file: compute one with "
                f"`layerif score --method {self.allocation} --model … --train … --val … --out scores.json` "
                "and set scores: path/to/scores.json"
            )
        # data-free scorers (alpha_hill: the weight spectra; depth_ramp: the layer index)
        return resolve_scores(model, self.allocation, **spec.accepted(show_progress=self._show_progress))

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        # Upstream reads a per-target list from `sparsity`; swap it in only while hooks are
        # registered so the public field (and the saved recipe) keeps the global target.
        target = self.sparsity
        self.sparsity = list(self.layer_sparsity or [])
        try:
            super().on_calibration_start(state, event, **kwargs)
        finally:
            self.sparsity = target


class LayerIFWandaPruningModifier(LayerIFSparsityModifierBase, WandaPruningModifier):
    """Wanda with per-layer sparsity from LayerIF scores (or OWL / AlphaPruning / depth ramp / uniform).

    Sample yaml::

        pruning_stage:
          sparsity_modifiers:
            LayerIFWandaPruningModifier:
              sparsity: 0.7
              allocation: layerif
              scores: $LAYERIF_SCORES
              epsilon: 0.1

    Wanda prunes ``int(columns · s)`` weights per row, so the measured sparsity of a
    layer is the allocation rounded down to whole weights per row.
    """

    _stock: ClassVar[type[SparsityModifierBase]] = WandaPruningModifier
    _algorithm: ClassVar[str] = "wanda"


class LayerIFSparseGPTModifier(LayerIFSparsityModifierBase, SparseGPTModifier):
    """SparseGPT with per-layer sparsity from LayerIF scores (or OWL / AlphaPruning / depth ramp / uniform).

    Sample yaml::

        pruning_stage:
          sparsity_modifiers:
            LayerIFSparseGPTModifier:
              sparsity: 0.7
              allocation: layerif
              scores: $LAYERIF_SCORES
              epsilon: 0.1
              block_size: 128
              dampening_frac: 0.01
    """

    _stock: ClassVar[type[SparsityModifierBase]] = SparseGPTModifier
    _algorithm: ClassVar[str] = "sparsegpt"


MODIFIERS = {
    "LayerIFWandaPruningModifier": LayerIFWandaPruningModifier,
    "LayerIFSparseGPTModifier": LayerIFSparseGPTModifier,
}
