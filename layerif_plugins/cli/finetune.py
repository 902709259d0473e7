"""``layerif finetune``: train a LoRA-MoE adapter (from ``layerif moe``) with the HF Trainer on a local task.

The adapter is loaded trainable onto ``--model``, trained on ``--train`` (text or JSONL via
:mod:`layerif_plugins.data`), optionally evaluated on ``--val`` (mean token loss and
perplexity, padding excluded) before and after, and saved to ``--out`` with its
``layout.json`` and a ``train_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from layerif_plugins.cli.common import (
    ConfigOptions,
    add_model_args,
    add_progress_args,
    declare_paths,
    load_model,
    load_split,
    positive_int,
)
from layerif_plugins.data import pad_id_of
from layerif_plugins.io import atomic_dir, atomic_write_json
from layerif_plugins.training import TrainConfig

#: the training options, generated from TrainConfig's fields (a new field is a new option)
TRAIN_OPTIONS = ConfigOptions(TrainConfig, help={"seed": "seed of data order, sampling and dropout"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="train a LoRA-MoE adapter with the HF Trainer on a local text/JSONL task")
    add_model_args(p)
    p.add_argument("--adapter", required=True, help="adapter directory written by `layerif moe`")
    p.add_argument("--train", required=True, help="training data (.txt / .jsonl)")
    p.add_argument("--val", help="held-out data for loss/perplexity before and after training")
    p.add_argument("--n-train", type=positive_int, default=None, help="use N training examples (default: all)")
    p.add_argument("--n-val", type=positive_int, default=None)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--text-field", default="text")
    TRAIN_OPTIONS.add_to(p.add_argument_group("training (TrainConfig)"))
    add_progress_args(p)
    p.add_argument("--out", required=True,
                   help="directory for the trained adapter (written atomically; see --overwrite)")
    declare_paths(p, dirs=("out",), inputs=("model", "tokenizer", "adapter", "train", "val"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.peft_moe import check_adapter_dir, load_lora_moe
    from layerif_plugins.integrations.peft_moe.build import LAYOUT_FILE, append_load_note
    from layerif_plugins.training import heldout_loss, train_adapter

    check_adapter_dir(args.adapter)
    config = TRAIN_OPTIONS.build(args)
    model, tok = load_model(args)
    pad = pad_id_of(tok)
    train = load_split(args.train, tok, args, args.n_train)
    val = load_split(args.val, tok, args, args.n_val) if args.val else None
    peft_model = load_lora_moe(model, args.adapter, is_trainable=True)
    before = heldout_loss(peft_model, val, pad) if val is not None else None
    metrics = train_adapter(peft_model, train, pad, config, show_progress=not args.quiet)
    after = heldout_loss(peft_model, val, pad) if val is not None else None
    record = {"adapter": str(args.adapter), "train": train.fingerprint(), "val": val.fingerprint() if val else None,
              "heldout_before": before, "heldout_after": after, "trainer": metrics}
    layout_src = Path(args.adapter) / LAYOUT_FILE
    with atomic_dir(args.out) as tmp:
        peft_model.save_pretrained(str(tmp))
        if layout_src.is_file():
            (tmp / LAYOUT_FILE).write_text(layout_src.read_text(encoding="utf-8"), encoding="utf-8")
        atomic_write_json(tmp / "train_metrics.json", record)
        append_load_note(tmp / "README.md")
    print(json.dumps({"train_loss": metrics.get("train_loss"), "steps": metrics.get("global_step"),
                      "heldout_before": before, "heldout_after": after}, indent=2))
    print(f"wrote {args.out}")
    return 0
