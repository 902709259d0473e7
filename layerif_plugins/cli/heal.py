"""``layerif heal``: a short LoRA fine-tune of a (depth-pruned) model on a local text set.

    layerif heal --model M-3L --data train.txt --steps 200 --out M-3L-healed [--val valid.txt]
    layerif heal --model M-3L --data train.txt --steps 200 --no-merge --out M-3L-lora   # adapter only

With ``--val`` the mean validation loss (nats/token) is printed before and after.
"""

from __future__ import annotations

import argparse

from layerif_plugins.cli.common import add_model_args, add_progress_args, declare_paths, load_model, positive_int
from layerif_plugins.cli.drop import add_heal_args, heal_options
from layerif_plugins.data import load_examples, pad_id_of
from layerif_plugins.depth.heal import heal, mean_loss, save_healed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heal", help="LoRA healing fine-tune (MLP modules) of a model; merge back or save the adapter")
    add_model_args(p)
    p.add_argument("--data", required=True, help="training text (.txt / .jsonl)")
    p.add_argument("--n", type=positive_int, default=None, help="training examples (first N; default: all)")
    p.add_argument("--val", default=None, help="validation text: print the loss before and after")
    p.add_argument("--n-val", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    p.add_argument("--max-length", type=positive_int, default=128, help="truncate examples to T tokens")
    p.add_argument("--text-field", default="text", help="JSONL text field")
    add_heal_args(p, prefix="")
    p.add_argument("--no-merge", action="store_true", help="save the LoRA adapter instead of merged weights")
    add_progress_args(p)
    p.add_argument("--out", required=True,
                   help="output directory (HF model, or PEFT adapter with --no-merge; see --overwrite)")
    declare_paths(p, dirs=("out",), inputs=("model", "tokenizer", "data", "val"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = heal_options(prefix="").build(args)  # steps from --steps
    model, tok = load_model(args)
    pad = pad_id_of(tok)
    train = load_examples(args.data, tok, args.max_length, n=args.n, text_field=args.text_field)
    val = load_examples(args.val, tok, args.max_length, n=args.n_val, text_field=args.text_field) if args.val else None
    before = mean_loss(model, val, pad) if val is not None else None
    result = heal(model, train, pad, cfg, merge=not args.no_merge, show_progress=not args.quiet)
    info = {"model": str(args.model), "data": train.fingerprint()}
    if val is not None:
        after = mean_loss(result.model, val, pad)
        info.update(val_loss_before=before, val_loss_after=after)
        print(f"validation loss {before:.4f} → {after:.4f} nats/token")
    print(f"train loss {result.losses[0]:.4f} → {result.losses[-1]:.4f} over {cfg.steps} steps "
          f"({result.trainable_params} LoRA parameters, {result.seconds:.1f}s)")
    save_healed(result, tok, args.out, info)
    kept = result.extras.get("kept_zeros")
    if kept:
        print(f"kept the pruned zeros after merging: {kept}")
    print(f"wrote {args.out} ({'merged model' if result.merged else 'LoRA adapter'})")
    return 0
