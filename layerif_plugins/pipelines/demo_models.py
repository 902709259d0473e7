"""The demo's models: LayerIF scores per task, Wanda-pruned models per (sparsity × allocation), depth-dropped
ones, and quantized ones (one scheme, or mixed precision from the scores).

Each step reuses what an earlier run into the same output directory made with the same settings
(:mod:`layerif_plugins.pipelines.resume`) and reports one progress line per model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerif_plugins.data import Examples, load_examples, pad_id_of
from layerif_plugins.io import atomic_write_json
from layerif_plugins.pipelines.demo_config import DemoConfig, DemoTask
from layerif_plugins.pipelines.demo_result import Progress, StageClock, depth_label, log_progress, model_label
from layerif_plugins.pipelines.resume import read_json, reusable_prune, reusable_scores
from layerif_plugins.scores import LayerScores

#: what the demo records beside a quantized model (the settings it was made with, for resuming)
QUANTIZE_SETTINGS = "demo_quantize.json"


def _task_examples(task: DemoTask, tok: Any, config: DemoConfig) -> tuple[Examples, Examples]:
    if task.val is None:  # one file: the first n_train documents train, the next n_val validate
        both = load_examples(task.train, tok, config.max_length, n=config.n_train + config.n_val)
        return both.subset(range(config.n_train)), both.subset(range(config.n_train, len(both)))
    return (load_examples(task.train, tok, config.max_length, n=config.n_train),
            load_examples(task.val, tok, config.max_length, n=config.n_val))


def score_tasks(model: Any, tok: Any, config: DemoConfig, out: Path, clock: StageClock,
                progress: Progress = log_progress, reused: set[str] | None = None) -> dict[str, LayerScores]:
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
              progress: Progress = log_progress, fresh: bool = True,
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
             progress: Progress = log_progress, fresh: bool = True,
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


def quantize_all(models: dict[str, Path], config: DemoConfig, out: Path, clock: StageClock,
                 progress: Progress = log_progress, reused: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every :attr:`DemoConfig.quantize` entry → a compressed-tensors checkpoint, keyed by its label.

    ``models`` maps the labels made so far (``dense``, pruned, dropped) to their directories. A
    mixed model orders its layers by the scores task's scores file. An earlier run's checkpoint is
    reused when its source model (and, for a mixed one, the scores) were reused too and it was made
    with the same settings (``demo_quantize.json`` beside it).
    """
    reused = reused if reused is not None else set()
    from layerif_plugins.integrations.llmcompressor.quantize import REPORT_NAME, quantize_model

    scores_file = out / f"scores_{config.scores_task.name}.json"
    reports: dict[str, dict[str, Any]] = {}
    for spec in config.quantize_specs:
        label, source = spec.label, Path(models[spec.source])
        used = scores_file if spec.budget_bits is not None else None
        settings = {"source": str(source.resolve()), "scheme": spec.scheme, "budget_bits": spec.budget_bits,
                    "scores": str(used.resolve()) if used else None, "target": config.quantize_target,
                    "calib": str(config.calib), "n_calib": config.n_calib, "max_length": config.max_length}
        target = out / "models" / label
        inputs_reused = spec.source in reused and (used is None or f"scores:{config.scores_task.name}" in reused)
        earlier = read_json(target / QUANTIZE_SETTINGS) if config.resume and inputs_reused else None
        report = read_json(target / REPORT_NAME) if earlier == settings else None
        if report is not None:
            progress(clock.total, f"reusing {label} (quantized the same way by an earlier run)")
            reused.add(label)
        else:
            what = spec.scheme or f"mixed precision at {spec.budget_bits:g} bits per weight ({config.method} order)"
            progress(clock.total, f"quantizing {spec.source} with {what} → {label}")
            report = quantize_model(source, target, calib=config.calib, scheme=spec.scheme,
                                    budget_bits=spec.budget_bits, scores=used, device_target=config.quantize_target,
                                    n_calib=config.n_calib, max_length=config.max_length, overwrite=True,
                                    show_progress=config.show_progress)
            atomic_write_json(target / QUANTIZE_SETTINGS, settings)
        reports[label] = {**report, "label": label, "source": spec.source}
        clock.done("quantize (llm-compressor oneshot)")
        progress(clock.total, f"  {label}: {', '.join(dict.fromkeys(report['schemes']))}, mean "
                              f"{report['mean_bits']:.2f} bits per weight, {report['bytes_on_disk'] / 2**20:.1f} MiB")
    return reports


__all__ = ["QUANTIZE_SETTINGS", "drop_all", "prune_all", "quantize_all", "score_tasks"]
