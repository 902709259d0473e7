"""``AllocationPlan``: the per-layer sparsity a prune will use, with how it was chosen — a JSON file.

Why a file: planning is the expensive, judgment-laden step (tens of pruning passes for a
search); pruning with its result is one ``oneshot``. A plan is saved beside the scores
file, reviewed, and read by the modifiers (``plan: plan.json``) or ``layerif prune --plan``,
which then only set the per-layer ``sparsity`` and hooks. Like a scores file it carries
the model's fingerprint, and it is refused for another model, target or algorithm,
naming the field that differs.
"""

from __future__ import annotations

import hashlib
import math
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.errors import AllocationError
from layerif_plugins.io import atomic_write_json, read_json_object
from layerif_plugins.models import fingerprint
from layerif_plugins.models.fingerprint import ModelFingerprint, same_weights
from layerif_plugins.scores import library_versions

PLAN_FORMAT_VERSION = 1
PLAN_KIND = "layerif-allocation-plan"


def cpu_identity() -> dict[str, str]:
    """The CPU as torch's kernels see it: model name, the vector capability torch dispatches to and a
    digest of the instruction-set flags (Linux ``/proc/cpuinfo``; elsewhere the first two only).

    Why: an unchanged SparseGPT plan — same data, library versions and thread count — made another
    model on another machine (SmolLM2-135M at 70 %, the uniform list: TinyStories test perplexity
    107.07 on one, 141.37 on the other; docs/quality.md §0).
    """
    info = {"model": platform.processor() or platform.machine(),
            "capability": str(torch.backends.cpu.get_cpu_capability())}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return info
    fields: dict[str, str] = {}
    for line in lines:  # one block per logical CPU: the first one's values
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        info["model"] = fields["model name"]
    if "flags" in fields:
        info["flags_sha256"] = hashlib.sha256(" ".join(sorted(fields["flags"].split())).encode()).hexdigest()[:16]
    return info


def search_numerics() -> dict[str, Any]:
    """What the judged models depend on besides model, data and plan: the CPU thread count and the CPU.

    Why: SparseGPT's masks and weight updates follow the float order of its Hessian sums and
    matrix products, which changes with ``torch.get_num_threads()`` and with the CPU's kernels. On
    SmolLM2-135M at 70 % the same per-layer list and calibration gave WikiText-2 test perplexity 248.8
    at 1 thread and 262.5 at 2 (uniform), 196.5 / 246.1 (AlphaPruning's list); TinyStories: the
    planner's chosen list 60.8 / 73.7, the uniform list 107.07 / 141.37 on two machines at one thread
    (docs/quality.md §0). Wanda's did not move (within 1e-5 relative).
    """
    return {"torch_threads": torch.get_num_threads(), "cpu": cpu_identity()}


@dataclass
class AllocationPlan:
    """Per-decoder-layer sparsity for one model, algorithm and target, and the search behind it.

    Attributes:
        layer_sparsity: one sparsity per decoder block (layer 0 first); their
            parameter-weighted mean is ``target``.
        target: the global sparsity the plan was made for.
        algorithm: ``wanda`` | ``sparsegpt`` (the pruner the candidates were judged with).
        allocation: what was asked (``uniform``, ``atp``, ``owl``, ``alpha_hill``, ``layerif``,
            ``depth_ramp``, ``sensitivity``, ``auto``).
        chosen: the winning candidate: ``provider``, ``knobs`` (β, ε, λ, M, invert, …) and its index.
        model: the fingerprint of the model (refused for another).
        params_per_layer: prunable parameters per block (the weights of the mean).
        candidates: every candidate tried, with its held-out loss and paired difference to uniform.
        decision: the rule and the reasons, step by step.
        cost: seconds, pruning passes, resumed candidates, the budget.
        scores: the scores file(s) behind score-mapped candidates (path, method, direction).
        data: fingerprints of the calibration and held-out examples.
        extras: e.g. the sensitivity table.
        numerics: the torch thread count and the CPU of the search (``search_numerics``); a SparseGPT
            plan applied at another count or on another CPU makes another model than the one judged (a warning).
    """

    layer_sparsity: list[float]
    target: float
    algorithm: str
    allocation: str
    chosen: dict[str, Any]
    model: ModelFingerprint
    params_per_layer: list[int]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    decision: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    numerics: dict[str, Any] = field(default_factory=search_numerics)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    format_version: int = PLAN_FORMAT_VERSION
    _source: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        where = f"{self._source}: " if self._source else ""
        values = self.layer_sparsity
        if not isinstance(values, list) or not values or any(
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v < 1
                for v in values):
            raise AllocationError(f"{where}layer_sparsity must be a non-empty list of numbers in [0, 1), "
                                  f"got {values!r}")
        if len(values) != self.model.num_layers:
            raise AllocationError(f"{where}{len(values)} per-layer sparsities for a model with "
                                  f"{self.model.num_layers} decoder layers")
        if len(self.params_per_layer) != len(values):
            raise AllocationError(f"{where}{len(self.params_per_layer)} parameter counts for {len(values)} layers")
        mean = sum(s * p for s, p in zip(values, self.params_per_layer, strict=True)) / sum(self.params_per_layer)
        if abs(mean - self.target) > 1e-6:
            raise AllocationError(f"{where}per-layer sparsities average {mean:.6f} (parameter-weighted), not the "
                                  f"plan's target {self.target}; the file was edited or is corrupt: make a new plan")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PLAN_KIND,
            "format_version": self.format_version,
            "algorithm": self.algorithm,
            "target": self.target,
            "allocation": self.allocation,
            "chosen": self.chosen,
            "layer_sparsity": self.layer_sparsity,
            "params_per_layer": self.params_per_layer,
            "model": self.model.to_dict(),
            "decision": self.decision,
            "cost": self.cost,
            "scores": self.scores,
            "data": self.data,
            "options": self.options,
            "candidates": self.candidates,
            "extras": self.extras,
            "versions": self.versions,
            "numerics": self.numerics,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> AllocationPlan:
        if d.get("kind") != PLAN_KIND:
            raise AllocationError(f"{source}: not an allocation plan (kind {d.get('kind')!r}); make one with "
                                  "`layerif plan` or `layerif prune --save-plan`")
        if d.get("format_version") != PLAN_FORMAT_VERSION:
            raise AllocationError(f"{source}: plan format_version {d.get('format_version')!r} is not supported "
                                  f"(this library reads {PLAN_FORMAT_VERSION}); make a new plan")
        missing = [k for k in ("algorithm", "target", "allocation", "layer_sparsity", "params_per_layer", "model")
                   if k not in d]
        if missing:
            raise AllocationError(f"{source}: allocation plan is missing {missing}")
        try:
            model = ModelFingerprint.from_dict(d["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AllocationError(f"{source}: malformed model fingerprint ({exc})") from exc
        target = d["target"]
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target < 1:
            raise AllocationError(f"{source}: target must be a number in (0, 1), got {target!r}")
        params = d["params_per_layer"]
        if not isinstance(params, list) or any(isinstance(p, bool) or not isinstance(p, int) or p <= 0 for p in params):
            raise AllocationError(f"{source}: params_per_layer must be a list of positive integers")
        return cls(layer_sparsity=d["layer_sparsity"], target=float(target), algorithm=str(d["algorithm"]),
                   allocation=str(d["allocation"]), chosen=d.get("chosen") or {}, model=model,
                   params_per_layer=params, candidates=d.get("candidates") or [], decision=d.get("decision") or {},
                   cost=d.get("cost") or {}, scores=d.get("scores") or {}, data=d.get("data") or {},
                   options=d.get("options") or {}, extras=d.get("extras") or {}, versions=d.get("versions") or {},
                   numerics=d.get("numerics") or {}, created=d.get("created", ""), _source=source)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> AllocationPlan:
        d = read_json_object(path, "allocation plan", AllocationError, "make one with `layerif plan` (or drop `plan`)")
        return cls.from_dict(d, source=str(path))

    # ------------------------------------------------------------------ checks

    def check(self, model: nn.Module | None = None, *, target: float | None = None, algorithm: str | None = None,
              params_per_layer: list[int] | None = None) -> None:
        """Refuse a plan made for another model, target, algorithm or set of pruned modules, naming the field."""
        where = self._source or "allocation plan"
        if model is not None:
            other = fingerprint(model)
            for name in ModelFingerprint.MATCH_FIELDS:
                mine, theirs = getattr(self.model, name), getattr(other, name)
                if mine != theirs:
                    raise AllocationError(
                        f"{where} was made for another model: {name} is {mine!r} in the plan (model "
                        f"{self.model.name_or_path!r}) but {theirs!r} in the model it is applied to; make a new "
                        "plan for this model")
            if same_weights(self.model.weights, other.weights) is False:
                raise AllocationError(
                    f"{where} was made for other weights: weights {self.model.weights} in the plan but "
                    f"{other.weights} in the model it is applied to (same config, other checkpoint); make a new "
                    "plan for these weights")
        if target is not None and abs(float(target) - self.target) > 1e-9:
            raise AllocationError(f"{where} was made for target sparsity {self.target}, not {target}; make a new "
                                  "plan or set sparsity to the plan's target")
        if algorithm is not None and algorithm != self.algorithm:
            raise AllocationError(f"{where} was made for algorithm {self.algorithm!r}, not {algorithm!r}: its "
                                  "candidates were judged with that pruner; make a new plan")
        if params_per_layer is not None and list(params_per_layer) != list(self.params_per_layer):
            raise AllocationError(f"{where} was made for other prunable modules (parameters per layer "
                                  f"{self.params_per_layer[:3]}… vs {list(params_per_layer)[:3]}…): targets/ignore "
                                  "differ; make a new plan with the same targets and ignore")

    def numerics_warning(self) -> str | None:
        """Why this process will not remake the models a SparseGPT search judged, or ``None``.

        Only searched SparseGPT plans (Wanda's masks do not move with the summation order), and
        only what the plan recorded: the thread count (plans since 2026-12-05), the CPU (since 2026-12-06).
        """
        if self.algorithm != "sparsegpt" or not self.candidates:
            return None
        here = search_numerics()
        threads, cpu = self.numerics.get("torch_threads"), self.numerics.get("cpu") or {}
        reasons, remedies = [], []
        if threads is not None and threads != here["torch_threads"]:
            reasons.append(f"was searched with {threads} torch thread(s) and is applied with {here['torch_threads']}")
            remedies.append(f"torch.set_num_threads({threads}) remakes it")
        differing = [f"{key} {value!r} vs {here['cpu'].get(key)!r}" for key, value in cpu.items()
                     if key in here["cpu"] and value != here["cpu"][key]]
        if differing:
            reasons.append(f"was searched on another CPU ({'; '.join(differing)})")
            remedies.append("search again on this machine, or ship the model the search saved")
        if not reasons:
            return None
        return (f"{self._source or 'allocation plan'} {' and '.join(reasons)}: SparseGPT's result follows the "
                "float order of its sums, so the pruned model will differ from the candidate the search judged (on "
                "SmolLM2-135M at 70 % the test perplexity of one list moved by up to 27 % between 1 and 2 threads, "
                f"and by 32 % between two machines); {', or '.join(remedies)}")


__all__ = ["PLAN_FORMAT_VERSION", "AllocationPlan", "cpu_identity", "search_numerics"]
