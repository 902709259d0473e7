"""Register our llm-compressor modifiers and PEFT tuner as soon as those libraries are imported.

``import layerif_plugins`` must be cheap (the CLI and the engine need neither llm-compressor
nor PEFT, and each takes seconds to import), yet a YAML recipe naming
``LayerIFWandaPruningModifier`` or ``PeftModel.from_pretrained`` on a LoRA-MoE adapter must
work in any import order. So: if the upstream library is already imported we register now;
otherwise a post-import hook on ``sys.meta_path`` registers right after it finishes importing.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)

# upstream top-level module → our module whose import registers the integration
INTEGRATIONS: dict[str, str] = {
    "llmcompressor": "layerif_plugins.adapters.llmcompressor",
    "peft": "layerif_plugins.adapters.peft_moe",
}


def _register(ours: str) -> None:
    try:
        importlib.import_module(ours)
    except Exception as exc:  # an integration failing must never break the host library's import
        logger.warning("could not register %s: %s", ours, exc)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched top-level modules to run a callback after they execute."""

    def __init__(self, callbacks: dict[str, Callable[[], None]]):
        self.callbacks = callbacks
        self._busy: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname not in self.callbacks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        loader, callback, callbacks = spec.loader, self.callbacks[fullname], self.callbacks

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):  # noqa: ANN001
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)
                callbacks.pop(fullname, None)
                callback()

        spec.loader = _Loader()
        return spec


def install() -> None:
    pending: dict[str, Callable[[], None]] = {}
    for upstream, ours in INTEGRATIONS.items():
        if upstream in sys.modules:
            _register(ours)
        elif importlib.util.find_spec(upstream) is not None:
            pending[upstream] = lambda ours=ours: _register(ours)
    if pending and not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder(pending))
