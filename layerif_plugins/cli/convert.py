"""``layerif convert``: llama2.c checkpoint → HF model directory (model + tokenizer)."""

from __future__ import annotations

import argparse

from layerif_plugins.models import load_model_and_tokenizer, save_model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a llama2.c checkpoint into an HF model directory")
    p.add_argument("checkpoint", help="llama2.c .bin checkpoint (v0 format)")
    p.add_argument("--tokenizer", default=None, help="llama2.c tokenizer .bin (default: tok*.bin beside it)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, "float32", "cpu")
    out = save_model_dir(model, tok, args.out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_hidden_layers} layers)")
    return 0
