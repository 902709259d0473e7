"""A demo run's record: stage timings, progress lines, the result the report reads, and the models' names."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerif_plugins.pipelines.demo_config import DemoConfig, depth_label, model_label
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)


class StageClock:
    """Wall time per named stage (a stage may be entered several times; its times add up)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def done(self, stage: str) -> float:
        """Charge the time since the previous ``done`` to ``stage``; returns the total so far."""
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now
        return now - self.t0

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


Progress = Callable[[float, str], None]



def log_progress(elapsed: float, message: str) -> None:
    """The default :data:`Progress`: one INFO record per line (the CLI prints them instead)."""
    logger.info("[demo %6.1fs] %s", elapsed, message)


@dataclass
class DemoResult:
    """What a demo run produced, for the report.

    Attributes:
        config: the run's settings; out: its output directory.
        hf_dir: the converted dense model; n_layers / n_params: its size.
        scores: per task name, in config order.
        prune: per pruned-model label (``wanda70-layerif``), ``prune_model``'s report plus
            ``label`` / ``alloc`` / ``sparsity``.
        evals: per model label (``dense`` first), the lm-eval result.
        extra: per model label, the ``sparsity`` measured in the saved weights and the ``vLLM dir`` check
            (and ``dropped`` layers for a depth-pruned model).
        depth: per depth-pruned model label (``drop1-angular``): ``method``, ``dropped``, ``layers`` left.
        quantized: per quantized model label (``w8a8``, ``mixed20``): ``quantize_model``'s report plus ``label``
            and ``source`` (the model it quantized).
        serve: the vLLM section: ``models`` (per label: HF and vLLM perplexity, generation tokens/s),
            ``device``, ``versions``, or ``skipped`` with the reason.
        clock: stage timings (the report adds its own stage).
    """

    config: DemoConfig
    out: Path
    hf_dir: Path
    n_layers: int
    n_params: int
    scores: dict[str, LayerScores]
    prune: dict[str, dict[str, Any]]
    evals: dict[str, Any]
    extra: dict[str, dict[str, object]]
    depth: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    clock: StageClock = field(default_factory=StageClock)

    def by_allocation(self, task: str, metric: str) -> dict[str, dict[float, float]]:
        """``{allocation: {sparsity: value}}``, the dense model at sparsity 0 in every row."""
        out: dict[str, dict[float, float]] = {}
        for label, rep in self.prune.items():
            out.setdefault(rep["alloc"], {0.0: self.evals["dense"].metric(task, metric)})
            out[rep["alloc"]][rep["sparsity"]] = self.evals[label].metric(task, metric)
        return out


def steps(config: DemoConfig) -> list[str]:
    """The pipeline's steps for ``config``, in order (what a run does, without running it)."""
    out = ["convert"]
    out += [f"score {config.method} on {t.name}" for t in config.tasks]
    pruned = [] if config.skip_prune else [model_label(s, a) for s in config.sparsities for a in config.allocations]
    dropped = [depth_label(config.depth_k, m) for m in config.depth_methods]
    quantized = [q.label for q in config.quantize_specs]
    out += [f"prune {label}" for label in pruned] + [f"drop {label}" for label in dropped]
    out += [f"quantize {label}" for label in quantized]
    labels = ["dense", *pruned, *dropped, *quantized]
    out += [f"evaluate {label}" for label in labels]
    if config.vllm_check:
        out += [f"vLLM dir check {label}" for label in labels]
    if config.vllm_serve:
        out += [f"vLLM serve {label}" for label in labels]
    return out



__all__ = ["DemoResult", "Progress", "StageClock", "depth_label", "log_progress", "model_label", "steps"]
