"""What a demo run does, as data: its tasks, the metrics its report shows, and every setting (:class:`DemoConfig`).

The named configurations (stories260K, SmolLM2-135M) are in
:mod:`layerif_plugins.pipelines.demo_presets`; the steps that read a config are in
:mod:`layerif_plugins.pipelines.demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from layerif_plugins.allocate.layers import DROP_RULES
from layerif_plugins.allocate.sparsity import ALLOCATIONS, default_epsilon
from layerif_plugins.errors import ConfigError

#: the allocations the demo compares by default (each one of :data:`~layerif_plugins.allocate.sparsity.ALLOCATIONS`,
#: the one list of allocation names): the two baselines of the LayerIF paper and LayerIF itself
DEFAULT_ALLOCATIONS: tuple[str, ...] = ("uniform", "owl", "layerif")


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
class QuantizeSpec:
    """One quantized model of the demo: ``WHAT[@SOURCE]``, e.g. ``W8A8``, ``W8A8@wanda50-uniform``, ``mixed-20``.

    ``WHAT`` is one scheme for every decoder Linear (``W8A8``; on a GPU target also ``W4A16``,
    ``W8A16``, ``FP8``) or ``mixed-BITS``: each decoder layer gets a scheme of the target's menu
    (CPU: W8A8 or dense) at a parameter-weighted mean of BITS bits per weight, the layers ordered
    by the scores task's scores (:func:`layerif_plugins.integrations.llmcompressor.quantize.quantize_model`).
    ``SOURCE`` is the label of the model quantized: ``dense`` (the default), a pruned model's
    (``wanda50-uniform``) or a depth-pruned one's (``drop4-angular``).

    Attributes:
        scheme: the one scheme (None for a mixed model).
        budget_bits: the mixed model's mean bits per weight (None for one scheme).
        source: the label of the model quantized.
    """

    scheme: str | None
    budget_bits: float | None
    source: str = "dense"

    @classmethod
    def parse(cls, text: str) -> QuantizeSpec:
        """``"W8A8@wanda50-uniform"`` → ``QuantizeSpec("W8A8", None, "wanda50-uniform")``; bad text: ConfigError."""
        from layerif_plugins.integrations.llmcompressor.schemes import PRESETS

        what, _, source = text.strip().partition("@")
        hint = "give SCHEME[@MODEL] or mixed-BITS[@MODEL], e.g. W8A8, W8A8@wanda50-uniform, mixed-20"
        if source == "" and "@" in text or not what:
            raise ConfigError(f"quantize {text!r}: {hint}")
        if what.lower().startswith("mixed-"):
            try:
                bits = float(what[len("mixed-"):])
            except ValueError:
                raise ConfigError(f"quantize {text!r}: {what[len('mixed-'):]!r} is not a number of bits; "
                                  f"{hint}") from None
            if not 0 < bits:
                raise ConfigError(f"quantize {text!r}: the mean bits per weight must be > 0")
            return cls(None, bits, source or "dense")
        if what not in PRESETS:
            raise ConfigError(f"quantize {text!r}: unknown scheme {what!r} (choose from {', '.join(PRESETS)}); {hint}")
        return cls(what, None, source or "dense")

    @property
    def label(self) -> str:
        """The quantized model's directory / table name: ``w8a8``, ``wanda50-uniform-w8a8``, ``mixed20``."""
        what = self.scheme.lower() if self.scheme else f"mixed{self.budget_bits:g}"
        return what if self.source == "dense" else f"{self.source}-{what}"


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
        quantize: quantized models built after the pruned and dropped ones (llm-compressor ``oneshot`` on the
            first ``n_calib`` calibration examples, saved compressed; :class:`QuantizeSpec` texts such as
            ``W8A8``, ``W8A8@wanda50-uniform``, ``mixed-20``), evaluated and served beside the others.
        quantize_target: where vLLM will serve them (``cpu``: W8A8 or dense; ``gpu``: also W4A16, W8A16, FP8);
            a scheme that target cannot serve is refused before any work.
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
    allocations: tuple[str, ...] = DEFAULT_ALLOCATIONS
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
    quantize: tuple[str, ...] = ()
    quantize_target: Literal["cpu", "gpu"] = "cpu"
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
        unknown = [a for a in self.allocations if a not in ALLOCATIONS]
        if unknown:
            raise ConfigError(f"allocations {unknown}: choose from {', '.join(ALLOCATIONS)}")
        if self.depth_methods and self.depth_k < 1:
            raise ConfigError(f"depth_k must be >= 1 (blocks to drop), got {self.depth_k}")
        unknown = [m for m in self.depth_methods if m not in DROP_RULES]
        if unknown:
            raise ConfigError(f"depth methods {unknown}: choose from {', '.join(DROP_RULES)}")
        self.quantize_specs  # noqa: B018  (parses and checks every quantize entry now)

    @property
    def quantize_specs(self) -> tuple[QuantizeSpec, ...]:
        """The parsed :attr:`quantize` entries, checked: servable on the target, distinct, of models the run makes."""
        if not self.quantize:
            return ()
        from layerif_plugins.integrations.llmcompressor.quantize import check_device_target, check_servable, menu_for

        specs = tuple(QuantizeSpec.parse(q) for q in self.quantize)
        check_device_target(self.quantize_target)
        cheapest = menu_for(self.quantize_target, 32)[0]
        labels = [q.label for q in specs]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"quantize {list(self.quantize)}: the same model is named twice")
        sources = {"dense", *self.model_labels}
        for spec in specs:
            if spec.scheme is not None:
                check_servable([spec.scheme], self.quantize_target)
            if spec.budget_bits is not None and spec.budget_bits <= float(cheapest.bits):
                raise ConfigError(f"quantize mixed-{spec.budget_bits:g}: at most the cheapest scheme of the "
                                  f"{self.quantize_target} menu ({cheapest.name}, {float(cheapest.bits):g} bits) "
                                  f"everywhere; use {cheapest.name} for that, or more bits for a mix")
            if spec.source not in sources:
                raise ConfigError(f"quantize {spec.source!r}: this run makes no model of that name; quantize one of "
                                  f"{', '.join(sorted(sources))}")
        return specs

    @property
    def model_labels(self) -> tuple[str, ...]:
        """The pruned and depth-pruned models this run makes (``wanda50-uniform``, ``drop4-angular``), in order."""
        pruned = () if self.skip_prune else tuple(model_label(s, a) for s in self.sparsities for a in self.allocations)
        return (*pruned, *(depth_label(self.depth_k, m) for m in self.depth_methods))

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


def model_label(sparsity: float, allocation: str) -> str:
    """The directory / table name of one pruned model: ``wanda70-layerif``."""
    return f"wanda{round(100 * sparsity)}-{allocation}"


def depth_label(k: int, method: str) -> str:
    """The directory / table name of one depth-pruned model: ``drop1-angular``."""
    return f"drop{k}-{method}"


def parse_sparsities(spec: str) -> tuple[float, ...]:
    """``"0.3,0.5,0.7"`` → ``(0.3, 0.5, 0.7)`` (sorted, distinct); a bad value raises :class:`ConfigError`."""
    try:
        values = sorted({float(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7") from None
    if not values or not all(0 < v < 1 for v in values):
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7")
    return tuple(values)



__all__ = ["DEFAULT_ALLOCATIONS", "DemoConfig", "DemoTask", "MetricView", "QuantizeSpec", "depth_label", "model_label",
           "parse_sparsities"]
