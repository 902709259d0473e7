"""``layerif show``: print a scores file as a table; optionally plot it."""

from __future__ import annotations

import argparse

from layerif_plugins.cli.common import declare_paths
from layerif_plugins.scores import LayerScores


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print scores file(s) as a table, optionally a PNG bar plot")
    p.add_argument("scores", nargs="+", help="LayerScores JSON file(s)")
    p.add_argument("--png", default=None, help="write a bar plot of the per-layer scores here (see --overwrite)")
    declare_paths(p, files={"png": "png"}, inputs=("scores",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.report import plot_layer_scores, scores_markdown

    loaded = [LayerScores.load(p) for p in args.scores]
    for path, s in zip(args.scores, loaded, strict=True):
        print(f"{path}: method={s.method} model={s.model.name_or_path} layers={s.num_layers}")
    print(scores_markdown(loaded, labels=args.scores))
    if args.png:
        plot_layer_scores(loaded, labels=args.scores, path=args.png)
        print(f"wrote {args.png}")
    return 0
