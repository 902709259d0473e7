"""What identifies a model for a scores file (:class:`ModelFingerprint`); integrations compare it before use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from torch import nn

from layerif_plugins.models.families import model_type, num_layers

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
