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
