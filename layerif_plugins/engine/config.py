"""Configuration and result types of the influence engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch


@dataclass
class InfluenceConfig:
    """How to compute LayerIF.

    Args:
        params: parameter group of each block: ``"attn"`` (q,k,v,o: the reference),
            ``"mlp"`` or ``"all"``.
        damping: the λ factor: ``λ_w = damping · mean_i ||g_{i,w}||² / numel(w)`` (0.1 in DataInf).
        batch_size: examples per forward/backward in every pass.
        pairwise: also return the full ``IF_l(i, j)`` matrices (L×n×m); needs m
            gradient-sized vectors per module, so keep m small.
        grad_mode: ``"auto"`` picks per module between materialized per-example gradients
            (fewer FLOPs) and ghost products (less memory) by ``materialize_limit_bytes``.
        materialize_limit_bytes: largest transient per-example-gradient tensor (batch ×
            d_out × d_in × bytes) the auto mode allows.
        max_tokens_per_batch: optional cap on padded tokens per batch (batch × longest
            example); batches are cut at ``batch_size`` examples or this many tokens.
        checkpoint_dir: when set, every finished pass is saved there and a rerun of the
            same command resumes from the last finished pass.
        gradient_checkpointing: recompute block activations in the backward pass (HF's
            ``gradient_checkpointing_enable``) to cut autograd memory on large models.
        show_progress: tqdm bars on every pass.
    """

    params: Literal["attn", "mlp", "all"] = "attn"
    damping: float = 0.1
    batch_size: int = 8
    pairwise: bool = False
    grad_mode: Literal["auto", "ghost", "materialize"] = "auto"
    materialize_limit_bytes: int = 512 * 2**20
    max_tokens_per_batch: int | None = None
    checkpoint_dir: str | None = None
    gradient_checkpointing: bool = False
    show_progress: bool = True

    # options that do not change the numbers (beyond float rounding), so a resumed run may differ in them
    RUNTIME_ONLY = ("batch_size", "grad_mode", "materialize_limit_bytes", "max_tokens_per_batch",
                    "checkpoint_dir", "gradient_checkpointing", "show_progress")

    def numeric_options(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_ONLY}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InfluenceResult:
    """Everything the engine computes; :mod:`layerif_plugins.scorers.layerif` turns it into LayerScores.

    ``per_example[i, l] = s_i^l = Σ_j IF_l(i, j)`` and ``layer_scores[l] = Σ_i max(0, -s_i^l)``.
    """

    layer_scores: list[float]
    per_example: torch.Tensor  # (n, L)
    per_module: dict[str, torch.Tensor]  # module name → (n,) s_i^w
    lambdas: dict[str, float]
    module_layers: dict[str, int]
    pairwise: torch.Tensor | None = None  # (L, n, m)
    train_losses: torch.Tensor | None = None
    val_losses: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


def aggregate_positive(per_example: torch.Tensor) -> torch.Tensor:
    """``S = Σ_i max(0, -s_i)`` along dim 0 (the reference's "aggregated positive influence")."""
    return torch.clamp(-per_example, min=0).sum(dim=0)
