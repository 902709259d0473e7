"""``prune_model``: one call from a model + calibration file to a pruned HF directory.

Runs llm-compressor's real ``oneshot`` with a LayerIF Wanda / SparseGPT modifier, saves
the result as an HF directory that vLLM loads as an ordinary dense model (dense
safetensors, no ``sparsity_config``), with the tokenizer, llm-compressor's
``recipe.yaml`` and ``sparsity_report.json`` (target vs measured sparsity per layer and
per module). Everything is written into a temp directory swapped into place at the end:
a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.allocate.sparsity import check_target, weighted_mean
from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.integrations.llmcompressor.modifiers import (
    ALLOCATIONS,
    LayerIFSparseGPTModifier,
    LayerIFSparsityModifierBase,
    LayerIFWandaPruningModifier,
    prunable_modules,
)
from layerif_plugins.io import atomic_dir, atomic_write_json, check_parent
from layerif_plugins.models import CATALOGUE, model_dir_for
from layerif_plugins.scores import library_versions

logger = logging.getLogger(__name__)

ALGORITHMS: dict[str, type[LayerIFSparsityModifierBase]] = {
    "wanda": LayerIFWandaPruningModifier,
    "sparsegpt": LayerIFSparseGPTModifier,
}
REPORT_NAME = "sparsity_report.json"


def measure_sparsity(model: torch.nn.Module, layer_targets: list[float], targets: Any = None,
                     ignore: list[str] | None = None) -> dict[str, Any]:
    """Measured zeros of every pruned module vs its layer's target, per module, per layer, weighted mean."""
    from layerif_plugins.models import block_class_name

    mods = prunable_modules(model, targets or [block_class_name(model)], ignore or ["re:.*lm_head"])
    layers = [{"layer": i, "target": float(t), "params": 0, "zeros": 0} for i, t in enumerate(layer_targets)]
    modules: dict[str, dict[str, Any]] = {}
    for layer, name, module in mods:
        w = module.weight.detach()
        zeros, numel = int((w == 0).sum()), w.numel()
        modules[name] = {"layer": layer, "target": float(layer_targets[layer]), "measured": zeros / numel,
                         "params": numel}
        layers[layer]["params"] += numel
        layers[layer]["zeros"] += zeros
    for row in layers:
        row["measured"] = row["zeros"] / row["params"]
    params = [row["params"] for row in layers]
    return {
        "layers": layers,
        "modules": modules,
        "weighted_mean_target": weighted_mean([r["target"] for r in layers], params),
        "weighted_mean_measured": sum(r["zeros"] for r in layers) / sum(params),
    }


def _calibration_dataset(calib: str | Path, tokenizer: Any, n_calib: int, max_length: int) -> Any:
    from datasets import Dataset

    from layerif_plugins.data import load_examples

    examples = load_examples(calib, tokenizer, max_length=max_length, n=n_calib)
    return Dataset.from_dict({
        "input_ids": [list(x) for x in examples.input_ids],
        "attention_mask": [[1] * len(x) for x in examples.input_ids],
    }), examples


def _check_saved_config(out: Path) -> None:
    """vLLM refuses a ``sparsity_config`` with targets: the saved config must have none."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    qcfg = cfg.get("quantization_config") or cfg.get("compression_config")
    if isinstance(qcfg, dict) and qcfg.get("sparsity_config"):
        # weights are saved dense: drop the descriptive block so vLLM loads the model as dense
        qcfg.pop("sparsity_config")
        key = "quantization_config" if "quantization_config" in cfg else "compression_config"
        if not any(k for k in qcfg if k not in ("format", "quant_method", "version")):
            cfg.pop(key)
        atomic_write_json(cfg_path, cfg)
        logger.info("removed sparsity_config from %s (weights are dense)", cfg_path)


def prune_model(
    model_path: str | Path,
    out: str | Path,
    *,
    algorithm: str = "wanda",
    sparsity: float = 0.5,
    allocation: str = "layerif",
    scores: str | Path | None = None,
    epsilon: float | None = None,
    calib: str | Path,
    n_calib: int = 128,
    max_length: int = 128,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune with llm-compressor's real ``oneshot`` and per-layer sparsity from ``allocation``.

    Args:
        model_path: HF model directory or llama2.c ``.bin`` (converted into a temp dir first).
        out: output directory (must not exist or be empty unless ``overwrite``).
        algorithm: ``wanda`` | ``sparsegpt``.
        sparsity: global target in (0, 1): parameter-weighted mean over the decoder blocks.
        allocation: ``layerif`` (needs ``scores``) | ``owl`` | ``alpha_hill`` | ``uniform``;
            ``owl`` / ``alpha_hill`` are computed (from ``calib`` / the weights) when ``scores`` is None.
        scores: LayerScores JSON computed on this model (its method must equal ``allocation``).
        epsilon: relative spread ``[1-ε, 1+ε]`` (OWL's λ for ``owl``); None: the reference's value
            for the allocation (layerif 0.1, owl 0.08, alpha_hill 0.2).
        calib: calibration text file (.txt / .jsonl), its first ``n_calib`` examples, ``max_length`` tokens each.
        show_progress: progress bars of the scores computed here (OWL activations, ESD fits);
            llm-compressor's own bars and logs follow its settings (``LLM_COMPRESSOR_LOG_LEVEL``).

    Returns the report written to ``out/sparsity_report.json``.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    check_target(sparsity)
    out = check_parent(Path(out))
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise ConfigError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) or choose another out")
    if allocation == "layerif" and scores is None:
        raise ConfigError(
            "allocation 'layerif' needs a scores file: run `layerif score --model M --train T --val V "
            "--out scores.json` on this model and pass scores=scores.json (--scores)"
        )
    scores_path = None
    if scores is not None:
        from layerif_plugins.scorers import resolve_scores

        scores_path = Path(scores).expanduser().resolve()
        # fails early on a missing / malformed file or one of another method; the modifier checks the model
        resolve_scores(None, allocation, scores_path, role="allocation")
    modifier = ALGORITHMS[algorithm](
        sparsity=sparsity, allocation=allocation, epsilon=epsilon,
        scores=str(scores_path) if scores_path else None,
    ).show_progress(show_progress)
    if str(model_path) not in CATALOGUE and not Path(model_path).exists():
        raise ModelError(f"model not found: {model_path} (an HF dir, llama2.c .bin, .gguf or a `layerif models list` "
                         "name)")

    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="layerif-prune-") as work:
        model_dir = model_dir_for(model_path, work)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        dataset, examples = _calibration_dataset(calib, tokenizer, n_calib, max_length)
        try:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                t0 = time.perf_counter()
                model = oneshot(
                    model=str(model_dir), tokenizer=tokenizer, recipe=[modifier], dataset=dataset,
                    num_calibration_samples=len(dataset), max_seq_length=max_length,
                    shuffle_calibration_samples=False,
                )
                elapsed = time.perf_counter() - t0
                run = next(m for m in active_session().lifecycle.recipe.modifiers
                           if isinstance(m, LayerIFSparsityModifierBase))
                model.save_pretrained(str(tmp), save_compressed=True)  # dense safetensors + recipe.yaml
                tokenizer.save_pretrained(str(tmp))
                _check_saved_config(tmp)
                info = run.allocation_info
                measured = measure_sparsity(model, run.layer_sparsity, run.targets, run.ignore)
                report = {
                    "model": str(model_path),
                    "out": str(out),
                    "algorithm": algorithm,
                    "allocation": allocation,
                    "epsilon": epsilon,
                    "target_sparsity": float(sparsity),
                    "scores": str(scores_path) if scores_path else None,
                    "scores_method": info["scores_method"],
                    "layer_scores": info["scores"],
                    "calib": {**examples.fingerprint(), "max_length": max_length},
                    **measured,
                    "oneshot_seconds": elapsed,
                    "allocation_seconds": info["seconds"],
                    "versions": library_versions(),
                }
                atomic_write_json(tmp / REPORT_NAME, report)
        finally:
            active_session().reset()  # release hooks and the recipe state, also on failure
    logger.info("pruned %s → %s: target %.4f, measured %.4f", model_path, out, sparsity,
                report["weighted_mean_measured"])
    return report
