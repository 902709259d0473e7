"""``layerif drop``: remove K decoder layers chosen by a scorer, optionally heal with LoRA, save an HF dir.

    layerif drop --model M --n-layers 2 --by angular --calib train.txt --out M-3L
    layerif drop --model M --n-layers 2 --by layerif --scores scores.json --out M-3L \\
                 --heal-steps 200 --heal-data train.txt

Rules (see :mod:`layerif_plugins.allocate.layers`): ``angular`` removes the contiguous
block with the smallest angular distance; ``block_influence`` and ``layerif`` remove the K
highest scores (lowest Block Influence; least well-trained layers); ``last`` the final K.
"""

from __future__ import annotations

import argparse
from typing import Any

from layerif_plugins.allocate.layers import DROP_RULES, check_k, last_layers, layers_to_drop
from layerif_plugins.cli.common import (
    ConfigOptions,
    add_model_args,
    add_progress_args,
    declare_paths,
    load_model,
    load_scoring_data,
    positive_int,
)
from layerif_plugins.data import pad_id_of
from layerif_plugins.depth.drop import drop_layers, save_dropped
from layerif_plugins.depth.heal import HealConfig
from layerif_plugins.errors import ConfigError
from layerif_plugins.models import PARAM_GROUPS, num_layers
from layerif_plugins.scores import LayerScores

BY = DROP_RULES


def heal_options(prefix: str = "heal-") -> ConfigOptions:
    """LoRA healing options from :class:`HealConfig` (``drop`` uses a ``--heal-`` prefix, ``heal`` none).

    ``r`` and ``lora_alpha`` keep their historical option names ``--rank`` / ``--alpha``;
    ``steps`` is each command's own option (``--steps`` / ``--heal-steps``).
    """
    return ConfigOptions(HealConfig, prefix=prefix, rename={"r": "rank", "lora_alpha": "alpha"},
                         choices={"params": PARAM_GROUPS},
                         help={"r": "LoRA rank r", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout"})


def add_heal_args(p: argparse.ArgumentParser, prefix: str = "heal-") -> ConfigOptions:
    """Add the healing options (after the command's own ``--[prefix]steps``) and return their spec."""
    options = heal_options(prefix)
    options.add_to(p)
    return options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drop", help="remove K decoder layers (angular / Block Influence / LayerIF / last) → HF dir")
    add_model_args(p)
    p.add_argument("--n-layers", type=int, required=True, help="K, the number of layers to remove")
    p.add_argument("--by", required=True, choices=DROP_RULES, help="how to choose the layers")
    p.add_argument("--scores", default=None, help="a LayerScores file of this model (skips scoring)")
    p.add_argument("--calib", default=None, help="calibration text for --by angular / block_influence")
    p.add_argument("--n-calib", type=positive_int, default=64, help="calibration examples (first N)")
    p.add_argument("--train", default=None, help="LayerIF train data (--by layerif without --scores)")
    p.add_argument("--val", default=None, help="LayerIF validation data (--by layerif without --scores)")
    p.add_argument("--n-train", type=positive_int, default=64)
    p.add_argument("--n-val", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, default=128, help="truncate examples to T tokens")
    p.add_argument("--text-field", default="text", help="JSONL text field")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--save-scores", default=None, help="also write the computed scores here")
    p.add_argument("--heal-steps", type=int, default=0, help="LoRA healing steps after the drop (0: none)")
    p.add_argument("--heal-data", default=None, help="text for healing (.txt / .jsonl)")
    p.add_argument("--heal-n", type=positive_int, default=None, help="healing examples (default: all)")
    add_heal_args(p)
    add_progress_args(p)
    p.add_argument("--out", required=True, help="output HF model directory (written atomically; see --overwrite)")
    declare_paths(p, dirs=("out",), files={"save_scores": "json"},
                  inputs=("model", "tokenizer", "scores", "calib", "train", "val", "heal_data"))
    p.set_defaults(func=run)


def _scores(model: Any, tok: Any, args: argparse.Namespace) -> LayerScores:
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.scorers import get_scorer, resolve_scores

    data = None if args.scores else load_scoring_data(args, tok, args.by)
    params = get_scorer(args.by).accepted(
        n=args.n_layers, batch_size=args.batch_size, show_progress=not args.quiet,
        config=InfluenceConfig(batch_size=args.batch_size, show_progress=not args.quiet),
    )
    scores = resolve_scores(model, args.by, args.scores, data, role="--by", **params)
    if args.save_scores and not args.scores:
        scores.save(args.save_scores)
        print(f"wrote {args.save_scores}")
    return scores


def run(args: argparse.Namespace) -> int:
    if args.heal_steps and not args.heal_data:
        raise ConfigError("--heal-steps needs --heal-data FILE (the text to fine-tune on)")
    if args.heal_steps < 0:
        raise ConfigError(f"--heal-steps must be >= 0, got {args.heal_steps}")
    model, tok = load_model(args)
    n_layers = num_layers(model)
    check_k(args.n_layers, n_layers)
    scores = None
    if args.by == "last":
        layers = last_layers(n_layers, args.n_layers)
    else:
        scores = _scores(model, tok, args)
        print(f"{scores.method} scores (higher: {scores.higher_is}):")
        print(scores.table())
        layers = layers_to_drop(scores, args.n_layers)
    print(f"dropping layers {layers} of {n_layers} (--by {args.by})")
    info = drop_layers(model, layers)
    record: dict[str, Any] = info.to_dict()
    record.update(method=args.by, scores=None if scores is None else
                  {"method": scores.method, "scores": scores.scores, "extras_keys": sorted(scores.extras),
                   "file": args.scores})
    if args.heal_steps:
        from layerif_plugins.data import load_examples
        from layerif_plugins.depth.heal import heal

        train = load_examples(args.heal_data, tok, args.max_length, n=args.heal_n, text_field=args.text_field)
        cfg = heal_options().build(args)  # steps from --heal-steps
        result = heal(model, train, pad_id_of(tok), cfg, merge=True, show_progress=not args.quiet)
        model = result.model
        record["heal"] = {"config": cfg.to_dict(), "data": train.fingerprint(), "first_loss": result.losses[0],
                          "last_loss": result.losses[-1], "seconds": result.seconds}
        print(f"healed {cfg.steps} steps: train loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    save_dropped(model, tok, args.out, record)
    print(f"wrote {args.out} ({n_layers - len(layers)} layers)")
    return 0
