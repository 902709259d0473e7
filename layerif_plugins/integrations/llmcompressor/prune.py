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
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.allocate.sparsity import check_target, weighted_mean
from layerif_plugins.errors import ConfigError, DataError, ModelError
from layerif_plugins.integrations.llmcompressor.modifiers import (
    LayerIFSparseGPTModifier,
    LayerIFSparsityModifierBase,
    LayerIFWandaPruningModifier,
    build_modifier,
    prunable_modules,
)
from layerif_plugins.io import atomic_dir, atomic_write_json, check_out_dir
from layerif_plugins.models import CATALOGUE, model_dir_for
from layerif_plugins.models.loading import limit_to_positions
from layerif_plugins.plan import AllocationOptions, AllocationPlan
from layerif_plugins.scores import library_versions

logger = logging.getLogger(__name__)

ALGORITHMS: dict[str, type[LayerIFSparsityModifierBase]] = {
    "wanda": LayerIFWandaPruningModifier,
    "sparsegpt": LayerIFSparseGPTModifier,
}
REPORT_NAME = "sparsity_report.json"
PLAN_NAME = "plan.json"


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


@dataclass
class PlanningData:
    """The examples of one prune: calibration, the held-out judge and the sensitivity table's, and their origin."""

    calibration: Any
    held: Any = None
    table: Any = None
    held_from: dict[str, Any] | None = None


def _load_data(calib: str | Path, holdout: str | Path | None, tokenizer: Any, n_calib: int, n_holdout: int | None,
               max_length: int, search: bool, holdout_length: int | None = None, n_table: int = 0,
               ) -> PlanningData:
    """The calibration examples and, for a search, the held-out ones and the sensitivity table's.

    The held-out examples are ``holdout_length`` tokens long (default ``max_length``): the
    search should judge perplexity at the context length the model is used with, which can
    be longer than what calibration can afford. The ``n_table`` examples of the sensitivity
    table follow the held-out ones in the same file, so they are disjoint from both the
    calibration set and the judge; when the file has too few, the table uses calibration
    examples (logged and recorded in the plan).
    """
    from layerif_plugins.data import load_examples

    def calibration() -> Any:
        return load_examples(calib, tokenizer, max_length=max_length, n=n_calib)

    if not search:
        return PlanningData(calibration())
    k = default_n_holdout(n_calib) if n_holdout is None else n_holdout
    if k < 1:
        raise DataError(f"n_holdout={k}: epsilon auto needs at least one held-out example")
    length = max_length if holdout_length is None else holdout_length
    source, skip = (holdout, 0) if holdout is not None else (calib, n_calib)
    try:
        rows = _load_with_table(source, tokenizer, length, skip + k, n_table)
    except DataError as exc:
        where = ("the holdout file" if holdout is not None else
                 f"the {k} examples after the first {n_calib} (n_calib + n_holdout = {n_calib + k})")
        raise DataError(f"{exc}; the search holds out {where}: use a longer file, a smaller n_holdout, or "
                        "a separate holdout file") from None
    if holdout is not None:
        head, held_from = calibration(), {"file": str(holdout), "first": k, "max_length": length}
    else:  # one tokenization serves both when the lengths agree (the calibration examples are its head)
        head = rows.subset(range(n_calib)) if length == max_length else calibration()
        held_from = {"file": str(calib), "examples": [n_calib, n_calib + k], "max_length": length}
    table = rows.subset(range(skip + k, len(rows))) if len(rows) > skip + k else None
    if n_table:
        held_from["table_examples"] = ([skip + k, len(rows)] if table is not None else
                                       "calibration examples (the file has none after the held-out ones)")
        if table is None:
            logger.info("sensitivity table: %s has no examples after the held-out ones; measuring it on "
                        "calibration examples", source)
    return PlanningData(head, rows.subset(range(skip, skip + k)), table, held_from)


def _load_with_table(source: str | Path, tokenizer: Any, length: int, n: int, n_table: int) -> Any:
    """The first ``n`` examples of ``source`` and up to ``n_table`` more (fewer when the file ends)."""
    from layerif_plugins.data import load_examples

    if n_table:
        try:
            return load_examples(source, tokenizer, max_length=length, n=n + n_table)
        except DataError:
            pass  # too short for the table: the table falls back to calibration examples
    return load_examples(source, tokenizer, max_length=length, n=n)


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


def calibration_batches(examples: Any, batch_size: int, max_length: int | None = None,
                        tokenizer: Any = None) -> list[dict[str, Any]]:
    """The batches the final ``oneshot`` will calibrate on, in its order: llm-compressor's own dataloader.

    A search judges each candidate by pruning it with these batches; the model it judges must be
    the model the user gets. ``oneshot`` batches with a length-aware sampler (``torch.argsort`` of
    the lengths, descending, which is not stable: from 17 equal-length examples on, it is not the
    file's order) and cuts each batch to its shortest example. SparseGPT's masks and updates depend on the
    order its Hessian is summed in at float rounding, and on SmolLM2 that alone moved a
    candidate's held-out loss by up to 0.09 nats: more than the paired standard error the search
    decides with. So the batches come from llm-compressor's ``get_calibration_dataloader`` with the
    arguments ``oneshot`` gets (:func:`_oneshot_and_save`), not from a re-implementation of it.
    """
    from llmcompressor.args import DatasetArguments
    from llmcompressor.datasets import get_calibration_dataloader

    from layerif_plugins.integrations.llmcompressor.search import materialize

    dataset = _calibration_dataset(examples)
    args = DatasetArguments(dataset=dataset, num_calibration_samples=len(dataset), max_seq_length=max_length,
                            shuffle_calibration_samples=False, batch_size=batch_size)
    return materialize(get_calibration_dataloader(args, tokenizer))


def check_path_args(**paths: Any) -> None:
    """API type check: every path argument is a ``str`` / ``os.PathLike`` (``None`` where optional)."""
    import os

    for name, value in paths.items():
        if value is None and name not in ("model_path", "out", "calib"):
            continue
        if not isinstance(value, str | os.PathLike):
            hint = ("; for a model already loaded in Python use llm-compressor's oneshot(model=…, recipe=[modifier]) "
                    "with a LayerIF modifier" if name == "model_path" else "")
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}{hint}")


def check_prune_request(algorithm: str, sparsity: float, batch_size: int, options: AllocationOptions,
                        holdout_args: dict[str, Any], scores: Any, plan: Any) -> None:
    """Everything about the options that can be refused before a model is loaded."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
    check_target(sparsity)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    given = [k for k, v in holdout_args.items() if v is not None]
    if given and (not options.searched or plan is not None):
        raise ConfigError(f"{', '.join(given)} belong to epsilon='auto' or a searched allocation (atp without beta, "
                          "sensitivity, auto); pass one or leave them out")
    hl = holdout_args.get("holdout_length")
    if hl is not None and (isinstance(hl, bool) or not isinstance(hl, int) or hl < 1):
        raise ConfigError(f"holdout_length must be an integer >= 1, got {hl!r}")
    if options.allocation == "layerif" and scores is None and plan is None:
        raise ConfigError(
            "allocation 'layerif' needs a scores file: run `layerif score --model M --train T --val V "
            "--out scores.json` on this model and pass scores=scores.json (--scores)"
        )
    if scores is not None:
        from layerif_plugins.scorers import resolve_scores

        method = "layerif" if options.allocation in ("auto", "sensitivity") else options.allocation
        # fails early on a missing / malformed file or one of another method; the modifier checks the model
        resolve_scores(None, method, Path(scores).expanduser().resolve(), role="allocation")
    if plan is not None:
        AllocationPlan.load(plan)  # a missing or malformed plan fails before any work


def prune_model(
    model_path: str | Path,
    out: str | Path,
    *,
    algorithm: str = "wanda",
    sparsity: float = 0.5,
    calib: str | Path,
    scores: str | Path | None = None,
    plan: str | Path | None = None,
    n_calib: int = 128,
    max_length: int = 128,
    batch_size: int = 1,
    n_holdout: int | None = None,
    holdout: str | Path | None = None,
    holdout_length: int | None = None,
    save_plan: str | Path | None = None,
    quantize: str | None = None,
    device_target: str = "cpu",
    overwrite: bool = False,
    show_progress: bool = True,
    options: AllocationOptions | None = None,
    **allocation: Any,
) -> dict[str, Any]:
    """Options → plan → one llm-compressor ``oneshot`` → a pruned HF directory (+ plan.json, sparsity_report.json).

    Args:
        model_path: HF model directory, llama2.c ``.bin`` / ``.gguf`` (converted into a temp dir) or a catalogue name.
        out: output directory (must not exist or be empty unless ``overwrite``).
        algorithm: ``wanda`` | ``sparsegpt``.
        sparsity: global target in (0, 1): parameter-weighted mean over the decoder blocks.
        calib: calibration text file (.txt / .jsonl), its first ``n_calib`` examples, ``max_length`` tokens each.
        scores: LayerScores JSON of this model (method = ``allocation``; a LayerIF file for ``auto``).
        plan: an AllocationPlan JSON made before (``layerif plan``): used as is, no search.
        batch_size: calibration batch size of ``oneshot`` (batches are cut to their shortest example: use
            more than 1 when the examples have equal length; 2-3.5x faster Wanda on SmolLM2).
        n_holdout / holdout / holdout_length: a search's held-out examples: the ``n_holdout`` after the first
            ``n_calib`` of ``calib`` (default ``max(8, n_calib // 4)``), or the first of ``holdout``;
            ``holdout_length`` tokens each (default ``max_length``). Never the evaluation set.
        save_plan: also write the plan here (e.g. beside the scores file); ``out/plan.json`` is always written.
        quantize: also quantize in the same ``oneshot``, after pruning (``W8A8``; ``W4A16`` / ``W8A16`` / ``FP8``
            for a GPU): llm-compressor's own quantization modifiers, saved compressed. A scheme vLLM on
            ``device_target`` (``cpu`` | ``gpu``) cannot serve is refused before any work. The plan is made on
            the unquantized model (quantization is applied after the pruning, as in the recipe).
        options / allocation: :class:`~layerif_plugins.plan.AllocationOptions`, or its fields as keywords
            (``allocation="auto"``, ``epsilon="auto"``, ``beta=…``, ``budget_prunes=…``, …).
        show_progress: progress bars of the planning (scores, candidates, sensitivity table).

    A search keeps its finished candidates in ``.<out>.layerif-plan.jsonl`` beside ``out`` until
    the run succeeds: rerunning an interrupted command resumes from the last finished candidate.
    Returns the report written to ``out/sparsity_report.json``.
    """
    check_path_args(model_path=model_path, out=out, calib=calib, scores=scores, plan=plan, holdout=holdout,
                    save_plan=save_plan)
    options = options or AllocationOptions(**allocation)
    holdout_args = {"n_holdout": n_holdout, "holdout": holdout, "holdout_length": holdout_length}
    check_prune_request(algorithm, sparsity, batch_size, options, holdout_args, scores, plan)
    if quantize is not None:
        from layerif_plugins.integrations.llmcompressor.quantize import check_servable

        check_servable([quantize], device_target)
    out = check_out_dir(out, overwrite=overwrite, option="out", inputs={
        "model": [model_path], "calib": [calib], "holdout": [holdout], "scores": [scores], "plan": [plan]})
    modifier, scores_path = _modifier(algorithm, sparsity, scores, options, show_progress, model_path)
    journal = out.parent / f".{out.name}.layerif-plan.jsonl"
    with tempfile.TemporaryDirectory(prefix="layerif-prune-") as work:
        model, tokenizer = _load_for_oneshot(model_path, work)
        t0 = time.perf_counter()
        made, got = _plan(modifier.journal(str(journal)), model, tokenizer, plan, calib, n_calib, max_length,
                               batch_size, holdout_args)
        planning = time.perf_counter() - t0
        head = {"model": str(model_path), "out": str(out), "algorithm": algorithm, "scores": scores_path,
                "quantization": quantize, "device_target": device_target if quantize else None,
                "epsilon": options.epsilon,  # as passed (None: the reference's; "auto"), what resumed runs compare
                "planning_seconds": planning, "plan_file": str(out / PLAN_NAME)}
        report = _oneshot_and_save(model, tokenizer, modifier.use_plan(made), got.calibration, out, overwrite,
                                   max_length, batch_size, save_plan, head, quantize, judged_on=got.held)
    journal.unlink(missing_ok=True)
    logger.info("pruned %s → %s: target %.4f, measured %.4f (%s, chose %s)", model_path, out, sparsity,
                report["weighted_mean_measured"], options.allocation, made.chosen.get("provider"))
    return report


def plan_pruning(
    model_path: str | Path,
    out: str | Path,
    *,
    algorithm: str = "wanda",
    sparsity: float = 0.5,
    calib: str | Path,
    scores: str | Path | None = None,
    n_calib: int = 128,
    max_length: int = 128,
    batch_size: int = 1,
    n_holdout: int | None = None,
    holdout: str | Path | None = None,
    holdout_length: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    options: AllocationOptions | None = None,
    **allocation: Any,
) -> AllocationPlan:
    """Make and save an :class:`AllocationPlan` (``out``, a JSON file) without pruning: the plan step of
    :func:`prune_model` alone, with the same arguments. ``layerif prune --plan out`` then prunes in one pass.

    A search keeps its finished candidates in ``out + ".journal.jsonl"`` until it succeeds, so
    rerunning an interrupted command resumes from the last finished candidate.
    """
    from layerif_plugins.io import check_out_file

    check_path_args(model_path=model_path, out=out, calib=calib, scores=scores, holdout=holdout)
    options = options or AllocationOptions(**allocation)
    holdout_args = {"n_holdout": n_holdout, "holdout": holdout, "holdout_length": holdout_length}
    check_prune_request(algorithm, sparsity, batch_size, options, holdout_args, scores, None)
    out = check_out_file(out, overwrite=overwrite, option="out", kind="json", inputs={
        "model": [model_path], "calib": [calib], "holdout": [holdout], "scores": [scores]})
    modifier, _ = _modifier(algorithm, sparsity, scores, options, show_progress, model_path)
    journal = out.with_name(out.name + ".journal.jsonl")
    with tempfile.TemporaryDirectory(prefix="layerif-plan-") as work:
        model, tokenizer = _load_for_oneshot(model_path, work)
        made, _ = _plan(modifier.journal(str(journal)), model, tokenizer, None, calib, n_calib, max_length,
                        batch_size, holdout_args)
    made.save(out)
    journal.unlink(missing_ok=True)
    return made


def _modifier(algorithm: str, sparsity: float, scores: Any, options: AllocationOptions, show_progress: bool,
              model_path: Any) -> tuple[LayerIFSparsityModifierBase, str | None]:
    scores_path = str(Path(scores).expanduser().resolve()) if scores is not None else None
    modifier = build_modifier(ALGORITHMS[algorithm], sparsity=sparsity, scores=scores_path, **options.to_dict())
    if str(model_path) not in CATALOGUE and not Path(model_path).exists():
        raise ModelError(f"model not found: {model_path} (an HF dir, llama2.c .bin, .gguf or a `layerif models list` "
                         "name)")
    return modifier.show_progress(show_progress), scores_path


def _plan(modifier: LayerIFSparsityModifierBase, model: Any, tokenizer: Any, plan: Any, calib: Any, n_calib: int,
          max_length: int, batch_size: int, holdout_args: dict[str, Any]) -> tuple[AllocationPlan, PlanningData]:
    """Read ``plan``, or make one with the modifier's options on the loaded model (weights restored after).

    Returns the plan and the data it was made with (``held`` is None unless a search ran here).
    """
    options = modifier.options()
    searching = options.searched and plan is None
    n_table = options.sensitivity_examples if options.uses_table else 0
    got = _load_data(calib, holdout_args["holdout"], tokenizer, n_calib, holdout_args["n_holdout"], max_length,
                     searching, holdout_args["holdout_length"], n_table)
    made = (AllocationPlan.load(plan) if plan is not None else
            modifier.plan_for_model(model, calibration_batches(got.calibration, batch_size, max_length, tokenizer),
                                    got.held, table_held=got.table))
    made.data["calibration"] = {**got.calibration.fingerprint(), "max_length": max_length, "batch_size": batch_size}
    if got.held_from:
        made.data["holdout_file"] = got.held_from
    return made, got


def _load_for_oneshot(model_path: str | Path, work: str) -> tuple[Any, Any]:
    """The model and tokenizer as ``oneshot`` would load them from a path (``dtype="auto"``); never a quantized one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerif_plugins.integrations.llmcompressor.quantize import check_not_quantized

    model_dir = model_dir_for(model_path, work)
    check_not_quantized(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit_to_positions(tokenizer, config.get("max_position_embeddings"))  # over-length calibration fails early
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    return model, tokenizer


#: most a saved model's per-example held-out loss may differ from the chosen candidate's (nats; float noise only)
SAME_MODEL_TOLERANCE = 1e-4


def saved_model_check(model: torch.nn.Module, held: Any, plan: AllocationPlan) -> dict[str, Any]:
    """Is the model ``oneshot`` just made the candidate the search chose? Its held-out losses, compared.

    The search judges each candidate by pruning it in a separate session with the batches the
    final ``oneshot`` uses; if anything differs between the two (batch order, examples, a host
    change), SparseGPT gives another model, and the decision was made about a model the user does
    not get. One forward pass over the held-out examples makes that visible in every run.
    """
    from layerif_plugins.evaluation.perplexity import example_token_losses
    from layerif_plugins.plan.decide import example_losses, token_mean

    chosen = plan.candidates[plan.chosen["index"]] if plan.chosen.get("index") is not None else None
    if not chosen or chosen.get("example_losses") is None:
        return {"checked": False, "why": "the chosen candidate has no held-out losses"}
    sums, counts = example_token_losses(model, held, pad_id=0)
    mine = example_losses(sums, counts)
    if len(mine) != len(chosen["example_losses"]):  # a confirmation slice keeps the last examples apart
        mine = mine[:len(chosen["example_losses"])]
        sums, counts = sums[:len(mine)], counts[:len(mine)]
    worst = max(abs(a - b) for a, b in zip(mine, chosen["example_losses"], strict=True))
    out = {"checked": True, "judged_perplexity": chosen.get("perplexity"),
           "saved_perplexity": math.exp(token_mean(sums, counts)), "max_example_difference": worst,
           "same_model": worst <= SAME_MODEL_TOLERANCE}
    if not out["same_model"]:
        logger.warning("the saved model is not the candidate the search judged: its held-out losses differ by up "
                       "to %.4g nats/example (held-out perplexity %.4f judged, %.4f saved); the decision may not "
                       "hold for it — please report this with the plan file", worst, out["judged_perplexity"],
                       out["saved_perplexity"])
    return out


def _oneshot_and_save(model: Any, tokenizer: Any, modifier: LayerIFSparsityModifierBase, examples: Any, out: Path,
                      overwrite: bool, max_length: int, batch_size: int, save_plan: Any, head: dict[str, Any],
                      quantize: str | None = None, judged_on: Any = None) -> dict[str, Any]:
    """One ``oneshot`` with the planned modifier, then the model, tokenizer, recipe, plan and report, atomically.

    ``judged_on``: the held-out examples of a search run here; the saved model's losses on them are
    compared with the chosen candidate's (:func:`saved_model_check`, the report's ``search_check``).
    """
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from layerif_plugins.integrations.llmcompressor.quantize import quantization_modifiers
    from layerif_plugins.integrations.llmcompressor.release import release_traced_forwards

    dataset = _calibration_dataset(examples)
    recipe = [modifier, *(quantization_modifiers(quantize) if quantize else [])]
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            t0 = time.perf_counter()
            model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset,
                            num_calibration_samples=len(dataset), max_seq_length=max_length,
                            shuffle_calibration_samples=False, batch_size=batch_size)
            elapsed = time.perf_counter() - t0
            # before saving: compression replaces packed (W4A16) weights in place
            measured = measure_sparsity(model, modifier.layer_sparsity or [], modifier.targets, modifier.ignore)
            plan = modifier.allocation_plan
            assert plan is not None
            check = saved_model_check(model, judged_on, plan) if judged_on is not None and not quantize else None
            model.save_pretrained(str(tmp), save_compressed=True)  # safetensors (+ quantization) + recipe.yaml
            tokenizer.save_pretrained(str(tmp))
            _check_saved_config(tmp)
            plan.save(tmp / PLAN_NAME)
            if save_plan is not None:
                plan.save(save_plan)
            info = modifier.allocation_info
            report = {
                "allocation": modifier.allocation,
                "epsilon_used": modifier.epsilon,
                "invert": modifier.invert,
                "target_sparsity": float(modifier.sparsity),
                "scores_method": info["scores_method"],
                "layer_scores": info["scores"],
                "chosen": plan.chosen,
                "decision": plan.decision,
                "plan_cost": plan.cost,
                "calib": {**examples.fingerprint(), "max_length": max_length, "batch_size": batch_size},
                "epsilon_search": info["epsilon_search"],
                "search_check": check,
                **measured,
                "oneshot_seconds": elapsed,
                "allocation_seconds": info["seconds"],
                "versions": library_versions(),
                **head,
            }
            atomic_write_json(tmp / REPORT_NAME, report)
    finally:
        active_session().reset()  # release hooks and the recipe state, also on failure
        release_traced_forwards(model)  # else torch.fx keeps the model alive for the process's life
    return report
