"""Read GGUF checkpoints (llama.cpp's format) as plain HF models, through transformers' own GGUF support.

transformers dequantizes every tensor (Q4/Q8/F16 → the requested dtype) and rebuilds the
tokenizer from the ``tokenizer.ggml.*`` metadata, which needs the ``gguf`` package (the
``gguf`` extra). Two things are put right after loading so the result behaves like any
other HF model here:

- the config's ``quantization_config`` (``quant_method: gguf``) is dropped: the weights are
  now dense, and a saved directory that still claimed GGUF quantization would be re-read
  through the GGUF quantizer (and refused by vLLM / llm-compressor);
- the tokenizer's special tokens are set from the file's ``tokenizer.ggml.*_token_id``
  fields: transformers 5.17's GGUF converter names the BOS token as EOS too (for SmolLM2
  ``eos_token`` came back as ``<|im_start|>``, id 1, instead of ``<|im_end|>``, id 2) and sets no pad;
  and ``tokenizer.ggml.add_bos_token`` is honoured (transformers ignores it: a llama2.c /
  SentencePiece vocabulary, which llama.cpp prefixes with BOS, lost its BOS).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.errors import ModelError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# tokenizer.ggml.<field> → the tokenizer attribute it names
_SPECIAL_FIELDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "unknown_token_id": "unk_token",
                   "padding_token_id": "pad_token"}


def is_gguf(path: str | Path) -> bool:
    """True for an existing file that starts with the GGUF magic bytes (whatever its suffix)."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def require_gguf() -> None:
    """Refuse early, with the install command, when the ``gguf`` package is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            "reading a .gguf file needs the `gguf` package: pip install 'layerif-plugins[gguf]' (or pip install gguf)"
        ) from exc


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The scalar metadata of a GGUF file (architecture, sizes, tokenizer ids); arrays are left out.

    Reads the header only (the tensors are memory-mapped, not loaded), so it is cheap enough
    to check a file before the minute-long dequantization of a real model.
    """
    require_gguf()
    from gguf import GGUFReader, GGUFValueType

    p = Path(path)
    if not is_gguf(p):
        raise ModelError(f"{p} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = GGUFReader(str(p))
    except Exception as exc:  # noqa: BLE001 - a truncated header raises ValueError, IndexError, struct / numpy errors
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ModelError(f"{p} is not a readable GGUF file (truncated or corrupt header: {type(exc).__name__}: "
                         f"{first}); download it again") from exc
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            continue
        meta[key] = field.contents()
    return meta


def _set_special_tokens(tok: Any, meta: dict[str, Any], path: Path) -> None:
    """Name the special tokens from the file's ids (see the module docstring for why)."""
    for field, attr in _SPECIAL_FIELDS.items():
        token_id = meta.get(f"tokenizer.ggml.{field}")
        if token_id is None:
            continue
        if not 0 <= int(token_id) < len(tok):
            logger.warning("%s: tokenizer.ggml.%s=%s is outside the vocabulary (%d); ignored",
                           path, field, token_id, len(tok))
            continue
        setattr(tok, attr, tok.convert_ids_to_tokens(int(token_id)))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    for flag in ("add_bos_token", "add_eos_token"):
        value = meta.get(f"tokenizer.ggml.{flag}")
        if value is not None and bool(getattr(tok, flag, False)) != bool(value):
            setattr(tok, flag, bool(value))


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a ``.gguf`` file: weights dequantized to ``dtype``, a plain HF model.

    Raises :class:`ModelError` naming the file when ``gguf`` is missing, the file is not GGUF,
    or transformers does not support its architecture.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    meta = gguf_metadata(p)
    arch = meta.get("general.architecture", "?")
    logger.info("reading GGUF %s (architecture %s; dequantizing to %s)", p, arch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"transformers could not load the GGUF file {p} (architecture {arch!r}): {exc}") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = str(p)
    _set_special_tokens(tok, meta, p)
    tok.clean_up_tokenization_spaces = False  # ignored for BPE by transformers, which warns on every decode
    if tok.model_max_length > 1e9:  # transformers leaves it "unlimited"; the context length is the real limit
        tok.model_max_length = int(model.config.max_position_embeddings)
    return model.eval(), tok
