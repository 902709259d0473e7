"""``layerif score``: per-layer scores of a model on a task, saved as a LayerScores JSON file."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from layerif_plugins.cli.common import (
    ConfigOptions,
    add_model_args,
    add_progress_args,
    declare_paths,
    load_model,
    load_scoring_data,
    positive_int,
)
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.engine import distributed as dd
from layerif_plugins.errors import ConfigError
from layerif_plugins.models import resolve_device
from layerif_plugins.scorers import SCORERS, get_scorer, resolve_scores

#: the engine options, generated from InfluenceConfig's fields (a new field is a new option)
INFLUENCE_OPTIONS = ConfigOptions(InfluenceConfig, exclude=("show_progress",))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="compute per-layer scores (LayerIF or a baseline) → scores.json")
    add_model_args(p)
    p.add_argument("--method", default="layerif", choices=sorted(SCORERS), help="scoring method")
    p.add_argument("--train", help="task training data (.txt / .jsonl)")
    p.add_argument("--val", help="task validation data (.txt / .jsonl)")
    p.add_argument("--calib", help="calibration data for data-driven baselines")
    p.add_argument("--n-train", type=positive_int, default=None, help="use the first N train examples (default: all)")
    p.add_argument("--n-val", type=positive_int, default=None,
                   help="use the first M validation examples (default: all)")
    p.add_argument("--n-calib", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=None, help="sample N/M examples with this seed instead of the first")
    p.add_argument("--max-length", type=positive_int, default=128, help="truncate examples to T tokens")
    p.add_argument("--text-field", default="text", help="JSONL text field")
    p.add_argument("--label-field", default=None,
                   help="JSONL label field of a labelled --calib set (methods that need labels, e.g. variability; "
                        "default: label)")
    p.add_argument("--per-example", action="store_true", help="keep s_i^l for every train example in the file")
    INFLUENCE_OPTIONS.add_to(p.add_argument_group("LayerIF engine (InfluenceConfig)"))
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="data-parallel over N processes on this machine (relaunches itself as N workers, as torchrun "
                        "would; a signal to this process reaches every worker)")
    add_progress_args(p)
    p.add_argument("--out", required=True, help="scores JSON path (written atomically; see --overwrite)")
    declare_paths(p, files={"out": "json"}, inputs=("model", "tokenizer", "train", "val", "calib", "checkpoint_dir"))
    p.set_defaults(func=run)


def _relaunch_data_parallel(args: argparse.Namespace) -> int:
    """``--nproc N``: rerun this very command as N data-parallel workers (torchrun's environment, gloo / nccl)."""
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
    # torchrun's environment, one process group: SIGTERM / Ctrl-C here reach every worker, and the
    # command reports only once all of them have exited (engine.distributed.launch_workers)
    return dd.launch_workers(rest, args.nproc)


def run(args: argparse.Namespace) -> int:
    if args.nproc and args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch_data_parallel(args)
    dist_device = dd.init_from_env(resolve_device(args.device).type)
    if dist_device is not None:
        args.device = str(dist_device)
        size, _ = dd.world()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size) if dist_device.type == "cpu" else 1)
    model, tok = load_model(args)
    data = load_scoring_data(args, tok, args.method)
    params = get_scorer(args.method).accepted(
        config=INFLUENCE_OPTIONS.build(args, show_progress=not args.quiet), per_example=args.per_example,
        batch_size=args.batch_size, show_progress=not args.quiet,
    )
    scores = resolve_scores(model, args.method, data=data, **params)
    scores.params.setdefault("max_length", args.max_length)
    if dd.world()[0] > 1:
        scores.params["world_size"] = dd.world()[0]
    if dd.is_main():
        scores.save(args.out)
        print(scores.table())
        print(f"wrote {args.out}")
    dd.barrier()
    return 0
