"""Let a model that went through llm-compressor's sequential pipeline be freed.

llm-compressor's sequential pipeline (``pipelines/sequential/ast_helpers.autowrap_forwards``)
re-executes the model's ``forward`` source in a namespace holding ``self`` = the model, and
decorates the untraceable parts with ``torch.fx.wrap``. ``torch.fx.wrap`` records that
namespace in a module-level table (``torch.fx._symbolic_trace._wrapped_fns_to_patch``) for the
life of the process, so every model calibrated this way stays alive after its session ends:
+0.5 GiB per ``prune_model`` call on SmolLM2-135M in one process (a sweep of calls, the retest
of a planner cell; benchmarks/planner_memory.py), and every later trace re-patches the dead
namespaces too.
torch.fx reads that table only while it traces; dropping the entries whose namespace's
``self`` is one of the model's modules releases the model and changes nothing else. The
subgraphs torch.fx compiles from that trace call ``wrap`` again from their generated code, so
the table also holds the subgraphs' globals, whose wrapped functions' own globals hold ``self``:
those entries go too.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn


def release_traced_forwards(model: Any) -> int:
    """Drop torch.fx's records of llm-compressor's autowrapped forwards of ``model``; returns how many."""
    from torch.fx import _symbolic_trace

    table = getattr(_symbolic_trace, "_wrapped_fns_to_patch", None)
    if not isinstance(table, dict) or not isinstance(model, nn.Module):
        return 0
    mine = {id(m) for m in model.modules()}
    stale = [key for key, namespace in table.items() if isinstance(namespace, dict) and _holds(namespace, mine)]
    for key in stale:
        del table[key]
    return len(stale)


def _holds(namespace: dict[str, Any], mine: set[int]) -> bool:
    """Whether a recorded namespace is an autowrapped forward's (``self`` is ours) or a subgraph's that calls one."""
    if id(namespace.get("self")) in mine:
        return True
    return any(isinstance(v, types.FunctionType) and id(v.__globals__.get("self")) in mine for v in namespace.values())
