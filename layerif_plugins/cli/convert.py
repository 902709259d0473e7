"""``layerif convert``: llama2.c checkpoint, GGUF file or catalogue name → HF model directory (model + tokenizer)."""

from __future__ import annotations

import argparse

from layerif_plugins.cli.common import declare_paths
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a llama2.c .bin or a .gguf checkpoint into an HF model directory")
    p.add_argument("checkpoint", help="llama2.c .bin (v0 format), .gguf file (needs the gguf extra), or any --model")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (llama2.c: default tok*.bin beside it; GGUF: default the file's own)")
    p.add_argument("--dtype", default="float32",
                   help="float32 | bfloat16 | float16 | float64 of the saved weights (GGUF is dequantized to it)")
    p.add_argument("--out", required=True, help="output directory (written atomically; see --overwrite)")
    declare_paths(p, dirs=("out",), inputs=("checkpoint", "tokenizer"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tok = load_model_and_tokenizer(args.checkpoint, args.tokenizer, args.dtype, "cpu")
    out = save_model_dir(model, tok, args.out)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{model.config.num_hidden_layers} layers, {args.dtype})")
    return 0
