"""``layerif prune`` and ``layerif plan``: per-layer sparsity chosen (and judged on held-out data), then one oneshot.

    layerif plan  --model M --algorithm wanda --sparsity 0.7 --allocation auto --scores scores.json \\
                  --calib train.txt --out plan.json
    layerif prune --model M --algorithm wanda --sparsity 0.7 --plan plan.json --calib train.txt --out M-wanda70
    layerif prune --model M --algorithm wanda --sparsity 0.7 --allocation atp --calib train.txt --out M-atp70

``prune`` writes an HF directory vLLM loads as a dense model, with the tokenizer,
llm-compressor's ``recipe.yaml``, ``plan.json`` (the allocation plan) and
``sparsity_report.json`` (target vs measured sparsity per layer/module). The allocation
options come from :class:`~layerif_plugins.plan.AllocationOptions` (one set of checks for
the CLI, ``prune_model`` and the modifiers).
"""

from __future__ import annotations

import argparse
from typing import Any

from layerif_plugins.allocate.sparsity import ALLOCATIONS, REFERENCE_EPSILON, epsilon_or_auto
from layerif_plugins.cli.common import MODEL_HELP
from layerif_plugins.report import markdown_table

ALLOCATION_HELP = (
    "per-layer ratios: layerif (needs --scores), owl (from --calib), alpha_hill (from the weights), depth_ramp "
    "(score = layer index), uniform, atp (ATP's depth progression, its slope --beta searched on held-out "
    "calibration data unless given), sensitivity (measured per-layer sensitivity, exact knapsack, local search), "
    "auto (every provider with its knob searched; the simplest kept unless another beats it by --sigmas paired "
    "standard errors)")


def _options() -> Any:
    from layerif_plugins.cli.common import ConfigOptions
    from layerif_plugins.plan import AllocationOptions

    return ConfigOptions(AllocationOptions, exclude=("epsilon_grid",), choices={"allocation": ALLOCATIONS})


def _common(p: argparse.ArgumentParser) -> None:
    from layerif_plugins.cli.common import finite_float, positive_int

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--algorithm", default="wanda", choices=["wanda", "sparsegpt"])
    p.add_argument("--sparsity", type=finite_float, required=True, help="global target in (0, 1), parameter-weighted")
    p.add_argument("--allocation", default="layerif", choices=ALLOCATIONS, help=ALLOCATION_HELP)
    p.add_argument("--scores", default=None, help="LayerScores JSON of this model (method = --allocation; "
                                                  "a LayerIF file adds LayerIF to --allocation auto)")
    p.add_argument("--epsilon", type=epsilon_or_auto, default=None,
                   help="relative spread: ratios in [1-eps, 1+eps] before rescaling (OWL's lambda for owl); "
                        "default: the reference's (" + ", ".join(
                            f"{a} {e}" for a, e in REFERENCE_EPSILON.items() if e) + "); auto: try eps in "
                        "{0, 0.05, 0.1, 0.2, 0.3} (0 = uniform) as scored and inverted, keep the lowest loss "
                        "on held-out calibration examples")
    p.add_argument("--invert", action="store_true",
                   help="reverse the mapping: more sparsity where the scores say less (--epsilon auto tries both)")
    p.add_argument("--n-holdout", type=positive_int, default=None,
                   help="a search's held-out examples: the ones after the first --n-calib of --calib "
                        "(default: max(8, n-calib/4))")
    p.add_argument("--holdout-length", type=positive_int, default=None,
                   help="tokens per held-out example (default: --max-length); judge the candidates at the context "
                        "length you serve when calibration is cut short")
    p.add_argument("--calib", required=True, help="calibration data (.txt / .jsonl)")
    p.add_argument("--n-calib", type=positive_int, default=128, help="calibration examples (the first N)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per calibration example")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="calibration batch size (batches are truncated to their shortest example: use > 1 when "
                        "the examples are all longer than --max-length)")
    _options().add_to(p)
    p.add_argument("--overwrite", action="store_true", help="replace an --out written by layerif")
    p.add_argument("--quiet", action="store_true", help="no progress bars of ours")


def register(sub: argparse._SubParsersAction) -> None:
    from layerif_plugins.cli.common import declare_paths

    p = sub.add_parser("prune", help="one-shot Wanda / SparseGPT pruning with per-layer ratios from a plan")
    _common(p)
    p.add_argument("--plan", default=None,
                   help="an allocation plan JSON (`layerif plan`): its per-layer list, no search")
    p.add_argument("--save-plan", default=None, help="also write the plan here (it is always in --out/plan.json)")
    p.add_argument("--quantize", default=None, choices=["W8A8", "W8A16", "W4A16", "FP8"],
                   help="also quantize after pruning, in the same oneshot, saved compressed (vLLM on CPU serves "
                        "W8A8 only; the others need --device-target gpu)")
    p.add_argument("--device-target", default="cpu", choices=["cpu", "gpu"],
                   help="where vLLM will serve the result: a --quantize scheme it cannot serve there is refused")
    p.add_argument("--out", required=True, help="output HF directory")
    declare_paths(p, dirs=("out",), files={"save_plan": "json"}, inputs=("model", "scores", "calib", "plan"))
    p.set_defaults(func=run)

    q = sub.add_parser("plan", help="choose per-layer sparsity on held-out calibration data; write a plan JSON")
    _common(q)
    q.add_argument("--out", required=True, help="the plan JSON to write")
    declare_paths(q, files={"out": "json"}, inputs=("model", "scores", "calib"))
    q.set_defaults(func=run_plan)


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(algorithm=args.algorithm, sparsity=args.sparsity, scores=args.scores, calib=args.calib,
                n_calib=args.n_calib, max_length=args.max_length, batch_size=args.batch_size,
                n_holdout=args.n_holdout, holdout_length=args.holdout_length, overwrite=args.overwrite,
                show_progress=not args.quiet, options=_options().build(args))


def print_plan(plan: Any) -> None:
    from layerif_plugins.integrations.llmcompressor.planning import summary_rows

    if len(plan.candidates) > 1:
        print(markdown_table(["candidate", "knobs", "status", "held-out perplexity", "Δ loss vs uniform ± SE"],
                             summary_rows(plan)))
        for line in plan.decision.get("why", []):
            print(f"  {line}")
        cost = plan.cost
        print(f"plan: chose {plan.chosen.get('provider')} ({cost.get('prunes', 0)} pruning passes, "
              f"{cost.get('layer_prunes', 0)} single-layer prunes, {cost.get('seconds', 0):.0f} s)")


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.llmcompressor import prune_model
    from layerif_plugins.plan import AllocationPlan

    report = prune_model(args.model, args.out, plan=args.plan, save_plan=args.save_plan, quantize=args.quantize,
                         device_target=args.device_target, **_kwargs(args))
    print_plan(AllocationPlan.load(report["plan_file"]))
    if report["epsilon_search"]:
        found = report["epsilon_search"]
        print(f"epsilon auto: chose {report['epsilon_used']}{' inverted' if report['invert'] else ''} "
              f"({found['chosen_perplexity']:.4f} vs uniform {found['uniform_perplexity']:.4f})")
    rows = [[r["layer"], f"{r['target']:.4f}", f"{r['measured']:.4f}", f"{r['params']:,}"] for r in report["layers"]]
    rows.append(["mean (weighted)", f"{report['weighted_mean_target']:.4f}",
                 f"{report['weighted_mean_measured']:.4f}", f"{sum(r['params'] for r in report['layers']):,}"])
    print(markdown_table(["layer", "target", "measured", "params"], rows))
    check = report.get("search_check") or {}
    if check.get("checked"):
        print(f"saved model = chosen candidate: {'yes' if check['same_model'] else 'NO'} (held-out perplexity "
              f"{check['saved_perplexity']:.4f} saved, {check['judged_perplexity']:.4f} judged)")
    quantized = f" + {args.quantize}" if args.quantize else ""
    print(f"{args.algorithm} / {args.allocation}{quantized}: oneshot {report['oneshot_seconds']:.1f} s; wrote "
          f"{args.out} (plan.json, sparsity_report.json, recipe.yaml)")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.llmcompressor.prune import plan_pruning

    plan = plan_pruning(args.model, args.out, **_kwargs(args))
    print_plan(plan)
    print(markdown_table(["layer", "sparsity"], [[i, f"{s:.4f}"] for i, s in enumerate(plan.layer_sparsity)]))
    print(f"wrote {args.out}: prune with `layerif prune --plan {args.out} …`")
    return 0
