"""The one training loop of the package: a PEFT adapter (plain LoRA or LoRA-MoE) on tokenized examples.

Two jobs use it, with different adapters and the same loop (the HF ``Trainer``):

* healing after depth pruning (:mod:`layerif_plugins.depth.heal`): :func:`attach_lora` puts a
  plain PEFT LoRA on the remaining blocks' linears, then :func:`train_adapter` with a
  constant learning rate;
* fine-tuning a LoRA-MoE adapter (``layerif finetune``, ``integration/moe_pipeline.py``):
  the adapter comes from :mod:`layerif_plugins.integrations.peft_moe`, whose forward hooks
  add ``router_aux_loss_coef × load-balancing loss`` to the model's loss in training mode,
  so the loop optimises it without knowing about it; the per-step router loss is recorded.

The data come from :mod:`layerif_plugins.data` (text / JSONL → :class:`Examples`); batches
are right-padded with labels masked at padding, so padding never enters the loss.
Determinism: the batch order, dropout and (when the adapter is attached here) the adapter
initialisation come from ``TrainConfig.seed``.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from layerif_plugins.data import Examples, collate
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.evaluation.perplexity import mean_token_loss
from layerif_plugins.fields import check_number

logger = logging.getLogger(__name__)

Scheduler = Literal["linear", "constant"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


@dataclass
class TrainConfig:
    """Training settings (the HF ``TrainingArguments`` subset that matters here).

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
        lr_scheduler: ``"linear"`` (decay to 0 over the run) or ``"constant"`` (healing).
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
    lr_scheduler: Scheduler = "linear"

    def __post_init__(self) -> None:
        # every number through the one validator (a recipe or a config file may hold "5", NaN, 1e999)
        if self.max_steps is not None:
            check_number(self.max_steps, "max_steps", kind="int", minimum=1)
        check_number(self.epochs, "epochs", minimum=0, exclusive_minimum=True)
        for name in ("batch_size", "grad_accum", "logging_steps"):
            check_number(getattr(self, name), name, kind="int", minimum=1)
        check_number(self.seed, "seed", kind="int")
        check_number(self.weight_decay, "weight_decay", minimum=0)
        if not 0.0 <= check_number(self.warmup_ratio, "warmup_ratio") < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_number(self.lr, "lr", minimum=0, exclusive_minimum=True)
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler {self.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}")


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


def _router_aux_loss(model: Any) -> torch.Tensor | None:
    """The LoRA-MoE tuner's last summed load-balancing loss (None for a plain LoRA)."""
    getter = getattr(getattr(model, "base_model", None), "get_router_aux_loss", None)
    return getter() if callable(getter) else None


def _trainer_class() -> type:
    from transformers import Trainer

    class _RecordingTrainer(Trainer):
        """The HF Trainer, also recording every micro-batch's loss (and router loss) as a float."""

        step_losses: list[float]
        aux_losses: list[float]

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = out[0] if return_outputs else out
            if model.training:
                self.step_losses.append(float(loss.detach()))
                aux = _router_aux_loss(model)
                if aux is not None:
                    self.aux_losses.append(float(aux.detach()))
            return out

    return _RecordingTrainer


def _per_step(values: Sequence[float], grad_accum: int) -> list[float]:
    """Micro-batch values → one mean per optimizer step."""
    return [sum(values[i : i + grad_accum]) / len(values[i : i + grad_accum])
            for i in range(0, len(values), grad_accum)]


def train_adapter(
    model: Any, train: Examples, pad_id: int, config: TrainConfig | None = None, show_progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train ``model`` (a PeftModel; only its trainable parameters move); returns the run's metrics.

    The metrics are the Trainer's (``train_loss``, ``train_runtime`` ...) plus ``global_step``,
    ``losses`` (the training loss of every optimizer step), ``router_aux_losses`` (LoRA-MoE:
    the unweighted load-balancing loss of every step; empty otherwise) and ``train_config``.
    The model is left in eval mode. ``callbacks``: HF ``TrainerCallback`` objects added to the
    Trainer (a held-out curve, AdaLoRA's ``update_and_allocate`` after each optimizer step).
    """
    from transformers import PrinterCallback, TrainingArguments

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
            lr_scheduler_type="constant_with_warmup" if config.lr_scheduler == "constant" and config.warmup_ratio > 0
            else config.lr_scheduler,
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
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=_ExamplesDataset(train), data_collator=_Collator(train, pad_id),
            callbacks=list(callbacks) or None,
        )
        trainer.step_losses, trainer.aux_losses = [], []
        if not show_progress:
            trainer.remove_callback(PrinterCallback)  # quiet means no printed log dicts either
        result = trainer.train()
    metrics = dict(result.metrics)
    metrics["global_step"] = result.global_step
    metrics["losses"] = _per_step(trainer.step_losses, config.grad_accum)
    metrics["router_aux_losses"] = _per_step(trainer.aux_losses, config.grad_accum)
    metrics["train_config"] = asdict(config)
    model.eval()
    if metrics["losses"]:
        logger.info("trained %d steps in %.1fs: loss %.4f → %.4f", result.global_step,
                    metrics.get("train_runtime", 0.0), metrics["losses"][0], metrics["losses"][-1])
    return metrics


def attach_lora(
    model: Any, target_modules: Sequence[str], r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
    seed: int = 0,
) -> Any:
    """Wrap ``model`` in a trainable plain PEFT LoRA on ``target_modules`` (full dotted names), seeded init."""
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a declared extra
        raise ConfigError("LoRA training needs PEFT: pip install 'layerif-plugins[moe]'") from exc
    if not target_modules:
        raise ConfigError("no target modules for the LoRA adapter")
    check_number(r, "r", kind="int", minimum=1)
    check_number(lora_alpha, "lora_alpha", minimum=0, exclusive_minimum=True)
    if check_number(lora_dropout, "lora_dropout", minimum=0) >= 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    torch.manual_seed(seed)
    lora = peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules),
                           bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)


def heldout_loss(model: Any, examples: Examples, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean token cross-entropy over ``examples`` (padding excluded) and its exponential (perplexity)."""
    loss, count = mean_token_loss(model, examples, pad_id, batch_size)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
