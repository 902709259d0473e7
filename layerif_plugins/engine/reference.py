"""The slow, obviously-correct LayerIF: the test oracle and the benchmark baseline.

Per example, batch size 1, no padding, the mean token cross-entropy computed in the
model's own dtype (HF's ``labels=`` loss upcasts to float32, which would spoil float64
comparisons); explicit flattened
per-example gradients of every target weight; then the per-pair DataInf formula of
docs/method.md §1 exactly as written:

    λ_w     = damping · Σ_i ||g_{i,w}||² / (n · numel(w))
    h_{j,w} = (1/(n λ_w)) Σ_i [ v_{j,w} − (g_{i,w}ᵀ v_{j,w} / (λ_w + ||g_{i,w}||²)) g_{i,w} ]
    IF_l(i, j) = − Σ_{w∈P_l} g_{i,w}ᵀ h_{j,w}

``per_layer_passes=True`` and ``python_loops=True`` reproduce the cost structure of the
published code (one forward+backward per example *per layer*, per-pair maths in Python
loops) for the benchmark; they do not change the result.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Examples
from layerif_plugins.models import LinearModule, block_linears, num_layers


def _example_grads(model: nn.Module, ids: tuple[int, ...], weights: list[nn.Parameter]) -> list[torch.Tensor]:
    device = weights[0].device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    with torch.enable_grad():
        logits = model(input_ids=x, use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, x[0, 1:])
        grads = torch.autograd.grad(loss, weights)
    return [g.detach().flatten().to(torch.float64 if g.dtype == torch.float64 else torch.float32).cpu()
            for g in grads]


def _grads(model: nn.Module, examples: Examples, weights: list[nn.Parameter], desc: str,
           progress: bool) -> list[torch.Tensor]:
    """(n, numel) per-example gradients for each weight."""
    per_ex = [_example_grads(model, ids, weights) for ids in tqdm(examples.input_ids, desc=desc, disable=not progress,
                                                                    leave=False)]
    return [torch.stack([g[k] for g in per_ex]) for k in range(len(weights))]


def _influence_one_weight(g: torch.Tensor, v: torch.Tensor, damping: float, python_loops: bool) -> torch.Tensor:
    """(n, m) IF_w(i, j) for one weight matrix, from (n, D) train and (m, D) val gradients."""
    n, numel = g.shape
    lam = damping * g.pow(2).sum() / (n * numel)
    norms = g.pow(2).sum(dim=1)
    if python_loops:
        out = torch.zeros(n, v.shape[0], dtype=g.dtype)
        for j in range(v.shape[0]):
            h = torch.zeros_like(v[j])
            for i in range(n):
                h += v[j] - (g[i] @ v[j]) / (lam + norms[i]) * g[i]
            h /= n * lam
            for i in range(n):
                out[i, j] = -(g[i] @ h)
        return out
    coef = (g @ v.T) / (lam + norms)[:, None]  # (n, m): g_iᵀ v_j / (λ + ||g_i||²)
    h = (n * v - coef.T @ g) / (n * lam)  # (m, D): Σ_i [v_j − coef_ij g_i] / (n λ)
    return -(g @ h.T)


def reference_influence(
    model: nn.Module,
    train: Examples,
    val: Examples,
    params: str = "attn",
    damping: float = 0.1,
    per_layer_passes: bool = False,
    python_loops: bool = False,
    layers: list[int] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Full ``IF_l(i, j)`` as an (L, n, m) float64 tensor (rows of layers not in ``layers`` are 0)."""
    targets = block_linears(model, params)
    n_layers = num_layers(model)
    wanted = list(range(n_layers)) if layers is None else layers
    out = torch.zeros(n_layers, len(train), len(val), dtype=torch.float64)
    model.eval()
    groups: list[list[LinearModule]]
    if per_layer_passes:
        groups = [[t for t in targets if t.layer == layer] for layer in wanted]
    else:
        groups = [[t for t in targets if t.layer in wanted]]
    for group in groups:
        weights = [t.module.weight for t in group]
        saved = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        try:
            g_train = _grads(model, train, weights, "reference train grads", progress)
            g_val = _grads(model, val, weights, "reference val grads", progress)
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)
        for t, g, v in zip(group, g_train, g_val, strict=True):
            out[t.layer] += _influence_one_weight(g, v, damping, python_loops).double()
    return out
