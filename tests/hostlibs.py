"""Importing the host libraries a test module needs: a skip on a partial install, a failure under CI.

`make install` installs every extra, so under ``CI=true`` a missing host library is a broken
environment, not a reason to skip ~1,000 lines of tests silently (the vLLM tests do the same with
their own environment). Test modules import this as ``from hostlibs import require`` (pytest puts
``tests/`` on ``sys.path``, as for ``conftest.py``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str, extra: str) -> ModuleType:
    """``import module``; without it, skip the calling test module, or fail it under ``CI=true``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if under_ci():
            pytest.fail(f"CI=true but {module} cannot be imported (`make install` installs the {extra!r} extra): "
                        f"{exc}", pytrace=False)
        pytest.skip(f"{module} is not installed (pip install 'layerif-plugins[{extra}]')", allow_module_level=True)
