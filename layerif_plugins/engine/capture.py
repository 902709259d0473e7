"""Run a batch through the model and get, for every target linear module, its inputs and the
gradients of the summed per-example loss with respect to its outputs.

Only the module *outputs* are differentiated (``torch.autograd.grad``), so no weight
gradient is ever computed in the per-example passes; parameters are frozen while the
engine runs and the graph is rooted at a ``requires_grad`` copy of the input embeddings.
Because the batch loss is a sum of per-example losses and examples do not interact, the
output gradient rows of example ``i`` are exactly those of ``loss_i`` alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from layerif_plugins.data import Batch
from layerif_plugins.engine.loss import per_example_loss
from layerif_plugins.models import LinearModule


@dataclass
class Captured:
    """Inputs (b,T,d_in) and output gradients (b,T,d_out) of each target module, and the losses."""

    inputs: list[torch.Tensor]
    grads: list[torch.Tensor]
    losses: torch.Tensor  # (b,)


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def capture(model: nn.Module, targets: Sequence[LinearModule], batch: Batch) -> Captured:
    """Forward + backward of ``Σ_i loss_i`` returning per-module (inputs, output grads)."""
    inputs: list[torch.Tensor | None] = [None] * len(targets)
    outputs: list[torch.Tensor | None] = [None] * len(targets)

    def make_hook(k: int):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if outputs[k] is None:  # activation checkpointing re-runs the forward: keep the first call
                inputs[k] = args[0].detach()
                outputs[k] = output

        return hook

    handles = [t.module.register_forward_hook(make_hook(k)) for k, t in enumerate(targets)]
    try:
        with torch.enable_grad():
            embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False)
            losses = per_example_loss(out.logits, batch.labels)
            missing = [targets[k].name for k, o in enumerate(outputs) if o is None]
            if missing:
                raise RuntimeError(f"modules not called in the forward pass: {missing[:3]}")
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    grads_out = [g if g is not None else torch.zeros_like(o) for g, o in zip(grads, outputs, strict=True)]
    return Captured([x for x in inputs if x is not None], grads_out, losses.detach())
