"""The ``layerif`` command. Each module of this package adds one or more subcommands.

A module defines ``register(subparsers)`` that adds its parser(s) with
``set_defaults(func=...)`` and declares its output and input paths
(:func:`~layerif_plugins.cli.common.declare_paths`); modules are discovered, so a new
command is a new file.

Every failure is one line on stderr, ``layerif COMMAND: error: ...``:

* errors raised on purpose (:class:`LayerIFError`), bad options (argparse, without the
  usage block) and operating-system errors (a file that cannot be read or written): exit 2;
* Ctrl-C (SIGINT): exit 130; SIGTERM: exit 143 (128 + the signal number, the shell's
  convention). Both unwind as exceptions, so every temp directory (``io.atomic_dir``'s,
  ``tempfile.TemporaryDirectory``) is removed and ``--out`` is left as it was.

The output paths are checked before the command runs (type, writability, ``--overwrite``,
never an input; see :mod:`layerif_plugins.io`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from layerif_plugins.errors import LayerIFError


class Terminated(BaseException):  # noqa: N818 - named after the signal, like KeyboardInterrupt
    """SIGTERM, raised in the main thread so the command unwinds (temp directories removed) and exits 143."""


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (``layerif COMMAND: error: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="layerif", description="Layer-wise influence scores for LLM pruning (llm-compressor) and LoRA-MoE (PEFT)."
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and host libraries' logs on stderr instead of a log file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_") or mod.name == "common":
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        module.register(sub)
    return parser


@contextmanager
def _signals_raise(received: list[int]) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` and SIGINT into ``KeyboardInterrupt`` while a command runs.

    Each signal is also appended to ``received``: a host library may swallow or replace the
    exception on its way up (llm-compressor 0.14's ``auto_wrapper.visit_Call`` turns a Ctrl-C
    that lands inside it into ``UnboundLocalError``), and :func:`main` still has to exit 130 /
    143 then. SIGINT keeps its disposition when the caller ignores it (``nohup``, a
    background job). Main thread only; the previous handlers are restored after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt

    wanted = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        wanted.append(signal.SIGINT)
    previous = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _os_error(exc: OSError) -> str:
    """One line for an operating-system error: what failed and on which path."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"layerif {args.command}"
    from layerif_plugins.cli.common import check_paths
    from layerif_plugins.console import command_console  # host libraries' logs → a log file (--verbose: stderr)
    from layerif_plugins.io import replacing

    spec = getattr(args, "path_spec", None)
    out_dirs = [getattr(args, d) for d in (spec.dirs if spec else ()) if getattr(args, d, None)]

    received: list[int] = []
    try:
        with _signals_raise(received):
            approved = check_paths(args)  # before any work: --out type, writability, --overwrite, inputs
            with replacing(*approved), command_console(args.command, verbose=args.verbose, out_dirs=out_dirs):
                return int(args.func(args) or 0)
    except BaseException as exc:
        code = _exit_code(name, exc, received)
        if code is None:
            raise
        return code


def _exit_code(name: str, exc: BaseException, received: list[int]) -> int | None:
    """Print the one-line error for ``exc`` and return the exit code; None: not ours to handle (a bug: re-raise).

    A signal received while the command ran decides the code whatever exception it became on
    its way up (see :func:`_signals_raise`); the original traceback goes to the debug log.
    """
    if received or isinstance(exc, (KeyboardInterrupt, Terminated)):
        sigterm = isinstance(exc, Terminated) or (received and received[0] == signal.SIGTERM)
        if not isinstance(exc, (KeyboardInterrupt, Terminated)):
            logging.getLogger(__name__).debug("signal arrived as %s", type(exc).__name__, exc_info=exc)
        what = "terminated (SIGTERM)" if sigterm else "interrupted (Ctrl-C)"
        print(f"{name}: error: {what}; nothing half-written was left behind", file=sys.stderr)
        return 143 if sigterm else 130
    if isinstance(exc, LayerIFError):
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError):
        logging.getLogger(__name__).debug("operating-system error", exc_info=exc)
        print(f"{name}: error: {_os_error(exc)}", file=sys.stderr)
        return 2
    return None


def console_main() -> int:
    """The ``layerif`` console script (and ``python -m``): thread defaults for a shared machine, then :func:`main`.

    OpenMP threads spinning against other processes slow scoring up to 10× on a busy machine;
    ``OMP_WAIT_POLICY=PASSIVE`` (read once, when torch loads) avoids it, so the command restarts
    itself once with it set unless the user chose a policy (``OMP_WAIT_POLICY=ACTIVE`` keeps
    spinning). See :mod:`layerif_plugins.engine.threads`. Tests call :func:`main` in-process instead.
    """
    from layerif_plugins.engine.threads import configure_threads, env_threads, reexec_with_wait_policy

    try:
        if os.environ.get("OMP_NUM_THREADS", "").strip():
            env_threads()  # a bad value is refused before the restart below (one line, naming the variable)
        reexec_with_wait_policy()
        configure_threads()
        return main()
    except KeyboardInterrupt:  # before main's own handling (while torch is imported)
        print("layerif: error: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except LayerIFError as exc:  # before main's own handling: the environment (OMP_NUM_THREADS=0)
        print(f"layerif: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
