"""``layerif prune``: llm-compressor Wanda / SparseGPT with per-layer sparsity from LayerIF or a baseline.

    layerif prune --model M --algorithm wanda --sparsity 0.7 --allocation layerif \\
                  --scores scores.json --calib train.txt --out M-wanda70

Writes an HF directory vLLM loads as a dense model, with the tokenizer, llm-compressor's
``recipe.yaml`` and ``sparsity_report.json`` (target vs measured sparsity per layer/module).
"""

from __future__ import annotations

import argparse

from layerif_plugins.allocate.sparsity import ALLOCATIONS, REFERENCE_EPSILON, epsilon_or_auto
from layerif_plugins.cli.common import MODEL_HELP
from layerif_plugins.report import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    from layerif_plugins.cli.common import declare_paths, finite_float, positive_int

    p = sub.add_parser("prune", help="one-shot Wanda / SparseGPT pruning with LayerIF / OWL / AlphaPruning ratios")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--algorithm", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=finite_float, required=True, help="global target in (0, 1), parameter-weighted")
    p.add_argument("--allocation", default="layerif", choices=ALLOCATIONS,
                   help="per-layer ratios: layerif (needs --scores), owl (from --calib), alpha_hill (from the "
                        "weights), depth_ramp (score = layer index: the depth control), uniform")
    p.add_argument("--scores", default=None, help="LayerScores JSON of this model (method = --allocation)")
    p.add_argument("--epsilon", type=epsilon_or_auto, default=None,
                   help="relative spread: ratios in [1-eps, 1+eps] before rescaling (OWL's lambda for owl); "
                        "default: the reference's (" + ", ".join(
                            f"{a} {e}" for a, e in REFERENCE_EPSILON.items() if e) + "); auto: try eps in "
                        "{0, 0.05, 0.1, 0.2, 0.3} (0 = uniform) as scored and inverted, keep the lowest perplexity "
                        "on held-out calibration examples (one extra oneshot per candidate, 9 by default)")
    p.add_argument("--invert", action="store_true",
                   help="reverse the mapping: more sparsity where the scores say less (--epsilon "
                        "auto tries both directions anyway)")
    p.add_argument("--n-holdout", type=positive_int, default=None,
                   help="--epsilon auto: held-out examples, the ones after the first --n-calib of --calib "
                        "(default: max(8, n-calib/4))")
    p.add_argument("--holdout-length", type=positive_int, default=None,
                   help="--epsilon auto: tokens per held-out example (default: --max-length); judge the candidates "
                        "at the context length you serve when calibration is cut short")
    p.add_argument("--calib", required=True, help="calibration data (.txt / .jsonl)")
    p.add_argument("--n-calib", type=positive_int, default=128, help="calibration examples (the first N)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per calibration example")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="calibration batch size (batches are truncated to their shortest example: use > 1 when "
                        "the examples are all longer than --max-length)")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out written by layerif")
    p.add_argument("--quiet", action="store_true", help="no progress bars of ours")
    declare_paths(p, dirs=("out",), inputs=("model", "scores", "calib"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.llmcompressor import prune_model

    report = prune_model(
        args.model, args.out, algorithm=args.algorithm, sparsity=args.sparsity, allocation=args.allocation,
        scores=args.scores, epsilon=args.epsilon, invert=args.invert, calib=args.calib, n_calib=args.n_calib,
        max_length=args.max_length, batch_size=args.batch_size, overwrite=args.overwrite, show_progress=not args.quiet,
        n_holdout=args.n_holdout, holdout_length=args.holdout_length,
    )
    if report["epsilon_search"]:
        found = report["epsilon_search"]
        print(markdown_table(["epsilon", "inverted", "held-out perplexity"],
                             [[c["epsilon"], c["invert"], c["error"] or f"{c['perplexity']:.4f}"]
                              for c in found["sweep"]]))
        print(f"epsilon auto: chose {report['epsilon_used']}{' inverted' if report['invert'] else ''} "
              f"({found['chosen_perplexity']:.4f} vs uniform {found['uniform_perplexity']:.4f})")
    rows = [[r["layer"], f"{r['target']:.4f}", f"{r['measured']:.4f}", f"{r['params']:,}"] for r in report["layers"]]
    rows.append(["mean (weighted)", f"{report['weighted_mean_target']:.4f}",
                 f"{report['weighted_mean_measured']:.4f}", f"{sum(r['params'] for r in report['layers']):,}"])
    print(markdown_table(["layer", "target", "measured", "params"], rows))
    print(f"{args.algorithm} / {args.allocation}: oneshot {report['oneshot_seconds']:.1f} s; wrote {args.out} "
          f"(sparsity_report.json, recipe.yaml)")
    return 0
