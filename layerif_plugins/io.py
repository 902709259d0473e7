"""Atomic file and directory writes, and the one rule for output paths: nothing of the user's is ever destroyed.

* **Atomic**: a file or directory appears at its target by one rename; nothing half-written
  is ever left at the target path, and the temp entries beside it are removed on every
  failure, Ctrl-C and SIGTERM included (a SIGKILL leaves them; the next write to the same
  target removes those of dead processes).
* **Our own output only**: every directory :func:`atomic_dir` writes holds a marker file,
  :data:`MARKER`. An existing non-empty directory is replaced only when the caller allows
  it (``overwrite=True``, or :func:`replacing` around the call: the CLI's ``--overwrite``)
  *and* it holds the marker (or, from before the marker, one of our :data:`OWN_REPORTS`),
  so a typo in ``--out`` can never delete a project. A regular file where a directory
  goes, or a directory where a file goes, is refused.
* **Checked before the work**: :func:`check_out_dir` / :func:`check_out_file` check the
  type, the writability, the overwrite rule and the relation to every input (``--out``
  equal to, inside, or holding an input) before a command loads anything, so a
  computation never ends in "cannot write".
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from layerif_plugins.errors import ConfigError

#: marker file inside every directory written by :func:`atomic_dir` ("this is a layerif output")
MARKER = ".layerif-output"
#: files that prove a directory is ours when it was written before :data:`MARKER` existed
#: (llm-compressor prune report, layer drop, healing, LoRA-MoE adapter, finetune metrics, catalogue)
OWN_REPORTS: tuple[str, ...] = ("sparsity_report.json", "layer_drop.json", "heal.json", "layout.json",
                                "train_metrics.json", "layerif_source.json")
#: what an output file must already look like for ``--overwrite`` to replace it, by kind
FILE_KINDS: tuple[str, ...] = ("json", "png")

_TMP_TAG = "layerif-tmp"
_OLD_TAG = "layerif-old"
_APPROVED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("layerif_io_approved", default=())


# ----------------------------------------------------------------------------- files


def check_parent(path: str | Path) -> Path:
    """Refuse an output path whose parent directory does not exist."""
    path = Path(path)
    if not path.parent.exists():
        raise ConfigError(f"output directory {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise ConfigError(f"{path.parent} is a file, not a directory: {path} cannot be written there")
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = check_parent(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; a file goes there: choose a file path")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with deferred_signals():
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename it onto ``path`` on success."""
    path = check_parent(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; a file goes there: choose a file path")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix or path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with deferred_signals():
            Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- directories


def is_own_output(path: str | Path) -> bool:
    """True when ``path`` is a directory this library wrote (it holds :data:`MARKER` or one of :data:`OWN_REPORTS`)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (MARKER, *OWN_REPORTS))


def mark_output(path: str | Path, **info: Any) -> Path:
    """Write :data:`MARKER` into the directory ``path`` (what makes it replaceable by a later ``--overwrite``)."""
    marker = Path(path) / MARKER
    marker.write_text(json.dumps({"written_by": "layerif-plugins", **info}, default=str) + "\n", encoding="utf-8")
    return marker


@contextmanager
def replacing(*paths: str | Path | None) -> Iterator[None]:
    """Allow :func:`atomic_dir` calls inside the block to replace our own outputs at or below ``paths``.

    The CLI wraps a command in it for ``--out`` when ``--overwrite`` was given (after
    :func:`check_out_dir` accepted the target), so library writers that do not take an
    ``overwrite`` argument follow the command line. The marker check still applies.
    """
    resolved = tuple(_resolve(p) for p in paths if p is not None)
    token = _APPROVED.set(_APPROVED.get() + resolved)
    try:
        yield
    finally:
        _APPROVED.reset(token)


def _approved(path: Path) -> bool:
    target = _resolve(path)
    return any(target == p or p in target.parents for p in _APPROVED.get())


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``path``; swap it into place (with :data:`MARKER`) on success.

    An existing non-empty ``path`` is replaced only with ``overwrite=True`` (or inside
    :func:`replacing`) and only when it is our own output (:func:`is_own_output`; ``owned``:
    the caller knows it is, e.g. a cache entry under our cache directory). The old
    directory is removed after the new one is in place; on any failure or interrupt the
    target is left as it was and the temp directory is removed.
    """
    path = check_parent(path)
    check_replaceable(path, overwrite=overwrite or _approved(path), owned=owned)
    _sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_TMP_TAG}-{os.getpid()}-"))
    old: Path | None = None
    try:
        yield tmp
        if not (tmp / MARKER).exists():
            mark_output(tmp)
        with deferred_signals():
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            elif path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_OLD_TAG}-{os.getpid()}-"))
                old.rmdir()
                path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                if old is not None and not path.exists():
                    old.rename(path)
                    old = None
                raise
    finally:
        with deferred_signals():
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def check_replaceable(path: Path, *, overwrite: bool, owned: bool = False, option: str = "--out") -> None:
    """The directory rule: missing or empty is fine; non-empty needs ``overwrite`` and our marker; a file is refused."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; a directory goes there: choose another {option} "
                          "(nothing was changed)")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{option} {path} exists and is not empty: pass --overwrite to replace it, "
                          f"or choose another {option}")
    if not owned and not is_own_output(path):
        raise ConfigError(f"{option} {path} is not a layerif output (no {MARKER} marker): not replacing it even "
                          f"with --overwrite; choose another {option}, or delete it yourself")


def _sweep_stale(path: Path) -> None:
    """Remove temp / old directories beside ``path`` left by a killed process (SIGKILL) of an earlier write."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:{_TMP_TAG}|{_OLD_TAG})-(\d+)-")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for entry in siblings:
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: not ours to judge
    return True


# ----------------------------------------------------------------------------- signals


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT / SIGTERM during a short critical step (a swap, a cleanup); deliver them after it.

    Only the main thread can set handlers; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    wanted = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in wanted}
    except (ValueError, OSError):  # not settable here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


# ----------------------------------------------------------------------------- checks before the work


def _resolve(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _check_writable_dir(parent: Path, option: str, path: Path) -> None:
    """Probe that a file can be created in ``parent`` (permission bits lie to root; a read-only mount does not)."""
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".layerif-probe-")
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc}); "
                          f"choose a writable {option}") from exc
    os.close(fd)
    os.unlink(probe)


def check_apart(path: Path, option: str, inputs: Mapping[str, Iterable[str | Path | None]],
                     is_dir: bool) -> None:
    """Refuse ``path`` equal to an input, inside an input directory, or (a directory) holding an input."""
    target = _resolve(path)
    for name, values in inputs.items():
        for value in values:
            if value is None or str(value) == "":
                continue
            src = _resolve(value)
            if not src.exists():
                continue  # a hub id, a catalogue name, a missing file: the command names it
            if src == target:
                raise ConfigError(f"{option} {path} is the input {name} {value}: writing it would destroy the "
                                  f"input; choose another {option}")
            if src.is_dir() and src in target.parents:
                raise ConfigError(f"{option} {path} is inside the input {name} {value}: choose an {option} "
                                  "outside it")
            if is_dir and target in src.parents:
                raise ConfigError(f"{option} {path} holds the input {name} {value}: replacing it would delete "
                                  f"the input; choose another {option}")


def check_out_dir(path: str | Path, *, overwrite: bool = False, option: str = "--out",
                  inputs: Mapping[str, Iterable[str | Path | None]] | None = None, into: bool = False) -> Path:
    """Check a directory output before any work: type, parent, writability, the overwrite rule, the inputs.

    ``into``: files are written into the directory (kept across runs, e.g. ``--task-dir``):
    no overwrite rule, only the type, writability and input checks.
    """
    path = Path(path).expanduser()
    check_parent(path)
    check_apart(path, option, inputs or {}, is_dir=True)
    if into:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{option} {path} is a file; a directory goes there: choose another {option}")
        _check_writable_dir(path if path.is_dir() else path.parent, option, path)
        return path
    check_replaceable(path, overwrite=overwrite, option=option)
    _check_writable_dir(path.parent, option, path)
    return path


def _looks_like(path: Path, kind: str) -> bool:
    """True when the existing file ``path`` has the form we write for ``kind`` (so it can be a previous output)."""
    try:
        if kind == "png":
            with path.open("rb") as fh:
                return fh.read(8) == b"\x89PNG\r\n\x1a\n"
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False


def check_out_file(path: str | Path, *, overwrite: bool = False, option: str = "--out", kind: str = "json",
                   inputs: Mapping[str, Iterable[str | Path | None]] | None = None) -> Path:
    """Check a file output before any work: type, parent, writability, the overwrite rule, the inputs.

    An existing non-empty file is replaced only with ``overwrite`` and only when it has the
    form of our output of this ``kind`` (a JSON object, a PNG image), never a data file.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"kind must be one of {FILE_KINDS}, got {kind!r}")
    path = Path(path).expanduser()
    check_parent(path)
    check_apart(path, option, inputs or {}, is_dir=False)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; a file goes there: choose a file path for {option}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{option} {path} is not a regular file: choose a file path for {option}")
    if path.is_file() and path.stat().st_size > 0:
        if not overwrite:
            raise ConfigError(f"{option} {path} exists: pass --overwrite to replace it, or choose another {option}")
        if not _looks_like(path, kind):
            raise ConfigError(f"{option} {path} is not a previous layerif output (not a {kind.upper()} file we "
                              f"write): not replacing it even with --overwrite; choose another {option}")
    _check_writable_dir(path.parent, option, path)
    return path


def check_outputs_apart(outputs: Mapping[str, str | Path | None]) -> None:
    """Refuse two outputs of one command that are the same path or nested (one would replace the other)."""
    items = [(name, _resolve(p), p) for name, p in outputs.items() if p is not None and str(p) != ""]
    for i, (a, pa, ra) in enumerate(items):
        for b, pb, rb in items[i + 1:]:
            if pa == pb or pa in pb.parents or pb in pa.parents:
                raise ConfigError(f"{a} {ra} and {b} {rb} overlap: give each output its own path")


def check_readable(name: str, path: str | Path | None) -> None:
    """Refuse an existing input file that cannot be read (one line, before any work)."""
    if path is None or str(path) == "":
        return
    p = Path(path).expanduser()
    if not p.is_file():
        return
    try:
        with p.open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(f"{name} {path} cannot be read: {exc.strerror or exc}") from exc
