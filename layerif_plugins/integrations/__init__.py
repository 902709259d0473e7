"""Bridges to outside libraries, and the one table that says when each registers itself.

Each bridge is a package here that adapts one host library and exposes
``register(host_module)`` (idempotent). :data:`INTEGRATIONS` is the only place that says which
host module triggers which bridge; :func:`install` (run by ``import layerif_plugins``) watches
the hosts through one post-import hook (:mod:`._hooks`), so registration works in any import
order and ``import layerif_plugins`` stays cheap (no host library is imported by it):

* host imported first → the bridge is imported and registered right after the host;
* bridge imported first (it imports its host while loading) → registered once the bridge
  has finished loading.

To add a host integration: write ``integrations/<name>/`` with a ``register(host_module)``
and add one :class:`Integration` row below.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from functools import partial
from types import ModuleType

from layerif_plugins.integrations._hooks import when_imported

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Integration:
    """One host library and the bridge that registers our plugins with it.

    Attributes:
        name: what is registered, for messages.
        requires: top-level package that must be installed for the bridge to apply.
        host: the host module whose import triggers registration.
        bridge: our module exposing ``register(host_module)``.
    """

    name: str
    requires: str
    host: str
    bridge: str


INTEGRATIONS: tuple[Integration, ...] = (
    Integration("LayerIF Wanda / SparseGPT modifiers in llm-compressor recipes", "llmcompressor",
                "llmcompressor.modifiers.factory", "layerif_plugins.integrations.llmcompressor"),
    Integration("LoRA-MoE tuner in PEFT", "peft", "peft", "layerif_plugins.integrations.peft_moe"),
)


def _initializing(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def _register(integration: Integration, bridge: ModuleType, host: ModuleType) -> None:
    bridge.register(host)
    logger.debug("registered %s", integration.name)


def _host_loaded(integration: Integration, host: ModuleType) -> None:
    bridge = importlib.import_module(integration.bridge)
    if not _initializing(bridge):  # a bridge still loading registers when it finishes (_bridge_loaded)
        _register(integration, bridge, host)


def _bridge_loaded(integration: Integration, bridge: ModuleType) -> None:
    host = sys.modules.get(integration.host)
    if host is not None:
        _register(integration, bridge, host)


def install() -> None:
    """Watch every host in :data:`INTEGRATIONS` whose library is installed (idempotent)."""
    for integration in INTEGRATIONS:
        if integration.host not in sys.modules and importlib.util.find_spec(integration.requires) is None:
            continue
        if integration.bridge not in sys.modules:
            when_imported(integration.bridge, partial(_bridge_loaded, integration))
        when_imported(integration.host, partial(_host_loaded, integration))


__all__ = ["INTEGRATIONS", "Integration", "install", "when_imported"]
