"""``layerif eval`` (lm-eval on local-file tasks) and ``layerif vllm-check`` (is a saved dir servable by vLLM)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from layerif_plugins.cli.common import declare_paths, device_option, finite_float, positive_int
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_write_json

if TYPE_CHECKING:
    from layerif_plugins.integrations.vllm_backend import VllmOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model with lm-eval on local tasks (perplexity, multiple choice)")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--tasks", required=True, action="append",
                   help="comma-separated: perplexity:FILE, mc:FILE.jsonl, tinystories-mc, tinystories-ppl "
                        "(repeat the flag for paths with commas)")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--limit", type=positive_int, default=None, help="first N documents / items of every task")
    p.add_argument("--mc-fields", default=None,
                   help="field names of mc files, e.g. question=ctx,choices=endings,label=gold")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default="auto", type=device_option, help="cpu | cuda | cuda:N | auto (hf backend)")
    p.add_argument("--dtype", default=None,
                   help="weights dtype (default float32; vLLM's auto runs a float32 checkpoint in bfloat16/float16)")
    p.add_argument("--max-length", type=positive_int, default=None, help="context length (default: the model config's)")
    p.add_argument("--task-dir", default=None, help="keep the generated lm-eval task files here")
    p.add_argument("--vllm-python", default=None, help="vLLM interpreter (default: $LAYERIF_VLLM_PYTHON or .venv-vllm)")
    _vllm_options(p)
    p.add_argument("--out", default=None, help="results JSON (written atomically; see --overwrite)")
    declare_paths(p, files={"out": "json"}, into=("task_dir",), inputs=("model", "tokenizer"),
                  more_inputs=_task_files)
    p.set_defaults(func=run)

    c = sub.add_parser("vllm-check", help="check that a saved model dir is loadable by vLLM; --run serves it")
    c.add_argument("model", help="saved HF model directory (dense, e.g. pruned by llm-compressor)")
    c.add_argument("--run", action="store_true",
                   help="also serve it with vllm.LLM in the vLLM env (`make vllm-env`; CPU or GPU)")
    c.add_argument("--text", default=None, help="perplexity text file for --run")
    c.add_argument("--limit", type=positive_int, default=None, help="first N documents of --text")
    c.add_argument("--prompt", action="append", default=None, help="generation prompt for --run (repeatable)")
    c.add_argument("--max-tokens", type=positive_int, default=64)
    c.add_argument("--context-length", type=positive_int, default=None,
                   help="perplexity window (default: max_position_embeddings - 2)")
    c.add_argument("--dtype", default="float32", help="vLLM dtype (float32 matches the HF evaluator; auto: bf16/fp16)")
    c.add_argument("--vllm-python", default=None)
    _vllm_options(c)
    c.add_argument("--out", default=None, help="results JSON (see --overwrite)")
    declare_paths(c, files={"out": "json"}, inputs=("model", "text"))
    c.set_defaults(func=run_check)


def _vllm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-gib", type=finite_float, default=None,
                   help="vLLM KV cache in GiB (default on CPU: 1, or $VLLM_CPU_KVCACHE_SPACE; on GPU vLLM's own)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="vLLM CPU threads (default: $OMP_NUM_THREADS, else every core this process may use)")


def _task_files(args: argparse.Namespace) -> dict[str, list[str]]:
    """The data files named inside ``--tasks`` (``perplexity:FILE``, ``mc:FILE``): inputs ``--out`` must not touch."""
    specs = [t.strip() for group in args.tasks or [] for t in group.split(",") if t.strip()]
    return {"--tasks": [spec.partition(":")[2] for spec in specs if ":" in spec]}


def _options(args: argparse.Namespace, dtype: str | None) -> VllmOptions:
    from layerif_plugins.integrations.vllm_backend import VllmOptions

    return VllmOptions(dtype=dtype or "float32", kv_cache_gib=args.kv_cache_gib, threads=args.threads)


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

    tasks = [t for group in args.tasks for t in group.split(",") if t.strip()]
    res = evaluate(args.model, tasks, tokenizer=args.tokenizer, backend=args.backend, batch_size=args.batch_size,
                   device=args.device, dtype=args.dtype, max_length=args.max_length, max_docs=args.limit,
                   fields=parse_fields(args.mc_fields), task_dir=args.task_dir, vllm_python=args.vllm_python,
                   vllm_options=_options(args, args.dtype) if args.backend == "vllm" else None)
    print(res.table())
    print(f"{args.backend} backend, {res.seconds:.1f} s")
    if args.out:
        res.save(args.out)
        print(f"wrote {args.out}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.vllm_backend import check_vllm_dir, probe_vllm, run_vllm

    device = probe_vllm(args.vllm_python)["device"] if args.run else None
    check = check_vllm_dir(args.model, device=device)
    print(f"{args.model}: OK for vLLM{f' on {device}' if device else ''} — {check.architecture}, "
          f"{check.num_params:,} parameters in "
          f"{len(check.weight_files)} safetensors file(s) ({', '.join(check.dtypes)}), "
          f"tokenizer: {', '.join(check.tokenizer_files)}; "
          f"quantization: {', '.join(check.schemes) if check.schemes else 'none (dense weights)'}")
    for w in check.warnings:
        print(f"warning: {w}")
    out = {"check": check.__dict__}
    if args.run:
        res = run_vllm(args.model, texts=args.text, prompts=args.prompt or ["Once upon a time"],
                       max_tokens=args.max_tokens, max_docs=args.limit, python=args.vllm_python,
                       context_length=args.context_length, options=_options(args, args.dtype))
        if res.perplexity:
            print(f"perplexity {res.perplexity.perplexity:.4g}, word perplexity {res.perplexity.word_perplexity:.4g} "
                  f"({res.prompt_tokens_per_s:,.0f} prompt tokens/s)")
        print(f"vLLM {res.versions.get('vllm', '?')} on {res.device}: loaded in {res.load_seconds:.1f} s; generation "
              f"{res.gen_tokens_per_s:,.0f} tokens/s; first: {res.generations[0][:200]!r}")
        out["vllm"] = res.to_dict()
    if args.out:
        atomic_write_json(args.out, json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.out}")
    return 0
