"""Per-example gradient statistics of linear layers, without storing per-example gradients.

For a linear layer, example ``i`` with inputs ``A_i`` (T×d_in) and output gradients
``B_i`` (T×d_out) has weight gradient ``g_i = B_iᵀ A_i``. Everything LayerIF needs is an
inner product of such gradients with each other or with a few fixed gradient-sized
vectors ``X`` (shape m×d_out×d_in). Two exact ways to get them:

* **materialized**: form ``G = [g_i]`` for the batch (b×d_out×d_in) and contract;
  cheapest in FLOPs, costs b·d_out·d_in memory transiently;
* **ghost**: ``||g_i||² = Σ (A_i A_iᵀ) ⊙ (B_i B_iᵀ)`` and ``g_iᵀX = Σ_t b_tᵀ X a_t``;
  never forms ``g_i``, memory O(T² + T·d_out·m).

**Precision** (:class:`Precision`, ``InfluenceConfig.stats_precision``). Every function takes
the accumulation dtype ``dtype`` (fp32, or fp64 for fp64 models) and returns it; ``compute``
is the operand dtype of the large products (the per-example gradients ``B_iᵀ A_i``, ``A Xᵀ``,
``A Aᵀ``, ``B Bᵀ`` and ``Σ w B·A``): the same as ``dtype`` by default ("fp32": every number as
before), or bf16 ("bf16": tensor-core GEMMs, which accumulate their inner products in fp32;
each product's *result* is cast back to ``dtype`` before any further sum, so no sum is ever
held in bf16). "tf32" keeps fp32 operands and lets cuBLAS use TF32 tensor cores inside
:meth:`Precision.matmuls` (CUDA only).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: the choices of ``InfluenceConfig.stats_precision``
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class Precision:
    """How the statistics are computed: ``acc`` = dtype of every result and sum, ``compute`` = operand dtype.

    ``tf32`` enables TF32 for fp32 CUDA matmuls inside :meth:`matmuls` (and only there: the model's own
    forward and backward keep the process's setting).
    """

    acc: torch.dtype
    compute: torch.dtype
    tf32: bool = False

    @classmethod
    def of(cls, name: str, acc: torch.dtype) -> Precision:
        """The precision called ``name`` (one of :data:`PRECISIONS`) for accumulation dtype ``acc``."""
        if name == "bf16":
            return cls(acc, torch.bfloat16)
        return cls(acc, acc, tf32=name == "tf32")

    @contextmanager
    def matmuls(self) -> Iterator[None]:
        """TF32 cuBLAS matmuls inside the block when ``tf32`` (restored afterwards); a no-op otherwise.

        ``torch.set_float32_matmul_precision("high")`` sets the legacy flag and the per-backend
        ``fp32_precision`` together (torch refuses to read a mix of the two APIs); when the user already
        chose per-backend settings, only ``torch.backends.cuda.matmul.fp32_precision`` is touched.
        """
        if not self.tf32:
            yield
            return
        try:
            old = torch.get_float32_matmul_precision()
        except RuntimeError:  # per-backend settings in use: keep to that API
            old = None
        cfg = torch.backends.cuda.matmul
        previous = cfg.fp32_precision if old is None else None
        if old is None:
            cfg.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("high")
        try:
            yield
        finally:
            if old is None:
                cfg.fp32_precision = previous
            else:
                torch.set_float32_matmul_precision(old)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (itself when it already is: no copy)."""
    return t if t.dtype == dtype else t.to(dtype)


def per_example_grads(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                      compute: torch.dtype | None = None) -> torch.Tensor:
    """(b,T,i), (b,T,o) → (b,o,i) per-example weight gradients, in ``compute`` (default ``dtype``)."""
    c = compute or dtype
    return torch.einsum("bto,bti->boi", as_dtype(b, c), as_dtype(a, c))


def sq_norms(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, ghost: bool,
             compute: torch.dtype | None = None) -> torch.Tensor:
    """(b,) squared Frobenius norms of the per-example gradients."""
    c = compute or dtype
    if not ghost:
        return as_dtype(per_example_grads(a, b, dtype, c), dtype).pow(2).sum(dim=(1, 2))
    a, b = as_dtype(a, c), as_dtype(b, c)
    aa = as_dtype(torch.bmm(a, a.transpose(1, 2)), dtype)
    bb = as_dtype(torch.bmm(b, b.transpose(1, 2)), dtype)
    return (aa * bb).sum(dim=(1, 2))


def dots(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, ghost: bool,
         compute: torch.dtype | None = None) -> torch.Tensor:
    """(b, m) inner products ``g_iᵀ X_j`` for X of shape (m, o, i)."""
    c = compute or dtype
    if not ghost:
        return torch.einsum("boi,moi->bm", as_dtype(per_example_grads(a, b, dtype, c), dtype), as_dtype(x, dtype))
    m, o, i = x.shape
    ax = torch.matmul(as_dtype(a, c), as_dtype(x, c).reshape(m * o, i).T)
    ax = ax.view(a.shape[0], a.shape[1], m, o)  # (b,T,m,o)
    return torch.einsum("btmo,bto->bm", as_dtype(ax, dtype), as_dtype(b, dtype))


def weighted_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, dtype: torch.dtype,
                 compute: torch.dtype | None = None) -> torch.Tensor:
    """(m, o, i) sums ``Σ_i w[i, j] g_i`` for weights w of shape (b, m)."""
    c = compute or dtype
    b_acc, w = as_dtype(b, dtype), as_dtype(w, dtype)
    bw = torch.einsum("bm,bto->mbto", w, b_acc).reshape(w.shape[1], -1, b.shape[-1])  # (m, bT, o)
    return as_dtype(torch.matmul(as_dtype(bw, c).transpose(1, 2), as_dtype(a, c).reshape(-1, a.shape[-1])), dtype)


def norms_and_dots(
    a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, dtype: torch.dtype, ghost: bool,
    compute: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||g_i||², g_iᵀX_j)`` in one go (the per-example gradients are formed once if materialized)."""
    if ghost:
        return sq_norms(a, b, dtype, True, compute), dots(a, b, x, dtype, True, compute)
    g = as_dtype(per_example_grads(a, b, dtype, compute), dtype)
    return g.pow(2).sum(dim=(1, 2)), torch.einsum("boi,moi->bm", g, as_dtype(x, dtype))
