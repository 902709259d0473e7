"""Read llama2.c ("tinyllamas") checkpoints and tokenizers and turn them into HF objects.

The llama2.c "v0" format is a 7-int32 header followed by raw float32 arrays; its
tokenizer is a list of (score, bytes) pieces encoded by SentencePiece-style BPE (merge
the adjacent pair whose merged piece has the highest score). We convert the weights to
an HF ``LlamaForCausalLM`` and the tokenizer to a ``tokenizers`` BPE with byte fallback,
so the result can be saved with ``save_pretrained`` and reloaded by ``AutoTokenizer`` /
``AutoModelForCausalLM`` -- which is what llm-compressor, lm-eval and vLLM need.

A slow pure-Python copy of llama2.c's own ``encode`` (:func:`llama2c_encode`) is kept as
the test oracle for the converted tokenizer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerif_plugins.errors import ModelError

HEADER = struct.Struct("<7i")
SPECIAL_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>"}
SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True)
class Llama2cHeader:
    """The seven integers at the start of a llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int

    @property
    def shared_classifier(self) -> bool:
        return self.vocab_size > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def weight_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Arrays in file order (RoPE tables and the optional classifier last)."""
        d, h, n, v = self.dim, self.hidden_dim, self.n_layers, abs(self.vocab_size)
        shapes = [
            ("tok_embeddings", (v, d)),
            ("attention_norm", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, self.kv_dim, d)),
            ("wv", (n, self.kv_dim, d)),
            ("wo", (n, d, d)),
            ("ffn_norm", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("norm", (d,)),
            ("freqs", (2, self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("output", (v, d)))
        return shapes

    def expected_bytes(self) -> int:
        return HEADER.size + 4 * sum(int(np.prod(s)) for _, s in self.weight_shapes())


def read_header(path: Path) -> Llama2cHeader:
    """Read and sanity-check the header; raise :class:`ModelError` naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"llama2.c checkpoint not found: {path}")
    raw = path.read_bytes()[: HEADER.size]
    if len(raw) < HEADER.size:
        raise ModelError(f"{path} is too short ({len(raw)} bytes) to hold a llama2.c header")
    header = Llama2cHeader(*HEADER.unpack(raw))
    fields = [header.dim, header.hidden_dim, header.n_layers, header.n_heads, header.n_kv_heads,
              abs(header.vocab_size), header.seq_len]
    if min(fields) <= 0 or header.dim % header.n_heads or header.n_heads % header.n_kv_heads:
        raise ModelError(
            f"{path} does not have a valid llama2.c v0 header: {header}. "
            "Only the legacy v0 format (7 int32 then float32 weights) is supported; "
            "export with llama2.c's `export.py --version 0`."
        )
    size = path.stat().st_size
    if size != header.expected_bytes():
        raise ModelError(
            f"{path} has {size} bytes but its header {header} implies {header.expected_bytes()}: "
            "the file is truncated or not a llama2.c v0 checkpoint."
        )
    return header


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from llama2.c's interleaved rotary pairs to HF's rotate-half layout."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a llama2.c v0 checkpoint as an HF ``LlamaForCausalLM`` (weights converted exactly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    header = read_header(path)
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    arrays: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in header.weight_shapes():
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(data[offset : offset + count].copy()).view(shape)
        offset += count

    config = LlamaConfig(
        vocab_size=abs(header.vocab_size),
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": arrays["tok_embeddings"], "model.norm.weight": arrays["norm"]}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = arrays["attention_norm"][i]
        state[p + "post_attention_layernorm.weight"] = arrays["ffn_norm"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(arrays["wq"][i], header.n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(arrays["wk"][i], header.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        state[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        state[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        state[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        state[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    state["lm_head.weight"] = arrays["tok_embeddings"] if header.shared_classifier else arrays["output"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise ModelError(f"llama2.c conversion mismatch: missing={missing} unexpected={unexpected}")
    if header.shared_classifier:
        model.tie_weights()
    model.config.name_or_path = str(path)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- tokenizer


def read_llama2c_vocab(path: str | Path) -> tuple[list[bytes], list[float]]:
    """Pieces (raw bytes) and scores of a llama2.c ``tokenizer.bin``/``tok512.bin``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"llama2.c tokenizer not found: {path}. Pass it with --tokenizer "
            "(for stories260K it is tok512.bin beside the checkpoint)."
        )
    raw = path.read_bytes()
    pieces: list[bytes] = []
    scores: list[float] = []
    pos = 4
    try:
        while pos < len(raw):
            score, length = struct.unpack_from("<fi", raw, pos)
            pos += 8
            if length < 0 or pos + length > len(raw):
                raise struct.error("bad piece length")
            pieces.append(raw[pos : pos + length])
            scores.append(score)
            pos += length
    except struct.error as exc:
        raise ModelError(f"{path} is not a llama2.c tokenizer file (piece {len(pieces)}: {exc})") from exc
    if len(pieces) < 3:
        raise ModelError(f"{path} holds {len(pieces)} pieces; a llama2.c tokenizer has at least 3")
    return pieces, scores


def _piece_text(i: int, piece: bytes) -> str:
    if i in SPECIAL_PIECES:
        return SPECIAL_PIECES[i]
    return piece.decode("utf-8", errors="replace")


def llama2c_encode(text: str, pieces: list[bytes], scores: list[float], bos: bool = True) -> list[int]:
    """llama2.c's ``encode`` in pure Python (slow; the oracle for the converted tokenizer)."""
    lookup = {_piece_text(i, p): i for i, p in enumerate(pieces)}
    tokens: list[int] = [1] if bos else []
    if not text:
        return tokens
    ids = [lookup[" "]] if " " in lookup else []
    for ch in text:
        if ch in lookup:
            ids.append(lookup[ch])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    texts = {i: _piece_text(i, p) for i, p in enumerate(pieces)}
    while True:
        best, best_id, best_pos = -1e10, -1, -1
        for k in range(len(ids) - 1):
            merged = texts[ids[k]] + texts[ids[k + 1]]
            j = lookup.get(merged)
            if j is not None and scores[j] > best:
                best, best_id, best_pos = scores[j], j, k
        if best_pos == -1:
            break
        ids[best_pos : best_pos + 2] = [best_id]
    return tokens + ids


def build_llama2c_tokenizer(path: str | Path, model_max_length: int = 512):
    """Convert a llama2.c tokenizer into an HF fast tokenizer (BPE + byte fallback).

    Pieces are ranked by score like SentencePiece; every way of splitting a multi-character
    piece into two vocabulary pieces becomes a merge with that piece's rank. A leading space
    is prepended and spaces become ``▁``, as in the Llama tokenizer; BOS is added.
    """
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pieces, scores = read_llama2c_vocab(path)
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab[_piece_text(i, piece).replace(" ", SPACE)] = i
    order = sorted(range(len(pieces)), key=lambda i: (-scores[i], i))
    merges: list[tuple[str, str]] = []
    for i in order:
        if i in SPECIAL_PIECES or pieces[i].startswith(b"<0x"):
            continue
        text = _piece_text(i, pieces[i]).replace(" ", SPACE)
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        model_max_length=model_max_length,
        padding_side="right",
        add_bos_token=True,
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def load_llama2c(path: str | Path, tokenizer: str | Path | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(HF model, HF tokenizer) from a llama2.c checkpoint and its tokenizer (found beside it by default)."""
    path = Path(path)
    model = load_llama2c_model(path, dtype=dtype)
    tok = build_llama2c_tokenizer(find_llama2c_tokenizer(path, tokenizer), model.config.max_position_embeddings)
    return model, tok


def find_llama2c_tokenizer(path: Path, tokenizer: str | Path | None) -> Path:
    """``tokenizer`` if given, else ``tok512.bin`` / ``tokenizer.bin`` / the one ``tok*.bin`` beside ``path``."""
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
