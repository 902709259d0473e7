"""``layerif demo``: the main job on the embedded stories260K model.

Converts the llama2.c checkpoint to an HF directory, scores it with LayerIF on TinyStories
(train → validation) and on Shakespeare (a task the model was not trained for), and writes
the scores files, a side-by-side PNG and a markdown summary under ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from layerif_plugins.data import load_examples, pad_id_of
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_write_text
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir
from layerif_plugins.paths import shared_data, shared_dir, stories260k_checkpoint
from layerif_plugins.report import plot_layer_scores, scores_markdown
from layerif_plugins.scorers import ScoringData, score_layers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="score the embedded stories260K on TinyStories and Shakespeare")
    p.add_argument("--model", default=None, help="llama2.c .bin or HF dir (default: ../shared stories260K)")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--params", default="attn", choices=["attn", "mlp", "all"])
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def _tasks() -> dict[str, tuple[Path, Path]]:
    stories = (shared_data("tinystories", "train.txt"), shared_data("tinystories", "valid.txt"))
    shakespeare = shared_data("tinyshakespeare", "input.txt")
    return {"tinystories": stories, "shakespeare": (shakespeare, shakespeare)}


def run(args: argparse.Namespace) -> int:
    model_path = Path(args.model) if args.model else stories260k_checkpoint()
    if not model_path.exists():
        raise ConfigError(
            f"demo model not found at {model_path} (shared assets looked for in {shared_dir()}). "
            "Set LAYERIF_SHARED to the shared/ folder, or pass --model PATH (a llama2.c .bin or an HF dir)."
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(model_path, device="cpu")
    hf_dir = save_model_dir(model, tok, out / "stories260K-hf")
    print(f"[demo] converted {model_path.name} → {hf_dir}")
    config = InfluenceConfig(params=args.params, batch_size=16, show_progress=not args.quiet)
    results, labels = [], []
    for task, (train_path, val_path) in _tasks().items():
        if task == "shakespeare":
            # one file: paragraphs; first half of the examples train, the next ones validate
            train = load_examples(train_path, tok, args.max_length, n=args.n_train + args.n_val)
            train, val = train.subset(range(args.n_train)), train.subset(range(args.n_train, len(train)))
        else:
            train = load_examples(train_path, tok, args.max_length, n=args.n_train)
            val = load_examples(val_path, tok, args.max_length, n=args.n_val)
        data = ScoringData(train=train, val=val, pad_id=pad_id_of(tok))
        scores = score_layers(model, "layerif", data, config=config)
        scores.params["max_length"] = args.max_length
        scores.save(out / f"scores_{task}.json")
        results.append(scores)
        labels.append(task)
        print(f"[demo] {task}: scores {['%.4g' % s for s in scores.scores]} → {out / f'scores_{task}.json'}")
    png = plot_layer_scores(results, labels, out / "layer_scores.png")
    elapsed = time.perf_counter() - t0
    summary = "\n".join([
        "# LayerIF demo: stories260K",
        "",
        f"Model: `{model_path}` ({model.config.num_hidden_layers} decoder layers), converted to `{hf_dir}`.",
        f"LayerIF ({args.params} projections), {args.n_train} train / {args.n_val} validation examples per task, "
        f"{args.max_length} tokens max. Higher score = less well-trained layer for that task "
        "(gets more sparsity / more LoRA experts).",
        "",
        scores_markdown(results, labels),
        "",
        f"![per-layer scores]({png.name})",
        "",
        f"Mean validation loss: " + ", ".join(f"{lab} {s.extras['mean_val_loss']:.3f}" for lab, s in zip(labels, results)),
        "",
        f"Total time: {elapsed:.1f} s.",
        "",
    ])
    atomic_write_text(out / "report.md", summary)
    print(f"[demo] wrote {out / 'report.md'} and {png} in {elapsed:.1f} s")
    return 0
