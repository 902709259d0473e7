"""Serve compressed-tensors *quantized* checkpoints (``layerif quantize``) with :func:`run_vllm_models`.

:func:`run_vllm_models` checks every directory with ``check_vllm_dir(dir, device=…)``, whose
default refuses quantized checkpoints (that check was written for dense pruned ones).
:func:`run_vllm_quantized` runs it with the check's ``allow_quantized=True`` for directories
whose config states compressed-tensors ``config_groups``, every other check unchanged.
Interim: once ``run_vllm_models`` takes an ``allow_quantized`` argument this module is one call.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _states_quantization(path: str | Path) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False  # the check itself names what is wrong with the directory
    qc = config.get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" and bool(qc.get("config_groups"))


@contextmanager
def _allow_quantized() -> Iterator[None]:
    import layerif_plugins.integrations.vllm_backend as backend

    original = backend.check_vllm_dir

    def check(path: str | Path, allow_quantized: bool = False, device: str | None = None) -> Any:
        return original(path, allow_quantized=allow_quantized or _states_quantization(path), device=device)

    backend.check_vllm_dir = functools.update_wrapper(check, original)
    try:
        yield
    finally:
        backend.check_vllm_dir = original


def run_vllm_quantized(model_dirs: Sequence[str | Path], *args: Any, **kwargs: Any) -> list[Any]:
    """:func:`~layerif_plugins.integrations.vllm_backend.run_vllm_models`, accepting quantized checkpoints."""
    from layerif_plugins.integrations.vllm_backend import run_vllm_models

    with _allow_quantized():
        return run_vllm_models(model_dirs, *args, **kwargs)
