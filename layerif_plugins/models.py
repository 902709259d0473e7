"""Load causal LMs and find their decoder blocks and linear modules.

Architecture knowledge lives in one table (:data:`FAMILIES`): where the list of decoder
blocks is, and which linear modules of a block belong to attention and to the MLP. The
influence engine, the scorers and the adapters all ask this module, never the model
classes directly, so a new family is one table row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from layerif_plugins.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

ParamGroup = Literal["attn", "mlp", "all"]
PARAM_GROUPS: tuple[str, ...] = ("attn", "mlp", "all")


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its decoder blocks, and how its linears are grouped."""

    blocks_path: str
    attn: str  # regex on the module name relative to the block
    mlp: str


_LLAMA_LIKE = Family("model.layers", r"^self_attn\.", r"^mlp\.")
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA_LIKE for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
        "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2", "smollm3",
    )},
    "gpt2": Family("transformer.h", r"^attn\.", r"^mlp\."),
    "gpt_neox": Family("gpt_neox.layers", r"^attention\.", r"^mlp\."),
    "opt": Family("model.decoder.layers", r"^self_attn\.", r"^(fc1|fc2)$"),
    "phi": Family("model.layers", r"^self_attn\.", r"^mlp\."),
    "falcon": Family("transformer.h", r"^self_attention\.", r"^mlp\."),
}


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
    for fam in {f.blocks_path: f for f in FAMILIES.values()}.values():
        if _get_attr_path(model, fam.blocks_path) is not None:
            logger.info("model_type %r not in the table; using blocks at %s", mtype, fam.blocks_path)
            return fam
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


# ----------------------------------------------------------------------------- fingerprint

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
    "quantization_config", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_commit_hash",
    "tokenizer_class", "pad_token_id", "_experts_implementation",
}


def config_hash(config: Any) -> str:
    """Hash of the architecture-defining config fields (runtime-only fields excluded)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    clean = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model for a scores file: adapters compare it before use."""

    name_or_path: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    config_hash: str

    # fields that must agree for a scores file to apply (name_or_path may legitimately differ)
    MATCH_FIELDS: ClassVar[tuple[str, ...]] = ("architecture", "model_type", "num_layers", "hidden_size", "config_hash")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        return cls(**{f.name: d[f.name] for f in fields(cls)})


def fingerprint(model: nn.Module) -> ModelFingerprint:
    config = model.config
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelFingerprint(
        name_or_path=str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        architecture=str(archs[0]),
        model_type=model_type(model),
        num_layers=num_layers(model),
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
        config_hash=config_hash(config),
    )


# ----------------------------------------------------------------------------- loading


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → cuda when available else cpu; refuse cuda when absent."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _find_llama2c_tokenizer(path: Path, tokenizer: str | Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    for name in ("tok512.bin", "tokenizer.bin"):
        if (path.parent / name).is_file():
            return path.parent / name
    candidates = sorted(path.parent.glob("tok*.bin"))
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(
        f"No llama2.c tokenizer found beside {path} (looked for tok512.bin, tokenizer.bin, tok*.bin). "
        "Pass it with --tokenizer PATH."
    )


def load_model_and_tokenizer(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    device_map: str | dict | None = None,
):
    """Load (model, tokenizer) from an HF directory, a hub id, or a llama2.c ``.bin``.

    The model is returned in eval mode on ``device``, or spread over the available devices
    with ``device_map`` (e.g. ``"auto"``, through accelerate) for models larger than one
    device. A llama2.c checkpoint gets its tokenizer from ``tokenizer`` or from ``tok*.bin``
    beside it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    p = Path(path)
    if p.suffix == ".bin" and p.is_file():
        from layerif_plugins.llama2c import build_llama2c_tokenizer, load_llama2c_model

        model = load_llama2c_model(p, dtype=torch_dtype)
        tok = build_llama2c_tokenizer(_find_llama2c_tokenizer(p, tokenizer), model.config.max_position_embeddings)
        return model.to(dev), tok
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{p} exists but is neither an HF model directory (no config.json) nor a llama2.c .bin")
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load a causal LM from {path!s}: {exc}") from exc
    tok_src = str(tokenizer) if tokenizer is not None else str(path)
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"No tokenizer could be loaded from {tok_src}: {exc}. Save one beside the model or pass --tokenizer."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    decoder_blocks(model)  # fail early on an unknown architecture
    if device_map is not None:
        return model.eval(), tok
    return model.to(dev).eval(), tok


def save_model_dir(model: nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Save model + tokenizer as an HF directory (atomically: temp dir, then rename)."""
    from layerif_plugins.io import atomic_dir

    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
