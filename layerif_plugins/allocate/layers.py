"""Scores → which decoder layers to drop (depth pruning) and which to adapt (fine-tuning).

Pure functions of plain lists and :class:`~layerif_plugins.scores.LayerScores`. Layers are
decoder blocks ``0 … L−1``; every result is a sorted list of layer indices.

Which end of the scores counts is read from the file's :class:`~layerif_plugins.scores.ScoreDirection`
(declared by each scorer), never from the method name.

Dropping (``K`` layers):

* **angular** — the contiguous block ``l* … l*+K−1`` with the smallest angular distance
  ``d(l, l+K)`` (Gromov et al.), read from the scores file's ``extras["distances"][str(K)]``
  (the ``angular`` scorer stores every block size, so one file serves every ``K``).
* **every other method** — the ``K`` layers at the direction's ``drop_end``: the **highest**
  scores for ``HIGHER_PRUNES`` / ``LOWER_ADAPTS`` scores (``block_influence``, ``layerif`` …),
  the **lowest** for ``HIGHER_PROTECTS`` scores (``owl``: the fewest outliers). For
  ``block_influence`` the score is ``1 − BI``, so this is ShortGPT's "remove the lowest
  Block Influence"; for ``layerif`` a higher score is a less well-trained layer, the one the
  sparsity allocators prune hardest, and removing a block is the limit of pruning it
  (sparsity 1), so the same layers go first.
* **last** (baseline, :func:`last_layers`) — the final ``K`` layers.

Ties go to the deeper layer (deeper layers are the more redundant ones in practice, and a
constant score then reduces to the last-layers baseline).

Adapting (``K`` layers, for a PEFT ``LoraConfig(layers_to_transform=…)``), the direction's
``adapt_end``:

* ``LOWER_ADAPTS`` (``variability``) — the ``K`` lowest ``ν`` (the most task-specialised
  representations);
* ``HIGHER_PRUNES`` (``layerif`` …) — the ``K`` highest scores (the less well-trained layers,
  the ones LayerIF gives more LoRA experts); ``HIGHER_PROTECTS`` (``owl``) — the ``K`` lowest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from layerif_plugins.errors import AllocationError, ScoresError
from layerif_plugins.scores import LayerScores, ScoreDirection, as_direction

Rule = Literal["auto", "highest", "lowest"]

#: how ``layerif drop --by`` chooses layers: a scoring method, or the last-layers baseline
DROP_RULES: tuple[str, ...] = ("angular", "block_influence", "layerif", "last")


def check_k(k: int, num_layers: int, what: str = "drop") -> int:
    """Refuse ``k < 1`` and ``k ≥ num_layers`` (at least one layer must remain / stay frozen)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise AllocationError(f"number of layers to {what} must be an integer, got {k!r}")
    if k < 1:
        raise AllocationError(f"cannot {what} {k} layers: choose at least 1")
    if k >= num_layers:
        hint = " (to adapt every layer, leave layers_to_transform unset)" if what == "adapt" else \
            " (at least one layer must remain)"
        raise AllocationError(f"cannot {what} {k} of {num_layers} layers: choose at most {num_layers - 1}{hint}")
    return k


def top_k_layers(scores: Sequence[float], k: int, highest: bool = True, what: str = "drop") -> list[int]:
    """Indices of the ``k`` highest (or lowest) scores, ties to the deeper layer, sorted ascending."""
    check_k(k, len(scores), what)
    sign = 1.0 if highest else -1.0
    order = sorted(range(len(scores)), key=lambda i: (-sign * float(scores[i]), -i))
    return sorted(order[:k])


def lowest_distance_block(distances: Sequence[float], k: int, num_layers: int) -> list[int]:
    """The block ``l* … l*+k−1`` with ``l* = argmin_l d(l, l+k)`` (ties to the deeper block)."""
    check_k(k, num_layers)
    if len(distances) != num_layers - k + 1:
        raise ScoresError(f"{len(distances)} angular distances for blocks of {k} in {num_layers} layers; "
                          f"expected {num_layers - k + 1} (one per start layer)")
    start = min(range(len(distances)), key=lambda s: (float(distances[s]), -s))
    return list(range(start, start + k))


def last_layers(num_layers: int, k: int) -> list[int]:
    """Baseline: the final ``k`` layers."""
    check_k(k, num_layers)
    return list(range(num_layers - k, num_layers))


def angular_distances(scores: LayerScores, k: int) -> list[float]:
    """``d(l, l+k)`` for every start ``l`` from an ``angular`` scores file."""
    by_n = scores.extras.get("distances") or {}
    if str(k) in by_n:
        return [float(d) for d in by_n[str(k)]]
    if scores.params.get("n") == k and "angular_distance" in scores.extras:
        return [float(d) for d in scores.extras["angular_distance"]]
    raise ScoresError(f"the angular scores file has no distances for blocks of {k} layers "
                      f"(has {sorted(by_n, key=int) or [scores.params.get('n')]}); recompute with "
                      "`layerif score --method angular`")


def layers_to_drop(scores: LayerScores, k: int) -> list[int]:
    """The ``k`` layers to remove according to ``scores`` (see the module docstring for each rule)."""
    check_k(k, scores.num_layers)
    if scores.method == "angular":
        return lowest_distance_block(angular_distances(scores, k), k, scores.num_layers)
    return top_k_layers(scores.scores, k, highest=as_direction(scores.direction).drop_end == "highest")


def adapt_rule(direction: ScoreDirection | str) -> Literal["highest", "lowest"]:
    """Which end of the scores marks the layers to adapt (a direction, or a method name read as its direction)."""
    return as_direction(direction).adapt_end


def layers_to_adapt(scores: LayerScores, k: int, rule: Rule = "auto") -> list[int]:
    """The ``k`` layers to fine-tune; ``rule="auto"``: the end the scores' direction names (lowest ν …)."""
    if rule not in ("auto", "highest", "lowest"):
        raise AllocationError(f"rule must be 'auto', 'highest' or 'lowest', got {rule!r}")
    chosen = adapt_rule(scores.direction) if rule == "auto" else rule
    return top_k_layers(scores.scores, k, highest=chosen == "highest", what="adapt")


def lora_config_kwargs(
    layers: Sequence[int],
    target_modules: Sequence[str],
    layers_pattern: str = "layers",
    r: int = 8,
    lora_alpha: int = 16,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``peft.LoraConfig`` that put LoRA only on ``layers``.

    ``layers_pattern`` is the name of the block list in the module path (``layers`` for
    ``model.layers.3.mlp``; ``h`` for GPT-2): PEFT uses it to read the layer index.
    """
    if not layers:
        raise AllocationError("no layers to adapt")
    if not target_modules:
        raise AllocationError("no target modules for LoRA")
    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "target_modules": list(target_modules),
        "layers_to_transform": sorted(int(i) for i in layers),
        "layers_pattern": layers_pattern,
        **extra,
    }
