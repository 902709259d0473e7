"""``layerif moe``: per-layer LoRA expert counts from layer scores → an initialised PEFT LoRA-MoE adapter.

Writes ``--out`` atomically: ``adapter_config.json`` + ``adapter_model.safetensors`` (load
with ``PeftModel.from_pretrained`` after ``import layerif_plugins``) and ``layout.json``
(``experts`` and ``top_k`` per layer, layer 0 first, and the scores/method behind them).
"""

from __future__ import annotations

import argparse

from layerif_plugins.allocate.experts import LAYOUTS, SCORED_LAYOUTS, check_budget_fits
from layerif_plugins.cli.common import (
    add_model_args,
    add_progress_args,
    declare_paths,
    finite_float,
    load_model,
    load_scoring_data,
    positive_int,
)
from layerif_plugins.report import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("moe", help="layer scores → per-layer LoRA experts → initialised PEFT LoRA-MoE adapter")
    add_model_args(p)
    p.add_argument("--scores", help="LayerScores JSON (from `layerif score`); needed by --layout layerif")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=positive_int,
                      help="total number of experts T over all layers (>= layers; at most layers × hidden size / r)")
    size.add_argument("--max-params", type=positive_int,
                      help="instead of --budget: as many experts as fit in this many trainable parameters "
                           "(experts + routers)")
    size.add_argument("--match-lora-r", type=positive_int,
                      help="instead of --budget: as many experts as fit in the trainable parameters of a plain "
                           "LoRA of this rank on the same --target-modules (a comparison at equal parameters)")
    p.add_argument("--beta", type=finite_float, default=2.5, help="exponent β of the score → experts mapping")
    p.add_argument("--layout", default="layerif", choices=LAYOUTS,
                   help="layerif (docs/method.md §2a), alphalora (alpha_hill scores, AlphaLoRA rounding), MoLA, "
                        "uniform")
    p.add_argument("--max-top-k", type=positive_int, default=2, help="router top-k of layers with more than one expert")
    p.add_argument("--r", type=positive_int, default=8, help="rank of every LoRA expert")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=finite_float, default=0.0)
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names to adapt (default: the model family's projections, "
                        "q_proj … down_proj for Llama; models.families.FAMILIES)")
    p.add_argument("--router-aux-loss-coef", type=finite_float, default=0.001)
    p.add_argument("--router-jitter", type=finite_float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's initial weights")
    p.add_argument("--train", help="with --layout layerif and no --scores: task train data to score on")
    p.add_argument("--val", help="with --layout layerif and no --scores: task validation data")
    p.add_argument("--n-train", type=positive_int, default=None)
    p.add_argument("--n-val", type=positive_int, default=None)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--text-field", default="text")
    add_progress_args(p)
    p.add_argument("--out", required=True, help="adapter directory to write (atomically; see --overwrite)")
    declare_paths(p, dirs=("out",), inputs=("model", "tokenizer", "scores", "train", "val"))
    p.set_defaults(func=run)


def _scores(args: argparse.Namespace, model, tok):
    """The scores behind a scored layout: ``--scores`` (any method), or computed with the layout's method."""
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.scorers import get_scorer, resolve_scores

    method = SCORED_LAYOUTS.get(args.layout)
    if args.scores:
        return resolve_scores(model, None, args.scores), args.scores
    if method is None:
        return None, None
    data = load_scoring_data(args, tok, method)
    params = get_scorer(method).accepted(config=InfluenceConfig(show_progress=not args.quiet))
    return resolve_scores(model, method, None, data, **params), f"{method} (computed)"


def _max_params(args: argparse.Namespace, model, targets: list[str]) -> int | None:
    """The parameter budget of ``--max-params`` / ``--match-lora-r`` (None with ``--budget``), checked to fit."""
    from peft import LoraConfig

    from layerif_plugins.integrations.peft_lora.layout import lora_trainable_params, targeted_linears
    from layerif_plugins.integrations.peft_moe.build import moe_layout_for_params

    if args.budget:
        return None
    if args.max_params:
        most = args.max_params
    else:
        most = lora_trainable_params(LoraConfig(r=args.match_lora_r), targeted_linears(model, targets))
    moe_layout_for_params(model, "uniform", most, args.r, targets)  # the smallest layout: fails early if it cannot fit
    return most


def run(args: argparse.Namespace) -> int:
    import torch

    from layerif_plugins.integrations.peft_moe.build import (
        get_moe_model,
        moe_layout,
        moe_layout_for_params,
        save_moe_adapter,
    )
    from layerif_plugins.models import num_layers
    from layerif_plugins.models.families import peft_targets

    model, tok = load_model(args)
    targets = ([t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules
               else peft_targets(model))
    max_params = _max_params(args, model, targets)  # refuses a size that fits no layout before any scoring
    hidden = getattr(model.config, "hidden_size", None)
    if hidden and args.budget:  # before any scoring: a budget the layers cannot hold would grow without bound
        check_budget_fits(args.budget, num_layers(model), int(hidden), args.r)
    scores, source = _scores(args, model, tok)
    if max_params is None:
        layout = moe_layout(model, args.layout, args.budget, scores=scores, beta=args.beta, max_top_k=args.max_top_k)
    else:
        layout = moe_layout_for_params(model, args.layout, max_params, args.r, targets, scores=scores,
                                       beta=args.beta, max_top_k=args.max_top_k)
    torch.manual_seed(args.seed)
    peft_model = get_moe_model(
        model, layout, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
        router_aux_loss_coef=args.router_aux_loss_coef, router_jitter=args.router_jitter,
    )
    save_moe_adapter(peft_model, layout, args.out, extra={"scores_file": source, "seed": args.seed})
    rows = [[i, n, k, f"{scores.scores[i]:.6g}" if scores else "-"]
            for i, (n, k) in enumerate(zip(layout.experts, layout.top_k, strict=True))]
    print(markdown_table(["layer", "experts", "top_k", "score"], rows))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print(f"layout {args.layout}: {sum(layout.experts)} experts, {trainable:,} trainable parameters")
    print(f"wrote {args.out} (load with `import layerif_plugins` + PeftModel.from_pretrained)")
    return 0
