"""Block Influence (ShortGPT, Men et al. 2024): how much a decoder block changes its input.

    BI_l = 1 − E_{x, t} [ cos(h_t^l, h_t^{l+1}) ]

over **all non-pad tokens** of the calibration examples (token-weighted), with ``h^l``
the input and ``h^{l+1}`` the output of block ``l`` (pre-norm; see
:mod:`layerif_plugins.scorers.hidden_states`). ShortGPT removes the layers with the
*lowest* BI.

The scores file follows the project convention (higher = less important = more
sparsity / dropped first), so ``scores[l] = 1 − BI_l`` = the mean cosine similarity of
the block's input and output; the raw ``BI_l`` are in ``extras["block_influence"]``.
Dropping the ``K`` highest scores is exactly ShortGPT's "remove the ``K`` lowest BI".
"""

from __future__ import annotations

import torch
from torch import nn

from layerif_plugins.models import fingerprint, num_layers
from layerif_plugins.scorers.hidden_states import iter_block_states
from layerif_plugins.scorers.registry import ScoringData, register_scorer
from layerif_plugins.scores import LayerScores, ScoreDirection


def token_cosines(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """``(B, T, d)`` × 2 → ``(B, T)`` cosine similarity per token, in float64."""
    a, b = h_in.double(), h_out.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def cosine_sums(states: list[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per block, the sum over non-pad tokens of ``cos(h^l, h^{l+1})``, and the token count."""
    m = mask.bool().to(states[0].device)
    sums = torch.stack([token_cosines(states[i], states[i + 1])[m].sum() for i in range(len(states) - 1)])
    return sums.cpu(), int(m.sum())


@register_scorer("block_influence", needs=("calib",), direction=ScoreDirection.HIGHER_PRUNES,
                 description="ShortGPT Block Influence 1 - E_tokens cos(h^l, h^{l+1})")
def score_block_influence(
    model: nn.Module, data: ScoringData, batch_size: int = 8, show_progress: bool = False
) -> LayerScores:
    """ShortGPT Block Influence; the score is ``1 − BI`` (higher = more redundant layer)."""
    assert data.calib is not None
    total = torch.zeros(num_layers(model), dtype=torch.float64)
    tokens = 0
    for batch, states in iter_block_states(model, data.calib, data.pad_id, batch_size, "block influence",
                                           show_progress):
        sums, n = cosine_sums(states, batch.attention_mask)
        total += sums
        tokens += n
    mean_cos = (total / tokens).tolist()
    return LayerScores(
        scores=mean_cos,
        method="block_influence",
        model=fingerprint(model),
        params={
            "batch_size": batch_size,
            "tokens": "all non-pad tokens, token-weighted",
            "states": "input and output of each block (pre final norm)",
            "score": "1 - BI_l = E_tokens cos(h^l, h^{l+1})",
        },
        data=data.fingerprints(),
        extras={"block_influence": [1.0 - c for c in mean_cos], "tokens": tokens},
        higher_is="more redundant (1 - Block Influence): dropped / sparsified first",
    )
