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
          allocation: layerif              # layerif | owl | alpha_hill | uniform
          scores: $LAYERIF_SCORES          # LayerScores JSON (env vars and ~ expanded)
          epsilon: 0.1                     # spread [1-ε, 1+ε] (OWL's λ for owl); default: the reference's
                                           # or `auto`: searched on held-out calibration data (search.py)

What happens in ``on_initialize`` (before any weight is touched):

* ``targets`` left out (``None``, also in a dumped recipe, which drops ``None`` fields) or
  given as llm-compressor's own default ``Linear`` means the model's decoder-block class
  (``LlamaDecoderLayer``, ``Qwen2DecoderLayer`` … from
  :func:`layerif_plugins.models.block_class_name`): a per-layer list only lines up with
  block targets, and a block target prunes every Linear inside it, which is what
  ``Linear`` asks for; ``re:.*lm_head`` is always ignored. The resolved value is stored,
  so the ``recipe.yaml`` written after the run names it.
* the scores file is read through :func:`~layerif_plugins.scorers.resolve_scores`: its
  method must equal ``allocation`` and it is checked against the model's fingerprint (a
  file for another model is refused, naming the differing field);
* without a scores file, ``alpha_hill`` is computed from the weights (the registry's
  scorer) and ``owl`` from llm-compressor's calibration dataloader (one extra forward pass
  over it, as llm-compressor's own OWL does); ``layerif`` needs a file (``layerif score``);
* the per-layer list is :func:`~layerif_plugins.allocate.sparsity.sparsity_from_scores`
  with the scores' direction (docs/method.md §2b; OWL's mapping for protect scores such as
  ``owl``; ``invert: true`` reverses it) and the block sizes as weights;
* ``epsilon: auto`` first runs the search of :mod:`.search` (one pruning pass per
  candidate ε × direction, each undone) and stores the winner in ``epsilon`` / ``invert``,
  so the saved recipe reruns the chosen setting in one pass; the sweep is in
  ``allocation_info["epsilon_search"]``.

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
    check_epsilon,
    check_target,
    default_epsilon,
    search_grid,
    sparsity_from_scores,
    weighted_mean,
)
from layerif_plugins.data import Examples
from layerif_plugins.errors import AllocationError, ConfigError, LayerIFError
from layerif_plugins.integrations.llmcompressor import search
from layerif_plugins.models import block_class_name, blocks_prefix, decoder_blocks
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)

# the pydantic field type, from the one list of allocation names in allocate/sparsity.py
Allocation = Literal[ALLOCATIONS]  # type: ignore[valid-type]
LM_HEAD_IGNORE = "re:.*lm_head"
#: llm-compressor's own ``targets`` default: every Linear, which inside decoder blocks is what a block target prunes
UPSTREAM_TARGETS = ("Linear",)


def resolve_scores_path(value: str) -> Path:
    """Expand ``~`` and environment variables (``$LAYERIF_SCORES``) in a recipe's scores path."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if "$" in expanded:
        raise ConfigError(
            f"scores path {value!r} names an environment variable that is not set; "
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


def _compute_owl(model: torch.nn.Module, dataloader: Any, show_progress: bool = False) -> LayerScores:
    from layerif_plugins.scorers.owl import owl_layer_scores

    if dataloader is None or len(dataloader) == 0:
        raise ConfigError(
            "allocation 'owl' without a scores file computes outlier ratios from the calibration data, but "
            "oneshot got none: pass dataset=…, or a scores file from `layerif score --method owl`"
        )
    was_training = model.training
    model.eval()
    try:
        source = {"calib": {"source": "llm-compressor calibration dataloader", "batches": len(dataloader)}}
        return owl_layer_scores(model, dataloader, show_progress=show_progress, data=source)
    finally:
        model.train(was_training)


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

    :param sparsity: global target sparsity in (0, 1): the parameter-weighted mean over the blocks
    :param allocation: ``layerif`` | ``owl`` | ``alpha_hill`` | ``depth_ramp`` | ``uniform``
    :param scores: LayerScores JSON path (``~`` and ``$VARS`` expanded); required for
        ``layerif``, optional for the others (``owl`` from the calibration data,
        ``alpha_hill`` from the weights, ``depth_ramp`` = the layer index)
    :param epsilon: relative spread: ratios in ``[1-ε, 1+ε]`` before rescaling (OWL's λ
        for ``allocation: owl``); default: the reference's value for the allocation
        (layerif 0.1, owl 0.08, alpha_hill 0.2, depth_ramp 0.1); ``auto``: searched
        (see :mod:`.search`), the winner replaces ``auto`` after initialisation
    :param invert: reverse the mapping (more sparsity where the scores say less)
    :param epsilon_grid: the spreads ``auto`` tries (default 0, 0.05, 0.1, 0.2, 0.3; 0 and
        the reference spread are always added), each as scored and inverted
    :param holdout: calibration batches ``auto`` holds out for the perplexity: a count, or
        a fraction of the batches (evenly spaced); the other batches prune the candidates
    :param targets: ``None`` (default) or ``Linear``: the model's decoder blocks
    """

    _stock: ClassVar[type[SparsityModifierBase]]  # the upstream modifier the search runs per candidate

    targets: str | list[str] | None = None
    # upstream's default False turns into True on every reload (its deprecation validator), so
    # model_validate(model_dump()) would differ from the instance; True is what runs anyway
    sequential_update: bool | None = True
    allocation: Allocation = "layerif"
    scores: str | None = None
    epsilon: float | Literal["auto"] | None = None
    invert: bool = False
    epsilon_grid: list[float] | None = None
    holdout: int | float = 0.125

    _layer_sparsity: list[float] = PrivateAttr(default_factory=list)
    _allocation_info: dict[str, Any] = PrivateAttr(default_factory=dict)
    _show_progress: bool = PrivateAttr(default=False)
    _holdout_examples: Examples | None = PrivateAttr(default=None)

    @field_validator("sparsity", mode="after")
    @classmethod
    def validate_global_sparsity(cls, value: Any) -> float:
        if isinstance(value, list | dict) or value is None:
            raise AllocationError(
                f"LayerIF modifiers take one global sparsity (the per-layer list is computed), got {value!r}"
            )
        return check_target(value)

    @field_validator("epsilon", mode="after")
    @classmethod
    def validate_epsilon(cls, value: float | str | None) -> float | str | None:
        return check_epsilon(value)

    @field_validator("epsilon_grid", mode="after")
    @classmethod
    def validate_epsilon_grid(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise AllocationError("epsilon_grid is empty; leave it out for the default grid")
            value = [check_epsilon(v, "epsilon_grid value") for v in value]  # type: ignore[misc]
        return value

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
        if self.epsilon is None:
            self.epsilon = default_epsilon(self.allocation)
        return self

    # ----------------------------------------------------------------- results

    @property
    def layer_sparsity(self) -> list[float]:
        """The per-decoder-layer sparsities computed at initialisation (layer 0 first)."""
        return list(self._layer_sparsity)

    def show_progress(self, enabled: bool = True) -> LayerIFSparsityModifierBase:
        """Progress bars for the scores this modifier computes itself (OWL activations, ESD fits)."""
        self._show_progress = enabled
        return self

    def use_holdout(self, examples: Examples) -> LayerIFSparsityModifierBase:
        """Held-out examples for ``epsilon: auto`` instead of batches taken out of the calibration data.

        ``prune_model`` passes the calibration file's next examples here, so every
        calibration batch prunes and the held-out slice is disjoint by construction.
        Not part of the recipe (a recipe rerun holds out ``holdout`` batches instead).
        """
        self._holdout_examples = examples
        return self

    @property
    def allocation_info(self) -> dict[str, Any]:
        """Where the allocation came from: scores method/path/values, block sizes, timing, the ε search."""
        return dict(self._allocation_info)

    # ----------------------------------------------------------------- lifecycle

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        model = state.model
        t0 = time.perf_counter()
        if self.targets is None or self.targets in (UPSTREAM_TARGETS[0], list(UPSTREAM_TARGETS)):
            self.targets = [block_class_name(model)]
        if not any(str(i).endswith("lm_head") for i in self.ignore):
            self.ignore = [*self.ignore, LM_HEAD_IGNORE]
        modules = prunable_modules(model, self.targets, self.ignore)
        num_layers = len(decoder_blocks(model))
        params = params_per_layer(modules, num_layers)
        if any(p == 0 for p in params):
            raise ConfigError(f"decoder layers {[i for i, p in enumerate(params) if p == 0]} have nothing to prune "
                              f"after ignore={self.ignore}")
        dataloader = state.data.calib if state.data is not None else None
        layer_scores = self._layer_scores(model, dataloader)
        target = float(self.sparsity)

        def allocate(epsilon: float, invert: bool) -> list[float]:
            if layer_scores is None:
                return [target] * num_layers
            return sparsity_from_scores(layer_scores.scores, layer_scores.direction, params, target,
                                        epsilon=epsilon, invert=invert)

        searched = None
        if self.epsilon == AUTO:
            searched = self._search_epsilon(model, [m for _, _, m in modules], allocate, dataloader,
                                            kwargs.get("sequential_targets"))
            self.epsilon, self.invert = searched["chosen"]["epsilon"], searched["chosen"]["invert"]
        sparsities = allocate(float(self.epsilon), self.invert)  # type: ignore[arg-type]
        self._layer_sparsity = sparsities
        self._allocation_info = {
            "allocation": self.allocation,
            "epsilon": self.epsilon,
            "invert": self.invert,
            "target": target,
            "scores_path": self.scores,
            "scores_method": layer_scores.method if layer_scores else "uniform",
            "scores": layer_scores.scores if layer_scores else None,
            "params_per_layer": params,
            "layer_sparsity": sparsities,
            "weighted_mean": weighted_mean(sparsities, params),
            "epsilon_search": searched,
            "seconds": time.perf_counter() - t0,
        }
        logger.info("%s allocation, target %.4f, epsilon %s%s: per-layer sparsity %s", self.allocation, target,
                    self.epsilon, " (inverted)" if self.invert else "", [round(s, 4) for s in sparsities])
        return super().on_initialize(state, **kwargs)

    def _layer_scores(self, model: torch.nn.Module, dataloader: Any) -> LayerScores | None:
        from layerif_plugins.scorers import get_scorer, resolve_scores

        if self.allocation == "uniform":
            return None
        if self.scores is not None:
            path = resolve_scores_path(self.scores)
            scores = resolve_scores(model, self.allocation, path, role="allocation")
            self.scores = str(path)  # the saved recipe records the resolved file
            return scores
        if self.allocation == "owl":  # OWL's outlier ratios from llm-compressor's calibration dataloader
            return _compute_owl(model, dataloader, self._show_progress)
        spec = get_scorer(self.allocation)
        if spec.needs:
            raise ConfigError(
                f"allocation {self.allocation!r} needs a scores file: compute one with "
                f"`layerif score --method {self.allocation} --model … --train … --val … --out scores.json` "
                "and set scores: path/to/scores.json"
            )
        # data-free scorers (alpha_hill: the weight spectra; depth_ramp: the layer index)
        return resolve_scores(model, self.allocation, **spec.accepted(show_progress=self._show_progress))

    def _search_epsilon(self, model: torch.nn.Module, modules: list[torch.nn.Module], allocate: search.Allocator,
                        dataloader: Any, sequential_targets: Any) -> dict[str, Any]:
        batches = search.materialize(dataloader)
        if self._holdout_examples is not None:
            prune_batches, held = batches, self._holdout_examples
            holdout = {"from": "examples given to use_holdout (not calibration batches)", **held.fingerprint()}
        else:
            positions = search.holdout_positions(len(batches), self.holdout)
            prune_batches, held_batches = search.split_batches(batches, positions)
            held = search.batches_to_examples(held_batches, "held-out calibration batches")
            holdout = {"from": "calibration batches", "positions": positions, "of_batches": len(batches),
                       **held.fingerprint()}
        stock = self._stock
        algorithm_fields = set(stock.model_fields) - set(SparsityModifierBase.model_fields)

        def make_modifier(layer_sparsity: list[float]) -> SparsityModifierBase:
            return stock(sparsity=layer_sparsity, targets=self.targets, ignore=self.ignore,
                         **{k: getattr(self, k) for k in algorithm_fields})

        result = search.run_search(model, modules, allocate, make_modifier, prune_batches, held,
                                   search_grid(self.allocation, self.epsilon_grid), sequential_targets)
        result["holdout"] = holdout
        result["pruning_batches"] = len(prune_batches)
        return result

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        # Upstream reads a per-target list from `sparsity`; swap it in only while hooks are
        # registered so the public field (and the saved recipe) keeps the global target.
        target = self.sparsity
        self.sparsity = list(self._layer_sparsity)
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


MODIFIERS = {
    "LayerIFWandaPruningModifier": LayerIFWandaPruningModifier,
    "LayerIFSparseGPTModifier": LayerIFSparseGPTModifier,
}
