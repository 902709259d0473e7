"""``layerif lora-layout``: layer scores → per-layer LoRA ranks → a stock PEFT ``LoraConfig`` JSON.

    layerif lora-layout --model M --scores scores.json --r 8 [--target-modules q_proj,v_proj]
        [--spread 0.5] [--invert] [--alpha scale|fixed] --out lora_config.json

The ranks keep the uniform ``--r`` config's trainable-parameter count exactly
(:mod:`layerif_plugins.allocate.ranks`); the file is what PEFT's ``save_pretrained`` writes as
``adapter_config.json`` and loads with PEFT alone (docs/lora_ranks.md). ``--method`` instead of
``--scores`` computes a data-free scorer on the fly (``alpha_hill``, ``depth_ramp``, ``uniform``).
"""

from __future__ import annotations

import argparse

from layerif_plugins.allocate.ranks import DEFAULT_SPREAD
from layerif_plugins.cli.common import add_model_args, declare_paths, finite_float, load_model, positive_int
from layerif_plugins.errors import ConfigError
from layerif_plugins.integrations.peft_lora.layout import ALPHA_MODES
from layerif_plugins.report import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora-layout", help="layer scores → per-layer LoRA ranks (rank_pattern) at the uniform budget")
    add_model_args(p, device=False)
    p.add_argument("--scores", default=None, help="LayerScores JSON of this model (from `layerif score`)")
    p.add_argument("--method", default=None,
                   help="instead of --scores: compute a scorer that needs no data (alpha_hill, depth_ramp, uniform)")
    p.add_argument("--r", type=positive_int, default=8, help="uniform rank whose trainable-parameter count is kept")
    p.add_argument("--lora-alpha", type=finite_float, default=16.0, help="alpha of the uniform config")
    p.add_argument("--alpha", default="scale", choices=ALPHA_MODES,
                   help="scale: alpha_l = alpha·r_l/r (keeps alpha/r, default); fixed: alpha everywhere")
    p.add_argument("--spread", type=finite_float, default=DEFAULT_SPREAD,
                   help="ε in [0, 1]: ranks before rounding span [1-ε, 1+ε] × the mean (0 = uniform)")
    p.add_argument("--invert", action="store_true", help="more rank to the better-trained layers instead")
    p.add_argument("--budget", type=positive_int, default=None,
                   help="spend this many trainable parameters instead of the uniform --r config's")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module names to adapt (default: the model family's projections)")
    p.add_argument("--lora-dropout", type=finite_float, default=0.0)
    p.add_argument("--out", required=True, help="LoraConfig JSON to write (adapter_config.json format)")
    declare_paths(p, files={"out": "json"}, inputs=("model", "tokenizer", "scores"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.peft_lora.layout import lora_layout_config, save_lora_config
    from layerif_plugins.scorers import resolve_scores

    if (args.scores is None) == (args.method is None):
        raise ConfigError("give exactly one of --scores FILE or --method NAME (a scorer that needs no data)")
    args.device = "cpu"
    model, _ = load_model(args)
    scores = resolve_scores(model, args.method, args.scores)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    if args.target_modules is not None and not targets:
        raise ConfigError("--target-modules is empty: name the linear layers to adapt (e.g. q_proj,v_proj)")
    layout = lora_layout_config(model, scores, r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                spread=args.spread, invert=args.invert, alpha=args.alpha, budget=args.budget,
                                lora_dropout=args.lora_dropout)
    save_lora_config(layout.config, args.out)
    print(markdown_table(["layer", "score", "ideal rank", "rank", "alpha", "LoRA params"],
                         layout.rows(scores.scores)))
    print(f"{scores.method} scores ({scores.direction.value}{', inverted' if args.invert else ''}), spread "
          f"{args.spread}: {layout.trainable:,} trainable parameters (uniform r={args.r}: "
          f"{layout.uniform_trainable:,}) on {len(layout.modules)} modules")
    print(f"wrote {args.out} (stock PEFT: LoraConfig.from_peft_type(**LoraConfig.from_json_file(path)))")
    return 0
