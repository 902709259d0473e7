"""The demo's report: ``report.md`` (prose and tables), its PNG plots and ``summary.json``.

Everything here reads one :class:`~layerif_plugins.pipelines.demo_result.DemoResult`; the words
that depend on the model and the tasks come from its :class:`DemoConfig`, so a new demo
configuration gets a matching report without new code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from layerif_plugins.io import atomic_write_text
from layerif_plugins.pipelines.demo_result import DemoResult
from layerif_plugins.report import (
    allocations_markdown,
    eval_markdown,
    markdown_table,
    plot_allocations,
    plot_layer_scores,
    plot_metric,
    plot_sweep,
    scores_markdown,
    sweep_markdown,
)

#: how the report names each allocation of :data:`~layerif_plugins.allocate.sparsity.ALLOCATIONS`
ALLOCATION_NAMES = {"uniform": "uniform", "owl": "OWL", "layerif": "LayerIF", "alpha_hill": "AlphaPruning",
                    "depth_ramp": "depth ramp"}


def write_plots(result: DemoResult) -> dict[str, Path]:
    """The PNGs under ``result.out``: per-layer scores, one sweep per plotted metric, per-layer sparsity."""
    config, out = result.config, result.out
    pngs = {"scores": plot_layer_scores(list(result.scores.values()), list(result.scores), out / "layer_scores.png")}
    if not result.prune:
        first = config.metrics[0]
        pngs[first.key or first.metric] = plot_metric(
            {k: r.metric(first.task, first.metric) for k, r in result.evals.items()}, out / (first.plot or "eval.png"),
            f"{config.tasks[0].label} {first.metric.replace('_', ' ')}", first.metric.replace("_", " "))
        return pngs
    for view in config.metrics:
        if view.plot:
            pngs[view.key] = plot_sweep(
                {a: list(v.items()) for a, v in result.by_allocation(view.task, view.metric).items()},
                out / view.plot, view.title, "target sparsity", view.ylabel, logy=view.logy,
                reference=view.reference, reference_label=view.reference_label)
    top = max(rep["sparsity"] for rep in result.prune.values())
    pngs["per-layer sparsity"] = plot_allocations(
        {rep["alloc"]: [row["target"] for row in rep["layers"]] for rep in result.prune.values()
         if rep["sparsity"] == top},
        out / "sparsity.png", f"Wanda {top:.0%}: per-layer sparsity by allocation")
    return pngs


def _scores_section(result: DemoResult, png: Path) -> list[str]:
    config, scores = result.config, result.scores
    return [
        "## 1. LayerIF scores",
        "",
        f"LayerIF ({config.params} projections), {config.n_train} train / {config.n_val} validation examples per "
        f"task, {config.max_length} tokens max. Higher score = less well-trained layer for that task "
        "(gets more sparsity / more LoRA experts).",
        "",
        scores_markdown(list(scores.values()), list(scores)),
        "",
        f"![per-layer scores]({png.name})",
        "",
        "Mean validation loss: " + ", ".join(f"{lab} {s.extras['mean_val_loss']:.3f}" for lab, s in scores.items()),
        "",
    ]


def _pruning_section(result: DemoResult, pngs: dict[str, Path]) -> list[str]:
    config = result.config
    names = " vs ".join(ALLOCATION_NAMES.get(a, a) for a in config.allocations)
    targets = {f"{rep['alloc']} {rep['sparsity']:.0%}": [row["target"] for row in rep["layers"]]
               for rep in result.prune.values()}
    spreads = []
    if "owl" in config.allocations:
        spreads.append(f"OWL: outlier ratios (M = 5, λ = {config.spread('owl')})")
    if config.method in config.allocations:
        spreads.append(f"LayerIF: the {config.scores_task.label} scores above mapped into [1−ε, 1+ε]·target, "
                       f"ε = {config.spread(config.method)}")
    lines = [
        f"## 2. Wanda pruning: {names} per-layer sparsity",
        "",
        f"llm-compressor `oneshot` with Wanda, {config.n_calib} {config.calib_label} calibration examples; each "
        "target is the parameter-weighted mean sparsity of the decoder blocks (embeddings and lm_head stay dense). "
        + "".join(f"{s}; " for s in spreads[:-1]) + (f"{spreads[-1]}. " if spreads else "")
        + "Sparsity 0% is the dense model. Best per column in bold. "
        "Wanda zeroes int(columns × s) weights per row, so the measured sparsity (section 3) can fall a little "
        "below the target, by different amounts for different allocations: compare with it.",
        "",
    ]
    for view in config.metrics:
        lines += [view.caption, "",
                  sweep_markdown(result.by_allocation(view.task, view.metric), lower_is_better=view.lower_is_better,
                                 first="allocation"),
                  ""]
    images = [f"![{v.alt}]({pngs[v.key].name})" for v in config.metrics if v.plot]
    if images:
        lines += [" ".join(images), ""]
    return lines + [
        "Per-layer target sparsity of every run:",
        "",
        allocations_markdown(targets),
        "",
        f"![per-layer sparsity]({pngs['per-layer sparsity'].name})",
        "",
    ]


def _depth_section(result: DemoResult) -> list[str]:
    config = result.config
    header = ["model", "method", "dropped", "layers", *(f"{v.task} {v.metric}" for v in config.metrics)]
    rows: list[list[object]] = [["dense", "–", "–", result.n_layers,
                                 *(result.evals["dense"].metric(v.task, v.metric) for v in config.metrics)]]
    for label, rep in result.depth.items():
        rows.append([label, rep["method"], str(rep["dropped"]), rep["layers"],
                     *(result.evals[label].metric(v.task, v.metric) for v in config.metrics)])
    return [
        f"## Depth pruning: {config.depth_k} of {result.n_layers} decoder layers dropped",
        "",
        "Each method names the blocks to remove (`layers_to_drop`: the contiguous block of smallest angular "
        f"distance, the highest redundancy scores, or the last layers); {config.method} reuses the "
        f"{config.scores_task.label} scores of section 1, the other scorers use the {config.calib_label} "
        "calibration examples. No healing.",
        "",
        markdown_table(header, rows),
        "",
    ]


def _quantize_section(result: DemoResult) -> list[str]:
    config = result.config
    header = ["model", "quantized", "scheme per layer", "mean bits", "MiB", *(f"{v.task} {v.metric}"
                                                                           for v in config.metrics)]
    rows = []
    for label, rep in result.quantized.items():
        layers = ", ".join(f"{name} {rep['schemes'].count(name)}" for name in dict.fromkeys(rep["schemes"]))
        rows.append([label, rep["source"], layers, f"{rep['mean_bits']:.2f}", f"{rep['bytes_on_disk'] / 2**20:.1f}",
                     *(result.evals[label].metric(v.task, v.metric) for v in config.metrics)])
    return [
        "## Quantization (llm-compressor, saved compressed)",
        "",
        f"`quantize_model` (one `oneshot` on the first {config.n_calib} {config.calib_label} examples; "
        f"vLLM target: {config.quantize_target}). A mixed model gives each decoder layer a scheme of that "
        f"target's menu at the stated mean bits per weight, the layers ordered by the {config.scores_task.label} "
        f"{config.method} scores of section 1 (more bits to the layers they call less well-trained). "
        "`scheme per layer`: decoder layers per scheme. The HF evaluator's perplexity of a W8A8 layer uses "
        "its dequantized weights only (vLLM also quantizes the inputs; see the vLLM section).",
        "",
        markdown_table(header, rows),
        "",
    ]


def _vllm_section(result: DemoResult) -> list[str]:
    serve, config = result.serve, result.config
    if "skipped" in serve:
        return ["## vLLM serving", "", f"Skipped: {serve['skipped']}", ""]
    rows = serve["models"]
    dense = rows.get("dense", {}).get("gen_tokens_per_s") or 0.0

    def mib(r: dict[str, Any]) -> str:  # an earlier run's summary may not have the bytes
        return f"{r['bytes_on_disk'] / 2**20:.1f}" if r.get("bytes_on_disk") is not None else "–"

    scheme = {label: str(x.get("scheme", "dense")) for label, x in result.extra.items()}
    table = [[label, scheme.get(label, "dense"), r["layers"], mib(r), f"{r['hf_token_perplexity']:.4f}",
              f"{r['vllm_token_perplexity']:.4f}", f"{r['relative_difference']:.1e}", f"{r['gen_tokens_per_s']:.0f}",
              f"{r['gen_tokens_per_s'] / dense:.2f}×" if dense else "–"] for label, r in rows.items()]
    w8a8 = ("" if not result.quantized else
            " W8A8 layers in vLLM also quantize every Linear's input per token to int8, which the HF evaluator's load "
            "of the checkpoint does not: their two perplexities differ by that, not by a bug "
            "(docs/validation.md).")
    versions = ", ".join(f"{k} {v}" for k, v in serve.get("versions", {}).items())
    return [
        "## vLLM serving",
        "",
        f"Every saved directory served by vLLM ({serve['device']}; {versions}) in one worker process. Token "
        f"perplexity on the first {serve['docs']} held-out {config.tasks[0].label} documents with the same rolling "
        f"windows (context {serve['context']}) from vLLM's prompt log-probabilities and from the project's HF "
        f"evaluator; generation: {serve['prompts']} prompts × {serve['max_tokens']} greedy tokens (tokens/s, and "
        "relative to the dense model: what depth pruning and quantization buy at serving time; unstructured "
        f"sparsity buys none with dense kernels). MiB: the safetensors on disk.{w8a8}",
        "",
        markdown_table(["model", "scheme", "layers", "MiB", "HF ppl", "vLLM ppl", "rel. diff.", "gen tok/s",
                        "vs dense"], table),
        "",
    ]


def _evaluation_section(result: DemoResult, pngs: dict[str, Path]) -> list[str]:
    config = result.config
    sources = " and ".join(f"{config.n_eval_docs} {t.heldout}" for t in config.tasks)
    mc = "".join(f", and `{t.mc_name.replace('_', '-')}` ({config.n_mc} items: the true next sentence among 4) "
                 "built from other held-out stories" for t in config.tasks if t.mc)
    checks = ("; `vLLM dir` is the CPU-side check that vLLM can load the saved directory" if config.vllm_check
              else "")
    lines = [
        "## 3. All evaluations (lm-eval, held-out data)",
        "",
        "`lm_eval.simple_evaluate` (hf backend) on local tasks written by `layerif_plugins.integrations.lm_eval`: "
        f"rolling log-likelihood on {sources}{mc}. `sparsity` is measured in the saved weights{checks}.",
        "",
        eval_markdown(result.evals, metrics=list(config.table_metrics), extra=result.extra),
        "",
    ]
    if not result.prune:
        first = config.metrics[0]
        key = first.key or first.metric
        lines += [f"![{first.alt or key}]({pngs[key].name})", ""]
    return lines


def write_report(result: DemoResult) -> Path:
    """Write the plots, ``report.md`` and ``summary.json`` under ``result.out``; returns the report's path.

    The plots are timed as the ``report`` stage, so the report's time table includes them.
    """
    config, out, clock = result.config, result.out, result.clock
    pngs = write_plots(result)
    clock.done("report")
    lines = [
        f"# LayerIF demo: {config.title}",
        "",
        f"Model: `{config.model}` ({result.n_layers} decoder layers, {result.n_params:,} parameters), converted to "
        f"`{result.hf_dir}`. Generated by `layerif demo` in {clock.total:.0f} s.",
        "",
        *_scores_section(result, pngs["scores"]),
    ]
    if result.prune:
        lines += _pruning_section(result, pngs)
    if result.depth:
        lines += _depth_section(result)
    if result.quantized:
        lines += _quantize_section(result)
    lines += _evaluation_section(result, pngs)
    if result.serve:
        lines += _vllm_section(result)
    lines += [
        "## Time",
        "",
        markdown_table(["stage", "seconds"], [[k, round(v, 1)] for k, v in clock.stages.items()]),
        "",
        f"Total time: {clock.total:.1f} s (torch threads: {config.threads}).",
        "",
    ]
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps({
        "eval": {k: r.to_dict() for k, r in result.evals.items()},
        "sparsity": {label: {k: r[k] for k in ("alloc", "sparsity", "layers", "weighted_mean_target",
                                               "weighted_mean_measured")} for label, r in result.prune.items()},
        **({"depth": result.depth} if result.depth else {}),
        **({"quantized": {label: {k: r[k] for k in ("source", "schemes", "mean_bits", "bytes_on_disk", "recipe",
                                                     "scores", "device_target")}
                          for label, r in result.quantized.items()}} if result.quantized else {}),
        **({"vllm": result.serve} if result.serve else {}),
        "seconds": clock.stages, "total_seconds": clock.total}, indent=2) + "\n")
    return Path(report)
