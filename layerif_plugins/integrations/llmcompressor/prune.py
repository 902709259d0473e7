"""``prune_model``: one call from a model + calibration file to a pruned HF directory.

Runs llm-compressor's real ``oneshot`` with a LayerIF Wanda / SparseGPT modifier, saves
the result as an HF directory that vLLM loads as an ordinary dense model (dense
safetensors, no ``sparsity_config``), with the tokenizer, llm-compressor's
``recipe.yaml`` and ``sparsity_report.json`` (target vs measured sparsity per layer and
per module). Everything is written into a temp directory swapped into place at the end:
a failure leaves nothing behind.

``epsilon="auto"`` searches ε (OWL's λ) and the mapping direction on held-out calibration
examples (:mod:`.search`): the ``n_holdout`` examples that follow the first ``n_calib`` in
the calibration file (or a separate ``holdout`` file), so every calibration example still
prunes and the held-out slice is disjoint from them by construction.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.allocate.sparsity import AUTO, check_epsilon, check_target, weighted_mean
from layerif_plugins.errors import ConfigError, DataError, ModelError
from layerif_plugins.integrations.llmcompressor.modifiers import (
    ALLOCATIONS,
    LayerIFSparseGPTModifier,
    LayerIFSparsityModifierBase,
    LayerIFWandaPruningModifier,
    build_modifier,
    prunable_modules,
)
from layerif_plugins.io import atomic_dir, atomic_write_json, check_out_dir
from layerif_plugins.models import CATALOGUE, model_dir_for
from layerif_plugins.models.loading import limit_to_positions
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


def _calibration_dataset(examples: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({
        "input_ids": [list(x) for x in examples.input_ids],
        "attention_mask": [[1] * len(x) for x in examples.input_ids],
    })


def default_n_holdout(n_calib: int) -> int:
    """Held-out examples of ``epsilon="auto"`` by default: a quarter of the calibration set, at least 8."""
    return max(8, n_calib // 4)


def _load_data(calib: str | Path, holdout: str | Path | None, tokenizer: Any, n_calib: int, n_holdout: int | None,
               max_length: int, search: bool, holdout_length: int | None = None,
               ) -> tuple[Any, Any, dict[str, Any] | None]:
    """(calibration examples, held-out examples or None, where the held-out ones came from).

    The held-out examples are ``holdout_length`` tokens long (default ``max_length``): the
    search should judge perplexity at the context length the model is used with, which can
    be longer than what calibration can afford.
    """
    from layerif_plugins.data import load_examples

    def calibration() -> Any:
        return load_examples(calib, tokenizer, max_length=max_length, n=n_calib)

    if not search:
        return calibration(), None, None
    k = default_n_holdout(n_calib) if n_holdout is None else n_holdout
    if k < 1:
        raise DataError(f"n_holdout={k}: epsilon auto needs at least one held-out example")
    length = max_length if holdout_length is None else holdout_length
    if holdout is not None:
        return (calibration(), load_examples(holdout, tokenizer, max_length=length, n=k),
                {"file": str(holdout), "first": k, "max_length": length})
    try:
        both = load_examples(calib, tokenizer, max_length=length, n=n_calib + k)
    except DataError as exc:
        raise DataError(f"{exc}; epsilon auto holds out the {k} examples after the first {n_calib} "
                        f"(n_calib + n_holdout = {n_calib + k}): use a longer file, a smaller n_holdout, or "
                        "a separate holdout file") from None
    # one tokenization serves both when the lengths agree (the calibration examples are its head)
    head = both.subset(range(n_calib)) if length == max_length else calibration()
    return (head, both.subset(range(n_calib, n_calib + k)),
            {"file": str(calib), "examples": [n_calib, n_calib + k], "max_length": length})


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
    epsilon: float | str | None = None,
    invert: bool = False,
    calib: str | Path,
    n_calib: int = 128,
    max_length: int = 128,
    batch_size: int = 1,
    n_holdout: int | None = None,
    holdout: str | Path | None = None,
    holdout_length: int | None = None,
    epsilon_grid: list[float] | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune with llm-compressor's real ``oneshot`` and per-layer sparsity from ``allocation``.

    Args:
        model_path: HF model directory or llama2.c ``.bin`` (converted into a temp dir first).
        out: output directory (must not exist or be empty unless ``overwrite``).
        algorithm: ``wanda`` | ``sparsegpt``.
        sparsity: global target in (0, 1): parameter-weighted mean over the decoder blocks.
        allocation: ``layerif`` (needs ``scores``) | ``owl`` | ``alpha_hill`` | ``depth_ramp`` | ``uniform``;
            ``owl`` / ``alpha_hill`` / ``depth_ramp`` are computed (from ``calib`` / the weights / the
            layer index) when ``scores`` is None.
        scores: LayerScores JSON computed on this model (its method must equal ``allocation``).
        epsilon: relative spread ``[1-ε, 1+ε]`` (OWL's λ for ``owl``); None: the reference's value
            for the allocation (layerif 0.1, owl 0.08, alpha_hill 0.2, depth_ramp 0.1); ``"auto"``:
            searched with the mapping direction (one extra oneshot per candidate, 9 by default;
            the report's ``epsilon_search`` holds the sweep, ``epsilon_used``/``invert`` the choice).
        invert: reverse the mapping (more sparsity where the scores say less); ``auto`` tries both.
        calib: calibration text file (.txt / .jsonl), its first ``n_calib`` examples, ``max_length`` tokens each.
        batch_size: calibration batch size of ``oneshot`` (its ``batch_size``; 1 = llm-compressor's
            default). Batches are collated by truncation to their shortest example, so use more than
            1 when the examples have equal length (e.g. all longer than ``max_length``): the same
            statistics with far fewer forward calls (on a 2-core CPU, 128 × 16-token examples prune
            SmolLM2-135M ~2× faster with 16 per batch).
        n_holdout: ``auto`` only: held-out examples for the search's perplexity (default
            ``max(8, n_calib // 4)``), the ones after the first ``n_calib`` of ``calib``, or the
            first of ``holdout`` when given. Never the evaluation set.
        holdout: ``auto`` only: a text file for the held-out examples instead of ``calib``'s tail.
        holdout_length: ``auto`` only: tokens per held-out example (default ``max_length``). Judge
            the candidates at the context length the model serves: when calibration is cut
            short to save time (e.g. 16 tokens), short held-out snippets favour allocations
            that help only short contexts.
        epsilon_grid: ``auto`` only: the spreads to try (default 0, 0.05, 0.1, 0.2, 0.3).
        show_progress: progress bars of the scores computed here (OWL activations, ESD fits);
            llm-compressor's own bars and logs follow its settings (``LLM_COMPRESSOR_LOG_LEVEL``).

    Returns the report written to ``out/sparsity_report.json``.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    check_target(sparsity)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_epsilon(epsilon)
    searching = epsilon == AUTO
    if not searching and (n_holdout is not None or holdout is not None or epsilon_grid is not None
                          or holdout_length is not None):
        raise ConfigError("n_holdout, holdout, holdout_length and epsilon_grid belong to epsilon='auto'; pass "
                          "epsilon='auto' or leave them out")
    if holdout_length is not None and (isinstance(holdout_length, bool) or not isinstance(holdout_length, int)
                                       or holdout_length < 1):
        raise ConfigError(f"holdout_length must be an integer >= 1, got {holdout_length!r}")
    out = check_out_dir(out, overwrite=overwrite, option="out",
                        inputs={"model": [model_path], "calib": [calib], "holdout": [holdout], "scores": [scores]})
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
    modifier = build_modifier(
        ALGORITHMS[algorithm], sparsity=sparsity, allocation=allocation, epsilon=epsilon, invert=invert,
        epsilon_grid=epsilon_grid, scores=str(scores_path) if scores_path else None,
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
        config = json.loads((Path(model_dir) / "config.json").read_text())
        limit_to_positions(tokenizer, config.get("max_position_embeddings"))  # over-length calibration fails early
        examples, held, held_from = _load_data(calib, holdout, tokenizer, n_calib, n_holdout, max_length, searching,
                                                 holdout_length)
        dataset = _calibration_dataset(examples)
        if held is not None:
            modifier.use_holdout(held)
        try:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                t0 = time.perf_counter()
                model = oneshot(
                    model=str(model_dir), tokenizer=tokenizer, recipe=[modifier], dataset=dataset,
                    num_calibration_samples=len(dataset), max_seq_length=max_length,
                    shuffle_calibration_samples=False, batch_size=batch_size,
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
                    "epsilon": epsilon,  # as passed (None: the reference's; "auto"), what resumed runs compare
                    "epsilon_used": info["epsilon"],
                    "invert": info["invert"],
                    "target_sparsity": float(sparsity),
                    "scores": str(scores_path) if scores_path else None,
                    "scores_method": info["scores_method"],
                    "layer_scores": info["scores"],
                    "calib": {**examples.fingerprint(), "max_length": max_length, "batch_size": batch_size},
                    "epsilon_search": ({**info["epsilon_search"], "holdout": {**info["epsilon_search"]["holdout"],
                                                                              **(held_from or {})}}
                                       if info["epsilon_search"] else None),
                    **measured,
                    "oneshot_seconds": elapsed,
                    "allocation_seconds": info["seconds"],
                    "versions": library_versions(),
                }
                atomic_write_json(tmp / REPORT_NAME, report)
        finally:
            active_session().reset()  # release hooks and the recipe state, also on failure
    logger.info("pruned %s → %s: target %.4f, measured %.4f, epsilon %s%s", model_path, out, sparsity,
                report["weighted_mean_measured"], report["epsilon_used"], " (inverted)" if report["invert"] else "")
    return report
