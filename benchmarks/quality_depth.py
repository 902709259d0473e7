"""Depth pruning of stories260K: TinyStories perplexity after dropping 1 and 2 of its 5 layers.

Layers chosen by angular distance (contiguous block), Block Influence (lowest BI), LayerIF
(highest scores = least well-trained) and the last-layers baseline; perplexity on the
TinyStories validation set before and after the same LoRA healing run (MLP modules, same
steps, data, seed and learning rate for every model, the full model included); and the
wall-clock greedy generation speed (KV cache) of the shallower models relative to the full one.

    .venv/bin/python benchmarks/quality_depth.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/quality_depth.py --quick    # smoke run (< 1 min)

Prints markdown and writes it to ``bench_out/quality_depth.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from layerif_plugins.allocate.layers import last_layers, layers_to_drop  # noqa: E402
from layerif_plugins.data import load_examples, pad_id_of  # noqa: E402
from layerif_plugins.depth.drop import drop_layers  # noqa: E402
from layerif_plugins.depth.heal import HealConfig, heal  # noqa: E402
from layerif_plugins.engine import InfluenceConfig  # noqa: E402
from layerif_plugins.evaluation.perplexity import perplexity  # noqa: E402
from layerif_plugins.io import atomic_write_text  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402
from layerif_plugins.scorers import ScoringData, score_layers  # noqa: E402

METHODS = ("angular", "block_influence", "layerif", "last")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings for a smoke run")
    p.add_argument("--ks", default="1,2", help="numbers of layers to drop")
    p.add_argument("--n-calib", type=int, default=128, help="calibration examples (angular, BI)")
    p.add_argument("--n-train", type=int, default=128, help="LayerIF train examples")
    p.add_argument("--n-val", type=int, default=64, help="LayerIF validation examples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-docs", type=int, default=500, help="TinyStories validation documents for perplexity")
    p.add_argument("--heal-steps", type=int, default=200)
    p.add_argument("--heal-n", type=int, default=2000, help="TinyStories train examples for healing")
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--gen-tokens", type=int, default=128, help="new tokens per generation timing")
    p.add_argument("--gen-reps", type=int, default=5, help="timing repetitions (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = steadier timings on a shared box)")
    p.add_argument("--out", default="bench_out/quality_depth.md")
    args = p.parse_args(argv)
    if args.quick:
        args.n_calib, args.n_train, args.n_val = 16, 32, 16
        args.max_docs, args.heal_steps, args.heal_n = 50, 20, 256
        args.gen_tokens, args.gen_reps = 48, 2
    return args


def gen_seconds(model, tok, prompt_ids: torch.Tensor, new_tokens: int, reps: int) -> float:
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
    t_start = time.perf_counter()
    base, tok = load_model_and_tokenizer(stories260k_checkpoint(), device="cpu")
    pad = pad_id_of(tok)
    train_txt, valid_txt = shared_data("tinystories", "train.txt"), shared_data("tinystories", "valid.txt")
    calib = load_examples(train_txt, tok, args.max_length, n=args.n_calib)
    lif_train = load_examples(train_txt, tok, args.max_length, n=args.n_train, seed=1)
    lif_val = load_examples(valid_txt, tok, args.max_length, n=args.n_val, seed=1)
    heal_data = load_examples(train_txt, tok, args.max_length, n=args.heal_n, seed=2)
    print(f"[depth] scoring ({len(calib)} calib, LayerIF {len(lif_train)}→{len(lif_val)}) …", file=sys.stderr)
    scores = {
        "angular": score_layers(base, "angular", ScoringData(calib=calib, pad_id=pad), n=1),
        "block_influence": score_layers(base, "block_influence", ScoringData(calib=calib, pad_id=pad)),
        "layerif": score_layers(base, "layerif", ScoringData(train=lif_train, val=lif_val, pad_id=pad),
                                config=InfluenceConfig(params="attn", batch_size=16)),
    }
    heal_cfg = HealConfig(steps=args.heal_steps, lr=args.heal_lr, batch_size=8, seed=0)

    def ppl(model) -> float:
        return perplexity(model, tok, valid_txt, max_docs=args.max_docs, batch_size=16).perplexity

    prompt = tok("Once upon a time", return_tensors="pt")["input_ids"]
    full_ppl = ppl(base)
    full_healed = ppl(heal(copy.deepcopy(base), heal_data, pad, heal_cfg).model)
    full_t = gen_seconds(base, tok, prompt, args.gen_tokens, args.gen_reps)
    rows = [["none (full, 5 layers)", "0", "–", f"{full_ppl:.3f}", f"{full_healed:.3f}"]]
    speed_rows = [["5 (full)", f"{sum(p.numel() for p in base.parameters()):,}",
                   f"{1000 * full_t / args.gen_tokens:.2f}", "1.00×"]]
    for k in ks:
        timed = False
        for method in METHODS:
            layers = last_layers(5, k) if method == "last" else layers_to_drop(scores[method], k)
            print(f"[depth] K={k} {method}: drop {layers}", file=sys.stderr)
            model = copy.deepcopy(base)
            drop_layers(model, layers)
            before = ppl(model)
            if not timed:  # speed depends only on the depth, not on which layers went
                t = gen_seconds(model, tok, prompt, args.gen_tokens, args.gen_reps)
                speed_rows.append([f"{5 - k}", f"{sum(p.numel() for p in model.parameters()):,}",
                                   f"{1000 * t / args.gen_tokens:.2f}", f"{full_t / t:.2f}×"])
                timed = True
            healed = heal(model, heal_data, pad, heal_cfg).model
            rows.append([method, str(k), str(layers), f"{before:.3f}", f"{ppl(healed):.3f}"])
    elapsed = time.perf_counter() - t_start

    def fmt(vals: list[float]) -> str:
        return ", ".join(f"{v:.4f}" for v in vals)

    md = [
        "# Depth pruning of stories260K (TinyStories validation perplexity)",
        "",
        f"Command: `.venv/bin/python benchmarks/quality_depth.py{' --quick' if args.quick else ''}` "
        f"({elapsed:.0f} s, {args.threads} torch thread(s), CPU).",
        "",
        f"Perplexity: token-level, `layerif_plugins.evaluation.perplexity.perplexity` on the first {args.max_docs} "
        f"documents of "
        f"TinyStories valid. Healing: LoRA r={heal_cfg.r}, alpha={heal_cfg.lora_alpha} on the MLP linears, "
        f"{heal_cfg.steps} AdamW steps, lr {heal_cfg.lr}, batch {heal_cfg.batch_size} × ≤{args.max_length} tokens "
        f"from {len(heal_data)} TinyStories train examples, merged; identical for every row.",
        "",
        f"Scores: angular and Block Influence on {len(calib)} TinyStories train examples; LayerIF (attn params) "
        f"{len(lif_train)} train → {len(lif_val)} validation examples.",
        "",
        f"- angular d(l, l+1): {fmt(scores['angular'].extras['distances']['1'])}; "
        f"d(l, l+2): {fmt(scores['angular'].extras['distances']['2'])}",
        f"- Block Influence: {fmt(scores['block_influence'].extras['block_influence'])}",
        f"- LayerIF: {', '.join(f'{v:.4g}' for v in scores['layerif'].scores)}",
        "",
        markdown_table(["dropped by", "K", "layers dropped", "ppl (no healing)",
                        f"ppl (healed {heal_cfg.steps} steps)"], rows),
        "",
        f"Generation speed: greedy, KV cache, batch 1, {args.gen_tokens} new tokens after a "
        f"{prompt.shape[1]}-token prompt, median of {args.gen_reps}.",
        "",
        markdown_table(["layers", "parameters", "ms / token", "speed vs full"], speed_rows),
        "",
    ]
    text = "\n".join(md)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
