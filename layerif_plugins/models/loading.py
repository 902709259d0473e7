"""Load causal LMs (HF directory, hub id, llama2.c ``.bin``) and save them as HF directories."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.models.families import decoder_blocks

logger = logging.getLogger(__name__)

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
        from layerif_plugins.models.llama2c import build_llama2c_tokenizer, load_llama2c_model

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
