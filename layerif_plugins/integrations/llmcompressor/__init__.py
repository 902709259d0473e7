"""llm-compressor adapter: LayerIF (and baseline) per-layer sparsity for Wanda and SparseGPT.

``LayerIFWandaPruningModifier`` and ``LayerIFSparseGPTModifier`` are registered with
llm-compressor's ``ModifierFactory``, so YAML recipes that name them resolve in
``oneshot(recipe="recipe.yaml")``. :func:`prune_model` is the one-call entry point used
by ``layerif prune``.

Importing this package is cheap: llm-compressor takes seconds to import, so nothing of
it is imported here. :func:`register` (called through the table in
:mod:`layerif_plugins.integrations` as soon as llm-compressor's factory module is loaded)
puts a small factory for each modifier name into ``ModifierFactory``'s registry; the
first recipe that names one of them imports :mod:`.modifiers` and registers the real
classes in their place. Attribute access
(``from layerif_plugins.integrations.llmcompressor import prune_model``) imports lazily too.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

MODIFIER_NAMES = ("LayerIFWandaPruningModifier", "LayerIFSparseGPTModifier")
_FACTORY_MODULE = "llmcompressor.modifiers.factory"
_LAZY = {
    "LayerIFWandaPruningModifier": "modifiers",
    "LayerIFSparseGPTModifier": "modifiers",
    "LayerIFSparsityModifierBase": "modifiers",
    "ALLOCATIONS": "modifiers",
    "prunable_modules": "modifiers",
    "resolve_scores_path": "modifiers",
    "ALGORITHMS": "prune",
    "measure_sparsity": "prune",
    "prune_model": "prune",
    "release_traced_forwards": "release",
}


def _creator(name: str) -> Callable[..., Any]:
    """Stands in the registry for ``name`` until the real class is imported (then it is replaced)."""

    def create(**kwargs: Any) -> Any:
        from layerif_plugins.integrations.llmcompressor import modifiers

        register(sys.modules[_FACTORY_MODULE])  # the real classes replace the stand-ins
        return modifiers.MODIFIERS[name](**kwargs)

    create.__name__ = create.__qualname__ = name
    return create


def register(factory_module: ModuleType) -> None:
    """Make YAML recipes naming the LayerIF modifiers resolve in ``factory_module.ModifierFactory``.

    Puts the real classes there when :mod:`.modifiers` is loaded, cheap stand-ins otherwise
    (idempotent).
    """
    factory = factory_module.ModifierFactory
    modifiers = sys.modules.get(f"{__name__}.modifiers")
    real = getattr(modifiers, "MODIFIERS", None)
    for name in MODIFIER_NAMES:
        if real is not None:
            factory.register(name, real[name])
        else:
            factory._registered_registry.setdefault(name, _creator(name))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*MODIFIER_NAMES, "LayerIFSparsityModifierBase", "ALLOCATIONS", "ALGORITHMS", "register",
           "measure_sparsity", "prunable_modules", "prune_model", "release_traced_forwards", "resolve_scores_path"]
