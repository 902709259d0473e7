"""A post-import hook: run a callback on a module right after it is imported (or at once, if it is).

``import layerif_plugins`` must be cheap (the CLI and the engine need neither llm-compressor
nor PEFT, and each takes seconds to import), yet a YAML recipe naming
``LayerIFWandaPruningModifier`` or ``PeftModel.from_pretrained`` on a LoRA-MoE adapter must
work in any import order. :func:`when_imported` does that through one finder on
``sys.meta_path``; the registration table that uses it is :mod:`layerif_plugins.integrations`.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

Callback = Callable[[ModuleType], None]
_PENDING: dict[str, list[Callback]] = {}


def _run(name: str, module: ModuleType, callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception as exc:  # an integration failing must never break the host library's import
            logger.warning("layerif_plugins: registering with %s failed: %s", name, exc)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds watched modules through the other finders and wraps their loader's ``exec_module``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in _PENDING:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                _run(fullname, module, _PENDING.pop(fullname, []))

        spec.loader = _Loader()
        return spec


def when_imported(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once ``name`` is imported (now, if it already is)."""
    if name in sys.modules:
        _run(name, sys.modules[name], [callback])
        return
    _PENDING.setdefault(name, []).append(callback)
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
