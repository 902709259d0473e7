"""Depth pruning: perplexity after dropping K decoder layers, before and after LoRA healing.

Layers chosen by angular distance (contiguous block), Block Influence (lowest BI), LayerIF
(highest scores = least well-trained) and the last-layers baseline (which is also what the
depth ramp of docs/method.md §5 drops); perplexity on the task's fixed evaluation documents
before and after the same LoRA healing run (MLP modules, same steps, data, seed and
learning rate for every model, the full model included); and the wall-clock greedy
generation speed (KV cache) of the shallower models relative to the full one.

The task's data come from :func:`quality_pruning.task_splits` (the same disjoint splits as
the pruning benchmark): angular / BI on calibration examples, LayerIF on the score-train →
score-validation split, healing on further calibration-pool examples, perplexity on the
evaluation documents. Every finished row is appended to ``<out>.jsonl`` and skipped on a
rerun with the same sizes (resumable); two methods that drop the same layers share one run.

    .venv/bin/python benchmarks/quality_depth.py --model smollm2-135m             # SmolLM2, WikiText-2
    .venv/bin/python benchmarks/quality_depth.py --model smollm2-135m --quick     # smoke run
    .venv/bin/python benchmarks/quality_depth.py --model stories260k --task tinystories --ks 1,2

Prints markdown and writes it to ``bench_out/quality_depth_<model>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402

# isort: split

import torch  # noqa: E402
from quality_pruning import append_row, examples_of, model_tag, read_rows, task_splits  # noqa: E402

from layerif_plugins.allocate.layers import last_layers, layers_to_drop  # noqa: E402
from layerif_plugins.data import pad_id_of  # noqa: E402
from layerif_plugins.depth.drop import drop_layers  # noqa: E402
from layerif_plugins.depth.heal import HealConfig, heal  # noqa: E402
from layerif_plugins.engine import InfluenceConfig  # noqa: E402
from layerif_plugins.evaluation.perplexity import perplexity  # noqa: E402
from layerif_plugins.io import atomic_write_text  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer, num_layers  # noqa: E402
from layerif_plugins.paths import stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402
from layerif_plugins.scorers import ScoringData, score_layers  # noqa: E402
from layerif_plugins.scores import LayerScores  # noqa: E402

METHODS = ("angular", "block_influence", "layerif", "last")
SIZE_KEYS = ("task", "n_calib", "n_train", "n_val", "max_length", "eval_docs", "min_tokens", "heal_steps",
             "heal_n", "heal_lr", "heal_batch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir, llama2.c .bin or 'stories260k'")
    p.add_argument("--task", default="wikitext2", choices=["wikitext2", "tinystories"])
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    p.add_argument("--ks", default="2,4,6", help="numbers of layers to drop")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n-calib", type=int, default=32, help="calibration examples (angular, BI)")
    p.add_argument("--n-train", type=int, default=32, help="LayerIF train examples")
    p.add_argument("--n-val", type=int, default=16, help="LayerIF validation examples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=48, help="shortest paragraph/story used, in tokens")
    p.add_argument("--eval-docs", type=int, default=12, help="evaluation documents (fixed subset)")
    p.add_argument("--eval-batch", type=int, default=2)
    p.add_argument("--heal-steps", type=int, default=40)
    p.add_argument("--heal-n", type=int, default=256, help="healing examples (calibration pool, after calib)")
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generation timing")
    p.add_argument("--gen-reps", type=int, default=3, help="timing repetitions (median reported; 0 skips)")
    p.add_argument("--layerif-scores", default=None,
                   help="a LayerIF scores file of this model and task (e.g. quality_pruning.py's) instead of scoring")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_calib, args.n_train, args.n_val, args.eval_docs = 8, 8, 4, 4
        args.heal_steps, args.heal_n, args.gen_reps = 5, 32, 1
        args.ks = args.ks.split(",")[0]
    if args.model == "stories260k":
        args.model = str(stories260k_checkpoint())
    return args


def sizes(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SIZE_KEYS}


def gen_seconds(model, prompt_ids: torch.Tensor, new_tokens: int, reps: int) -> float:
    """Median wall-clock seconds of a greedy KV-cache generation of exactly ``new_tokens`` tokens."""
    times = []
    with torch.no_grad():
        model.generate(prompt_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           use_cache=True, pad_token_id=0)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    jsonl = out / f"quality_depth_{tag}.jsonl"
    rows = [r for r in read_rows(jsonl) if r.get("sizes") == sizes(args)]
    base, tok = load_model_and_tokenizer(args.model, device="cpu")
    pad = pad_id_of(tok)
    n_layers = num_layers(base)
    splits = task_splits(args.task, tok, args)
    calib = examples_of(splits["calib"][:args.n_calib], tok, args.max_length, f"{args.task}:calib")
    heal_data = examples_of(splits["calib"][args.n_calib:args.n_calib + args.heal_n], tok, args.max_length,
                            f"{args.task}:heal")
    print(f"[depth] scoring ({len(calib)} calib, LayerIF {args.n_train}→{args.n_val}) …", flush=True)
    t0 = time.perf_counter()
    scores = {
        "angular": score_layers(base, "angular", ScoringData(calib=calib, pad_id=pad), n=1),
        "block_influence": score_layers(base, "block_influence", ScoringData(calib=calib, pad_id=pad)),
    }
    if "layerif" in methods and args.layerif_scores:
        scores["layerif"] = LayerScores.load(args.layerif_scores)
        scores["layerif"].check_model(base)
    elif "layerif" in methods:
        scores["layerif"] = score_layers(
            base, "layerif",
            ScoringData(train=examples_of(splits["train"], tok, args.max_length, f"{args.task}:score-train"),
                        val=examples_of(splits["val"], tok, args.max_length, f"{args.task}:score-val"), pad_id=pad),
            config=InfluenceConfig(params="attn", batch_size=8, show_progress=False))
    print(f"[depth] scores in {time.perf_counter() - t0:.0f} s", flush=True)
    heal_cfg = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=args.heal_batch, seed=0)
    prompt = tok("The history of the", return_tensors="pt")["input_ids"]

    def ppl(model) -> float:
        return perplexity(model, tok, splits["eval"], batch_size=args.eval_batch).perplexity

    def run(method: str, k: int, layers: list[int]) -> dict[str, Any]:
        same = next((r for r in rows if r["k"] == k and r["layers"] == layers), None)
        if same is not None:  # another method dropped the same layers: same model, same numbers
            return {**same, "method": method, "same_as": same["method"]}
        model = copy.deepcopy(base)
        if layers:
            drop_layers(model, layers)
        before = ppl(model)
        speed = gen_seconds(model, prompt, args.gen_tokens, args.gen_reps) if args.gen_reps else None
        t = time.perf_counter()
        healed = heal(model, heal_data, pad, heal_cfg).model
        heal_s = time.perf_counter() - t
        return {"method": method, "k": k, "layers": layers, "ppl": before, "ppl_healed": ppl(healed),
                "gen_s": speed, "heal_s": heal_s, "params": sum(p.numel() for p in model.parameters())}

    plan = [("none", 0)] + [(m, k) for k in ks for m in methods]
    for method, k in plan:
        if any(r["method"] == method and r["k"] == k for r in rows):
            continue
        layers = [] if method == "none" else (last_layers(n_layers, k) if method == "last"
                                              else layers_to_drop(scores[method], k))
        print(f"[depth] K={k} {method}: drop {layers}", flush=True)
        row = {**run(method, k, layers), "sizes": sizes(args)}
        append_row(jsonl, row)
        rows.append(row)
        print(f"[depth]   ppl {row['ppl']:.3f} → healed {row['ppl_healed']:.3f}", flush=True)
    elapsed = time.perf_counter() - t_start

    def fmt(vals: list[float]) -> str:
        return ", ".join(f"{v:.3f}" for v in vals)

    full = next(r for r in rows if r["method"] == "none")
    table = [["none (full)" if r["method"] == "none" else r["method"], str(r["k"]), str(r["layers"] or "–"),
              f"{r['ppl']:.3f}", f"{r['ppl_healed']:.3f}"]
             for r in sorted(rows, key=lambda r: (r["k"], METHODS.index(r["method"]) if r["method"] in METHODS
                                                    else -1))]
    speed = [[str(n_layers - r["k"]), f"{r['params']:,}", f"{1000 * r['gen_s'] / args.gen_tokens:.2f}",
              f"{full['gen_s'] / r['gen_s']:.2f}×"]
             for r in rows if r.get("gen_s") and "same_as" not in r
             and r is next(x for x in rows if x["k"] == r["k"] and x.get("gen_s"))]
    md = [
        f"# Depth pruning of `{args.model}` ({args.task}; perplexity on {args.eval_docs} evaluation documents)",
        "",
        f"Command: `.venv/bin/python benchmarks/quality_depth.py {' '.join(sys.argv[1:])}` "
        f"({elapsed:.0f} s this invocation, {args.threads} torch thread(s), CPU). Sizes: {json.dumps(sizes(args))}.",
        "",
        f"Healing: LoRA r={heal_cfg.r}, alpha={heal_cfg.lora_alpha} on the MLP linears, {heal_cfg.steps} AdamW "
        f"steps, lr {heal_cfg.lr} (constant), batch {heal_cfg.batch_size} × ≤{args.max_length} tokens from "
        f"{len(heal_data)} examples of the task's calibration pool, merged; identical for every row.",
        "",
        f"- angular d(l, l+1): {fmt(scores['angular'].extras['distances']['1'])}",
        f"- Block Influence: {fmt(scores['block_influence'].extras['block_influence'])}",
        *([f"- LayerIF (attn): {', '.join(f'{v:.4g}' for v in scores['layerif'].scores)}"]
          if "layerif" in scores else []),
        "",
        markdown_table(["dropped by", "K", "layers dropped", "ppl (no healing)",
                        f"ppl (healed {heal_cfg.steps} steps)"], table),
        "",
    ]
    if speed:
        md += [f"Generation speed: greedy, KV cache, batch 1, {args.gen_tokens} new tokens, median of "
               f"{args.gen_reps} (shared CPU: indicative only).", "",
               markdown_table(["layers", "parameters", "ms / token", "speed vs full"], speed), ""]
    text = "\n".join(md)
    print(text)
    atomic_write_text(out / f"quality_depth_{tag}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
