"""``LayerScores``: the one interchange file between scorers and adapters.

A versioned JSON document: per-layer scores (layer 0 first; higher = less well-trained
layer = more sparsity / more experts), the method and its parameters, fingerprints of
the model and the data, optional per-module and per-example detail, library versions
and a creation time. Scores are expensive and reusable: compute once, allocate many
times. :meth:`LayerScores.check_model` refuses a file computed for another model and
names the field that differs.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from layerif_plugins.errors import ScoresError
from layerif_plugins.io import atomic_write_json
from layerif_plugins.models import ModelFingerprint, fingerprint

FORMAT_VERSION = 1
_VERSIONED_PACKAGES = ("layerif-plugins", "torch", "transformers", "llmcompressor", "peft", "lm_eval")


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
        higher_is: what a high score means; allocation treats the higher score as the
            layer that should receive more sparsity / more experts.
    """

    scores: list[float]
    method: str
    model: ModelFingerprint
    params: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    per_module: dict[str, float] | None = None
    per_example: list[list[float]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    higher_is: str = "less well-trained (more sparsity, more experts)"
    versions: dict[str, str] = field(default_factory=library_versions)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.scores = [float(s) for s in self.scores]
        if len(self.scores) != self.model.num_layers:
            raise ScoresError(
                f"{len(self.scores)} scores for a model with {self.model.num_layers} decoder layers"
            )
        bad = [i for i, s in enumerate(self.scores) if not math.isfinite(s)]
        if bad:
            raise ScoresError(f"non-finite scores at layers {bad}: {[self.scores[i] for i in bad]}")

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
        except (KeyError, TypeError) as exc:
            raise ScoresError(f"{source}: malformed model fingerprint ({exc})") from exc
        return cls(
            scores=list(d["scores"]),
            method=str(d["method"]),
            model=model,
            params=d.get("params") or {},
            data=d.get("data") or {},
            per_module=d.get("per_module"),
            per_example=d.get("per_example"),
            extras=d.get("extras") or {},
            higher_is=d.get("higher_is", cls.higher_is),
            versions=d.get("versions") or {},
            created=d.get("created", ""),
            format_version=version,
        )

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LayerScores:
        path = Path(path)
        if not path.is_file():
            raise ScoresError(f"scores file not found: {path}; compute one with `layerif score`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ScoresError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        if not isinstance(d, dict):
            raise ScoresError(f"{path}: not a LayerScores file (top level is {type(d).__name__})")
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------------ validation

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ScoresError` naming the first fingerprint field that differs."""
        self.check_fingerprint(fingerprint(model))

    def check_fingerprint(self, other: ModelFingerprint) -> None:
        for name in ModelFingerprint.MATCH_FIELDS:
            mine, theirs = getattr(self.model, name), getattr(other, name)
            if mine != theirs:
                raise ScoresError(
                    f"scores file was computed for another model: {name} is {mine!r} in the scores "
                    f"(model {self.model.name_or_path!r}) but {theirs!r} in the model it is applied to "
                    f"({other.name_or_path!r}). Recompute the scores on this model with `layerif score`."
                )

    def table(self) -> str:
        """A small markdown table (layer, score, rank; rank 1 = highest score)."""
        order = sorted(range(self.num_layers), key=lambda i: -self.scores[i])
        rank = {layer: r + 1 for r, layer in enumerate(order)}
        rows = ["| layer | score | rank |", "|---:|---:|---:|"]
        rows += [f"| {i} | {s:.6g} | {rank[i]} |" for i, s in enumerate(self.scores)]
        return "\n".join(rows)
