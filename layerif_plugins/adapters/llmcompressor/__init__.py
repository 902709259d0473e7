"""llm-compressor adapter: LayerIF (and baseline) per-layer sparsity for Wanda and SparseGPT.

``LayerIFWandaPruningModifier`` and ``LayerIFSparseGPTModifier`` are registered with
llm-compressor's ``ModifierFactory``, so YAML recipes that name them resolve in
``oneshot(recipe="recipe.yaml")``. :func:`prune_model` is the one-call entry point used
by ``layerif prune``.

Importing this package is cheap: llm-compressor takes seconds to import, so nothing of
it is imported here. Instead :func:`install_lazy_registration` puts a small factory for
each modifier name into ``ModifierFactory``'s registry as soon as llm-compressor's
factory module is loaded (now, if it already is); the first recipe that names one of
them imports :mod:`.modifiers`, which registers the real classes. Attribute access
(``from layerif_plugins.adapters.llmcompressor import prune_model``) imports lazily too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from layerif_plugins._plugins import when_imported

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
}


def _creator(name: str) -> Callable[..., Any]:
    """Stands in the registry for ``name`` until the real class is imported (then it replaces itself)."""

    def create(**kwargs: Any) -> Any:
        from layerif_plugins.adapters.llmcompressor import modifiers  # registers the real classes

        return modifiers.MODIFIERS[name](**kwargs)

    create.__name__ = create.__qualname__ = name
    return create


def _install_creators(factory_module: Any) -> None:
    registry = factory_module.ModifierFactory._registered_registry
    for name in MODIFIER_NAMES:
        registry.setdefault(name, _creator(name))


def install_lazy_registration() -> bool:
    """Make YAML recipes naming the LayerIF modifiers resolve, without importing llm-compressor now.

    Returns False when llm-compressor is not installed (nothing to do).
    """
    if _FACTORY_MODULE not in sys.modules and importlib.util.find_spec("llmcompressor") is None:
        return False
    when_imported(_FACTORY_MODULE, _install_creators)
    return True


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install_lazy_registration()

__all__ = [*MODIFIER_NAMES, "LayerIFSparsityModifierBase", "ALLOCATIONS", "ALGORITHMS", "install_lazy_registration",
           "measure_sparsity", "prunable_modules", "prune_model", "resolve_scores_path"]
