"""Per-example gradient statistics of linear layers, without storing per-example gradients.

For a linear layer, example ``i`` with inputs ``A_i`` (T×d_in) and output gradients
``B_i`` (T×d_out) has weight gradient ``g_i = B_iᵀ A_i``. Everything LayerIF needs is an
inner product of such gradients with each other or with a few fixed gradient-sized
vectors ``X`` (shape m×d_out×d_in). Two exact ways to get them:

* **materialized**: form ``G = [g_i]`` for the batch (b×d_out×d_in) and contract;
  cheapest in FLOPs, costs b·d_out·d_in memory transiently;
* **ghost**: ``||g_i||² = Σ (A_i A_iᵀ) ⊙ (B_i B_iᵀ)`` and ``g_iᵀX = Σ_t b_tᵀ X a_t``;
  never forms ``g_i``, memory O(T² + T·d_out·m).

All functions return fp32 (or fp64 when the inputs are fp64) values.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def per_example_grads(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b,T,i), (b,T,o) → (b,o,i) per-example weight gradients."""
    return torch.einsum("bto,bti->boi", _acc(b, dtype), _acc(a, dtype))


def sq_norms(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ghost: bool) -> torch.Tensor:
    """(b,) squared Frobenius norms of the per-example gradients."""
    a, b = _acc(a, dtype), _acc(b, dtype)
    if not ghost:
        return per_example_grads(a, b, dtype).pow(2).sum(dim=(1, 2))
    aa = torch.bmm(a, a.transpose(1, 2))
    bb = torch.bmm(b, b.transpose(1, 2))
    return (aa * bb).sum(dim=(1, 2))


def dots(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, ghost: bool) -> torch.Tensor:
    """(b, m) inner products ``g_iᵀ X_j`` for X of shape (m, o, i)."""
    a, b, x = _acc(a, dtype), _acc(b, dtype), _acc(x, dtype)
    if not ghost:
        return torch.einsum("boi,moi->bm", per_example_grads(a, b, dtype), x)
    m, o, i = x.shape
    ax = torch.matmul(a, x.reshape(m * o, i).T).view(a.shape[0], a.shape[1], m, o)  # (b,T,m,o)
    return torch.einsum("btmo,bto->bm", ax, b)


def weighted_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(m, o, i) sums ``Σ_i w[i, j] g_i`` for weights w of shape (b, m)."""
    a, b, w = _acc(a, dtype), _acc(b, dtype), _acc(w, dtype)
    bw = torch.einsum("bm,bto->mbto", w, b).reshape(w.shape[1], -1, b.shape[-1])  # (m, bT, o)
    return torch.matmul(bw.transpose(1, 2), a.reshape(-1, a.shape[-1]))


def norms_and_dots(
    a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, ghost: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||g_i||², g_iᵀX_j)`` in one go (the per-example gradients are formed once if materialized)."""
    if ghost:
        return sq_norms(a, b, dtype, ghost=True), dots(a, b, x, dtype, ghost=True)
    g = per_example_grads(a, b, dtype)
    return g.pow(2).sum(dim=(1, 2)), torch.einsum("boi,moi->bm", g, _acc(x, dtype))
