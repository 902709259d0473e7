"""One registry of layer scorers: model + data → :class:`LayerScores`.

Every method (LayerIF and the baselines) is a function registered under a name, with the
inputs it needs and what its scores mean declared, so the CLI and the adapters pick
methods by name without if-chains and the allocators read the direction from the file::

    @register_scorer("owl", needs=("calib",), direction=ScoreDirection.HIGHER_PROTECTS)
    def score_owl(model, data: ScoringData, *, m: float = 5.0) -> LayerScores: ...

:func:`resolve_scores` is the one way every command, pipeline and integration gets scores:
read a file (checked against the model and the method) or compute them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError, DataError, ScoresError
from layerif_plugins.scores import LayerScores, ScoreDirection, declare_direction


@dataclass
class ScoringData:
    """Inputs a scorer may use; which ones are required is declared at registration.

    Attributes:
        train / val: the task's training and validation examples (LayerIF).
        calib: calibration examples (OWL, angular distance, Block Influence).
        labels: one class label per ``calib`` example (hidden-state variability).
        pad_id: padding token id used to batch the examples.
    """

    train: Examples | None = None
    val: Examples | None = None
    calib: Examples | None = None
    labels: list[int] | None = None
    pad_id: int = 0

    def fingerprints(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("train", "val", "calib"):
            ex = getattr(self, name)
            if ex is not None:
                out[name] = ex.fingerprint()
        if self.labels is not None:
            out["labels"] = {"n": len(self.labels), "classes": len(set(self.labels))}
        return out


ScorerFn = Callable[..., LayerScores]


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    fn: ScorerFn
    needs: tuple[str, ...] = ()
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    direction: ScoreDirection = ScoreDirection.HIGHER_PRUNES

    def missing(self, data: ScoringData | None) -> list[str]:
        """The declared inputs (``needs``) that ``data`` lacks."""
        return [k for k in self.needs if data is None or getattr(data, k) is None]

    def accepted(self, **candidates: Any) -> dict[str, Any]:
        """The ``candidates`` this scorer names as parameters (e.g. a command's ``batch_size``).

        Lets a command offer its options to any scorer without an if-chain on the method;
        a scorer's ``**kwargs`` accept none of them.
        """
        named = {n for n, p in inspect.signature(self.fn).parameters.items()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
        return {k: v for k, v in candidates.items() if k in named}


SCORERS: dict[str, ScorerSpec] = {}
INPUTS: tuple[str, ...] = ("train", "val", "calib", "labels")


def register_scorer(
    name: str,
    needs: tuple[str, ...] = (),
    description: str = "",
    direction: ScoreDirection = ScoreDirection.HIGHER_PRUNES,
) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register ``fn(model, data, **params) -> LayerScores`` under ``name``.

    ``needs`` names the :class:`ScoringData` inputs the method requires (checked before it
    runs); ``direction`` says what a high score means, and is stamped on every result.
    """
    unknown = [k for k in needs if k not in INPUTS]
    if unknown:
        raise ConfigError(f"scorer {name!r}: unknown inputs {unknown} in needs; choose from {INPUTS}")

    def deco(fn: ScorerFn) -> ScorerFn:
        if name in SCORERS and SCORERS[name].fn is not fn:
            raise ConfigError(f"scorer {name!r} is already registered")
        SCORERS[name] = ScorerSpec(name, fn, tuple(needs), description or (fn.__doc__ or "").strip().split("\n")[0],
                                   direction=ScoreDirection.parse(direction, f"scorer {name!r}"))
        declare_direction(name, SCORERS[name].direction)
        return fn

    return deco


def get_scorer(name: str) -> ScorerSpec:
    if name not in SCORERS:
        raise ConfigError(f"unknown scoring method {name!r}; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def score_layers(model: nn.Module, method: str, data: ScoringData | None = None, **params: Any) -> LayerScores:
    """Score every decoder block of ``model`` with the registered ``method``."""
    spec = get_scorer(method)
    data = data or ScoringData()
    missing = spec.missing(data)
    if missing:
        raise DataError(_missing_message(method, missing))
    scores = spec.fn(model, data, **params)
    if scores.direction is not spec.direction:  # the registry's declaration is the one source
        if scores.higher_is == scores.direction.description:
            scores.higher_is = spec.direction.description
        scores.direction = spec.direction
    return scores


def _missing_message(method: str, missing: list[str]) -> str:
    return f"scoring method {method!r} needs {missing} data; pass it (e.g. --{missing[0]} FILE)"


def resolve_scores(
    model: nn.Module | None,
    method: str | None,
    path: str | Path | None = None,
    data: ScoringData | None = None,
    *,
    role: str = "method",
    **params: Any,
) -> LayerScores:
    """The scores of ``model`` by ``method``: read from ``path`` when given, else computed.

    The one way every command, pipeline and integration gets scores, so the rules are the
    same everywhere:

    * a file is checked against the method first (a file of another method is refused, not
      silently used; ``method=None`` accepts any) and then against the model (fingerprint;
      the differing field is named). ``model=None`` skips the model check, for callers that
      only validate a path before loading the model;
    * without a file the registered scorer runs on ``data`` with ``params``; the inputs it
      declares (``needs=``) must be present, else :class:`DataError` names them and the
      alternative (a scores file).

    ``role`` names what chose ``method`` in error messages (``"allocation"``, ``"--by"`` …).
    """
    if path is not None:
        scores = LayerScores.load(path)
        if method is not None and scores.method != method:
            raise ScoresError(
                f"{path} holds {scores.method!r} scores but {role} is {method!r}; pass a {method!r} scores file "
                f"(`layerif score --method {method}`) or set {role} to {scores.method!r}"
            )
        if model is not None:
            scores.check_model(model)
        return scores
    if method is None:
        raise ConfigError("no scores file and no scoring method: pass a scores file or name a method to compute")
    if model is None:
        raise ConfigError(f"computing {method!r} scores needs the model; pass a model or a scores file")
    missing = get_scorer(method).missing(data)
    if missing:
        raise DataError(f"{method!r} needs --scores FILE (from `layerif score --method {method}`) or the data to "
                        f"compute the scores: {_missing_message(method, missing)}")
    return score_layers(model, method, data, **params)
