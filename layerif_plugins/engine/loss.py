"""Per-example causal-LM loss: the mean token cross-entropy of each example.

This is exactly the loss a batch of size 1 gives (HF's ``labels=`` loss), computed for a
padded batch without letting examples mix: padding positions carry ``IGNORE_INDEX``
labels and are excluded from both the sum and the token count. (The published LayerIF
code counts padding tokens in its loss; we do not copy that bug.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layerif_plugins.data import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits and (B, T) labels → (B,) mean next-token cross-entropy, in fp32+."""
    logits = logits[:, :-1, :]
    target = labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    count = (target != IGNORE_INDEX).sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("an example has no target tokens (needs >= 2 tokens)")
    return nll.sum(dim=1) / count.to(nll.dtype)
