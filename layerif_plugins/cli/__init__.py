"""The ``layerif`` command. Each module of this package adds one or more subcommands.

A module defines ``register(subparsers)`` that adds its parser(s) with
``set_defaults(func=...)``; modules are discovered, so a new command is a new file.
Errors raised on purpose (:class:`LayerIFError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from layerif_plugins.errors import LayerIFError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerif", description="Layer-wise influence scores for LLM pruning (llm-compressor) and LoRA-MoE (PEFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except LayerIFError as exc:
        print(f"layerif {args.command}: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The ``layerif`` console script (and ``python -m``): thread defaults for a shared machine, then :func:`main`.

    OpenMP threads spinning against other processes slow scoring up to 10× on a busy machine;
    ``OMP_WAIT_POLICY=PASSIVE`` (read once, when torch loads) avoids it, so the command restarts
    itself once with it set unless the user chose a policy (``OMP_WAIT_POLICY=ACTIVE`` keeps
    spinning). See :mod:`layerif_plugins.engine.threads`. Tests call :func:`main` in-process instead.
    """
    from layerif_plugins.engine.threads import configure_threads, reexec_with_wait_policy

    reexec_with_wait_policy()
    configure_threads()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
