"""``layerif eval`` (lm-eval on local-file tasks) and ``layerif vllm-check`` (is a saved dir servable by vLLM)."""

from __future__ import annotations

import argparse
import json

from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_write_json, check_parent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model with lm-eval on local tasks (perplexity, multiple choice)")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--tasks", required=True, action="append",
                   help="comma-separated: perplexity:FILE, mc:FILE.jsonl, tinystories-mc, tinystories-ppl "
                        "(repeat the flag for paths with commas)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--limit", type=int, default=None, help="first N documents / items of every task")
    p.add_argument("--mc-fields", default=None,
                   help="field names of mc files, e.g. question=ctx,choices=endings,label=gold")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (hf backend)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 for hf, auto for vllm)")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model config's)")
    p.add_argument("--task-dir", default=None, help="keep the generated lm-eval task files here")
    p.add_argument("--vllm-python", default=None, help="vLLM interpreter (default: $LAYERIF_VLLM_PYTHON or .venv-vllm)")
    p.add_argument("--out", default=None, help="results JSON (written atomically)")
    p.set_defaults(func=run)

    c = sub.add_parser("vllm-check", help="check that a saved model dir is loadable by vLLM; --run serves it")
    c.add_argument("model", help="saved HF model directory (dense, e.g. pruned by llm-compressor)")
    c.add_argument("--run", action="store_true", help="also load it with vllm.LLM (needs the vLLM env and a GPU)")
    c.add_argument("--text", default=None, help="perplexity text file for --run")
    c.add_argument("--limit", type=int, default=None, help="first N documents of --text")
    c.add_argument("--prompt", action="append", default=None, help="generation prompt for --run (repeatable)")
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--vllm-python", default=None)
    c.add_argument("--out", default=None, help="results JSON")
    c.set_defaults(func=run_check)


def parse_fields(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ConfigError(f"--mc-fields {spec!r}: use key=field pairs, e.g. question=ctx,choices=endings")
        out[key.strip()] = val.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.lm_eval import evaluate

    if args.out:
        check_parent(args.out)
    tasks = [t for group in args.tasks for t in group.split(",") if t.strip()]
    res = evaluate(args.model, tasks, tokenizer=args.tokenizer, backend=args.backend, batch_size=args.batch_size,
                   device=args.device, dtype=args.dtype, max_length=args.max_length, max_docs=args.limit,
                   fields=parse_fields(args.mc_fields), task_dir=args.task_dir, vllm_python=args.vllm_python)
    print(res.table())
    print(f"{args.backend} backend, {res.seconds:.1f} s")
    if args.out:
        res.save(args.out)
        print(f"wrote {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.vllm_backend import check_vllm_dir, run_vllm

    check = check_vllm_dir(args.model)
    print(f"{args.model}: OK for vLLM — {check.architecture}, {check.num_params:,} parameters in "
          f"{len(check.weight_files)} safetensors file(s) ({', '.join(check.dtypes)}), "
          f"tokenizer: {', '.join(check.tokenizer_files)}")
    for w in check.warnings:
        print(f"warning: {w}")
    out = {"check": check.__dict__}
    if args.run:
        if args.out:
            check_parent(args.out)
        res = run_vllm(args.model, texts=args.text, prompts=args.prompt or ["Once upon a time"],
                       max_tokens=args.max_tokens, max_docs=args.limit, python=args.vllm_python)
        if res.perplexity:
            print(f"perplexity {res.perplexity.perplexity:.4g}, word perplexity {res.perplexity.word_perplexity:.4g} "
                  f"({res.prompt_tokens_per_s:,.0f} prompt tokens/s)")
        print(f"generation: {res.gen_tokens_per_s:,.0f} tokens/s; first: {res.generations[0][:200]!r}")
        out["vllm"] = res.to_dict()
    if args.out:
        atomic_write_json(args.out, json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.out}")
    return 0
