"""``layerif score``: per-layer scores of a model on a task, saved as a LayerScores JSON file."""

from __future__ import annotations

import argparse

from layerif_plugins.cli.common import add_model_args, add_progress_args, load_model, load_split
from layerif_plugins.data import pad_id_of
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.io import check_parent
from layerif_plugins.scorers import SCORERS, ScoringData, score_layers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="compute per-layer scores (LayerIF or a baseline) → scores.json")
    add_model_args(p)
    p.add_argument("--method", default="layerif", choices=sorted(SCORERS), help="scoring method")
    p.add_argument("--train", help="task training data (.txt / .jsonl)")
    p.add_argument("--val", help="task validation data (.txt / .jsonl)")
    p.add_argument("--calib", help="calibration data for data-driven baselines")
    p.add_argument("--n-train", type=int, default=None, help="use the first N train examples (default: all)")
    p.add_argument("--n-val", type=int, default=None, help="use the first M validation examples (default: all)")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seed", type=int, default=None, help="sample N/M examples with this seed instead of the first")
    p.add_argument("--max-length", type=int, default=128, help="truncate examples to T tokens")
    p.add_argument("--text-field", default="text", help="JSONL text field")
    p.add_argument("--params", default="attn", choices=["attn", "mlp", "all"],
                   help="parameter group per block (attn = q,k,v,o: the reference)")
    p.add_argument("--damping", type=float, default=0.1, help="λ_w = damping · mean ||g||² / numel")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-example", action="store_true", help="keep s_i^l for every train example in the file")
    p.add_argument("--pairwise", action="store_true", help="keep the full IF_l(i,j) matrices (small --n-val only)")
    p.add_argument("--grad-mode", default="auto", choices=["auto", "ghost", "materialize"])
    add_progress_args(p)
    p.add_argument("--out", required=True, help="scores JSON path (written atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_parent(args.out)
    model, tok = load_model(args)
    data = ScoringData(pad_id=pad_id_of(tok))
    if args.train:
        data.train = load_split(args.train, tok, args, args.n_train)
    if args.val:
        data.val = load_split(args.val, tok, args, args.n_val)
    if args.calib:
        data.calib = load_split(args.calib, tok, args, args.n_calib)
    params: dict = {}
    if args.method == "layerif":
        params = {
            "config": InfluenceConfig(params=args.params, damping=args.damping, batch_size=args.batch_size,
                                      pairwise=args.pairwise, grad_mode=args.grad_mode, show_progress=not args.quiet),
            "per_example": args.per_example,
        }
    scores = score_layers(model, args.method, data, **params)
    scores.params.setdefault("max_length", args.max_length)
    scores.save(args.out)
    print(scores.table())
    print(f"wrote {args.out}")
    return 0
