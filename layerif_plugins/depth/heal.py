"""LoRA "healing" after depth pruning (Gromov et al.): a short fine-tune of the shallower model.

The paper heals with QLoRA on the MLP modules; on CPU we use plain PEFT LoRA
(``peft.LoraConfig`` on the MLP linear layers of every remaining block, found through
:func:`layerif_plugins.models.block_linears`), AdamW, causal-LM loss on a local text set,
for a fixed number of optimizer steps. The adapter can be merged back into the weights
(``merge_and_unload``) so the result is again a plain HF model that vLLM serves as is.

Determinism: the batch order and the LoRA initialisation come from ``seed``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Examples, collate
from layerif_plugins.errors import ConfigError, DataError
from layerif_plugins.evaluation.perplexity import mean_token_loss
from layerif_plugins.models import block_linears

logger = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """Healing fine-tune settings.

    Args:
        steps: optimizer steps (the examples are cycled in a seeded random order).
        lr: AdamW learning rate.
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
        if self.lr <= 0:
            raise ConfigError(f"heal learning rate must be > 0, got {self.lr}")
        if self.r < 1 or self.batch_size < 1:
            raise ConfigError(f"LoRA rank and batch size must be >= 1 (r={self.r}, batch_size={self.batch_size})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a declared extra
        raise ConfigError("healing needs PEFT: pip install 'layerif-plugins[moe]'") from exc
    return peft


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
    peft = _peft()
    targets = [lin.name for lin in block_linears(model, config.params)]
    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                           target_modules=targets, bias="none", task_type="CAUSAL_LM")
    pmodel = peft.get_peft_model(model, lora)
    trainable = [p for p in pmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    device = next(pmodel.parameters()).device
    rng = random.Random(config.seed)
    order: list[int] = []
    losses: list[float] = []
    pmodel.train()
    t0 = time.perf_counter()
    for _ in tqdm(range(config.steps), desc="heal", disable=not show_progress, leave=False):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[: config.batch_size], order[config.batch_size:]
        b = collate(train, idx, pad_id).to(device)
        loss = pmodel(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    pmodel.eval()
    out = pmodel.merge_and_unload() if merge else pmodel
    logger.info("healed %d steps in %.1fs: loss %.4f → %.4f", config.steps, seconds, losses[0], losses[-1])
    return HealResult(model=out, merged=merge, losses=losses, config=config, target_modules=targets,
                      trainable_params=sum(p.numel() for p in trainable), seconds=seconds)


def save_healed(result: HealResult, tokenizer: Any, out: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Save a healed model atomically: the merged HF model (+ tokenizer), or the LoRA adapter alone.

    ``heal.json`` beside it records the settings, the loss curve and ``info``.
    """
    import json

    from layerif_plugins.io import atomic_dir

    out = Path(out)
    record = {"merged": result.merged, "config": result.config.to_dict(), "target_modules": result.target_modules,
              "trainable_params": result.trainable_params, "seconds": result.seconds, "losses": result.losses,
              **(info or {})}
    with atomic_dir(out) as tmp:
        result.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "heal.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out
