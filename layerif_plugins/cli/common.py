"""Argument groups and loaders shared by the subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.models import load_model_and_tokenizer


def add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--model", required=True, help="HF model directory, hub id, or llama2.c .bin checkpoint")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: beside the model)")
    p.add_argument("--dtype", default="float32", help="float32 | float64 | bfloat16 | float16")
    if device:
        p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
        p.add_argument("--device-map", default=None,
                       help="spread a large model over devices (accelerate device_map, e.g. 'auto')")


def add_progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_model_and_tokenizer(args.model, args.tokenizer, args.dtype, getattr(args, "device", "cpu"),
                                    device_map=getattr(args, "device_map", None))


def load_split(path: str, tokenizer: Any, args: argparse.Namespace, n: int | None) -> Examples:
    return load_examples(path, tokenizer, max_length=args.max_length, n=n, seed=getattr(args, "seed", None),
                         text_field=getattr(args, "text_field", "text"))
