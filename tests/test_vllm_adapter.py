"""The vLLM path: the CPU-side directory check, the interpreter checks, and the perplexity windows.

Real vLLM runs (``@pytest.mark.vllm``) need the separate vLLM environment and a GPU; they
skip with the reason elsewhere. The window arithmetic they rely on is checked here on CPU
by feeding the prompts to the HF model and summing prompt log-probabilities exactly as the
worker sums vLLM's ``prompt_logprobs``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.evaluation.checks import check_vllm_dir, safetensors_header
from layerif_plugins.evaluation.perplexity import perplexity
from layerif_plugins.integrations.vllm_backend import (
    perplexity_windows,
    probe_vllm,
    run_vllm,
    vllm_python,
    vllm_unavailable_reason,
)
from layerif_plugins.integrations.vllm_backend.worker import sum_prompt_logprobs
from layerif_plugins.models import load_model_and_tokenizer


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def wanda_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K pruned to 50% by llm-compressor's real Wanda, saved with save_compressed=True."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    from layerif_plugins.data import load_examples
    from layerif_plugins.paths import shared_data

    model, tok = load_model_and_tokenizer(stories_dir)
    ex = load_examples(shared_data("tinystories", "train.txt"), tok, 64, n=8)
    ds = Dataset.from_dict({"input_ids": [list(x) for x in ex.input_ids],
                            "attention_mask": [[1] * len(x) for x in ex.input_ids]})
    recipe = WandaPruningModifier(sparsity=0.5, targets=["LlamaDecoderLayer"], ignore=["re:.*lm_head"])
    oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=ds, num_calibration_samples=8, max_seq_length=64)
    out = tmp_path_factory.mktemp("wanda") / "stories-wanda50"
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    return out


def test_check_passes_on_dense_model(stories_dir: Path):
    from safetensors import safe_open

    check = check_vllm_dir(stories_dir)
    assert check.architecture == "LlamaForCausalLM"
    assert check.weight_files == ["model.safetensors"] and "tokenizer.json" in check.tokenizer_files
    with safe_open(str(stories_dir / "model.safetensors"), "pt") as fh:  # independent reader
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    header = safetensors_header(stories_dir / "model.safetensors")
    assert {k: v["shape"] for k, v in header.items()} == shapes
    assert check.num_params == sum(torch.Size(s).numel() for s in shapes.values())


@pytest.mark.integration
@pytest.mark.slow
def test_check_passes_on_wanda_pruned_model(wanda_dir: Path):
    from safetensors.torch import load_file

    check = check_vllm_dir(wanda_dir)
    assert check.dtypes == ["F32"]
    weights = load_file(str(wanda_dir / "model.safetensors"))
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert float((q == 0).float().mean()) == pytest.approx(0.5, abs=0.02)  # pruned, stored dense


def test_check_refuses_sparsity_config_with_targets(stories_dir: Path, tmp_path: Path):
    bad = _copy(stories_dir, tmp_path / "sparse")
    _edit_config(bad, quantization_config={
        "quant_method": "compressed-tensors", "format": "sparse-24-bitmask",
        "sparsity_config": {"format": "sparse-24-bitmask", "targets": ["Linear"], "ignore": ["lm_head"],
                            "global_sparsity": 0.5, "sparsity_structure": "2:4"}})
    with pytest.raises(ModelError, match=r"sparsity_config with targets \['Linear'\].*refuses"):
        check_vllm_dir(bad)
    # an empty sparsity_config (no targets) is what dense saves may carry: accepted
    _edit_config(bad, quantization_config={"quant_method": "compressed-tensors",
                                           "sparsity_config": {"format": "dense", "targets": []}})
    assert check_vllm_dir(bad).architecture == "LlamaForCausalLM"


def test_check_refuses_quantization_unless_allowed(stories_dir: Path, tmp_path: Path):
    bad = _copy(stories_dir, tmp_path / "quant")
    _edit_config(bad, quantization_config={"quant_method": "compressed-tensors",
                                           "config_groups": {"group_0": {"targets": ["Linear"]}}})
    with pytest.raises(ModelError, match="quantization_config with targets"):
        check_vllm_dir(bad)
    assert check_vllm_dir(bad, allow_quantized=True).num_tensors > 0


def test_check_other_failures(stories_dir: Path, tmp_path: Path):
    from safetensors.torch import save_file

    no_arch = _copy(stories_dir, tmp_path / "no_arch")
    _edit_config(no_arch, architectures=None)
    with pytest.raises(ModelError, match="no 'architectures'"):
        check_vllm_dir(no_arch)

    no_tok = _copy(stories_dir, tmp_path / "no_tok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="has no tokenizer"):
        check_vllm_dir(no_tok)

    bin_only = _copy(stories_dir, tmp_path / "bin_only")
    (bin_only / "model.safetensors").rename(bin_only / "pytorch_model.bin")
    with pytest.raises(ModelError, match="needs safetensors"):
        check_vllm_dir(bin_only)

    packed = _copy(stories_dir, tmp_path / "packed")
    save_file({"model.layers.0.mlp.up_proj.weight_packed": torch.zeros(4, 2, dtype=torch.int32)},
              str(packed / "model.safetensors"))
    with pytest.raises(ModelError, match="weight_packed.*not a dense"):
        check_vllm_dir(packed)

    sharded = _copy(stories_dir, tmp_path / "sharded")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match="missing.*00002"):
        check_vllm_dir(sharded)


def test_interpreter_missing_or_without_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LAYERIF_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(ConfigError, match=r"vLLM interpreter not found.*make vllm-env"):
        vllm_python()
    # this test environment's python has no vllm (it cannot: compressed-tensors pins conflict)
    with pytest.raises(ConfigError, match=r"has no vllm.*make vllm-env"):
        probe_vllm(sys.executable)
    reason = vllm_unavailable_reason(sys.executable)
    assert reason is not None and "make vllm-env" in reason


def test_run_vllm_refuses_wrong_interpreter_before_starting(stories_dir: Path):
    from layerif_plugins.integrations.lm_eval import evaluate

    with pytest.raises(ConfigError, match="has no vllm"):
        run_vllm(stories_dir, prompts=["Once upon a time"], python=sys.executable)
    with pytest.raises(ConfigError, match=r"has no vllm.*make vllm-env"):
        evaluate(stories_dir, ["tinystories-mc"], max_docs=2, backend="vllm", vllm_python=sys.executable)


@pytest.mark.slow
def test_windows_reproduce_own_perplexity(stories: tuple, tinystories_valid: Path):
    """Prompt log-probs of the vLLM windows (computed here with the HF model) give the evaluator's NLL."""
    model, tok = stories
    from layerif_plugins.evaluation.documents import read_perplexity_docs

    docs = read_perplexity_docs(tinystories_valid, max_docs=3)
    ctx = 48  # small, so documents span several windows
    windows, n_tokens = perplexity_windows(tok, docs, ctx)
    assert sum(n for _, n in windows) == n_tokens
    assert max(len(ids) for ids, _ in windows) == ctx + 1
    nll = 0.0
    with torch.no_grad():
        for ids, n_score in windows:
            lp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
            # vLLM's layout: entry k holds log P(ids[k] | ids[:k]); entry 0 is None
            prompt_logprobs = [None] + [{ids[k]: float(lp[k - 1, ids[k]])} for k in range(1, len(ids))]
            nll -= sum_prompt_logprobs(prompt_logprobs, ids, n_score)
    ref = perplexity(model, tok, docs, context_length=ctx)
    assert ref.tokens == n_tokens
    assert nll == pytest.approx(ref.nll, rel=1e-5)
    with pytest.raises(ValueError, match="n_score"):
        sum_prompt_logprobs([None, {5: -1.0}], [1, 5], 2)


# ---------------------------------------------------------------- real vLLM (GPU + the vLLM environment)

_REASON = None


def _skip_without_vllm() -> None:
    global _REASON
    if _REASON is None:
        _REASON = vllm_unavailable_reason() or ""
    if _REASON:
        pytest.skip(f"vLLM unavailable: {_REASON}")


@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_perplexity_matches_hf(wanda_dir: Path, tinystories_valid: Path):
    _skip_without_vllm()
    res = run_vllm(wanda_dir, texts=tinystories_valid, prompts=["Once upon a time"], max_docs=16, max_tokens=32,
                   llm_args={"dtype": "float32", "gpu_memory_utilization": 0.3})
    model, tok = load_model_and_tokenizer(wanda_dir)
    ctx = model.config.max_position_embeddings - 1
    ref = perplexity(model, tok, tinystories_valid, max_docs=16, context_length=ctx)
    assert res.perplexity is not None
    assert res.perplexity.word_perplexity == pytest.approx(ref.word_perplexity, rel=0.01)
    assert res.gen_tokens == 32 and res.gen_tokens_per_s > 0


@pytest.mark.vllm
@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_lm_eval_backend(stories_dir: Path, tinystories_valid: Path):
    _skip_without_vllm()
    from layerif_plugins.integrations.lm_eval import evaluate

    hf = evaluate(stories_dir, [f"perplexity:{tinystories_valid}", "tinystories-mc"], max_docs=16, device="cpu")
    vl = evaluate(stories_dir, [f"perplexity:{tinystories_valid}", "tinystories-mc"], max_docs=16, backend="vllm",
                  vllm_args={"gpu_memory_utilization": 0.3})
    assert vl.metric("ppl_valid", "word_perplexity") == pytest.approx(hf.metric("ppl_valid", "word_perplexity"),
                                                                      rel=0.01)
    assert abs(vl.metric("tinystories_mc", "acc") - hf.metric("tinystories_mc", "acc")) <= 2 / 16
