"""Measured per-layer quantization sensitivity: the held-out loss increase of quantizing each layer alone.

Host glue, the quantization counterpart of :func:`.planning.measure_sensitivity` (which prunes
each layer alone): for every decoder layer, *only* that layer's Linear modules are quantized
as the scheme does it, the token-mean held-out loss is measured (the planner's
:func:`~layerif_plugins.evaluation.perplexity.example_token_losses`), and the weights are
restored. The result is a :class:`~layerif_plugins.scores.LayerScores` that
:func:`~layerif_plugins.allocate.precision.precision_from_scores` reads like any scores file:
``method="quant_sensitivity"``, direction ``higher_prunes`` (a higher score gets more bits),
so the layers whose quantization costs the most loss keep the most bits.

How each layer is quantized (the library's own functions; nothing re-derived):

* **weights** — the scheme's ``QuantizationArgs`` (compressed-tensors'
  ``preset_name_to_scheme``), the weight observer llm-compressor's ``QuantizationModifier``
  attaches (``initialize_observer``: memoryless min-max unless the scheme names another),
  its ``get_qparams`` (compressed-tensors' ``calculate_qparams``) and compressed-tensors'
  ``fake_quantize``: the weights ``oneshot`` + ``save_compressed`` store, dequantized
  (``tests/integrations/llmcompressor/test_quant_sensitivity.py`` checks them against a real
  ``oneshot`` checkpoint);
* **input activations** of a dynamic scheme, at every forward pass — W8A8: per-token
  symmetric int8 *as vLLM computes it* (``scale = max|x| / 127``, round, clamp to
  [−128, 127]; vLLM's ``scaled_int8_quant`` dynamic path), since vLLM is where the
  checkpoint is served (compressed-tensors' own HF emulation divides by 127.5 instead);
  any other dynamic scheme (FP8): compressed-tensors' ``compute_dynamic_scales_and_zp`` +
  ``fake_quantize``, as its quantized forward does. Weight-only schemes (W4A16, W8A16)
  leave the activations alone.

The weights are round-to-nearest, what ``QuantizationModifier`` (``--algorithm rtn``) stores;
GPTQ's error compensation is not modelled, so with ``gptq`` the table is the RTN ordering.
With every other layer dense, a layer's inputs are the dense model's, as in the pruning table.

The loss *increase* can be slightly negative for a layer whose quantization happens to help
on these examples, so the method is signed (:data:`~layerif_plugins.scores.SIGNED_METHODS`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.evaluation.perplexity import example_token_losses
from layerif_plugins.integrations.llmcompressor.search import WeightSnapshot
from layerif_plugins.models import fingerprint
from layerif_plugins.plan.decide import token_mean
from layerif_plugins.scores import LayerScores, ScoreDirection

logger = logging.getLogger(__name__)

METHOD = "quant_sensitivity"
HIGHER_IS = "held-out loss increase when only this layer is quantized (more sensitive: more bits)"
#: how the W8A8 input activations are quantized: vLLM's dynamic per-token int8 (the served numbers)
VLLM_INT8_TOKEN = "vllm dynamic per-token int8 (scale = max|x| / 127)"


def scheme_of(name: str) -> Any:
    """compressed-tensors' ``QuantizationScheme`` of one of our scheme names (``W8A8``, ``W4A16``, ``FP8`` …)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from layerif_plugins.integrations.llmcompressor.schemes import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"unknown scheme {name!r} for the quantization sensitivity: one of {list(PRESETS)}")
    return preset_name_to_scheme(PRESETS[name], ["Linear"])


@torch.no_grad()
def fake_quantized_weight(module: torch.nn.Module, scheme: Any) -> torch.Tensor:
    """The module's weight quantized and dequantized as ``QuantizationModifier`` stores it (round to nearest).

    llm-compressor's own weight observer (``initialize_observer``, attached for the call and
    removed after), its ``get_qparams`` and compressed-tensors' ``fake_quantize``.
    """
    from compressed_tensors.quantization import fake_quantize
    from llmcompressor.modifiers.quantization.calibration import initialize_observer

    if hasattr(module, "quantization_scheme"):
        raise ModelError(f"{type(module).__name__} already carries a quantization scheme: measure the sensitivity "
                         "of the dense model")
    module.quantization_scheme = scheme  # what initialize_observer reads, as QuantizationModifier sets it
    try:
        initialize_observer(module, "weight")
        qparams = module.weight_observer(module.weight).get_qparams()
    finally:
        observer = getattr(module, "weight_observer", None)
        if observer is not None:
            observer.detach(module)
            del module.weight_observer
        del module.quantization_scheme
    return fake_quantize(module.weight, qparams["scale"], qparams["zero_point"], scheme.weights,
                         global_scale=qparams.get("global_scale"))


def vllm_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """``x`` through vLLM's dynamic per-token symmetric int8 quantization and back (W8A8 activations)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero token stays zero
    return (torch.round(xf / scale).clamp(-128, 127) * scale).to(x.dtype)


def _is_vllm_int8(args: Any) -> bool:
    from compressed_tensors.quantization import QuantizationStrategy, QuantizationType

    return (args.num_bits == 8 and args.type == QuantizationType.INT and args.symmetric
            and args.strategy == QuantizationStrategy.TOKEN and args.dynamic is True)


def activation_quantizer(scheme: Any) -> tuple[Any, str] | None:
    """``(fn(module, x) → x̂, description)`` for a scheme's dynamic input activations; None when it has none."""
    args = scheme.input_activations
    if args is None:
        return None
    if _is_vllm_int8(args):
        return (lambda _module, x: vllm_int8_per_token(x)), VLLM_INT8_TOKEN
    if args.dynamic is not True:
        raise ConfigError("static activation scales need calibrated observers: the quantization sensitivity "
                          "measures dynamic-activation and weight-only schemes (W8A8, FP8, W4A16, W8A16)")
    from compressed_tensors.quantization import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    def quantize(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=module)
        return fake_quantize(x, scale, zero_point, args)

    return quantize, f"compressed-tensors dynamic {args.type}{args.num_bits} per {args.strategy}"


@contextlib.contextmanager
def quantized_layer(modules: Sequence[torch.nn.Module], scheme: Any) -> Iterator[None]:
    """Inside the block, ``modules`` compute as the scheme quantizes them (weights and inputs); then restored."""
    from compressed_tensors.utils import update_offload_parameter

    snapshot = WeightSnapshot(modules)
    act = activation_quantizer(scheme)
    handles = []
    try:
        with torch.no_grad():
            for m in modules:
                update_offload_parameter(m, "weight", fake_quantized_weight(m, scheme))
        if act is not None:
            fn = act[0]
            handles = [m.register_forward_pre_hook(lambda mod, args: (fn(mod, args[0]), *args[1:]))
                       for m in modules]
        yield
    finally:
        for h in handles:
            h.remove()
        snapshot.restore()


def layer_modules(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The Linear modules (attention and MLP) of every decoder layer, layer 0 first."""
    from layerif_plugins.models import block_linears

    by_layer: dict[int, list[torch.nn.Module]] = {}
    for lin in block_linears(model, "all"):
        by_layer.setdefault(lin.layer, []).append(lin.module)
    return [by_layer[i] for i in sorted(by_layer)]


def _loss(model: torch.nn.Module, held: Examples, pad_id: int) -> float:
    return token_mean(*example_token_losses(model, held, pad_id=pad_id))


def measure_quant_sensitivity(
    model: torch.nn.Module,
    scheme: str,
    held_examples: Examples,
    *,
    pad_id: int = 0,
    show_progress: bool = False,
) -> LayerScores:
    """Per decoder layer, the held-out loss increase (nats/token) of quantizing only that layer with ``scheme``.

    Args:
        model: the dense model (restored bit for bit afterwards).
        scheme: one of our scheme names (``W8A8``; ``W4A16`` / ``W8A16`` / ``FP8`` for the GPU menu).
        held_examples: the examples the loss is measured on (not the ones the result is judged on).
        pad_id: padding id of the loss batches (excluded from the loss).

    Returns a signed :class:`LayerScores` (``quant_sensitivity``, ``higher_prunes``: more bits to
    a higher score) with the base and per-layer losses in ``extras``.
    """
    if len(held_examples) == 0:
        raise ConfigError("the quantization sensitivity needs at least one held-out example")
    qscheme = scheme_of(scheme)
    act = activation_quantizer(qscheme)
    layers = layer_modules(model)
    t0 = time.perf_counter()
    base = _loss(model, held_examples, pad_id)
    losses: list[float] = []
    for modules in tqdm(layers, desc=f"quant sensitivity: {scheme}", unit="layer", disable=not show_progress):
        with quantized_layer(modules, qscheme):
            losses.append(_loss(model, held_examples, pad_id))
    seconds = time.perf_counter() - t0
    logger.info("quantization sensitivity (%s) of %d layers on %d examples in %.1f s", scheme, len(layers),
                len(held_examples), seconds)
    return LayerScores(
        scores=[loss - base for loss in losses], method=METHOD, model=fingerprint(model),
        params={"scheme": scheme, "weights": qscheme.weights.model_dump(mode="json"),
                "activations": act[1] if act else None, "weight_rounding": "rtn (QuantizationModifier)",
                "loss": "token-mean next-token cross-entropy (nats)"},
        data={"held": held_examples.fingerprint()}, direction=ScoreDirection.HIGHER_PRUNES, higher_is=HIGHER_IS,
        extras={"base_loss": base, "layer_losses": losses, "seconds": seconds})
