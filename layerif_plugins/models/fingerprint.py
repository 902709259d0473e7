"""What identifies a model for a scores file (:class:`ModelFingerprint`); integrations compare it before use.

Two parts: the architecture (type, layer count, hidden size, a hash of the config) and the
**weights** (:func:`weights_fingerprint`): two checkpoints with the same config and other
weights (a fine-tune, a re-trained model) give other scores, so a scores file, a plan or a
scoring checkpoint made on one must not be applied to the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from layerif_plugins.models.families import model_type, num_layers

logger = logging.getLogger(__name__)

#: below this many weight elements in all, every value is hashed (stories260K, test models, ~32 MB in bf16)
FULL_DIGEST_ELEMENTS = 16 * 2**20
#: above it, this many evenly spaced values of every tensor are hashed (plus every name and shape)
SAMPLES_PER_TENSOR = 4096
WEIGHTS_FORMAT = "w1"

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


# ----------------------------------------------------------------------------- weights


def _value_bytes(t: torch.Tensor, precision: torch.dtype) -> bytes:
    """The bit patterns of ``t``'s values: floats rounded to ``precision`` (so float32 / bfloat16 copies agree)."""
    t = t.detach()
    if t.is_floating_point():
        return t.to(precision).contiguous().view(torch.int16).cpu().numpy().tobytes()
    if t.dtype is torch.bool:
        t = t.to(torch.uint8)
    return t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()


def _sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced values of the flattened ``t`` (first and last included)."""
    flat = t.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, n, dtype=torch.float64).round().long()
    return flat[idx.to(flat.device)]


def _named_tensors(source: nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        items: Iterable[tuple[str, torch.Tensor]] = source.named_parameters()
    elif isinstance(source, Mapping):
        items = source.items()
    else:
        raise TypeError(f"weights_fingerprint: model must be a torch nn.Module or a mapping of name to tensor, got "
                        f"{type(source).__name__}")
    out = []
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights_fingerprint: {name!r} is a {type(t).__name__}, not a tensor")
        out.append((str(name), t))
    return sorted(out, key=lambda item: item[0])


def weights_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str | None:
    """A short, stable fingerprint of a model's weights: ``"w1:<precision>:<mode>:<32 hex digits>"``.

    Hashes (SHA-256, cut to 128 bits) every parameter's name and shape and its values: all of
    them when the model has at most :data:`FULL_DIGEST_ELEMENTS` weight elements
    (``mode="full"``: any change of any value is seen), else :data:`SAMPLES_PER_TENSOR` evenly
    spaced values of each tensor (``mode="sampled"``: a few ms for a 7B model; replaced or
    re-trained weights change almost every value, so any sample sees it; a single edited
    value may be missed).

    Floating-point values are hashed **rounded to bfloat16** (``precision="bf16"``), so the
    same checkpoint loaded in float32 or bfloat16 - on any device - has the same fingerprint.
    A model holding float16 tensors is hashed in float16 (``precision="f16"``): rounding
    float16 and bfloat16 copies to one grid does not agree bit for bit, so fingerprints of
    different precisions are not compared (:func:`same_weights` returns None).

    Args:
        model: the model (its ``named_parameters()``; tied weights counted once) or a
            ``{name: tensor}`` state dict.

    Returns:
        The fingerprint, or ``None`` when values cannot be read (parameters on the ``meta``
        device, e.g. offloaded by ``device_map``).

    Raises:
        TypeError: ``model`` is neither a module nor a mapping of tensors.
    """
    tensors = _named_tensors(model)
    if any(t.device.type == "meta" for _, t in tensors):
        logger.debug("weights_fingerprint: parameters on the meta device (offloaded); no weights fingerprint")
        return None
    precision = torch.float16 if any(t.dtype is torch.float16 for _, t in tensors) else torch.bfloat16
    full = sum(t.numel() for _, t in tensors) <= FULL_DIGEST_ELEMENTS
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, t in tensors:
            kind = "float" if t.is_floating_point() else str(t.dtype)
            digest.update(f"{name}|{tuple(t.shape)}|{kind}\n".encode())
            if t.numel() == 0:
                continue
            values = t if full or t.numel() <= SAMPLES_PER_TENSOR else _sample(t, SAMPLES_PER_TENSOR)
            digest.update(_value_bytes(values, precision))
    label = "f16" if precision is torch.float16 else "bf16"
    return f"{WEIGHTS_FORMAT}:{label}:{'full' if full else 'sampled'}:{digest.hexdigest()[:32]}"


def same_weights(a: str | None, b: str | None) -> bool | None:
    """True / False when the two fingerprints can be compared; None when one is missing or of another precision."""
    if not a or not b:
        return None
    pa, pb = a.split(":"), b.split(":")
    if len(pa) != 4 or len(pb) != 4 or pa[:3] != pb[:3]:
        return None
    return pa[3] == pb[3]


# ----------------------------------------------------------------------------- the fingerprint


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a model for a scores file: adapters compare it before use.

    ``weights`` (:func:`weights_fingerprint`) is ``None`` in files written before it existed
    (accepted; the comparison is skipped with a debug log) and for offloaded models.
    """

    name_or_path: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    config_hash: str
    weights: str | None = None

    # fields that must agree for a scores file to apply (name_or_path may legitimately differ);
    # ``weights`` is compared separately (:func:`same_weights`: an older file has none)
    MATCH_FIELDS: ClassVar[tuple[str, ...]] = ("architecture", "model_type", "num_layers", "hidden_size", "config_hash")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        """From a file's ``model`` block; every field checked for its JSON type (``"5"`` is not a layer count)."""
        from layerif_plugins.fields import check_number, check_string

        if not isinstance(d, dict):
            raise TypeError(f"the model fingerprint is a {type(d).__name__}, not a JSON object")
        missing = [f.name for f in fields(cls) if f.name != "weights" and f.name not in d]
        if missing:
            raise KeyError(f"missing {missing}")
        weights = d.get("weights")
        return cls(
            name_or_path=check_string(d["name_or_path"], "model.name_or_path"),
            architecture=check_string(d["architecture"], "model.architecture"),
            model_type=check_string(d["model_type"], "model.model_type"),
            num_layers=check_number(d["num_layers"], "model.num_layers", kind="int", minimum=1),
            hidden_size=check_number(d["hidden_size"], "model.hidden_size", kind="int", minimum=0),
            config_hash=check_string(d["config_hash"], "model.config_hash"),
            weights=None if weights is None else check_string(weights, "model.weights"),
        )


def fingerprint(model: nn.Module) -> ModelFingerprint:
    """The :class:`ModelFingerprint` of ``model``, its weights fingerprint included."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fingerprint: model must be a torch nn.Module (a loaded model), got {type(model).__name__}")
    config = model.config
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return ModelFingerprint(
        name_or_path=str(getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")),
        architecture=str(archs[0]),
        model_type=model_type(model),
        num_layers=num_layers(model),
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)),
        config_hash=config_hash(config),
        weights=weights_fingerprint(model),
    )
