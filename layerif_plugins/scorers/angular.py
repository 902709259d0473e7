"""Angular distance between layers (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers").

For a block of ``n`` consecutive decoder layers starting at ``l``::

    d(l, l+n) = arccos( cos(h_T^l, h_T^{l+n}) ) / π        ∈ [0, 1]

on the last non-pad token ``T`` of each calibration example, averaged over examples.
``h^l`` is the *input* of block ``l`` and ``h^{l+n}`` the *output* of block ``l+n−1``
(see :mod:`layerif_plugins.scorers.hidden_states`: states come from hooks on the blocks,
so the last one is the pre-norm residual stream, not HF's normalised
``hidden_states[-1]``). A small ``d`` means the block ``l … l+n−1`` barely changes the
representation: the paper drops the block ``l* = argmin_l d(l, l+n)`` and heals with LoRA.

What the scores file holds:

* ``extras["distances"]``: ``{str(n'): [d(l, l+n') for l = 0 … L−n']}`` for **every**
  block size ``n' = 1 … L−1`` (one pass gives them all), so one file serves every
  ``layerif drop --n-layers K``;
* ``extras["angular_distance"]`` and ``extras["best_start"]``: the list and its argmin for
  the requested ``n``;
* ``scores[l] = 1 − min { d(s, s+n) : s ≤ l ≤ s+n−1 }``: the redundancy of the most
  redundant ``n``-block containing layer ``l``. **Higher = more redundant = less
  important**, the project's convention (more sparsity, dropped first); the layers of the
  argmin block share the highest score.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerif_plugins.errors import ConfigError
from layerif_plugins.models import fingerprint, num_layers
from layerif_plugins.scorers.hidden_states import iter_block_states, last_token
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / π`` along the last dimension (float64; 0 = same direction, 1 = opposite)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def distance_matrix(last_states: torch.Tensor) -> torch.Tensor:
    """``(L+1, N, d)`` last-token states → ``(L+1, L+1)`` matrix of mean angular distances."""
    u = last_states.double()
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = torch.einsum("lnd,mnd->lmn", u, u).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean(dim=-1)


def block_distances(dist: torch.Tensor, n: int) -> list[float]:
    """``[d(l, l+n) for l = 0 … L−n]`` from a ``(L+1, L+1)`` distance matrix."""
    size = dist.shape[0]
    return [float(dist[l, l + n]) for l in range(size - n)]


def redundancy_scores(distances: list[float], n: int, num_layers: int) -> list[float]:
    """Per-layer ``1 − min d`` over the ``n``-blocks that contain the layer (higher = more redundant)."""
    out = []
    for layer in range(num_layers):
        starts = range(max(0, layer - n + 1), min(layer, num_layers - n) + 1)
        out.append(1.0 - min(distances[s] for s in starts))
    return out


@register_scorer("angular", needs=("calib",), direction=ScoreDirection.HIGHER_PRUNES,
                 description="angular distance d(l, l+n) of the last token's state across n-layer blocks")
def score_angular(
    model: nn.Module, data: ScoringData, n: int = 1, batch_size: int = 8, show_progress: bool = False
) -> LayerScores:
    """Angular distance between block inputs and outputs (higher score = more redundant layer)."""
    n_layers = num_layers(model)
    if not 1 <= n < n_layers:
        raise ConfigError(f"angular: block size n={n} must be between 1 and {n_layers - 1} (the model has "
                          f"{n_layers} layers)")
    assert data.calib is not None
    # Sum the per-example distance matrices batch by batch: O(L²) memory, all n at once.
    total = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    count = 0
    for batch, states in iter_block_states(model, data.calib, data.pad_id, batch_size, "angular", show_progress):
        last = torch.stack([last_token(h, batch.attention_mask) for h in states]).cpu()  # (L+1, B, d)
        total += distance_matrix(last) * last.shape[1]
        count += last.shape[1]
    dist = total / count
    by_n = {str(k): block_distances(dist, k) for k in range(1, n_layers)}
    chosen = by_n[str(n)]
    best = min(range(len(chosen)), key=lambda s: (chosen[s], -s))
    return LayerScores(
        scores=redundancy_scores(chosen, n, n_layers),
        method="angular",
        model=fingerprint(model),
        params={
            "n": n,
            "batch_size": batch_size,
            "token": "last non-pad token of each example",
            "states": "h^l = input of block l, h^{l+n} = output of block l+n-1 (pre final norm)",
            "score": "1 - min d(s, s+n) over the n-blocks containing the layer",
        },
        data=data.fingerprints(),
        extras={"angular_distance": chosen, "best_start": best, "distances": by_n},
        higher_is="more redundant (small angular distance across the layer's block): dropped / sparsified first",
    )
