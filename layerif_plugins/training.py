"""Train a LoRA-MoE (or any PEFT) adapter on tokenized examples with the HF ``Trainer``.

The data come from :mod:`layerif_plugins.data` (text / JSONL → :class:`Examples`); batches
are right-padded with labels masked at padding, so padding never enters the loss. The
router's load-balancing loss is already inside the model's loss in training mode.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from layerif_plugins.data import Examples, collate
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.evaluation.perplexity import mean_token_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Training settings (HF ``TrainingArguments`` subset that matters here).

    Attributes:
        max_steps: optimizer steps; ``None`` → ``epochs`` passes over the data.
        epochs: passes over the data when ``max_steps`` is None.
        batch_size: examples per step (per device).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: linear warm-up fraction of the steps.
        grad_accum: gradient accumulation steps.
        seed: seed of data order and dropout.
        gradient_checkpointing: recompute activations in the backward pass.
        logging_steps: how often the Trainer logs the loss.
    """

    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    grad_accum: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False
    logging_steps: int = 10

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch_size and grad_accum must be >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


class _ExamplesDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> int:
        return i


class _Collator:
    def __init__(self, examples: Examples, pad_id: int) -> None:
        self.examples, self.pad_id = examples, pad_id

    def __call__(self, index: list[int]) -> dict[str, torch.Tensor]:
        b = collate(self.examples, index, self.pad_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}


def train_adapter(
    model: Any, train: Examples, pad_id: int, config: TrainConfig | None = None, show_progress: bool = True
) -> dict[str, Any]:
    """Train ``model`` (a PeftModel; only its trainable parameters move) and return the Trainer's metrics."""
    from transformers import Trainer, TrainingArguments

    config = config or TrainConfig()
    if len(train) == 0:
        raise DataError("no training examples")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters; load the adapter with is_trainable=True")
    with tempfile.TemporaryDirectory(prefix="layerif-train-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=config.max_steps if config.max_steps is not None else -1,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accum,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            warmup_steps=float(config.warmup_ratio),  # a float in [0, 1) is a ratio in transformers 5
            lr_scheduler_type="linear",
            seed=config.seed,
            data_seed=config.seed,
            logging_steps=config.logging_steps,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
            disable_tqdm=not show_progress,
            dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=_ExamplesDataset(train), data_collator=_Collator(train, pad_id)
        )
        result = trainer.train()
    metrics = dict(result.metrics)
    metrics["global_step"] = result.global_step
    metrics["train_config"] = asdict(config)
    model.eval()
    return metrics


def heldout_loss(model: Any, examples: Examples, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean token cross-entropy over ``examples`` (padding excluded) and its exponential (perplexity)."""
    loss, count = mean_token_loss(model, examples, pad_id, batch_size)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
