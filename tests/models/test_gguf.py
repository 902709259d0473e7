"""GGUF input: a GGUF written here from stories260K (F32 tensors) loads to the same logits and tokens.

The GGUF files are written in the test with the ``gguf`` package's ``GGUFWriter`` exactly as
llama.cpp's converter lays a Llama out (q/k rows permuted to interleaved rotary pairs,
``tokenizer.ggml.*`` metadata), so no download is needed; with F32 tensors the dequantized
model must reproduce the source model's logits bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hostlibs import require

from layerif_plugins.cli import main
from layerif_plugins.data import read_records
from layerif_plugins.errors import ModelError
from layerif_plugins.models import load_model_and_tokenizer, model_dir_for
from layerif_plugins.models.llama2c import SPACE, SPECIAL_PIECES, load_llama2c_model, read_llama2c_vocab

gguf = require("gguf", "gguf")


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows → llama.cpp's interleaved pairs (the inverse of what transformers undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama2c_vocab(tok_bin: Path) -> tuple[list[str], list[float], list[int]]:
    """A llama2.c vocabulary as GGUF ``llama`` (SentencePiece) tokens, scores and token types."""
    pieces, scores = read_llama2c_vocab(tok_bin)
    tokens, types = [], []
    for i, piece in enumerate(pieces):
        if i in SPECIAL_PIECES:
            tokens.append(SPECIAL_PIECES[i])
            types.append(gguf.TokenType.UNKNOWN if i == 0 else gguf.TokenType.CONTROL)
        else:
            tokens.append(piece.decode("utf-8", errors="replace").replace(" ", SPACE))
            types.append(gguf.TokenType.BYTE if piece.startswith(b"<0x") else gguf.TokenType.NORMAL)
    return tokens, scores, types


def write_llama_gguf(model, path: Path, vocab: tuple[list[str], list[float], list[int]]) -> Path:
    """Write an HF Llama and a SentencePiece-style vocabulary as an F32 GGUF file."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("layerif-test")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(c.vocab_size)
    tokens, scores, types = vocab
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", _interleave(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(b + "attn_k.weight", _interleave(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_stories_gguf(stories_bin: Path, path: Path) -> Path:
    """stories260K (weights and tok512 vocabulary) as an F32 GGUF file."""
    return write_llama_gguf(load_llama2c_model(stories_bin), path, llama2c_vocab(stories_bin.parent / "tok512.bin"))


@pytest.fixture(scope="module")
def stories_gguf(stories_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stories_gguf(stories_bin, tmp_path_factory.mktemp("gguf") / "stories260K.gguf")


def test_gguf_loads_to_the_source_logits_and_tokens(stories_gguf, stories_bin, tinystories_valid):
    model, tok = load_model_and_tokenizer(stories_gguf)
    ref, ref_tok = load_model_and_tokenizer(stories_bin)
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (5, 64, 4)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
    texts = read_records(tinystories_valid)[:20] + ["Héllo wörld — ünïcode ✓ 漢字", "a"]
    for text in texts:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text[:40]
    x = torch.tensor([ref_tok(texts[0])["input_ids"][:128]])
    assert torch.equal(model(x).logits, ref(x).logits)  # F32 tensors: exact


def test_gguf_with_gqa_and_untied_head_is_exact(tmp_path, stories_bin):
    """q/k un-permutation with 8 query / 2 KV heads of 16, and a separate output matrix."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5)
    src = LlamaForCausalLM(config).eval()
    path = write_llama_gguf(src, tmp_path / "gqa.gguf", llama2c_vocab(stories_bin.parent / "tok512.bin"))
    model, _ = load_model_and_tokenizer(path)
    assert model.config.tie_word_embeddings is False
    x = torch.randint(0, 512, (2, 33))
    assert torch.equal(model(x).logits, src(x).logits)


def test_convert_cli_writes_an_hf_dir_without_gguf_quantization(stories_gguf, stories_bin, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["convert", str(stories_gguf), "--out", str(out)]) == 0
    assert "5 layers" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ref, ref_tok = load_model_and_tokenizer(stories_bin)
    x = torch.tensor([ref_tok("Once upon a time there was a cat")["input_ids"]])
    assert tok("Once upon a time there was a cat")["input_ids"] == x[0].tolist()
    assert torch.equal(model(x).logits, ref(x).logits)

    half = tmp_path / "hf-bf16"
    assert main(["convert", str(stories_gguf), "--out", str(half), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(half, dtype="auto").dtype == torch.bfloat16


def test_model_dir_for_converts_gguf(stories_gguf, tmp_path):
    d = model_dir_for(stories_gguf, tmp_path)
    assert d == tmp_path / "model" and (d / "config.json").is_file() and (d / "tokenizer.json").is_file()
    assert model_dir_for(d, tmp_path / "unused") == d


def test_not_a_gguf_file_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_model_and_tokenizer(fake)
    assert main(["convert", str(fake), "--out", str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
