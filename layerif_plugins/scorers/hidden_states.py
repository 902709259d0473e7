"""Residual-stream states at every block boundary, captured with hooks on the decoder blocks.

The depth scorers (angular distance, Block Influence, hidden-state variability) compare
the residual stream *before* and *after* decoder blocks. Hugging Face's
``output_hidden_states`` is not quite that list: ``hidden_states[0]`` is the embedding
output (= input of block 0) and ``hidden_states[l]`` the output of block ``l − 1``, but
the last entry has the model's final norm applied, so comparing it with the others
mixes a normalised and an un-normalised vector. Here every state comes from the blocks
themselves:

    h^0      = input of block 0 (the embeddings, after any embedding scaling)
    h^{l+1}  = output of block l                       (l = 0 … L−1, never normalised)

so ``h^l`` is the input of block ``l`` and dropping blocks ``l … l+n−1`` replaces
``h^{l+n}`` by ``h^l``. The model's head (final norm + LM head) is never run: the states
come from ``model.base_model``.

Memory: one batch holds ``(L+1) · B · T · d`` floats; choose the batch size accordingly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Batch, Examples, batches
from layerif_plugins.models import decoder_blocks


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "to_tuple"):  # a ModelOutput
        x = x.to_tuple()
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    raise TypeError(f"cannot find the hidden states in a decoder block's {type(x).__name__}")


@contextmanager
def capture_block_states(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Hooks that fill a list with ``h^0 … h^L`` (see the module docstring) on each forward.

    The list is cleared at the start of every forward (block 0's pre-hook), so after a
    forward it holds exactly ``L + 1`` tensors of shape ``(B, T, d)``.
    """
    blocks = decoder_blocks(model)
    states: list[torch.Tensor] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        states.clear()
        hidden = args[0] if args else kwargs.get("hidden_states")
        states.append(_first_tensor(hidden).detach())

    def post_hook(_mod: nn.Module, _args: tuple, output: Any) -> None:
        states.append(_first_tensor(output).detach())

    handles = [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [b.register_forward_hook(post_hook) for b in blocks]
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


def block_states(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """``[h^0, …, h^L]`` for one batch, as float32 tensors of shape ``(B, T, d)``."""
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    with capture_block_states(model) as states, torch.no_grad():
        base(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
        out = [s.float() for s in states]
    n_expected = len(decoder_blocks(model)) + 1
    if len(out) != n_expected:
        raise RuntimeError(f"captured {len(out)} block states, expected {n_expected}")
    return out


def iter_block_states(
    model: nn.Module, examples: Examples, pad_id: int, batch_size: int = 8, desc: str = "hidden states",
    show_progress: bool = False,
) -> Iterator[tuple[Batch, list[torch.Tensor]]]:
    """``(batch, [h^0 … h^L])`` for consecutive batches of ``examples`` (model put in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        n_batches = (len(examples) + batch_size - 1) // batch_size
        for batch in tqdm(batches(examples, batch_size, pad_id), total=n_batches, desc=desc,
                          disable=not show_progress, leave=False):
            yield batch, block_states(model, batch)
    finally:
        model.train(was_training)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last non-pad token of each row (works for left and right padding)."""
    t = mask.shape[1]
    return (t - 1) - torch.flip(mask.long(), dims=[1]).argmax(dim=1)


def last_token(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, d)`` → ``(B, d)``: the state at each row's last non-pad token."""
    idx = last_token_index(mask).to(h.device)
    return h[torch.arange(h.shape[0], device=h.device), idx]


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, d)`` → ``(B, d)``: mean over each row's non-pad tokens."""
    m = mask.to(h.device, h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1)
