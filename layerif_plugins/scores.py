"""``LayerScores``: the one interchange file between scorers and adapters.

A versioned JSON document: per-layer scores (layer 0 first), what a high score means
(:class:`ScoreDirection`, the one thing the allocators read), the method and its
parameters, fingerprints of the model and the data, optional per-module and per-example
detail, library versions and a creation time. Scores are expensive and reusable: compute
once, allocate many times. :meth:`LayerScores.check_model` refuses a file computed for
another model and names the field that differs.

Score values are checked wherever a ``LayerScores`` is made (computed or loaded): every
score is a finite JSON number (not a string, boolean or null), and **no score is
negative** unless the method's scores are signed by construction (:data:`SIGNED_METHODS`:
Block Influence's mean cosine lies in [−1, 1]; a measured quantization loss increase can be
< 0). LayerIF's ``Σ_i max(0, −s_i)``, OWL's outlier ratios, AlphaPruning's α, angular
redundancy, variability ν and the depth ramp are all ≥ 0; a negative one means an edited or
foreign file, and since every allocation ranks the scores (shifted by their minimum), negated
scores would silently invert it.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from torch import nn

from layerif_plugins.errors import ScoresError
from layerif_plugins.fields import check_number
from layerif_plugins.io import atomic_write_json, read_json_object
from layerif_plugins.models import ModelFingerprint, fingerprint
from layerif_plugins.models.fingerprint import same_weights

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_VERSIONED_PACKAGES = ("layerif-plugins", "torch", "transformers", "llmcompressor", "peft", "lm_eval")


class ScoreDirection(StrEnum):
    """What a high score means, so that every allocator reads one field instead of a method name.

    * ``HIGHER_PRUNES`` — a high score marks a less well-trained or more redundant layer
      (LayerIF, AlphaPruning's α, 1 − Block Influence, angular distance): more sparsity,
      more LoRA experts, dropped first, adapted first.
    * ``HIGHER_PROTECTS`` — a high score marks a layer to protect (OWL's outlier ratio):
      less sparsity (OWL's own mapping), dropped last, adapted last.
    * ``LOWER_ADAPTS`` — a low score marks a task-specialised layer (hidden-state
      variability ν): the lowest are adapted; sparsity and dropping as ``HIGHER_PRUNES``.

    Scorers declare theirs at registration (``register_scorer(..., direction=...)``); the
    value is stored in the file as ``"direction"``.
    """

    HIGHER_PRUNES = "higher_prunes"
    HIGHER_PROTECTS = "higher_protects"
    LOWER_ADAPTS = "lower_adapts"

    @property
    def sparsity_mapping(self) -> Literal["layerwise", "owl"]:
        """``owl`` (OWL's inverse mapping) for protect scores, else ``layerwise`` (docs/method.md §2b)."""
        return "owl" if self is ScoreDirection.HIGHER_PROTECTS else "layerwise"

    @property
    def adapt_end(self) -> Literal["highest", "lowest"]:
        """Which end of the scores marks the layers to fine-tune."""
        return "highest" if self is ScoreDirection.HIGHER_PRUNES else "lowest"

    @property
    def drop_end(self) -> Literal["highest", "lowest"]:
        """Which end of the scores marks the layers to remove."""
        return "lowest" if self is ScoreDirection.HIGHER_PROTECTS else "highest"

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]

    @classmethod
    def parse(cls, value: ScoreDirection | str, source: str = "direction") -> ScoreDirection:
        """The member named by ``value`` (its value string); refuses anything else, naming the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ScoresError(
                f"{source}: unknown score direction {value!r}; one of {[d.value for d in cls]}"
            ) from None


_DESCRIPTIONS = {
    ScoreDirection.HIGHER_PRUNES: "less well-trained (more sparsity, more experts)",
    ScoreDirection.HIGHER_PROTECTS: "better-trained layer to protect (LESS sparsity: allocate with owl_sparsity)",
    ScoreDirection.LOWER_ADAPTS: "less task-specialised (layer selection adapts the lowest)",
}

#: Directions of the methods whose files predate the ``direction`` field (format_version 1
#: files written before it, and ``LayerScores`` built without one); every other method is
#: ``HIGHER_PRUNES``. New scorers declare their direction at registration instead.
_LEGACY_DIRECTIONS: dict[str, ScoreDirection] = {
    "owl": ScoreDirection.HIGHER_PROTECTS,
    "variability": ScoreDirection.LOWER_ADAPTS,
}


#: Methods whose scores may be negative by construction (Block Influence: a mean cosine in [−1, 1]).
#: Every other method's scores are ≥ 0 and a negative one is refused; a third-party scorer with
#: signed scores adds its name here.
SIGNED_METHODS: set[str] = {"block_influence", "quant_sensitivity"}  # a measured loss increase may be < 0

#: a negative score this close to 0 (relative to the largest |score|) is float rounding, not a sign
_ROUNDING = 1e-9


def check_score_values(values: Any, method: str, source: str = "scores") -> list[float]:
    """``values`` as floats; refuses a non-list, non-numbers, non-finite and (unsigned methods) negative scores."""
    if not isinstance(values, (list, tuple)):
        raise ScoresError(f"{source}: 'scores' must be a list of numbers (one per layer), got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bool, str, bytes)) or v is None:
            raise ScoresError(f"{source}: the score of layer {i} is {json.dumps(v, default=repr)[:40]} "
                              f"({type(v).__name__}), not a number")
        if isinstance(v, int):  # a JSON integer literal may be too large for a float: refused, not a traceback
            out.append(check_number(v, f"the score of layer {i}", source=source, error=ScoresError))
            continue
        try:
            out.append(float(v))  # numpy / 0-d torch scalars
        except (TypeError, ValueError, OverflowError):
            raise ScoresError(f"{source}: the score of layer {i} is {json.dumps(v, default=repr)[:40]} "
                              f"({type(v).__name__}), not a number") from None
    bad = [i for i, x in enumerate(out) if not math.isfinite(x)]
    if bad:
        raise ScoresError(f"{source}: non-finite scores at layers {bad}: {[out[i] for i in bad]}")
    if method not in SIGNED_METHODS and out:
        floor = -_ROUNDING * max(abs(x) for x in out)
        negative = [i for i, x in enumerate(out) if x < floor]
        if negative:
            raise ScoresError(
                f"{source}: negative {method!r} scores at layers {negative}: {[out[i] for i in negative]}; "
                f"{method} scores are >= 0 by construction, and negated scores would silently invert every "
                "allocation (to reverse a sparsity allocation on purpose, use the invert option of the "
                "allocator). Recompute them with `layerif score`"
            )
    return out


#: method → the direction its scorer declared; filled by ``scorers.registry.register_scorer`` (the registry
#: depends on this module, never the other way round)
DECLARED_DIRECTIONS: dict[str, ScoreDirection] = {}


def declare_direction(method: str, direction: ScoreDirection) -> None:
    """Record the direction a scorer declares (called by ``register_scorer``)."""
    DECLARED_DIRECTIONS[method] = direction


def _declared() -> dict[str, ScoreDirection]:
    """The declared directions, after the built-in scorers have registered (plugin discovery, by name)."""
    if not DECLARED_DIRECTIONS:
        importlib.import_module("layerif_plugins.scorers")
    return DECLARED_DIRECTIONS


def registered_direction(method: str) -> ScoreDirection | None:
    """The direction the scorer ``method`` declared at registration, or None when no such scorer is registered."""
    return _declared().get(method)


def direction_of_method(method: str) -> ScoreDirection:
    """The direction of a method's scores when a file or caller does not state it.

    The registered scorer's declaration; for a method not registered here,
    ``_LEGACY_DIRECTIONS`` or ``HIGHER_PRUNES``.
    """
    registered = registered_direction(method)
    if registered is not None:
        return registered
    return _LEGACY_DIRECTIONS.get(method, ScoreDirection.HIGHER_PRUNES)


def as_direction(value: ScoreDirection | str) -> ScoreDirection:
    """A :class:`ScoreDirection` from itself, its value (``"higher_protects"``) or a registered method name (``"owl"``).

    Anything else is refused (:class:`ScoresError` naming the choices): a misspelt direction
    must not silently become ``higher_prunes``.
    """
    if isinstance(value, ScoreDirection):
        return value
    if not isinstance(value, str):
        raise TypeError(f"direction must be a ScoreDirection or a string, got {type(value).__name__}")
    try:
        return ScoreDirection(value)
    except ValueError:
        pass
    registered = registered_direction(value)
    if registered is not None:
        return registered
    if value in _LEGACY_DIRECTIONS:
        return _LEGACY_DIRECTIONS[value]
    raise ScoresError(f"unknown score direction {value!r}: give one of {[d.value for d in ScoreDirection]} "
                      f"or a scoring method ({', '.join(sorted(_declared()))})")


def _check_stored_direction(stored: ScoreDirection, method: str, source: str) -> None:
    """Refuse a file whose ``direction`` is not its method's registered one (an edit would invert every allocation)."""
    registered = registered_direction(method)
    if registered is None:
        logger.debug("%s: method %r is not a registered scorer here; its direction %s is taken as stored",
                     source, method, stored.value)
        return
    if stored is not registered:
        raise ScoresError(
            f"{source}: direction is {stored.value!r} but {method!r} scores are {registered.value!r} (the "
            f"scorer's registered direction): an edited direction would silently invert every allocation. "
            f"Restore \"direction\": \"{registered.value}\" or recompute with `layerif score --method {method}` "
            "(to reverse an allocation on purpose, use the allocator's invert option)"
        )


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _VERSIONED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class LayerScores:
    """Per-layer scores of one model on one task, with their provenance.

    Attributes:
        scores: one float per decoder block, layer 0 first.
        method: scorer name in the registry (``layerif``, ``owl``, ``alpha_hill`` …).
        params: the scorer's parameters (damping, params group, lengths, seeds …).
        model: fingerprint of the model the scores belong to.
        data: fingerprints of the data used (``train``/``val``/``calib`` → n, tokens, hash).
        per_module: optional score per linear module (full dotted names).
        per_example: optional per-example detail, e.g. LayerIF's ``s_i^l`` (n × L).
        extras: method-specific arrays (e.g. angular distances for every start layer).
        direction: what a high score means (:class:`ScoreDirection`), read by every
            allocator; ``None`` → derived from ``method`` (:func:`direction_of_method`).
        higher_is: the same in words, for people (a scorer may be more specific); ``None``
            → the direction's description.
    """

    scores: list[float]
    method: str
    model: ModelFingerprint
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    per_module: dict[str, float] | None = None
    per_example: list[list[float]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    direction: ScoreDirection | None = None
    higher_is: str | None = None
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION
    _source: str = field(default="", repr=False, compare=False)  # the file, for messages

    def __post_init__(self) -> None:
        self.direction = (direction_of_method(self.method) if self.direction is None
                          else ScoreDirection.parse(self.direction))
        if self.higher_is is None:
            self.higher_is = self.direction.description
        self.scores = check_score_values(self.scores, self.method, self._source or f"{self.method} scores")
        if len(self.scores) != self.model.num_layers:
            raise ScoresError(
                f"{self._source + ': ' if self._source else ''}{len(self.scores)} scores for a model with "
                f"{self.model.num_layers} decoder layers"
            )

    @property
    def num_layers(self) -> int:
        return len(self.scores)

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "method": self.method,
            "params": self.params,
            "scores": self.scores,
            "direction": self.direction.value,
            "higher_is": self.higher_is,
            "model": self.model.to_dict(),
            "data": self.data,
            "per_module": self.per_module,
            "per_example": self.per_example,
            "extras": self.extras,
            "versions": self.versions,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> LayerScores:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ScoresError(
                f"{source}: format_version {version!r} is not supported (this library reads {FORMAT_VERSION}); "
                "recompute the scores with this version of layerif-plugins"
            )
        missing = [k for k in ("method", "scores", "model") if k not in d]
        if missing:
            raise ScoresError(f"{source}: not a LayerScores file, missing {missing}")
        try:
            model = ModelFingerprint.from_dict(d["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ScoresError(f"{source}: malformed model fingerprint ({exc})") from exc
        if not isinstance(d["scores"], list):
            raise ScoresError(f"{source}: 'scores' must be a list of numbers (one per layer), "
                              f"got {type(d['scores']).__name__}")
        if not isinstance(d["method"], str):
            raise ScoresError(f"{source}: 'method' must be a string (a scoring method), got {d['method']!r}")
        if d.get("direction") is not None:
            _check_stored_direction(ScoreDirection.parse(d["direction"], source), d["method"], source)
        if model.weights is None:
            logger.debug("%s: no weights fingerprint in the model block (written before it existed): the weights "
                         "it was computed on cannot be checked", source)
        return cls(
            scores=list(d["scores"]),
            method=str(d["method"]),
            model=model,
            params=d.get("params") or {},
            data=d.get("data") or {},
            per_module=d.get("per_module"),
            per_example=d.get("per_example"),
            extras=d.get("extras") or {},
            direction=ScoreDirection.parse(d["direction"], source) if d.get("direction") is not None else None,
            higher_is=d.get("higher_is"),
            versions=d.get("versions") or {},
            created=d.get("created", ""),
            format_version=version,
            _source=source,
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LayerScores:
        d = read_json_object(path, "LayerScores file", ScoresError, "compute one with `layerif score`")
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------------ validation

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ScoresError` naming the first fingerprint field that differs."""
        self.check_fingerprint(fingerprint(model))

    def check_fingerprint(self, other: ModelFingerprint) -> None:
        """Refuse ``other`` unless its architecture fields and (when both are known) its weights match the file's."""
        for name in ModelFingerprint.MATCH_FIELDS:
            mine, theirs = getattr(self.model, name), getattr(other, name)
            if mine != theirs:
                raise ScoresError(
                    f"scores file was computed for another model: {name} is {mine!r} in the scores "
                    f"(model {self.model.name_or_path!r}) but {theirs!r} in the model it is applied to "
                    f"({other.name_or_path!r}). Recompute the scores on this model with `layerif score`."
                )
        same = same_weights(self.model.weights, other.weights)
        if same is False:
            raise ScoresError(
                f"scores file was computed for other weights: the weights fingerprint is {self.model.weights} in "
                f"the scores (model {self.model.name_or_path!r}) but {other.weights} in the model it is applied to "
                f"({other.name_or_path!r}); same architecture and config, different weights (another checkpoint "
                "or a fine-tune). Recompute the scores on this model with `layerif score`."
            )
        if same is None:
            logger.debug("weights not compared (%s in the scores, %s in the model): an older file, an offloaded "
                         "model or another precision", self.model.weights, other.weights)

    def table(self) -> str:
        """A small markdown table (layer, score, rank; rank 1 = highest score)."""
        order = sorted(range(self.num_layers), key=lambda i: -self.scores[i])
        rank = {layer: r + 1 for r, layer in enumerate(order)}
        rows = ["| layer | score | rank |", "|---:|---:|---:|"]
        rows += [f"| {i} | {s:.6g} | {rank[i]} |" for i, s in enumerate(self.scores)]
        return "\n".join(rows)
