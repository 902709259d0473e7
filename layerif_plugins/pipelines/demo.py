"""The demo pipeline: convert → score per task → prune per (sparsity × allocation) → drop → quantize → evaluate → vLLM.

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

This module runs the steps in order; the pieces live in one module each:
:mod:`~layerif_plugins.pipelines.demo_config` (the settings), :mod:`~layerif_plugins.pipelines.demo_presets`
(stories260K, SmolLM2), :mod:`~layerif_plugins.pipelines.demo_models` (scores, pruned and dropped models),
:mod:`~layerif_plugins.pipelines.demo_eval` (held-out data, lm-eval, vLLM) and
:mod:`~layerif_plugins.pipelines.demo_result` (timings and the result). While it runs, host libraries'
logs go to ``log_dir/libraries.log`` (:func:`layerif_plugins.console.host_output`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from layerif_plugins.allocate.sparsity import ALLOCATIONS
from layerif_plugins.console import host_output
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import check_out_dir, check_readable, is_own_output, mark_output, replacing
from layerif_plugins.paths import shared_dir
from layerif_plugins.pipelines.demo_config import (
    DEFAULT_ALLOCATIONS,
    DemoConfig,
    DemoTask,
    MetricView,
    parse_sparsities,
)
from layerif_plugins.pipelines.demo_eval import evaluate_all, serve_all, vllm_status, write_heldout
from layerif_plugins.pipelines.demo_models import drop_all, prune_all, quantize_all, score_tasks
from layerif_plugins.pipelines.demo_presets import CONFIGS, config_for, smollm2_config, stories260k_config
from layerif_plugins.pipelines.demo_result import (
    DemoResult,
    Progress,
    StageClock,
    depth_label,
    log_progress,
    model_label,
    steps,
)
from layerif_plugins.pipelines.resume import same_weights

#: the log of host libraries (llm-compressor, transformers, torch ...) under ``DemoConfig.log_dir``
LIBRARY_LOG = "libraries.log"


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


def run_demo(config: DemoConfig, out: str | Path, progress: Progress = log_progress) -> DemoResult:
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
        logs = host_output(config.log_dir / LIBRARY_LOG) if config.log_dir is not None else nullcontext()
        with replacing(out), logs:  # its model directories are our own outputs, remade when their settings changed
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
    quantized = quantize_all(models, config, out, clock, progress, reused)
    models.update({label: Path(r["out"]) for label, r in quantized.items()})
    heldout = write_heldout(config, out)
    evals = evaluate_all(models, heldout, config, out, clock, progress, reused)

    measured = {"dense": 0.0, **{label: rep["weighted_mean_measured"] for label, rep in reports.items()}}
    extra: dict[str, dict[str, object]] = {label: {"sparsity": measured.get(label, 0.0)} for label in models}
    for label, rep in depth.items():
        extra[label]["dropped"] = str(rep["dropped"])
    for label, rep in quantized.items():
        extra[label].update(sparsity=measured.get(rep["source"], 0.0), scheme="/".join(dict.fromkeys(rep["schemes"])),
                            bits=round(rep["mean_bits"], 2))
        if rep["source"] in depth:
            extra[label]["dropped"] = str(depth[rep["source"]]["dropped"])
    if config.vllm_check:
        for label, path in models.items():
            extra[label]["vLLM dir"] = vllm_status(path)
        clock.done("vLLM dir checks")
    serve = serve_all(models, heldout[config.tasks[0].name], config, clock, progress) if config.vllm_serve else {}
    return DemoResult(config=config, out=out, hf_dir=hf_dir, n_layers=model.config.num_hidden_layers,
                      n_params=sum(p.numel() for p in model.parameters()), scores=scores, prune=reports,
                      evals=evals, extra=extra, depth=depth, quantized=quantized, serve=serve, clock=clock)


__all__ = [
    "ALLOCATIONS", "CONFIGS", "DEFAULT_ALLOCATIONS", "LIBRARY_LOG", "DemoConfig", "DemoResult", "DemoTask",
    "MetricView", "Progress", "StageClock", "config_for", "depth_label", "drop_all", "evaluate_all", "model_label",
    "parse_sparsities", "prepare_out", "prune_all", "quantize_all", "run_demo", "score_tasks", "serve_all",
    "smollm2_config", "steps", "stories260k_config", "vllm_status", "write_heldout",
]
