"""Configuration and result types of the influence engine."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from layerif_plugins.engine.factors import parse_bytes
from layerif_plugins.errors import ConfigError


def _document_fields(cls: type) -> type:
    """Append an ``Args:`` section built from each field's ``help`` metadata: the one copy of that text.

    ``layerif score --help`` shows the same metadata (:class:`~layerif_plugins.cli.common.ConfigOptions`),
    so the help cannot drift between the command line and ``help(InfluenceConfig)``.
    """
    lines = [f"        {f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls) if f.metadata.get("help")]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


@_document_fields
@dataclass
class InfluenceConfig:
    """How to compute LayerIF (each field's description is its ``help`` metadata, listed below).

    :meth:`validate` (run when the config is made, and again when the engine starts) is the one
    check of every field's value.
    """

    params: Literal["attn", "mlp", "all"] = field(default="attn", metadata={
        "help": "parameter group per block (attn = q,k,v,o: the reference)"})
    damping: float = field(default=0.1, metadata={
        "help": "the λ factor: λ_w = damping · mean_i ||g_{i,w}||² / numel(w) (0.1 in DataInf)"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward in every pass"})
    auto_batch_size: bool = field(default=False, metadata={
        "help": "on CUDA, choose the batch size from free memory instead of batch_size (a probe of 1- and "
                "2-example batches of the longest example measures the bytes per example; half of what the "
                "one-pass factors and the gradient-sized vectors leave free is used); on CPU batch_size is kept"})
    pairwise: bool = field(default=False, metadata={
        "help": "also return the full IF_l(i,j) matrices (L×n×m); needs m gradient-sized vectors per module, "
                "so keep the validation set small"})
    grad_mode: Literal["auto", "ghost", "materialize"] = field(default="auto", metadata={
        "help": "per-example gradient statistics: materialized (fewer FLOPs) or ghost products (less memory); "
                "auto picks per module by materialize_limit_bytes"})
    materialize_limit_bytes: int = field(default=512 * 2**20, metadata={
        "help": "largest transient per-example-gradient tensor (batch × d_out × d_in × bytes) grad_mode=auto "
                "allows"})
    max_tokens_per_batch: int | None = field(default=None, metadata={
        "help": "cap on padded tokens per batch (batch × longest example): batches are cut at batch_size "
                "examples or this many tokens"})
    checkpoint_dir: str | None = field(default=None, metadata={
        "help": "save each finished pass here; rerunning the same command resumes from it"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute block activations in the backward pass (HF gradient_checkpointing_enable) to cut "
                "autograd memory on large models"})
    show_progress: bool = field(default=True, metadata={"help": "tqdm progress bars on every pass"})
    mode: Literal["auto", "one-pass", "four-pass"] = field(default="auto", metadata={
        "help": "train passes: four-pass runs the model over the train set three times and holds no "
                "per-example state; one-pass runs it once and holds every train example's factors (each "
                "projection's inputs and output gradients, or its materialized gradient where smaller); auto "
                "holds what fits in max_factor_memory, and batches not held cost two more model passes each. "
                "All modes give the same scores (bit-identical where factors are held)"})
    max_factor_memory: int | str | None = field(default=None, metadata={
        "help": "memory budget for the one-pass factors, bytes or e.g. 4GB / 512MiB (default: on CPU the "
                "available memory less max(2 GiB, a quarter of it); on CUDA half the device's free memory)"})
    stats_precision: Literal["fp32", "tf32", "bf16"] = field(default="fp32", metadata={
        "help": "operands of the per-example statistics' products: fp32 (exact to float rounding); tf32 "
                "(CUDA only: TF32 tensor-core matmuls, refused on CPU); bf16 (bf16 operands, every product's "
                "result and every sum in fp32; meant for GPUs: a CPU without bf16 instructions runs it "
                "slower). Changes the numbers within a stated tolerance (tests/engine/test_engine_precision.py), "
                "so a checkpoint of one precision is not resumed under another"})

    # options that do not change the numbers (beyond float rounding), so a resumed run may differ in them
    RUNTIME_ONLY = ("batch_size", "auto_batch_size", "grad_mode", "materialize_limit_bytes", "max_tokens_per_batch",
                    "checkpoint_dir", "gradient_checkpointing", "show_progress", "mode",
                    "max_factor_memory")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values, naming the option: the one check of every field.

        Run when the config is made (before any model is loaded) and again by the engine. A NaN
        ``damping`` would otherwise pass ``damping <= 0`` and surface only as "non-finite scores"
        after the whole computation.
        """
        for name in ("params", "grad_mode", "mode", "stats_precision"):
            choices = typing.get_args(typing.get_type_hints(type(self))[name])
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r} "
                                  f"(option --{name.replace('_', '-')})")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping <= 0:
            raise ConfigError(f"damping must be a finite number > 0 (0.1 in DataInf / LayerIF), got {damping!r} "
                              "(option --damping)")
        for name, low in (("batch_size", 1), ("materialize_limit_bytes", 0), ("max_tokens_per_batch", 1)):
            value = getattr(self, name)
            if value is None and name == "max_tokens_per_batch":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                option = name.replace("_", "-")
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r} (option --{option})")
        if not isinstance(self.auto_batch_size, bool):
            raise ConfigError(f"auto_batch_size must be True or False, got {self.auto_batch_size!r} "
                              "(option --auto-batch-size)")
        parse_bytes(self.max_factor_memory)  # "4GB", "512MiB", bytes or None; anything else names the value

    def numeric_options(self) -> dict[str, Any]:
        """The options that change the numbers (a run's checkpoint fingerprint).

        ``stats_precision`` enters only when it is not the default ``"fp32"``, so a checkpoint directory
        written before the option existed (all fp32) still resumes, and one of another precision is refused.
        """
        out = {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_ONLY}
        if out.get("stats_precision") == "fp32":
            del out["stats_precision"]
        return out

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
    model_batches: int = 0  # batched forward+backward runs of the model (validation + train, this rank)
    factor_bytes: int = 0  # train factors held in memory by the one-pass mode (this rank)
    batch_size: int = 0  # examples per batch this run used (auto_batch_size: the chosen one)


def aggregate_positive(per_example: torch.Tensor) -> torch.Tensor:
    """``S = Σ_i max(0, -s_i)`` along dim 0 (the reference's "aggregated positive influence")."""
    return torch.clamp(-per_example, min=0).sum(dim=0)
