"""Quality of per-layer sparsity allocations for llm-compressor's Wanda and SparseGPT.

For algorithm ∈ {wanda, sparsegpt} × allocation ∈ {uniform, OWL, AlphaPruning, LayerIF}
× global sparsity ∈ {0.5, 0.6, 0.7}: prune the model with the real ``oneshot``
(:func:`layerif_plugins.integrations.llmcompressor.prune_model`), reload the saved directory
and measure perplexity on TinyStories validation and on Shakespeare
(:func:`layerif_plugins.evaluation.perplexity.perplexity`, lm-eval's rolling-window scheme). LayerIF
scores come from TinyStories train → validation. Each allocation uses its reference
spread (LayerIF ε = 0.1, OWL λ = 0.08, AlphaPruning ε = 0.2) unless ``--epsilon`` is given.

It also times LayerIF-Wanda against uniform Wanda (``oneshot`` wall time, median of
``--repeats`` alternating runs; the LayerIF scores are precomputed, as in a recipe).

Usage: ``python benchmarks/quality_pruning.py`` (full), ``--quick`` (smoke run).
Writes the tables to ``bench_out/quality_pruning.md`` (and the raw rows as JSON).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerif_plugins.allocate.sparsity import default_epsilon  # noqa: E402
from layerif_plugins.data import load_examples, pad_id_of  # noqa: E402
from layerif_plugins.engine import InfluenceConfig  # noqa: E402
from layerif_plugins.evaluation.perplexity import perplexity  # noqa: E402
from layerif_plugins.io import atomic_write_json, atomic_write_text  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402
from layerif_plugins.scorers import ScoringData, score_layers  # noqa: E402

ALLOCATIONS = {name: (label, default_epsilon(name)) for name, label in
               (("uniform", "uniform"), ("owl", "OWL"), ("alpha_hill", "AlphaPruning"), ("layerif", "LayerIF"))}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(stories260k_checkpoint()), help="llama2.c .bin or HF dir")
    p.add_argument("--algorithms", default="wanda,sparsegpt")
    p.add_argument("--allocations", default="uniform,owl,alpha_hill,layerif")
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--epsilon", type=float, default=None, help="one spread for every allocation")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--n-train", type=int, default=128, help="LayerIF train examples (TinyStories train)")
    p.add_argument("--n-val", type=int, default=64, help="LayerIF validation examples (TinyStories valid)")
    p.add_argument("--params", default="attn", choices=["attn", "mlp", "all"], help="LayerIF parameter group")
    p.add_argument("--eval-docs", type=int, default=200, help="documents per perplexity set")
    p.add_argument("--repeats", type=int, default=5, help="timing: runs per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on shared CPUs)")
    p.add_argument("--quick", action="store_true", help="small everything: a smoke run")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args()
    if args.quick:
        args.sparsities, args.n_calib, args.max_length = "0.5,0.7", 16, 64
        args.n_train, args.n_val, args.eval_docs, args.repeats = 32, 16, 20, 1
    return args


def evaluate_dir(path: Path, eval_sets: dict[str, Path], docs: int) -> dict[str, float]:
    model, tok = load_model_and_tokenizer(path)
    return {name: perplexity(model, tok, file, max_docs=docs).perplexity for name, file in eval_sets.items()}


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from layerif_plugins.integrations.llmcompressor import prune_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_txt, valid_txt = shared_data("tinystories", "train.txt"), shared_data("tinystories", "valid.txt")
    eval_sets = {"TinyStories valid": valid_txt, "Shakespeare": shared_data("tinyshakespeare", "input.txt")}
    algorithms = args.algorithms.split(",")
    allocations = args.allocations.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-pruning-") as work_s:
        work = Path(work_s)
        model, tok = load_model_and_tokenizer(args.model)
        model_dir = save_model_dir(model, tok, work / "dense")
        t0 = time.perf_counter()
        data = ScoringData(train=load_examples(train_txt, tok, args.max_length, n=args.n_train),
                           val=load_examples(valid_txt, tok, args.max_length, n=args.n_val), pad_id=pad_id_of(tok))
        scores = score_layers(model, "layerif", data, config=InfluenceConfig(params=args.params, show_progress=False))
        scoring_s = time.perf_counter() - t0
        scores_path = scores.save(out / "quality_pruning_layerif_scores.json")
        print(f"LayerIF scores ({args.params}, {args.n_train}/{args.n_val} ex, {scoring_s:.1f} s): "
              f"{[round(s, 4) for s in scores.scores]}", flush=True)
        dense = evaluate_dir(model_dir, eval_sets, args.eval_docs)
        rows = []
        for algo in algorithms:
            for sp in sparsities:
                for alloc in allocations:
                    eps = args.epsilon if args.epsilon is not None else ALLOCATIONS[alloc][1]
                    pruned = work / f"{algo}_{alloc}_{sp}"
                    report = prune_model(
                        model_dir, pruned, algorithm=algo, sparsity=sp, allocation=alloc, epsilon=eps,
                        scores=scores_path if alloc == "layerif" else None, calib=train_txt,
                        n_calib=args.n_calib, max_length=args.max_length, overwrite=True, show_progress=False,
                    )
                    ppl = evaluate_dir(pruned, eval_sets, args.eval_docs)
                    rows.append({"algorithm": algo, "allocation": alloc, "epsilon": eps, "sparsity": sp,
                                 "measured": report["weighted_mean_measured"],
                                 "layer_sparsity": [r["target"] for r in report["layers"]],
                                 "oneshot_s": report["oneshot_seconds"], **ppl})
                    print(f"{algo:9s} {alloc:10s} s={sp:.2f} measured={rows[-1]['measured']:.4f} "
                          f"ppl TS={ppl['TinyStories valid']:.3f} Shakespeare={ppl['Shakespeare']:.2f}", flush=True)
        # timing: LayerIF-Wanda vs uniform Wanda, alternating so drift hits both
        times: dict[str, list[float]] = {"uniform": [], "layerif": []}
        for _ in range(args.repeats):
            for alloc in ("uniform", "layerif"):
                report = prune_model(
                    model_dir, work / "timing", algorithm="wanda", sparsity=0.7, allocation=alloc,
                    scores=scores_path if alloc == "layerif" else None, calib=train_txt, n_calib=args.n_calib,
                    max_length=args.max_length, overwrite=True, show_progress=False,
                )
                times[alloc].append(report["oneshot_seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["layerif"] / med["uniform"]

    header = ["algorithm", "sparsity", *[ALLOCATIONS[a][0] for a in allocations]]
    pivots = []
    for metric in eval_sets:
        prow = []
        for algo in algorithms:
            for sp in sparsities:
                cells = {r["allocation"]: r[metric] for r in rows if r["algorithm"] == algo and r["sparsity"] == sp}
                best = min(cells.values())
                prow.append([algo, f"{sp:.1f}", *[(f"**{cells[a]:.3f}**" if cells[a] == best else f"{cells[a]:.3f}")
                                                  for a in allocations]])
        pivots.append(f"### {metric} perplexity (dense: {dense[metric]:.3f}; lower is better, best in bold)\n\n"
                      + markdown_table(header, prow) + "\n")
    long = markdown_table(
        ["algorithm", "allocation", "ε / λ", "target", "measured", "per-layer sparsity", *eval_sets],
        [[r["algorithm"], ALLOCATIONS[r["allocation"]][0], r["epsilon"] if r["allocation"] != "uniform" else "-",
          f"{r['sparsity']:.2f}", f"{r['measured']:.4f}", " ".join(f"{x:.3f}" for x in r["layer_sparsity"]),
          f"{r['TinyStories valid']:.3f}", f"{r['Shakespeare']:.3f}"] for r in rows])
    timing = markdown_table(
        ["variant", "runs", "median oneshot s", "all runs s"],
        [["uniform Wanda 0.7", len(times["uniform"]), f"{med['uniform']:.3f}",
          " ".join(f"{t:.2f}" for t in times["uniform"])],
         ["LayerIF-Wanda 0.7", len(times["layerif"]), f"{med['layerif']:.3f}",
          " ".join(f"{t:.2f}" for t in times["layerif"])]])
    text = "\n".join([
        "# Per-layer sparsity allocations for Wanda / SparseGPT (llm-compressor oneshot)",
        "",
        f"Model `{args.model}`; calibration: first {args.n_calib} TinyStories train examples, "
        f"{args.max_length} tokens; perplexity on the first {args.eval_docs} documents of each set "
        "(token-level, rolling windows). LayerIF scores: "
        f"{args.n_train} TinyStories train → {args.n_val} valid examples, params `{args.params}` "
        f"({scoring_s:.1f} s, not part of the oneshot time). OWL outlier ratios come from the calibration "
        "data (M = 5); AlphaPruning from the weights.",
        "",
        *pivots,
        "",
        "### All runs",
        "",
        long,
        "",
        f"### Timing: LayerIF-Wanda / uniform Wanda = {ratio:.3f}× (target ≤ 1.2×)",
        "",
        timing,
        "",
        f"torch threads: {args.threads}; total benchmark time {time.perf_counter() - t_start:.0f} s.",
        f"Command: `python benchmarks/quality_pruning.py {' '.join(sys.argv[1:])}`",
        "",
    ])
    atomic_write_text(out / "quality_pruning.md", text)
    atomic_write_json(out / "quality_pruning.json", {"rows": rows, "dense": dense, "timing": times, "ratio": ratio})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
