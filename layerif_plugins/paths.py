"""Where the shared read-only assets (stories260K, TinyStories …) live.

``LAYERIF_SHARED`` overrides; the default is ``../shared`` beside the repository, which
is how CI and developers' machines lay it out. Nothing here is ever copied into the repo.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("LAYERIF_SHARED", REPO_ROOT.parent / "shared")).resolve()


def stories260k_checkpoint() -> Path:
    return shared_dir() / "models" / "stories260K" / "stories260K.bin"


def shared_data(*parts: str) -> Path:
    return shared_dir().joinpath("data", *parts)


def layerif_home() -> Path:
    """Where fetched models are cached: ``$LAYERIF_HOME``, else ``$XDG_CACHE_HOME/layerif``, else ``~/.cache/layerif``.

    A cache (not the repository, not ``shared/``) because its content can always be fetched
    again; one variable moves it to a bigger disk.
    """
    if os.environ.get("LAYERIF_HOME"):
        return Path(os.environ["LAYERIF_HOME"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(cache).expanduser() / "layerif").resolve()


def model_cache_dir() -> Path:
    """``<layerif_home>/models``: one HF directory per catalogue name."""
    return layerif_home() / "models"
