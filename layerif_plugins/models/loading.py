"""Load causal LMs and save them as HF directories.

Accepted everywhere a model is read: an HF directory, a hub id, a llama2.c ``.bin``, a
``.gguf`` file (dequantized by transformers, see :mod:`layerif_plugins.models.gguf`) and a
catalogue name such as ``smollm2-135m`` (see :mod:`layerif_plugins.models.catalogue`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.models.catalogue import resolve_model
from layerif_plugins.models.families import decoder_blocks
from layerif_plugins.models.integrity import (
    TOKENIZER_FILES,
    check_finite_parameters,
    check_loading_info,
    check_model_files,
)

logger = logging.getLogger(__name__)

def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → cuda when available else cpu; refuse cuda when absent."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, str | torch.device | int):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', a torch.device or a CUDA index, "
                        f"got {type(device).__name__}")
    if isinstance(device, int):  # torch's convention: an integer is a CUDA device index
        if device < 0:
            raise ValueError(f"device index must be >= 0, got {device}")
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
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


#: suffixes of model files: an argument ending with one is a local path, never a hub id
MODEL_FILE_SUFFIXES = (".bin", ".gguf", ".json", ".safetensors", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_path(arg: str | Path) -> bool:
    """True when ``arg`` can only be a local path, not a hub id (``org/name``) or a catalogue name.

    Paths: an absolute or home-relative path (``/``, ``~``), one starting with ``.``, one with
    more than one ``/`` or a backslash, or ending with a model-file suffix (``.bin``,
    ``.gguf``, ``.json``, ``.safetensors`` …); anything a hub repo id cannot spell.
    """
    if isinstance(arg, Path):
        return True
    text = str(arg)
    return (text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1
            or (os.sep != "/" and os.sep in text) or text.lower().endswith(MODEL_FILE_SUFFIXES)
            or ".." in text or "--" in text or not _HUB_ID.match(text))


def locate_model(arg: str | Path) -> str | Path:
    """Where a model argument points: a local path (``~`` expanded), a catalogue entry's directory, or a hub id.

    Never lets a missing local path reach the hub: a path-looking argument that does not
    exist is "not found" in one line, and a hub-looking one (``org/name``) that is neither
    local nor in the HF cache is refused at once when downloads are off
    (``HF_HUB_OFFLINE`` / ``LAYERIF_OFFLINE``), or after one quick look-up on the hub
    (no retries) otherwise.
    """
    from layerif_plugins.models.catalogue import offline

    resolved = resolve_model(arg)
    if Path(resolved).exists():
        return resolved
    local = Path(resolved).expanduser()
    if local.exists():
        return local
    text = str(arg)
    if looks_like_path(arg) or looks_like_path(resolved):
        raise ModelError(f"model not found: {text} (no such file or directory: {local.absolute()})")
    where = (f"neither a local file or directory (looked for {local.absolute()}), a catalogue name "
             "(`layerif models list`), nor a hub model")
    if _in_hub_cache(text):
        return text
    if offline():
        raise ModelError(f"model not found: {text} is {where} in the local HF cache (downloads are off: "
                         "HF_HUB_OFFLINE / LAYERIF_OFFLINE)")
    problem = _hub_lookup(text)
    if problem:
        raise ModelError(f"model not found: {text} is {where} ({problem})")
    return text


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, no cache: not cached
        return False


def _hub_lookup(repo_id: str) -> str | None:
    """None when ``repo_id`` is a model on the hub; else why not, in a few words (one request, no retries)."""
    from huggingface_hub import model_info

    try:
        model_info(repo_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - not found, gated, no network: one line either way
        name = type(exc).__name__
        first = (str(exc).strip().splitlines() or [name])[0]
        if "NotFound" in name or "404" in first:
            return "no such repository on the hub"
        return f"the hub could not be asked: {name}: {first[:160]}"
    return None


def _tokenizer_problem(source: str | Path) -> str | None:
    """Why no tokenizer can come from a local ``source`` (None: it looks loadable, or it is a hub id)."""
    p = Path(source).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            return (f"no tokenizer in {p} (looked for {', '.join(TOKENIZER_FILES)}); save one beside the model "
                    "(tokenizer.save_pretrained(dir)) or pass --tokenizer DIR")
        return None
    if p.exists():
        return f"tokenizer {p} is a file; pass the directory that holds it (--tokenizer DIR)"
    if looks_like_path(source):
        return f"tokenizer not found: {source} (no such directory: {p.absolute()})"
    return None


def _load_tokenizer(source: str | Path) -> Any:
    """``AutoTokenizer`` from a directory or hub id, with a pad token (EOS, else UNK) when it has none."""
    from transformers import AutoTokenizer

    problem = _tokenizer_problem(source)
    if problem:
        raise ModelError(problem)
    try:
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if looks_like_path(source) else str(source))
    except Exception as exc:  # noqa: BLE001 - any failure of a tokenizer file is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"No tokenizer could be loaded from {source}: {first[:300]}. Save one beside the model or pass --tokenizer."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def limit_to_positions(tok: Any, positions: Any) -> None:
    """Lower ``tok.model_max_length`` to the model's ``positions`` (when they are known and smaller).

    Tokenizers often state no limit (a huge sentinel) or a larger one than the model holds;
    :func:`~layerif_plugins.data.load_examples` reads it to refuse over-length examples.
    """
    current = getattr(tok, "model_max_length", None)
    if isinstance(positions, int) and positions > 0 and (not isinstance(current, int) or current > positions):
        tok.model_max_length = positions


def _fit_tokenizer(model: nn.Module, tok: Any, where: str | Path) -> None:
    """Make the tokenizer state the model's limits: ``model_max_length`` ≤ its positions; warn on a larger vocab.

    :func:`~layerif_plugins.data.load_examples` reads ``model_max_length`` to refuse
    examples longer than the model's positions.
    """
    limit_to_positions(tok, getattr(model.config, "max_position_embeddings", None))
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int) and len(tok) > rows:
        logger.warning("%s: the tokenizer has %d tokens but the model's embedding only %d rows; ids >= %d would "
                       "fail", where, len(tok), rows, rows)


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

    Every model is checked before it is returned (:mod:`layerif_plugins.models.integrity`):
    safetensors headers against their files, ``config.json`` against the weights (a missing
    tensor is an error, never a random initialisation), and finite weights (the tensor with
    NaN / inf is named). A missing local path never reaches the hub (:func:`locate_model`).
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    path = locate_model(path)
    p = Path(path)
    if tokenizer is not None and looks_like_path(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise ModelError(f"tokenizer not found: {tokenizer} (no such file or directory)")
    if p.suffix == ".gguf" and p.is_file():
        from layerif_plugins.models.gguf import load_gguf

        model, tok = load_gguf(p, dtype=torch_dtype)
        if tokenizer is not None:
            tok = _load_tokenizer(tokenizer)
        decoder_blocks(model)
        check_finite_parameters(model, p)
        _fit_tokenizer(model, tok, p)
        return model.to(dev), tok
    if p.suffix == ".bin" and p.is_file():
        from layerif_plugins.models.llama2c import load_llama2c

        model, tok = load_llama2c(p, tokenizer, dtype=torch_dtype)
        check_finite_parameters(model, p)
        _fit_tokenizer(model, tok, p)
        return model.to(dev), tok
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{p} exists but is neither an HF model directory (no config.json), a llama2.c .bin "
                         "nor a .gguf file")
    tok_source = tokenizer if tokenizer is not None else path
    if p.is_dir():
        if problem := _tokenizer_problem(tok_source):
            raise ModelError(problem)
        check_model_files(p, finite=False)  # headers, sizes, config vs weights; values below, once loaded
    try:
        extra = {"device_map": device_map} if device_map is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, output_loading_info=True,
                                                           **extra)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, RuntimeError, SafetensorError, pickle errors…
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"Could not load a causal LM from {path!s}: {type(exc).__name__}: {first[:300]}") from exc
    check_loading_info(path, info)
    decoder_blocks(model)  # fail early on an unknown architecture
    check_finite_parameters(model, path)
    tok = _load_tokenizer(tok_source)
    _fit_tokenizer(model, tok, path)
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

    An HF directory is returned as is, after the checks of
    :func:`~layerif_plugins.models.integrity.check_model_files` (the tool that loads it does
    not make them); a catalogue name becomes its cached directory; a llama2.c ``.bin`` or a
    ``.gguf`` is converted into ``tmp/model`` (fp32). llm-compressor's ``oneshot``, lm-eval
    and vLLM take the result.
    """
    resolved = Path(locate_model(path))
    if resolved.is_file() and resolved.suffix in (".bin", ".gguf"):
        model, tok = load_model_and_tokenizer(resolved, device="cpu")
        return save_model_dir(model, tok, Path(tmp) / "model")
    if not (resolved / "config.json").is_file():
        raise ModelError(
            f"{path} is neither an HF model directory (no config.json), a llama2.c .bin, a .gguf file "
            "nor a catalogue name (`layerif models list`)"
        )
    if problem := _tokenizer_problem(resolved):
        raise ModelError(problem)
    check_model_files(resolved)
    return resolved
