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

from layerif_plugins.allocate.layers import check_k, last_layers, layers_to_drop
from layerif_plugins.cli.common import add_model_args, add_progress_args, load_model, load_split
from layerif_plugins.data import pad_id_of
from layerif_plugins.depth.drop import drop_layers, save_dropped
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.io import check_parent
from layerif_plugins.models import num_layers
from layerif_plugins.scores import LayerScores

BY = ("angular", "block_influence", "layerif", "last")


def add_heal_args(p: argparse.ArgumentParser, prefix: str = "heal-") -> None:
    """LoRA healing options (shared by ``drop`` with a ``--heal-`` prefix and by ``heal``)."""
    p.add_argument(f"--{prefix}lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument(f"--{prefix}rank", type=int, default=8, help="LoRA rank r")
    p.add_argument(f"--{prefix}alpha", type=int, default=16, help="LoRA alpha")
    p.add_argument(f"--{prefix}batch-size", type=int, default=8)
    p.add_argument(f"--{prefix}params", default="mlp", choices=["mlp", "attn", "all"],
                   help="linear layers that get LoRA (mlp: the paper)")
    p.add_argument(f"--{prefix}seed", type=int, default=0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drop", help="remove K decoder layers (angular / Block Influence / LayerIF / last) → HF dir")
    add_model_args(p)
    p.add_argument("--n-layers", type=int, required=True, help="K, the number of layers to remove")
    p.add_argument("--by", required=True, choices=BY, help="how to choose the layers")
    p.add_argument("--scores", default=None, help="a LayerScores file of this model (skips scoring)")
    p.add_argument("--calib", default=None, help="calibration text for --by angular / block_influence")
    p.add_argument("--n-calib", type=int, default=64, help="calibration examples (first N)")
    p.add_argument("--train", default=None, help="LayerIF train data (--by layerif without --scores)")
    p.add_argument("--val", default=None, help="LayerIF validation data (--by layerif without --scores)")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="truncate examples to T tokens")
    p.add_argument("--text-field", default="text", help="JSONL text field")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-scores", default=None, help="also write the computed scores here")
    p.add_argument("--heal-steps", type=int, default=0, help="LoRA healing steps after the drop (0: none)")
    p.add_argument("--heal-data", default=None, help="text for healing (.txt / .jsonl)")
    p.add_argument("--heal-n", type=int, default=None, help="healing examples (default: all)")
    add_heal_args(p)
    add_progress_args(p)
    p.add_argument("--out", required=True, help="output HF model directory (written atomically)")
    p.set_defaults(func=run)


def _scores(model: Any, tok: Any, args: argparse.Namespace) -> LayerScores:
    from layerif_plugins.scorers import ScoringData, score_layers

    if args.scores:
        scores = LayerScores.load(args.scores)
        if scores.method != args.by:
            raise ConfigError(f"--by {args.by} but {args.scores} holds {scores.method!r} scores; "
                              f"pass --by {scores.method} or another scores file")
        scores.check_model(model)
        return scores
    data = ScoringData(pad_id=pad_id_of(tok))
    params: dict[str, Any] = {}
    if args.by in ("angular", "block_influence"):
        if not args.calib:
            raise DataError(f"--by {args.by} needs calibration text: pass --calib FILE (or --scores FILE)")
        data.calib = load_split(args.calib, tok, args, args.n_calib)
        params = {"batch_size": args.batch_size, "show_progress": not args.quiet}
        if args.by == "angular":
            params["n"] = args.n_layers
    else:  # layerif
        if not (args.train and args.val):
            raise DataError("--by layerif needs --scores FILE (from `layerif score`) or --train FILE and --val FILE")
        from layerif_plugins.engine import InfluenceConfig

        data.train = load_split(args.train, tok, args, args.n_train)
        data.val = load_split(args.val, tok, args, args.n_val)
        params = {"config": InfluenceConfig(batch_size=args.batch_size, show_progress=not args.quiet)}
    scores = score_layers(model, args.by, data, **params)
    if args.save_scores:
        scores.save(args.save_scores)
        print(f"wrote {args.save_scores}")
    return scores


def run(args: argparse.Namespace) -> int:
    check_parent(args.out)
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
        print(f"{scores.method} scores ({scores.higher_is}):")
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
        from layerif_plugins.depth.heal import HealConfig, heal

        train = load_examples(args.heal_data, tok, args.max_length, n=args.heal_n, text_field=args.text_field)
        cfg = HealConfig(steps=args.heal_steps, lr=args.heal_lr, r=args.heal_rank, lora_alpha=args.heal_alpha,
                         batch_size=args.heal_batch_size, params=args.heal_params, seed=args.heal_seed)
        result = heal(model, train, pad_id_of(tok), cfg, merge=True, show_progress=not args.quiet)
        model = result.model
        record["heal"] = {"config": cfg.to_dict(), "data": train.fingerprint(), "first_loss": result.losses[0],
                          "last_loss": result.losses[-1], "seconds": result.seconds}
        print(f"healed {cfg.steps} steps: train loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}")
    save_dropped(model, tok, args.out, record)
    print(f"wrote {args.out} ({n_layers - len(layers)} layers)")
    return 0
