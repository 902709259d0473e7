"""Layer scorers behind one registry. Importing this package registers every built-in method."""

import importlib
import pkgutil

from layerif_plugins.scorers.registry import (
    SCORERS,
    ScoringData,
    get_scorer,
    register_scorer,
    resolve_scores,
    score_layers,
)

# Every module in this package registers its scorer(s) on import: a new method is a new file.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "registry":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["SCORERS", "ScoringData", "get_scorer", "register_scorer", "resolve_scores", "score_layers"]
