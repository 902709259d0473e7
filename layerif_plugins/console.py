"""The console of a command: our own lines and progress bars on the terminal, host libraries' output in a log file.

llm-compressor logs an INFO and a METRIC line for every module it sparsifies and draws two
progress bars per layer; transformers, torch, datasets, lm-eval and vLLM add warnings, bars
and start-up banners. A ``layerif`` command or the demo would print hundreds of lines in
which its own one line per stage is lost. :func:`host_output` sends all of that to a log
file (``--verbose``: to stderr) while it runs, and puts every host's configuration back
afterwards, so the library can be used inside someone else's program without changing
its logging for the rest of the process:

* Python loggers of the host libraries (:data:`HOST_LOGGERS`): their handlers and
  ``propagate`` flag are saved and replaced by one handler on the log;
* loguru (llm-compressor's logger): its sinks are set aside and one sink on the log added;
  llm-compressor's ``configure_logger`` runs when ``llmcompressor.logger`` is first imported
  (it removes every sink and adds one on stdout), so that import is watched and captured
  again. loguru has no public way to set sinks aside and put them back unchanged (``remove``
  stops them), so its handler table is swapped under loguru's own lock;
* warnings raised in a host package (transformers', torch's): written to the log; the warning
  filters are restored afterwards (``warnings.catch_warnings``);
* everything else a host writes to ``sys.stdout`` / ``sys.stderr`` (tqdm bars of
  llm-compressor, transformers and lm-eval, plain prints): the streams are replaced by a
  router that looks at who writes, the nearest caller outside tqdm and the I/O machinery: a
  host package (:data:`HOST_PACKAGES`) → the log; anything else (``layerif_plugins``, the
  user's own code) → the terminal. So our own progress bars and lines stay on the terminal
  without touching their call sites.

Captures nest (the demo captures into its own ``logs/`` inside the command's capture); each
restores what it found.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, TextIO

#: top-level loggers of the libraries we drive; each library's records go to the log while captured
HOST_LOGGERS: tuple[str, ...] = (
    "transformers", "torch", "datasets", "accelerate", "peft", "lm_eval", "lm-eval", "vllm",
    "compressed_tensors", "llmcompressor", "huggingface_hub", "safetensors", "filelock", "urllib3", "fsspec",
    "sentence_transformers", "evaluate", "sqlitedict",
)
#: modules whose import configures a host logger (their hook captures it again, once imported)
HOST_IMPORTS: tuple[str, ...] = ("transformers", "datasets", "lm_eval", "peft", "accelerate", "llmcompressor.logger")
#: packages whose writes to stdout / stderr (progress bars, prints) go to the log: the hosts above and
#: what they draw bars with; everything else (``layerif_plugins``, the user's own code) stays on the terminal
HOST_PACKAGES: frozenset[str] = frozenset({*HOST_LOGGERS, "tokenizers"})
_PASS_THROUGH = ("tqdm", "io", "codecs", "logging", "warnings", "contextlib", "threading", "_io")
_LOGURU_FORMAT = "{time:YYYY-MM-DD HH:mm:ss} {level} {name}:{function}: {message}"


def _is_host(module: str) -> bool:
    return module.split(".", 1)[0] in HOST_PACKAGES


def _writer(frame: FrameType | None) -> str:
    """Module of the nearest frame outside tqdm and the I/O machinery: who is writing."""
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.split(".", 1)[0] not in _PASS_THROUGH:
            return name
        frame = frame.f_back
    return ""


class _Router(io.TextIOBase):
    """A ``sys.stdout`` / ``sys.stderr`` stand-in: host writes to ``log``, everything else to ``console``.

    A host may keep a reference to it past the capture (a loguru sink or logging handler made on
    ``sys.stdout`` while captured); after :meth:`detach` it forwards everything to ``console``.
    """

    def __init__(self, console: TextIO, log: TextIO):
        self.console, self.log, self.attached = console, log, True

    def detach(self) -> None:
        self.attached = False

    def write(self, text: str) -> int:  # type: ignore[override]
        host = self.attached and _is_host(_writer(sys._getframe(1)))
        (self.log if host else self.console).write(text)
        return len(text)

    def flush(self) -> None:
        for stream in (self.console, self.log) if self.attached else (self.console,):
            stream.flush()

    def isatty(self) -> bool:  # tqdm and transformers ask: the terminal's answer, for our bars
        return bool(getattr(self.console, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.console.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.console, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.console, "errors", None)

    def writable(self) -> bool:
        return True


@dataclass
class _Capture:
    """One active capture: where host output goes, and what it replaced (to put back)."""

    log: TextIO
    handler: logging.Handler
    loggers: dict[str, tuple[list[logging.Handler], bool]] = field(default_factory=dict)
    loguru_saved: dict[int, Any] | None = None
    loguru_sink: int | None = None

    # ------------------------------------------------------------ Python logging

    def capture_loggers(self) -> None:
        """Point every existing host logger at the log (again after a host import configured one)."""
        existing = logging.Logger.manager.loggerDict
        for name in HOST_LOGGERS:
            lg = existing.get(name)
            if not isinstance(lg, logging.Logger):
                continue
            extra = [h for h in lg.handlers if h is not self.handler]
            if name in self.loggers:
                if not extra:
                    continue  # still ours
                handlers, _ = self.loggers[name]  # the host configured it while captured: keep that for after
                self.loggers[name] = (handlers + extra, False)
            else:
                self.loggers[name] = (list(lg.handlers), lg.propagate)
            lg.handlers = [self.handler]
            lg.propagate = False

    def restore_loggers(self) -> None:
        for name, (handlers, propagate) in self.loggers.items():
            lg = logging.getLogger(name)
            lg.handlers = [h for h in lg.handlers if h is not self.handler and h not in handlers] + handlers
            lg.propagate = propagate

    # ------------------------------------------------------------ loguru

    def capture_loguru(self) -> None:
        """Set loguru's sinks aside (llm-compressor's stdout sink) and log to ``log`` instead."""
        core = _loguru_core()
        if core is None:
            return
        with core.lock:
            current = dict(core.handlers)
            ours = current.pop(self.loguru_sink, None) if self.loguru_sink is not None else None
            if ours is None:  # first capture, or the host reset loguru (removing our sink): its new sinks
                self.loguru_saved = current
            elif current:
                self.loguru_saved = {**(self.loguru_saved or {}), **current}
            core.handlers = {} if ours is None else {self.loguru_sink: ours}
            core.min_level = float("inf") if ours is None else ours.levelno
        if ours is None:
            from loguru import logger as loguru_logger

            self.loguru_sink = loguru_logger.add(self.log, level="DEBUG", format=_LOGURU_FORMAT, colorize=False)

    def restore_loguru(self) -> None:
        core = _loguru_core()
        if core is None or self.loguru_saved is None:
            return
        from loguru import logger as loguru_logger

        if self.loguru_sink is not None and self.loguru_sink in core.handlers:
            loguru_logger.remove(self.loguru_sink)
        with core.lock:
            handlers = {**self.loguru_saved, **core.handlers}
            core.handlers = handlers
            core.min_level = min((h.levelno for h in handlers.values()), default=float("inf"))

    # ------------------------------------------------------------ warnings

    def show_warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     file: TextIO | None = None, line: str | None = None, *, console: TextIO) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        parts = filename.replace("\\", "/").split("/")
        host = any(p in HOST_PACKAGES for p in parts[:-1])  # .../site-packages/transformers/...
        (self.log if host else console).write(text)


_ACTIVE: list[_Capture] = []
_LOCK = threading.Lock()


def _loguru_core() -> Any:
    """loguru's handler table, when loguru is imported and laid out as in 0.7 (else None: left alone)."""
    if "loguru" not in sys.modules:
        return None
    core = getattr(sys.modules["loguru"].logger, "_core", None)
    if core is None or not all(hasattr(core, a) for a in ("handlers", "lock", "min_level")):
        return None
    return core


def _on_host_import(module: ModuleType) -> None:
    """A watched host module was imported: capture what its import configured, if a capture is active."""
    with _LOCK:
        capture = _ACTIVE[-1] if _ACTIVE else None
    if capture is None:
        return
    capture.capture_loggers()
    if module.__name__ == "llmcompressor.logger":
        capture.capture_loguru()


_WATCHED: set[str] = set()


def _watch_host_imports() -> None:
    from layerif_plugins.integrations._hooks import when_imported

    for name in HOST_IMPORTS:
        if name not in sys.modules and name not in _WATCHED:
            _WATCHED.add(name)
            when_imported(name, lambda module, name=name: (_WATCHED.discard(name), _on_host_import(module)))


def host_stream() -> TextIO:
    """Where host output goes now: the active capture's log, else ``sys.stderr``.

    For code of ours that relays a host's output (the vLLM worker's), which the router would
    otherwise send to the terminal as ours.
    """
    return _ACTIVE[-1].log if _ACTIVE else sys.stderr


def active_log() -> Path | None:
    """The file the innermost capture writes to (None: none active, or ``--verbose``'s stderr)."""
    if not _ACTIVE:
        return None
    name = getattr(_ACTIVE[-1].log, "name", None)
    return Path(name) if isinstance(name, str) else None


@contextmanager
def host_output(log_file: str | Path | None, *, verbose: bool = False) -> Iterator[Path | None]:
    """Send host libraries' logs, warnings, progress bars and prints to ``log_file`` while the block runs.

    ``verbose`` (or ``log_file=None``): they go to stderr instead, as they come (llm-compressor's
    loguru sink moved from stdout to stderr so stdout keeps our results only). Our own output
    (``print`` and tqdm bars of ``layerif_plugins`` code, our warnings) stays on the terminal.
    Everything changed is restored when the block ends. Yields the log file's path (None at
    ``verbose``); the file is appended to.
    """
    console_out, console_err = sys.stdout, sys.stderr
    path: Path | None = None
    if verbose or log_file is None:
        log: TextIO = console_err
    else:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("a", encoding="utf-8", buffering=1)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    capture = _Capture(log=log, handler=handler)
    with _LOCK:
        _ACTIVE.append(capture)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda *a, **k: capture.show_warning(*a, console=console_err, **k)  # type: ignore[assignment]
            capture.capture_loggers()
            capture.capture_loguru()
            _watch_host_imports()
            routers = (_Router(console_out, log), _Router(console_err, log)) if path is not None else ()
            if routers:
                sys.stdout, sys.stderr = routers  # type: ignore[assignment]
            try:
                yield path
            finally:
                for router in routers:
                    router.detach()
                sys.stdout, sys.stderr = console_out, console_err
                capture.restore_loguru()
                capture.restore_loggers()
    finally:
        with _LOCK:
            _ACTIVE.remove(capture)
        if path is not None:
            log.close()


# ----------------------------------------------------------------------------- the `layerif` command


def command_log(command: str) -> Path:
    """Where ``layerif COMMAND`` logs while it runs: ``$LAYERIF_HOME/logs/layerif-COMMAND-PID.log``."""
    from layerif_plugins.paths import layerif_home

    return layerif_home() / "logs" / f"layerif-{command}-{os.getpid()}.log"


def _settle(path: Path, command: str, out_dirs: list[Path]) -> Path | None:
    """Move a finished command's log under its output directory (``OUT/logs/layerif-COMMAND.log``).

    Without a directory output (a JSON file, nothing, a failed run) it stays under
    ``$LAYERIF_HOME/logs`` as ``layerif-COMMAND.log`` (the last run's). An empty log is removed.
    """
    from layerif_plugins.io import wrote

    if not path.is_file():
        return None
    if path.stat().st_size == 0:
        path.unlink()
        return None
    # only an output this run swapped in: never a failed run's target, nor the winner of a race for it
    home = next((d for d in out_dirs if d.is_dir() and wrote(d)), None)
    target = (home / "logs" if home is not None else path.parent) / f"layerif-{command}.log"
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(path), str(target)))


@contextmanager
def command_console(command: str, *, verbose: bool = False, out_dirs: Sequence[str | Path] = ()) -> Iterator[None]:
    """The console of ``layerif COMMAND``: our lines and warnings on the terminal, the rest in a log.

    Host output as :func:`host_output`; our own ``logging`` records go to the log from INFO and
    to stderr from WARNING (``verbose``: everything, from DEBUG, to stderr and no log). The log
    ends under the command's directory output (:func:`_settle`), and one line says where.
    """
    # absolute now: `--out .` replaced in place leaves the process in a deleted working directory
    dirs = [Path(os.path.abspath(os.path.expanduser(str(d)))) for d in out_dirs]
    root = logging.getLogger()
    saved_level = root.level
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    terminal.setLevel(logging.DEBUG if verbose else logging.WARNING)
    log_path = None if verbose else command_log(command)
    settled: Path | None = None
    root.addHandler(terminal)
    root.setLevel(logging.DEBUG if verbose else min(root.level or logging.INFO, logging.INFO))
    try:
        with host_output(log_path, verbose=verbose) as path:
            own = None
            if path is not None:
                own = logging.StreamHandler(host_stream())
                own.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
                own.setLevel(logging.INFO)
                root.addHandler(own)
            try:
                yield
            finally:
                if own is not None:
                    root.removeHandler(own)
    finally:
        root.removeHandler(terminal)
        root.setLevel(saved_level)
        if log_path is not None:
            settled = _settle(log_path, command, dirs)
    if settled is not None:
        print(f"layerif {command}: library logs in {settled}", file=sys.stderr)


__all__ = ["HOST_LOGGERS", "active_log", "command_console", "command_log", "host_output", "host_stream"]
