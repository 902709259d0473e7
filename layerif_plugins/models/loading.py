"""Load causal LMs and save them as HF directories.

Accepted everywhere a model is read: an HF directory, a hub id, a llama2.c ``.bin``, a
``.gguf`` file (dequantized by transformers, see :mod:`layerif_plugins.models.gguf`) and a
catalogue name such as ``smollm2-135m`` (see :mod:`layerif_plugins.models.catalogue`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.models.catalogue import resolve_model
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


def _load_tokenizer(source: str) -> Any:
    """``AutoTokenizer`` from a directory or hub id, with a pad token (EOS, else UNK) when it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"No tokenizer could be loaded from {source}: {exc}. Save one beside the model or pass --tokenizer."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model_and_tokenizer(
    path: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    device_map: str | dict | None = None,
):
    """Load (model, tokenizer) from an HF directory, a hub id, a llama2.c ``.bin``, a ``.gguf`` or a catalogue name.

    The model is returned in eval mode on ``device``, or spread over the available devices
    with ``device_map`` (e.g. ``"auto"``, through accelerate) for models larger than one
    device. A llama2.c checkpoint gets its tokenizer from ``tokenizer`` or from ``tok*.bin``
    beside it; a GGUF file carries its own (``tokenizer`` overrides it). A catalogue name
    (``smollm2-135m``) is replaced by its cached directory, fetched on first use unless
    downloads are off (:func:`~layerif_plugins.models.catalogue.resolve_model`).
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model(path)
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        from layerif_plugins.models.gguf import load_gguf

        model, tok = load_gguf(p, dtype=torch_dtype)
        if tokenizer is not None:
            tok = _load_tokenizer(str(tokenizer))
        decoder_blocks(model)
        return model.to(dev), tok
    if p.suffix == ".bin" and p.is_file():
        from layerif_plugins.models.llama2c import load_llama2c

        model, tok = load_llama2c(p, tokenizer, dtype=torch_dtype)
        return model.to(dev), tok
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{p} exists but is neither an HF model directory (no config.json), a llama2.c .bin "
                         "nor a .gguf file")
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not load a causal LM from {path!s}: {exc}") from exc
    tok = _load_tokenizer(str(tokenizer) if tokenizer is not None else str(path))
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


def model_dir_for(path: str | Path, tmp: str | Path) -> Path:
    """An HF directory for any accepted model argument, for tools that only read directories.

    An HF directory is returned as is; a catalogue name becomes its cached directory; a
    llama2.c ``.bin`` or a ``.gguf`` is converted into ``tmp/model`` (fp32). llm-compressor's
    ``oneshot``, lm-eval and vLLM take the result.
    """
    resolved = Path(resolve_model(path))
    if resolved.is_file() and resolved.suffix in (".bin", ".gguf"):
        model, tok = load_model_and_tokenizer(resolved, device="cpu")
        return save_model_dir(model, tok, Path(tmp) / "model")
    if not (resolved / "config.json").is_file():
        raise ModelError(
            f"{path} is neither an HF model directory (no config.json), a llama2.c .bin, a .gguf file "
            "nor a catalogue name (`layerif models list`)"
        )
    return resolved
