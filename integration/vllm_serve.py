"""End to end on a GPU machine: prune with LayerIF ratios → check the directory → serve it with vLLM → lm-eval.

Run from the main environment (llm-compressor, lm-eval); vLLM runs in its own environment
(``make vllm-env``, or ``--vllm-python``)::

    .venv/bin/python integration/vllm_serve.py --out /tmp/vllm_run            # stories260K, Wanda 70%
    .venv/bin/python integration/vllm_serve.py --model DIR --scores S.json --calib train.txt --text valid.txt

Prints a markdown table (HF vs vLLM perplexity, vLLM tokens/s, lm-eval vllm metrics) and
writes it with the raw numbers to ``--out``. On a machine without the vLLM environment or
a GPU it stops after the CPU-side directory check, saying why.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerif_plugins.evaluation.perplexity import perplexity
from layerif_plugins.integrations.lm_eval import evaluate
from layerif_plugins.integrations.vllm_backend import check_vllm_dir, run_vllm, vllm_unavailable_reason
from layerif_plugins.io import atomic_write_text
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir
from layerif_plugins.paths import shared_data, stories260k_checkpoint
from layerif_plugins.report import markdown_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF dir or llama2.c .bin (default: stories260K)")
    p.add_argument("--scores", default=None, help="LayerScores JSON for allocation=layerif (default: uniform)")
    p.add_argument("--calib", default=str(shared_data("tinystories", "train.txt")))
    p.add_argument("--text", default=str(shared_data("tinystories", "valid.txt")), help="perplexity text file")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--docs", type=int, default=64, help="documents for perplexity / items for the MC task")
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--out", default="vllm_out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from layerif_plugins.integrations.llmcompressor import prune_model

    src = Path(args.model) if args.model else stories260k_checkpoint()
    if src.suffix == ".bin":
        src = save_model_dir(*load_model_and_tokenizer(src), out / "dense")
    pruned = out / "pruned"
    report = prune_model(src, pruned, sparsity=args.sparsity, allocation="layerif" if args.scores else "uniform",
                         scores=args.scores, calib=args.calib, n_calib=64, overwrite=True)
    check = check_vllm_dir(pruned)
    print(f"pruned to {report['weighted_mean_measured']:.4f}; vLLM dir check ok ({check.architecture})")
    reason = vllm_unavailable_reason(args.vllm_python)
    if reason:
        print(f"stopping before vLLM: {reason}", file=sys.stderr)
        return 0
    res = run_vllm(pruned, texts=args.text, prompts=["Once upon a time"] * 32, max_tokens=128, max_docs=args.docs,
                   python=args.vllm_python)
    model, tok = load_model_and_tokenizer(pruned, device="auto")
    ref = perplexity(model, tok, args.text, max_docs=args.docs,
                     context_length=model.config.max_position_embeddings - 1)
    lm = evaluate(pruned, [f"perplexity:{args.text}", "tinystories-mc"], max_docs=args.docs, backend="vllm",
                  vllm_python=args.vllm_python)
    assert res.perplexity is not None
    rows = [
        ["word perplexity (HF, this process)", ref.word_perplexity],
        ["word perplexity (vLLM prompt_logprobs)", res.perplexity.word_perplexity],
        ["relative difference", abs(res.perplexity.word_perplexity / ref.word_perplexity - 1)],
        ["vLLM prompt tokens/s", res.prompt_tokens_per_s],
        ["vLLM generation tokens/s (32 × 128 tokens)", res.gen_tokens_per_s],
        ["vLLM load seconds", res.load_seconds],
        *[[f"lm-eval vllm {t} {m}", v] for t, r in lm.tasks.items() for m, v in r.metrics.items()],
    ]
    table = markdown_table(["quantity", "value"], rows)
    print(table)
    atomic_write_text(out / "vllm_serve.md", table + "\n")
    atomic_write_text(out / "vllm_serve.json", json.dumps({"vllm": res.to_dict(), "hf": ref.to_dict(),
                                                           "lm_eval": lm.to_dict(), "versions": res.versions},
                                                          indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
