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
* **Checked again at the swap**: the identity of the target (device, inode; or "missing")
  is recorded when the output is checked (:func:`check_out_dir` / :func:`check_out_file`,
  else when the write starts) and compared at the final rename, under an exclusive lock on
  the parent directory (``flock``: nothing is created beside the target). If another process
  wrote the target meanwhile (two runs with the same ``--out``), the later run does not
  replace it: its result is kept beside it as ``NAME.layerif-conflict-PID[.ext]`` and it
  raises :class:`ConfigError` saying where (the CLI exits 2). Exactly one run wins.
* **Symlinked outputs are written through**: when the output path is a symlink, the checks
  and the write apply to the path it points to, which is replaced in place; the link itself
  is kept (and keeps pointing at the new output). A dangling link is written through too
  when the directory it points into exists.
* **Permissions follow the umask** (``0o666``/``0o777`` minus the umask), not ``mkstemp``'s
  private ``0600``/``0700``.
* **A full disk is one line**: "no space left" / "file too large" while writing names the
  output, the bytes written before it failed and the space left (:class:`ConfigError`).
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
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
_CONFLICT_TAG = "layerif-conflict"
_APPROVED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("layerif_io_approved", default=())
#: resolved output path → its identity when it was checked (or last written by this process); see :func:`expect`
_EXPECTED: dict[str, tuple[int, int] | None] = {}
#: resolved output path → identity of what this process swapped into place there (see :func:`wrote`)
_WRITTEN: dict[str, tuple[int, int] | None] = {}


# ----------------------------------------------------------------------------- the swap


def follow_link(path: str | Path) -> Path:
    """The path a write to ``path`` goes to: a symlink's target (written through, replaced in place), else ``path``.

    ``.`` / ``..`` (and paths ending in them) are resolved too: they name a directory by its parent.
    """
    path = Path(path).expanduser()
    if path.is_symlink() or path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return path


def _key(path: Path) -> str:
    return str(_resolve(path))


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the entry at ``path`` (not following a final symlink), or None when there is none."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def expect(path: str | Path) -> None:
    """Record what ``path`` is now, so that the write at the end refuses a target another process wrote meanwhile.

    Called by :func:`check_out_dir` / :func:`check_out_file` (the checks before the work);
    :func:`atomic_dir` and :func:`atomic_file` record it themselves when the write starts.
    """
    target = follow_link(path)
    _EXPECTED[_key(target)] = _identity(target)


def wrote(path: str | Path) -> bool:
    """True when this process swapped the output now at ``path`` into place (a symlink followed).

    For code that adds to a command's output afterwards (a log file): a failed run, or a run
    that lost the race to another process, did not write what is there and must not touch it.
    """
    target = follow_link(path)
    key = _key(target)
    return key in _WRITTEN and _WRITTEN[key] is not None and _identity(target) == _WRITTEN[key]


@contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the directory ``parent`` for the compare-and-rename (no lock file is created)."""
    try:
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: the compare still runs, unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _conflict_path(path: Path) -> Path:
    """A free, visible name beside ``path`` for the result of the run that lost the race to ``path``."""
    stem, ext = (path.stem, path.suffix) if path.suffix and not path.is_dir() else (path.name, "")
    for n in range(1000):
        tail = f".{n}" if n else ""
        candidate = path.with_name(f"{stem}.{_CONFLICT_TAG}-{os.getpid()}{tail}{ext}")
        if not os.path.lexists(candidate):
            return candidate
    raise ConfigError(f"cannot find a free name beside {path} for this run's result")


def _swap(tmp: Path, path: Path, expected: tuple[int, int] | None, *, is_dir: bool, check: bool = True) -> None:
    """Move ``tmp`` onto ``path`` when ``path`` is still what it was when the write started; else keep ``tmp`` aside.

    Runs under the parent directory's lock, so two processes cannot both pass the compare.
    The old directory (a directory target) is renamed aside and removed after the new one is in place.
    ``check=False`` (a cache entry: any complete copy is as good as ours) replaces whatever is there.
    """
    with _parent_locked(path.parent):
        now = _identity(path)
        if check and now != expected:
            kept = _conflict_path(path)
            tmp.rename(kept)
            _EXPECTED.pop(_key(path), None)  # seen and reported: a retry (the user's decision) starts afresh
            raise ConfigError(
                f"{path} was written by another process while this run worked (two runs with the same output?): "
                f"it was not replaced; this run's result is kept at {kept} - compare the two and keep one"
            )
        old: Path | None = None
        if not is_dir:
            os.replace(tmp, path)
        else:
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            elif os.path.lexists(path):
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_OLD_TAG}-{os.getpid()}-"))
                old.rmdir()
                path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                if old is not None and not os.path.lexists(path):
                    old.rename(path)
                    old = None
                raise
        _EXPECTED[_key(path)] = _WRITTEN[_key(path)] = _identity(path)
    if old is not None:
        _remove(old)


def _remove(entry: Path) -> None:
    """Delete a temp / old entry: a directory tree, or a file or symlink (never followed)."""
    if entry.is_symlink() or (os.path.lexists(entry) and not entry.is_dir()):
        entry.unlink(missing_ok=True)
    else:
        shutil.rmtree(entry, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (a file or a directory tree) the modes of plain ``open`` / ``mkdir``: 0o666 / 0o777 less the umask.

    ``mkdtemp`` / ``mkstemp`` create private 0700 / 0600 entries; an output should be as
    readable as any other file the user creates. Executable bits of files are kept; links are not followed.
    """
    mask = _umask()
    if path.is_symlink():
        return
    if path.is_file():
        path.chmod((path.stat().st_mode & 0o111 | 0o666) & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            full = Path(root, name)
            if not full.is_symlink():
                full.chmod(0o777 & ~mask)
        for name in files:
            full = Path(root, name)
            if not full.is_symlink():
                full.chmod((full.stat().st_mode & 0o111 | 0o666) & ~mask)


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_SPACE_WORDS = ("No space left on device", "File too large", "Disk quota exceeded", "StorageFull", "FileTooLarge")


def _space_error(exc: BaseException) -> bool:
    """True for a write that failed for lack of space (also safetensors' SafetensorError, which wraps the OS error)."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    return isinstance(exc, Exception) and any(w in str(exc) for w in _SPACE_WORDS)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _space_message(path: Path, tmp: Path, exc: BaseException) -> str:
    what = "the file size limit was reached" if "too large" in str(exc).lower() or (
        isinstance(exc, OSError) and exc.errno == errno.EFBIG) else "no space left on the device"
    try:
        written = _size(tmp) if os.path.lexists(tmp) else 0
        free = shutil.disk_usage(path.parent).free
    except OSError:
        written, free = 0, -1
    room = f", {free:,} bytes free in {path.parent}" if free >= 0 else ""
    return (f"{what} while writing {path}: it needs more than the {written:,} bytes written before the write "
            f"failed{room}; free some space (or raise the limit) or choose another output path. Nothing was changed")


# ----------------------------------------------------------------------------- files


def check_parent(path: str | Path) -> Path:
    """Refuse an output path whose parent directory does not exist."""
    path = Path(path)
    if not path.parent.exists():
        raise ConfigError(f"output directory {path.parent} does not exist; create it first")
    if not path.parent.is_dir():
        raise ConfigError(f"{path.parent} is a file, not a directory: {path} cannot be written there")
    return path


def _file_target(path: str | Path) -> Path:
    path = check_parent(follow_link(path))
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; a file goes there: choose a file path")
    return path


def _registered(path: Path) -> tuple[bool, tuple[int, int] | None]:
    key = _key(path)
    return key in _EXPECTED, _EXPECTED.get(key)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` by one rename (a symlink is written through; the swap re-checks a checked output)."""
    path = _file_target(path)
    known, expected = _registered(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        with deferred_signals():
            _swap(Path(tmp), path, expected if known else _identity(path), is_dir=False)
    except Exception as exc:
        if _space_error(exc):
            message = _space_message(path, Path(tmp), exc)
            Path(tmp).unlink(missing_ok=True)
            raise ConfigError(message) from exc
        with deferred_signals():
            Path(tmp).unlink(missing_ok=True)
        raise
    except BaseException:
        with deferred_signals():
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename it onto ``path`` on success (re-checked at the swap)."""
    path = _file_target(path)
    known, expected = _registered(path)
    if not known:
        expected = _identity(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix or path.suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except Exception as exc:
            if _space_error(exc):
                raise ConfigError(_space_message(path, Path(tmp), exc)) from exc
            raise
        if Path(tmp).is_file():
            apply_umask(Path(tmp))
        with deferred_signals():
            _swap(Path(tmp), path, expected, is_dir=False)
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
    target is left as it was and the temp directory is removed. A symlink ``path`` is
    written through (its target is replaced, the link kept). The swap refuses a target that
    another process wrote since the output was checked (see the module docstring), except
    an ``owned`` one (a cache entry: the last complete copy wins).
    """
    path = check_parent(follow_link(path))
    check_replaceable(path, overwrite=overwrite or _approved(path), owned=owned)
    known, expected = _registered(path)
    if not known:
        expected = _identity(path)
    _sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{_TMP_TAG}-{os.getpid()}-"))
    try:
        try:
            yield tmp
        except Exception as exc:
            if _space_error(exc):
                raise ConfigError(_space_message(path, tmp, exc)) from exc
            raise
        if not (tmp / MARKER).exists():
            mark_output(tmp)
        apply_umask(tmp)
        with deferred_signals():
            _swap(tmp, path, expected, is_dir=True, check=not owned)
    finally:
        with deferred_signals():
            _remove(tmp)


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
        if match and not _alive(int(match.group(1))):
            _remove(entry)


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


def _linked_target(path: Path, option: str) -> Path:
    """Where an output at ``path`` is written (a symlink's target), with its parent checked; messages name the link."""
    target = follow_link(path)
    if target != path:
        if not target.parent.is_dir():
            raise ConfigError(f"{option} {path} is a symlink to {target}, whose directory {target.parent} does not "
                              f"exist: fix the link or choose another {option}")
        return target
    check_parent(path)
    return path


def check_out_dir(path: str | Path, *, overwrite: bool = False, option: str = "--out",
                  inputs: Mapping[str, Iterable[str | Path | None]] | None = None, into: bool = False) -> Path:
    """Check a directory output before any work: type, parent, writability, the overwrite rule, the inputs.

    ``into``: files are written into the directory (kept across runs, e.g. ``--task-dir``):
    no overwrite rule, only the type, writability and input checks.
    """
    path = Path(path).expanduser()
    target = _linked_target(path, option)
    check_apart(path, option, inputs or {}, is_dir=True)
    if into:
        if target.exists() and not target.is_dir():
            raise ConfigError(f"{option} {path} is a file; a directory goes there: choose another {option}")
        _check_writable_dir(target if target.is_dir() else target.parent, option, path)
        return path
    check_replaceable(target, overwrite=overwrite, option=option)
    _check_writable_dir(target.parent, option, path)
    expect(target)
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
    link, path = path, _linked_target(path, option)
    check_apart(link, option, inputs or {}, is_dir=False)
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
    expect(path)
    return link


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


def read_json_object(path: str | Path, what: str, error: type[Exception], missing_hint: str) -> dict[str, Any]:
    """A JSON file whose top level is an object, or ``error`` naming the file and what is wrong with it.

    ``what`` names the kind of file in messages ("LayerScores file", "allocation plan");
    ``missing_hint`` says how to make one when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}; {missing_hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError:
        raise error(f"{path}: not a {what} (not UTF-8 text)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: not a {what} (top level is {type(data).__name__})")
    return data

