"""``layerif score``: per-layer scores of a model on a task, saved as a LayerScores JSON file."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from layerif_plugins.cli.common import add_model_args, add_progress_args, load_model, load_split
from layerif_plugins.data import pad_id_of
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.engine import distributed as dd
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import check_parent
from layerif_plugins.models import resolve_device
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
    p.add_argument("--label-field", default=None,
                   help="JSONL label field: --calib is then a labelled set (for --method variability)")
    p.add_argument("--params", default="attn", choices=["attn", "mlp", "all"],
                   help="parameter group per block (attn = q,k,v,o: the reference)")
    p.add_argument("--damping", type=float, default=0.1, help="λ_w = damping · mean ||g||² / numel")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-example", action="store_true", help="keep s_i^l for every train example in the file")
    p.add_argument("--pairwise", action="store_true", help="keep the full IF_l(i,j) matrices (small --n-val only)")
    p.add_argument("--grad-mode", default="auto", choices=["auto", "ghost", "materialize"],
                   help="per-example gradient statistics: materialized (fewer FLOPs) or ghost (less memory)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None, help="cap padded tokens per batch")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (large models)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save each finished pass here; rerunning the same command resumes from it")
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel over N processes on this machine (relaunches itself with torchrun)")
    add_progress_args(p)
    p.add_argument("--out", required=True, help="scores JSON path (written atomically)")
    p.set_defaults(func=run)


def _relaunch_with_torchrun(args: argparse.Namespace) -> int:
    """``--nproc N``: rerun this very command under ``torch.distributed.run`` with N processes."""
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith(("layerif", "cli", "__main__.py")) else []
    if not argv or "--nproc" not in " ".join(argv):
        raise ConfigError("--nproc relaunches the `layerif score ...` command line; run it from the shell, "
                          "or use torchrun --nproc-per-node N -m layerif_plugins.cli score ...")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "layerif_plugins.cli", *rest]
    return subprocess.run(cmd, check=False).returncode


def run(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch_with_torchrun(args)
    check_parent(args.out)
    dist_device = dd.init_from_env(resolve_device(args.device).type)
    if dist_device is not None:
        args.device = str(dist_device)
        size, _ = dd.world()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size) if dist_device.type == "cpu" else 1)
    model, tok = load_model(args)
    data = ScoringData(pad_id=pad_id_of(tok))
    if args.train:
        data.train = load_split(args.train, tok, args, args.n_train)
    if args.val:
        data.val = load_split(args.val, tok, args, args.n_val)
    if args.calib and args.label_field:
        from layerif_plugins.data.labelled import load_labelled

        labelled = load_labelled(args.calib, tok, max_length=args.max_length, n=args.n_calib, seed=args.seed,
                                 text_field=args.text_field, label_field=args.label_field)
        data.calib, data.labels = labelled.examples, list(labelled.labels)
    elif args.calib:
        data.calib = load_split(args.calib, tok, args, args.n_calib)
    params: dict = {}
    if args.method == "layerif":
        params = {
            "config": InfluenceConfig(
                params=args.params, damping=args.damping, batch_size=args.batch_size, pairwise=args.pairwise,
                grad_mode=args.grad_mode, max_tokens_per_batch=args.max_tokens_per_batch,
                checkpoint_dir=args.checkpoint_dir, gradient_checkpointing=args.gradient_checkpointing,
                show_progress=not args.quiet,
            ),
            "per_example": args.per_example,
        }
    scores = score_layers(model, args.method, data, **params)
    scores.params.setdefault("max_length", args.max_length)
    if dd.world()[0] > 1:
        scores.params["world_size"] = dd.world()[0]
    if dd.is_main():
        scores.save(args.out)
        print(scores.table())
        print(f"wrote {args.out}")
    dd.barrier()
    return 0
