"""From a model (+ scores) to a LoRA-MoE PeftModel and a saved adapter directory.

The glue between :mod:`layerif_plugins.allocate.experts` (numbers) and the PEFT tuner:
pick a layout, refuse scores computed for another model, build the config with one
pattern key per decoder layer, wrap the model, and save adapter + ``layout.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from layerif_plugins.allocate.experts import LAYOUTS, SCORED_LAYOUTS, ExpertLayout, expert_layout, max_budget
from layerif_plugins.errors import ConfigError
from layerif_plugins.integrations.peft_lora.layout import targeted_linears
from layerif_plugins.integrations.peft_moe.config import LoraMoeConfig
from layerif_plugins.io import atomic_dir, atomic_write_json
from layerif_plugins.models import blocks_prefix, fingerprint, num_layers
from layerif_plugins.scores import LayerScores

logger = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"


def layer_names(model: nn.Module) -> list[str]:
    """Decoder-layer names as PEFT sees them in the base model (``model.layers.0`` …)."""
    prefix = blocks_prefix(model)
    return [f"{prefix}.{i}" for i in range(num_layers(model))]


def moe_layout(
    model: nn.Module,
    layout: str,
    budget: int,
    scores: LayerScores | None = None,
    beta: float = 2.5,
    max_top_k: int = 2,
) -> ExpertLayout:
    """The per-layer expert counts / top-k of ``layout`` for ``model`` (scores are checked against it)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    source: dict[str, Any] = {}
    values = None
    if scores is not None:
        scores.check_model(model)
        values = scores.scores
        source = {"scores_method": scores.method, "scores_params": scores.params, "scores_data": scores.data}
    elif layout in SCORED_LAYOUTS:
        raise ConfigError(
            f"layout {layout!r} needs layer scores: pass a LayerScores file (`layerif score --method "
            f"{SCORED_LAYOUTS[layout]}`)"
        )
    return expert_layout(layout, num_layers(model), budget, scores=values, beta=beta, max_top_k=max_top_k,
                         source=source)


def moe_trainable_params(model: nn.Module, layout: ExpertLayout, r: int, target_modules: Sequence[str] | str) -> int:
    """Trainable parameters ``get_moe_model(model, layout, r=r, target_modules=…)`` creates, from the shapes alone.

    Per adapted module of decoder layer ``i`` with ``n = layout.experts[i]``: ``n · r · (d_in + d_out)``
    expert weights, plus an ``n · d_in`` router when ``n > 1`` (one expert is not routed). Sizing a
    layout by this count, before any model is wrapped, is what makes "LoRA-MoE at a plain LoRA's
    parameters" exact (:func:`moe_layout_for_params`).
    """
    module_layers = _module_layers(model, target_modules)
    return _params_of(layout.experts, module_layers, r)


def moe_layout_for_params(
    model: nn.Module,
    layout: str,
    max_params: int,
    r: int,
    target_modules: Sequence[str] | str,
    scores: LayerScores | None = None,
    beta: float = 2.5,
    max_top_k: int = 2,
) -> ExpertLayout:
    """The ``layout`` with the most experts whose trainable parameters are at most ``max_params``.

    The budget ``T`` (total experts) is counted down from the most that ``max_params`` could pay for,
    so the result is the largest fitting ``T`` even where routers make the count uneven in ``T``. Use
    it to compare a LoRA-MoE with a plain LoRA at equal parameters:
    ``max_params = lora_trainable_params(LoraConfig(r=8, …), targeted_linears(model, targets))``.
    Refuses a ``max_params`` below one rank-``r`` expert per layer, naming the least that fits.
    """
    module_layers = _module_layers(model, target_modules)
    n_layers = num_layers(model)
    per_layer = [0] * n_layers
    for layer, (d_in, d_out) in module_layers:
        per_layer[layer] += r * (d_in + d_out)
    if empty := [i for i, p in enumerate(per_layer) if p == 0]:
        raise ConfigError(f"target_modules {target_modules!r} matches nothing in decoder layers {empty}: LoRA-MoE "
                          "gives every layer at least one expert; name projections every layer has")
    least = sum(per_layer)  # one expert per layer, no router
    if max_params < least:
        raise ConfigError(f"max_params={max_params:,} is less than one rank-{r} expert per layer ({least:,} "
                          f"parameters on {target_modules!r}): raise it, or use a smaller r")
    most = n_layers + (max_params - least) // min(per_layer)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden:
        most = min(most, max_budget(n_layers, int(hidden), r))
    for budget in range(most, n_layers - 1, -1):
        candidate = moe_layout(model, layout, budget, scores=scores, beta=beta, max_top_k=max_top_k)
        if _params_of(candidate.experts, module_layers, r) <= max_params:
            return candidate
    raise AssertionError("unreachable: one expert per layer fits")  # pragma: no cover


def _module_layers(model: nn.Module, target_modules: Sequence[str] | str) -> list[tuple[int, tuple[int, int]]]:
    """``(decoder layer, (d_in, d_out))`` of every module PEFT adapts for ``target_modules``."""
    names = layer_names(model)
    out = []
    for name, shape in targeted_linears(model, target_modules).items():
        layer = next((i for i, prefix in enumerate(names) if name.startswith(f"{prefix}.")), None)
        if layer is None:
            raise ConfigError(f"target_modules matches {name}, outside the decoder layers: LoRA-MoE puts experts "
                              "in decoder layers only; name the layers' projections (e.g. q_proj,v_proj)")
        out.append((layer, shape))
    return out


def _params_of(experts: Sequence[int], module_layers: list[tuple[int, tuple[int, int]]], r: int) -> int:
    total = 0
    for layer, (d_in, d_out) in module_layers:
        n = experts[layer]
        total += n * r * (d_in + d_out) + (n * d_in if n > 1 else 0)
    return total


def moe_config(model: nn.Module, layout: ExpertLayout, **config_kwargs: Any) -> LoraMoeConfig:
    """A :class:`LoraMoeConfig` giving decoder layer ``i`` ``layout.experts[i]`` experts and ``layout.top_k[i]``.

    ``task_type`` defaults to ``"CAUSAL_LM"`` (the models here are causal LMs), so the saved adapter
    also loads with ``AutoPeftModelForCausalLM.from_pretrained(dir)``.
    """
    config_kwargs.setdefault("task_type", "CAUSAL_LM")
    names = layer_names(model)
    if len(names) != len(layout.experts):
        raise ConfigError(f"layout has {len(layout.experts)} layers but the model has {len(names)}")
    meta = {**layout.to_dict(), "model": fingerprint(model).to_dict()}
    return LoraMoeConfig.from_layout(layout.experts, layout.top_k, names, layout=meta, **config_kwargs)


def get_moe_model(model: nn.Module, layout: ExpertLayout, **config_kwargs: Any) -> Any:
    """``get_peft_model(model, moe_config(model, layout, ...))`` — the model is modified in place."""
    from peft import get_peft_model

    return get_peft_model(model, moe_config(model, layout, **config_kwargs))


def built_layout(peft_model: Any, adapter_name: str = "default") -> tuple[list[int], list[int]]:
    """``(experts, top_k)`` per decoder layer as actually built (read back from the experts' weights)."""
    base = peft_model.get_base_model()
    names = layer_names(base)
    table = peft_model.base_model.layer_layout(adapter_name)
    experts, top_k = [], []
    for name in names:
        rows = [v for k, v in table.items() if k.startswith(f"{name}.")]
        if not rows:
            raise ConfigError(f"decoder layer {name} has no LoRA-MoE module")
        ns = {r["num_experts"] for r in rows}
        ks = {r["top_k"] for r in rows}
        if len(ns) != 1 or len(ks) != 1:
            raise ConfigError(f"decoder layer {name} has modules with different expert counts {ns} / top-k {ks}")
        experts.append(ns.pop())
        top_k.append(ks.pop())
    return experts, top_k


def save_moe_adapter(
    peft_model: Any, layout: ExpertLayout, out: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Save the adapter (``adapter_config.json`` + weights) and ``layout.json`` into ``out``, atomically."""
    out = Path(out)
    experts, top_k = built_layout(peft_model)
    if experts != list(layout.experts) or top_k != list(layout.top_k):
        raise ConfigError(f"built layout {experts}/{top_k} differs from the requested {layout.experts}/{layout.top_k}")
    record = {
        "experts": list(layout.experts),
        "top_k": list(layout.top_k),
        "layout": layout.method,
        "budget": layout.budget,
        "scores": layout.params.get("scores"),
        "scores_method": layout.params.get("scores_method"),
        "params": layout.params,
        "model": fingerprint(peft_model.get_base_model()).to_dict(),
        **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        atomic_write_json(tmp / LAYOUT_FILE, record)
        append_load_note(tmp / "README.md")
    return out


def append_load_note(readme: Path) -> None:
    """Add a "how to load" section to the adapter's README (PEFT writes the model card)."""
    note = (
        "\n## Loading this LoRA-MoE adapter\n\n"
        "It was made with layerif-plugins. Import the plugin before PEFT loads it:\n\n"
        "```python\nimport layerif_plugins.integrations.peft_moe  # registers LAYERIF_LORA_MOE with PEFT\n"
        "from peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, ADAPTER_DIR)\n"
        "# or: AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR); base_model.load_adapter(ADAPTER_DIR)\n```\n\n"
        "Without it PEFT stops with `KeyError: 'LAYERIF_LORA_MOE'`. The adapter cannot be merged into the "
        "base weights (routed experts); `layout.json` lists the experts and top-k per layer.\n"
    )
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    readme.write_text(text + note, encoding="utf-8")
