"""LoRA "healing" after depth pruning (Gromov et al.): a short fine-tune of the shallower model.

The paper heals with QLoRA on the MLP modules; on CPU we use plain PEFT LoRA
(``peft.LoraConfig`` on the MLP linear layers of every remaining block, found through
:func:`layerif_plugins.models.block_linears`), AdamW at a constant learning rate,
causal-LM loss on a local text set, for a fixed number of optimizer steps. The training
itself is the package's one loop, :func:`layerif_plugins.training.train_adapter`; this
module only chooses the adapter and the settings. The adapter can be merged back into the
weights (``merge_and_unload``) so the result is again a plain HF model that vLLM serves as is.

**A pruned model keeps its zeros.** Merging a LoRA adds ``B·A`` (dense) to every targeted
weight, which would refill the zeros that unstructured / 2:4 pruning left (measured: a 50 %
sparse stories260K came back 13 % sparse). So before training, every targeted weight with at
least :data:`PRUNED_FRACTION` exact zeros counts as pruned and its zero pattern is recorded;
after the merge the pattern is applied again (the healed model has exactly the sparsity it
had), logged and recorded in ``heal.json`` (``kept_zeros``). Without merging (``merge=False``)
the adapter is returned as is, and a warning says that merging it later refills the zeros.

Determinism: the batch order and the LoRA initialisation come from ``seed``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerif_plugins.data import Examples
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.evaluation.perplexity import mean_token_loss
from layerif_plugins.fields import check_number
from layerif_plugins.models import block_linears
from layerif_plugins.training import TrainConfig, attach_lora, train_adapter

logger = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """Healing fine-tune settings.

    Args:
        steps: optimizer steps (the examples are cycled in a seeded random order).
        lr: AdamW learning rate (constant over the steps).
        r / lora_alpha / lora_dropout: the LoRA adapter (``peft.LoraConfig``).
        batch_size: examples per step.
        params: which linear layers of each block get LoRA: "mlp" (the paper), "attn" or "all".
        weight_decay: AdamW weight decay.
        seed: batch order and LoRA initialisation.
    """

    steps: int = 100
    lr: float = 1e-3
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    batch_size: int = 8
    params: str = "mlp"
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"heal steps must be >= 1, got {self.steps}")
        if not self.lr > 0:  # NaN included
            raise ConfigError(f"heal learning rate must be > 0, got {self.lr}")
        if self.r < 1 or self.batch_size < 1:
            raise ConfigError(f"LoRA rank and batch size must be >= 1 (r={self.r}, batch_size={self.batch_size})")
        check_number(self.lr, "heal lr", minimum=0, exclusive_minimum=True)
        check_number(self.lora_alpha, "heal lora_alpha", minimum=0, exclusive_minimum=True)
        check_number(self.lora_dropout, "heal lora_dropout", minimum=0, maximum=1)
        check_number(self.weight_decay, "heal weight_decay", minimum=0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def train_config(self) -> TrainConfig:
        """The settings of the shared training loop that this healing run uses."""
        return TrainConfig(max_steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay, seed=self.seed, lr_scheduler="constant",
                           logging_steps=max(self.steps, 1))


@dataclass
class HealResult:
    """The healed model (merged: a plain HF model; otherwise a ``PeftModel``) and the training curve."""

    model: nn.Module
    merged: bool
    losses: list[float]
    config: HealConfig
    target_modules: list[str]
    trainable_params: int
    seconds: float
    extras: dict[str, Any] = field(default_factory=dict)


#: a weight with at least this fraction of exact zeros is taken as pruned (dense trained weights have ~none)
PRUNED_FRACTION = 0.1


def zero_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """``name → (weight == 0)`` of the linears ``names`` that look pruned (>= :data:`PRUNED_FRACTION` zeros)."""
    masks = {}
    for name in names:
        weight = model.get_submodule(name).weight
        zeros = weight.detach() == 0
        if zeros.numel() and zeros.float().mean().item() >= PRUNED_FRACTION:
            masks[name] = zeros
    return masks


def _sparsity(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    zeros = sum(int((model.get_submodule(n).weight.detach() == 0).sum()) for n in masks)
    return zeros / total if total else 0.0


def reapply_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set the recorded zero pattern again in each weight (after ``merge_and_unload``)."""
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.masked_fill_(mask.to(model.get_submodule(name).weight.device), 0)


def mean_loss(model: nn.Module, examples: Examples, pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean causal-LM loss (nats/token, padding excluded) of ``model`` on ``examples``."""
    return mean_token_loss(model, examples, pad_id, batch_size)[0]


def heal(
    model: nn.Module, train: Examples, pad_id: int, config: HealConfig | None = None, merge: bool = True,
    show_progress: bool = False,
) -> HealResult:
    """Fine-tune a LoRA on ``model``'s block linears (MLP by default) for ``config.steps`` steps.

    With ``merge=True`` the adapter is merged into the weights and a plain model is
    returned; otherwise the ``PeftModel`` (save it with ``save_pretrained`` as an adapter).
    """
    config = config or HealConfig()
    if len(train) == 0:
        raise DataError("no healing examples")
    targets = [lin.name for lin in block_linears(model, config.params)]
    masks = zero_masks(model, targets)
    before = _sparsity(model, masks)
    pmodel = attach_lora(model, targets, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                         seed=config.seed)
    trainable = sum(p.numel() for p in pmodel.parameters() if p.requires_grad)
    metrics = train_adapter(pmodel, train, pad_id, config.train_config(), show_progress=show_progress)
    losses = metrics["losses"]
    out = pmodel.merge_and_unload() if merge else pmodel
    logger.info("healed %d steps in %.1fs: loss %.4f → %.4f", config.steps, metrics["train_runtime"], losses[0],
                losses[-1])
    extras: dict[str, Any] = {}
    if masks and merge:
        merged = _sparsity(out, masks)
        reapply_zeros(out, masks)
        extras["kept_zeros"] = {"modules": len(masks), "sparsity": _sparsity(out, masks),
                                "sparsity_before": before, "sparsity_if_not_kept": merged}
        # a warning, not an info line: the merged model differs from the adapter as trained at the pruned positions
        logger.warning("the model was pruned: kept the zeros of %d weight matrices after merging the LoRA (sparsity "
                       "%.3f; merging alone would have left %.3f)", len(masks), extras["kept_zeros"]["sparsity"],
                       merged)
    elif masks:
        extras["kept_zeros"] = {"modules": len(masks), "sparsity_before": before, "merged": False}
        logger.warning("the model was pruned (%d weight matrices, sparsity %.3f): merging this LoRA adapter into it "
                       "later refills the zeros; heal with merging (the default) to keep them", len(masks), before)
    return HealResult(model=out, merged=merge, losses=losses, config=config, target_modules=targets,
                      trainable_params=trainable, seconds=metrics["train_runtime"], extras=extras)


def save_healed(result: HealResult, tokenizer: Any, out: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Save a healed model atomically: the merged HF model (+ tokenizer), or the LoRA adapter alone.

    ``heal.json`` beside it records the settings, the loss curve and ``info``.
    """
    import json

    from layerif_plugins.io import atomic_dir

    out = Path(out)
    record = {"merged": result.merged, "config": result.config.to_dict(), "target_modules": result.target_modules,
              "trainable_params": result.trainable_params, "seconds": result.seconds, "losses": result.losses,
              **result.extras, **(info or {})}
    with atomic_dir(out) as tmp:
        result.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "heal.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out
