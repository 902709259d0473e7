"""Shared fixtures: the real stories260K (converted once per session) and the real shared data.

No hub access: HF caches point into a session temp dir and the hub is switched off.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="layerif-tests-hf-"))
os.environ.setdefault("HF_HOME", str(_CACHE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: a second intra-op thread only adds synchronisation (measured 2-4x slower
# for oneshot and scoring when the cores are shared), and one thread keeps timings stable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# waiting OpenMP threads sleep instead of spinning (engine/threads.py); inherited by `layerif` subprocesses
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from layerif_plugins.paths import shared_data, shared_dir, stories260k_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not (path / "models" / "stories260K" / "stories260K.bin").is_file():
        pytest.fail(f"shared assets not found at {path}; set LAYERIF_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def stories_bin(shared: Path) -> Path:
    return stories260k_checkpoint()


@pytest.fixture(scope="session")
def stories_dir(stories_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to an HF directory (model + tokenizer), once per session."""
    from layerif_plugins.models import load_model_and_tokenizer, save_model_dir

    model, tok = load_model_and_tokenizer(stories_bin, device="cpu")
    return save_model_dir(model, tok, tmp_path_factory.mktemp("models") / "stories260K-hf")


@pytest.fixture()
def stories(stories_dir: Path):
    """A fresh (model, tokenizer) pair loaded from the converted directory (tests may mutate it)."""
    from layerif_plugins.models import load_model_and_tokenizer

    return load_model_and_tokenizer(stories_dir, device="cpu")


@pytest.fixture(scope="session")
def tinystories_train(shared: Path) -> Path:
    return shared_data("tinystories", "train.txt")


@pytest.fixture(scope="session")
def tinystories_valid(shared: Path) -> Path:
    return shared_data("tinystories", "valid.txt")


@pytest.fixture(scope="session")
def shakespeare(shared: Path) -> Path:
    return shared_data("tinyshakespeare", "input.txt")
