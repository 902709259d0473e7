"""The model-family table and decoder-block discovery.

Architecture knowledge lives in one table (:data:`FAMILIES`): where the list of decoder
blocks is, which linear modules of a block belong to attention and to the MLP, and which
projection names PEFT targets. The influence engine, the scorers and the integrations all
ask this module, never the model classes directly, so a new family is one table row.
"""


from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from layerif_plugins.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

ParamGroup = Literal["attn", "mlp", "all"]
PARAM_GROUPS: tuple[str, ...] = ("attn", "mlp", "all")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks, how its linears are grouped, what PEFT targets.

    Attributes:
        blocks_path: dotted path of the ``nn.ModuleList`` of decoder blocks.
        attn / mlp: regexes on a linear's name relative to its block.
        peft_targets: the leaf names of the block's linear projections, as PEFT's
            ``target_modules`` takes them (LoRA, LoRA-MoE, ``layerif moe`` / ``select-layers``
            defaults); empty when the family's names are not listed (callers then discover
            the block's linears).
    """

    blocks_path: str
    attn: str
    mlp: str
    peft_targets: tuple[str, ...] = ()


#: the seven projections of every Llama-style block (attention q/k/v/o, gated MLP)
LLAMA_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_LIKE = Family("model.layers", r"^self_attn\.", r"^mlp\.", LLAMA_PROJECTIONS)
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA_LIKE for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "granite", "cohere", "stablelm", "smollm3",
    )},
    # same block layout, other projection names (fused qkv / gate_up; GPT-style MLP; sparse-MoE MLP)
    "phi3": Family("model.layers", r"^self_attn\.", r"^mlp\.", ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "starcoder2": Family("model.layers", r"^self_attn\.", r"^mlp\.",
                         ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
    "mixtral": Family("model.layers", r"^self_attn\.", r"^mlp\.", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt2": Family("transformer.h", r"^attn\.", r"^mlp\.", ("c_attn", "c_proj", "c_fc")),
    "gpt_neox": Family("gpt_neox.layers", r"^attention\.", r"^mlp\.",
                       ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "opt": Family("model.decoder.layers", r"^self_attn\.", r"^(fc1|fc2)$",
                  ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    "phi": Family("model.layers", r"^self_attn\.", r"^mlp\.", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "falcon": Family("transformer.h", r"^self_attention\.", r"^mlp\.",
                     ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
}


def peft_targets_by_type() -> dict[str, list[str]]:
    """``model_type`` → PEFT target names, for PEFT tuners' ``target_module_mapping``."""
    return {t: list(f.peft_targets) for t, f in FAMILIES.items() if f.peft_targets}


def peft_targets(model: nn.Module) -> list[str]:
    """The PEFT ``target_modules`` of ``model``'s family; discovered from its block linears when not listed."""
    fam = family_of(model)
    if fam.peft_targets:
        return list(fam.peft_targets)
    return sorted({lin.local_name.rsplit(".", 1)[-1] for lin in block_linears(model, "all")})


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 style Conv1D is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight_is_transposed(module: nn.Module) -> bool:
    """True for GPT-2's Conv1D, whose weight is (in_features, out_features)."""
    return type(module).__name__ == "Conv1D"


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        raise ModelError(f"{type(model).__name__} has no `config`; pass an HF PreTrainedModel")
    return str(getattr(config, "model_type", ""))


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` row for ``model``; unknown families fall back to discovery."""
    mtype = model_type(model)
    if mtype in FAMILIES:
        return FAMILIES[mtype]
    by_path: dict[str, Family] = {}
    for fam in FAMILIES.values():
        by_path.setdefault(fam.blocks_path, fam)
    for fam in by_path.values():
        if _get_attr_path(model, fam.blocks_path) is not None:
            logger.info("model_type %r not in the table; using blocks at %s", mtype, fam.blocks_path)
            return replace(fam, peft_targets=())  # projection names unknown: peft_targets() discovers them
    raise ModelError(
        f"Cannot find the decoder blocks of model_type={mtype!r} ({type(model).__name__}). "
        f"Supported families: {', '.join(sorted(FAMILIES))}. Add a row to "
        "layerif_plugins.models.FAMILIES for a new family."
    )


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder blocks (layer 0 first)."""
    fam = family_of(model)
    blocks = _get_attr_path(model, fam.blocks_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ModelError(f"{type(model).__name__}.{fam.blocks_path} is not a non-empty ModuleList of blocks")
    return blocks


def blocks_prefix(model: nn.Module) -> str:
    """Dotted name of the block list inside ``model`` (e.g. ``model.layers``)."""
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise ModelError("decoder block list not reachable through named_modules()")


def num_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def block_class_name(model: nn.Module) -> str:
    """Class name of the decoder block (e.g. ``LlamaDecoderLayer``), for llm-compressor targets."""
    return type(decoder_blocks(model)[0]).__name__


@dataclass(frozen=True)
class LinearModule:
    """A linear module of a decoder block, as the engine and adapters see it."""

    name: str  # full dotted name in the model
    layer: int
    local_name: str  # name relative to the block, e.g. "self_attn.q_proj"
    group: Literal["attn", "mlp", "other"]
    module: nn.Module = field(compare=False, repr=False)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def block_linears(model: nn.Module, params: ParamGroup | str = "all") -> list[LinearModule]:
    """Linear modules of every decoder block that belong to ``params`` (attn | mlp | all).

    Raises :class:`ConfigError` when a block has none (e.g. ``params="mlp"`` on a model
    whose MLP is not made of linear layers).
    """
    if params not in PARAM_GROUPS:
        raise ConfigError(f"params must be one of {PARAM_GROUPS}, got {params!r}")
    fam = family_of(model)
    prefix = blocks_prefix(model)
    out: list[LinearModule] = []
    for layer, block in enumerate(decoder_blocks(model)):
        found = 0
        for local, module in block.named_modules():
            if not local or not _is_linear(module):
                continue
            group = "attn" if re.search(fam.attn, local) else "mlp" if re.search(fam.mlp, local) else "other"
            if group == "other" or (params != "all" and group != params):
                continue
            out.append(LinearModule(f"{prefix}.{layer}.{local}", layer, local, group, module))
            found += 1
        if found == 0:
            raise ConfigError(
                f"--params {params!r}: decoder block {layer} of {type(model).__name__} has no such "
                f"linear modules (attention regex {fam.attn!r}, MLP regex {fam.mlp!r}). "
                "Choose another parameter group."
            )
    return out
