"""llama2.c conversion, tokenizer equivalence, and the block table across families."""

from __future__ import annotations

import struct

import pytest
import torch

from layerif_plugins.data import read_records
from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.models import (
    block_class_name,
    block_linears,
    decoder_blocks,
    fingerprint,
    load_model_and_tokenizer,
)
from layerif_plugins.models.llama2c import build_llama2c_tokenizer, llama2c_encode, read_header, read_llama2c_vocab

KNOWN_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it,"
)


def test_header_matches_shared_readme(stories_bin):
    h = read_header(stories_bin)
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert h.expected_bytes() == stories_bin.stat().st_size == 1_056_540


def test_greedy_decoding_reproduces_known_text(stories_bin):
    model, tok = load_model_and_tokenizer(stories_bin)
    out = model.generate(torch.tensor([[1]]), max_new_tokens=64, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).startswith(KNOWN_GREEDY)


def test_converted_dir_reloads_with_auto_classes(stories_dir, stories_bin):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    ref, _ = load_model_and_tokenizer(stories_bin)
    x = torch.tensor([tok("Once upon a time")["input_ids"]])
    assert x[0, 0].item() == 1  # BOS
    assert torch.equal(model(x).logits, ref(x).logits)
    assert fingerprint(model).config_hash == fingerprint(ref).config_hash


def test_tokenizer_matches_llama2c_encode(stories_bin, tinystories_valid, shakespeare):
    tok = build_llama2c_tokenizer(stories_bin.parent / "tok512.bin")
    pieces, scores = read_llama2c_vocab(stories_bin.parent / "tok512.bin")
    texts = read_records(tinystories_valid)[:40] + read_records(shakespeare)[:40]
    texts += ["Héllo wörld — ünïcode ✓ 漢字", "  two  spaces\n\nand newlines\t", "a", ""]
    for text in texts:
        assert tok(text)["input_ids"] == llama2c_encode(text, pieces, scores), text[:40]
    assert tok.decode(tok("Héllo wörld\nnext")["input_ids"], skip_special_tokens=True) == "Héllo wörld\nnext"


def test_bad_checkpoints_are_refused(tmp_path, stories_bin):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<7i", 64, 172, 5, 8, 3, 512, 512) + b"\0" * 64)
    with pytest.raises(ModelError, match="valid llama2.c v0 header"):
        read_header(bad)
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(stories_bin.read_bytes()[:100_000])
    with pytest.raises(ModelError, match="truncated"):
        read_header(truncated)
    lonely = tmp_path / "lonely" / "model.bin"
    lonely.parent.mkdir()
    lonely.write_bytes(stories_bin.read_bytes())
    with pytest.raises(ModelError, match="--tokenizer"):
        load_model_and_tokenizer(lonely)
    with pytest.raises(ModelError, match="neither an HF model directory"):
        load_model_and_tokenizer(tmp_path)


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {
        "gpt2": dict(n_embd=32, n_layer=3, n_head=4, vocab_size=64, n_positions=64),
        "opt": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64, vocab_size=64,
                    word_embed_proj_dim=32, max_position_embeddings=64),
    }.get(model_type, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, head_dim=8))
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(("model_type", "n_attn", "n_mlp", "block"), [
    ("llama", 4, 3, "LlamaDecoderLayer"),
    ("mistral", 4, 3, "MistralDecoderLayer"),
    ("qwen2", 4, 3, "Qwen2DecoderLayer"),
    ("gemma", 4, 3, "GemmaDecoderLayer"),
    ("gpt2", 2, 2, "GPT2Block"),
    ("opt", 4, 2, "OPTDecoderLayer"),
])
def test_block_table(model_type, n_attn, n_mlp, block):
    model = _tiny(model_type)
    assert len(decoder_blocks(model)) == 3
    assert block_class_name(model) == block
    attn = block_linears(model, "attn")
    mlp = block_linears(model, "mlp")
    assert len(attn) == 3 * n_attn and len(mlp) == 3 * n_mlp
    assert len(block_linears(model, "all")) == len(attn) + len(mlp)
    assert [m.layer for m in attn][:n_attn] == [0] * n_attn
    named = dict(model.named_modules())
    assert all(named[m.name] is m.module for m in attn + mlp)


def test_engine_runs_on_gpt2_conv1d():
    """GPT-2's Conv1D (transposed weights) goes through the same engine and matches the oracle."""
    from layerif_plugins.data import Examples
    from layerif_plugins.engine import InfluenceConfig, compute_influence, reference_influence

    torch.manual_seed(0)
    model = _tiny("gpt2").double().eval()
    train = Examples(tuple(tuple(torch.randint(0, 64, (5 + i,)).tolist()) for i in range(6)))
    val = Examples(tuple(tuple(torch.randint(0, 64, (4 + i,)).tolist()) for i in range(3)))
    res = compute_influence(model, train, val, 0, InfluenceConfig(params="all", pairwise=True, show_progress=False))
    ref = reference_influence(model, train, val, params="all")
    assert float((res.pairwise - ref).abs().max() / ref.abs().max()) < 1e-9


def test_unknown_architecture_and_bad_params():
    from torch import nn

    class Weird(nn.Module):
        config = type("C", (), {"model_type": "weird"})()

    with pytest.raises(ModelError, match="Cannot find the decoder blocks"):
        decoder_blocks(Weird())
    with pytest.raises(ConfigError, match="params must be one of"):
        block_linears(_tiny("llama"), "ffn")


def test_cuda_requested_but_absent(stories_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_model_and_tokenizer(stories_dir, device="cuda")


@pytest.mark.parametrize(("arg", "is_path"), [
    ("/abs/model", True), ("./rel", True), ("../up/model", True), ("~/models/m", True), ("a/b/c", True),
    ("stories15M.bin", True), ("m.gguf", True), ("config.json", True), ("has space", True),
    ("HuggingFaceTB/SmolLM2-135M", False), ("gpt2", False), ("smollm2-135m", False),
])
def test_path_looking_arguments(arg, is_path):
    from layerif_plugins.models import looks_like_path

    assert looks_like_path(arg) is is_path


def test_safetensors_header_is_checked_against_the_file(tmp_path):
    from safetensors.torch import save_file

    from layerif_plugins.models import read_safetensors_header

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.float16)}, str(f))
    header = read_safetensors_header(f)
    assert {k: (t.dtype, t.shape, t.end - t.start) for k, t in header.items()} == {
        "a": ("F32", (3, 4), 48), "b": ("F16", (5,), 10)}
    data = f.read_bytes()
    f.write_bytes(data + b"\0" * 7)
    with pytest.raises(ModelError, match="has 7 bytes after the last tensor"):
        read_safetensors_header(f)
    f.write_bytes(data[:-4])
    with pytest.raises(ModelError, match=r"truncated: .* describes 58 bytes of tensor data but the file holds 54"):
        read_safetensors_header(f)
    f.write_bytes(data[:5])
    with pytest.raises(ModelError, match="not a safetensors file"):
        read_safetensors_header(f)
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:8] + data[8:8 + n].replace(b"F16", b"F64") + data[8 + n:])
    with pytest.raises(ModelError, match=r"tensor 'b' is F64 \[5\] \(40 bytes\) but its header gives it 10"):
        read_safetensors_header(f)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "qwen2"])
def test_intact_checkpoints_pass_the_integrity_check(model_type, tmp_path):
    from safetensors.torch import save_file

    from layerif_plugins.models import check_model_files

    model = _tiny(model_type)
    model.save_pretrained(tmp_path)
    tensors = check_model_files(tmp_path)
    assert set(tensors) <= set(model.state_dict()) and len(tensors) >= 3 * 4
    if model_type == "gpt2":  # the hub's layout: no "transformer." prefix, old mask buffers beside the weights
        state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
                 if k.startswith("transformer.")}
        state.update({"h.0.attn.bias": torch.ones(1, 1, 8, 8), "h.0.attn.masked_bias": torch.tensor(-1e4)})
        save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        assert "h.0.attn.c_attn.weight" in check_model_files(tmp_path)
