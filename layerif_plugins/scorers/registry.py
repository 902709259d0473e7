"""One registry of layer scorers: model + data → :class:`LayerScores`.

Every method (LayerIF and the baselines) is a function registered under a name, with the
inputs it needs declared, so the CLI and the adapters pick methods by name without
if-chains::

    @register_scorer("owl", needs=("calib",))
    def score_owl(model, data: ScoringData, *, m: float = 5.0) -> LayerScores: ...

:func:`resolve_scores` is the one way every command, pipeline and integration gets scores:
read a file (checked against the model and the method) or compute them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError, DataError, ScoresError
from layerif_plugins.scores import LayerScores


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


SCORERS: dict[str, ScorerSpec] = {}


def register_scorer(name: str, needs: tuple[str, ...] = (), description: str = "") -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: register ``fn(model, data, **params) -> LayerScores`` under ``name``."""

    def deco(fn: ScorerFn) -> ScorerFn:
        if name in SCORERS and SCORERS[name].fn is not fn:
            raise ConfigError(f"scorer {name!r} is already registered")
        SCORERS[name] = ScorerSpec(name, fn, needs, description or (fn.__doc__ or "").strip().split("\n")[0])
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
    missing = [k for k in spec.needs if getattr(data, k) is None]
    if missing:
        raise DataError(f"scoring method {method!r} needs {missing} data; pass it (e.g. --{missing[0]} FILE)")
    return spec.fn(model, data, **params)


def resolve_scores(
    model: nn.Module,
    method: str | None,
    path: str | Path | None = None,
    data: ScoringData | None = None,
    **params: Any,
) -> LayerScores:
    """The scores of ``model`` by ``method``: read from ``path`` when given, else computed.

    A file is checked against the model (fingerprint; the differing field is named) and,
    when ``method`` is given, against the method (a file of another method is refused, not
    silently used). Without a file the registered scorer runs on ``data``; the inputs it
    declares (``needs=``) must be present, else :class:`DataError` names the missing one.
    ``method=None`` accepts a file of any method (and needs ``path``).
    """
    if path is not None:
        scores = LayerScores.load(path)
        if method is not None and scores.method != method:
            raise ScoresError(
                f"{path} holds {scores.method!r} scores but {method!r} was asked for; pass a {method!r} scores "
                f"file (`layerif score --method {method}`) or choose {scores.method!r}"
            )
        scores.check_model(model)
        return scores
    if method is None:
        raise ConfigError("no scores file and no scoring method: pass a scores file or name a method to compute")
    return score_layers(model, method, data, **params)
