"""The exact LayerIF engine: all layers in four batched logical passes (one or three model passes over the train set).

DataInf's influence summed over the validation set (docs/method.md §1, docs/design.md "The engine")
needs, per weight matrix ``w``, only:

    pass 0 (validation):  V_w = Σ_j v_{j,w}                 (or every v_{j,w} for the pairwise matrix)
    pass 1 (train):       n_i = ||g_{i,w}||²,  c_i = g_{i,w}ᵀ V_w
                          λ_w = damping · mean_i n_i / numel(w),   d_i = λ_w + n_i
    pass 2 (train):       u_w = Σ_k (c_k / d_k) g_{k,w}
    pass 3 (train):       e_i = g_{i,w}ᵀ u_w
                          s_i^w = -(1/λ_w) (c_i - e_i / n)

which is algebraically identical to ``Σ_j IF_w(i, j)`` with the per-pair formula. The
per-example quantities come from module inputs and output gradients
(:mod:`layerif_plugins.engine.stats`); the only gradient-sized state is ``V`` and ``u``,
kept on each module's own device (so ``device_map``-placed models work).

Under ``torchrun`` every pass is data-parallel: each rank takes a strided shard of the
examples, ``V`` and ``u`` are all-reduced like DDP gradients and the per-example scalars
are summed into full arrays (each rank fills its own rows). Finished passes can be
checkpointed and a rerun resumes from the last one. Every pass runs through one
:class:`~layerif_plugins.engine.runner.PassRunner` (load checkpoint → run the batches → reduce across
ranks → checkpoint).

**One-pass mode** (``InfluenceConfig.mode``): the first train pass also holds each batch's
per-example factors (:mod:`layerif_plugins.engine.factors`) up to ``max_factor_memory``; passes 2
and 3 replay the held batches instead of running the model, so when everything fits the model
sees the train set once. Batches past the budget are captured again (the four-pass cost for those
batches only). λ needs every norm and ``u`` every ``c_k / d_k``, so no pass can be fused with
another: holding the factors is what saves the model passes, and it changes no number - the
batches are visited in the same order, with the same per-batch representation, in every mode.

**Precision and batch size** (``InfluenceConfig.stats_precision``, ``auto_batch_size``): the
statistics' products may take bf16 (or, on CUDA, TF32) operands, with every result and sum kept in
the accumulation dtype (:class:`~layerif_plugins.engine.stats.Precision`; part of the checkpoint
fingerprint); on CUDA the batch size may be chosen from free memory
(:mod:`layerif_plugins.engine.autobatch`, a runtime option).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerif_plugins.data import Examples
from layerif_plugins.engine.autobatch import choose_batch_size
from layerif_plugins.engine.capture import frozen_parameters
from layerif_plugins.engine.checkpoint import PassCheckpoints
from layerif_plugins.engine.config import InfluenceConfig, InfluenceResult, aggregate_positive
from layerif_plugins.engine.factors import (
    FactorStore,
    ModuleFactors,
    default_factor_budget,
    free_memory,
    parse_bytes,
    release_freed_memory,
)
from layerif_plugins.engine.runner import PassCallback, PassRunner, PassSpec, weight_shape
from layerif_plugins.engine.stats import Precision, as_dtype, per_example_grads
from layerif_plugins.errors import ConfigError, DataError, NumericsError
from layerif_plugins.models import LinearModule, block_linears, fingerprint, num_layers

logger = logging.getLogger(__name__)


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """fp64 for fp64 models (tests), fp32 otherwise (bf16/fp16 models accumulate in fp32)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def stats_precision(config: InfluenceConfig, model: nn.Module, targets: Sequence[LinearModule]) -> Precision:
    """The statistics' :class:`Precision` of this run; ``tf32`` on a model not wholly on CUDA is refused."""
    if config.stats_precision == "tf32":
        where = sorted({str(t.module.weight.device) for t in targets if t.module.weight.device.type != "cuda"})
        if where:
            raise ConfigError(f"stats_precision='tf32' needs a CUDA device (TF32 is an NVIDIA tensor-core mode), but "
                              f"the model has layers on {', '.join(where)}: use 'fp32' (exact) or 'bf16' there "
                              "(option --stats-precision)")
    return Precision.of(config.stats_precision, accumulation_dtype(model))


def choose_ghost(targets: Sequence[LinearModule], config: InfluenceConfig, itemsize: int) -> list[bool]:
    """Per module: ghost products (memory-light) or materialized per-example gradients (FLOP-light)."""
    if config.grad_mode == "ghost":
        return [True] * len(targets)
    if config.grad_mode == "materialize":
        return [False] * len(targets)
    out = []
    for t in targets:
        o, i = weight_shape(t)
        out.append(config.batch_size * o * i * itemsize > config.materialize_limit_bytes)
    return out


def _run_fingerprint(model: nn.Module, train: Examples, val: Examples, config: InfluenceConfig) -> dict[str, Any]:
    return {"model": fingerprint(model).to_dict(), "train": train.digest(), "val": val.digest(),
            "n_train": len(train), "n_val": len(val), **config.numeric_options()}


def factor_budget(config: InfluenceConfig, device: torch.device) -> int:
    """Bytes the train factors may hold: 0 for four-pass, else ``max_factor_memory`` or, unset, the default of
    :func:`~layerif_plugins.engine.factors.default_factor_budget` (CPU: the available memory less a reserve,
    after handing freed heap back to the OS; CUDA: half the free memory)."""
    if config.mode == "four-pass":
        return 0
    budget = parse_bytes(config.max_factor_memory)
    if budget is None:
        if device.type == "cpu":
            release_freed_memory()
        free = free_memory(device)
        budget = default_factor_budget(free, device.type)
        logger.info("max_factor_memory not set: %.2f GiB of the %.2f GiB free on %s", budget / 2**30, free / 2**30,
                    device)
    return budget


def compute_influence(
    model: nn.Module,
    train: Examples,
    val: Examples,
    pad_id: int,
    config: InfluenceConfig | None = None,
    on_pass_end: PassCallback | None = None,
) -> InfluenceResult:
    """Exact LayerIF of every decoder block of ``model`` (see module docstring).

    ``on_pass_end(name)`` is called after each pass is finished (and checkpointed).
    """
    config = config or InfluenceConfig()
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"need at least one train and one validation example (got {len(train)} and {len(val)})")
    config.validate()  # again: the dataclass is mutable, and a changed field must not reach the passes
    targets = block_linears(model, config.params)
    precision = stats_precision(config, model, targets)
    main = model.get_input_embeddings().weight.device
    store = FactorStore(factor_budget(config, main))
    ckpt = PassCheckpoints(config.checkpoint_dir, _run_fingerprint(model, train, val, config))
    was_training, was_ckpt = model.training, getattr(model, "is_gradient_checkpointing", False)
    model.eval()
    if config.gradient_checkpointing and not was_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()  # HF only recomputes in train mode for some models; eval keeps dropout off either way
    try:
        with frozen_parameters(model):
            shapes = [weight_shape(t) for t in targets]
            batch = choose_batch_size(model, targets, shapes, train, val, pad_id, config, store.budget, precision)
            if batch != config.batch_size:
                config = dataclasses.replace(config, batch_size=batch)
            ghost = choose_ghost(targets, config, torch.finfo(precision.acc).bits // 8)
            runner = PassRunner(model, targets, pad_id, config, ckpt, store, ghost, precision,
                                on_pass_end or (lambda _name: None))
            influence, lam, losses = _logical_passes(runner, train, val, config)
    finally:
        held_bytes = store.used
        store.clear()
        if config.gradient_checkpointing and not was_ckpt:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    result = _to_result(model, targets, influence, lam, config.pairwise, *losses, runner.timings)
    result.model_batches, result.factor_bytes, result.batch_size = runner.model_passes, held_bytes, config.batch_size
    return result


def _logical_passes(runner: PassRunner, train: Examples, val: Examples, config: InfluenceConfig
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The four logical passes of the module docstring, in every mode; ``(IF (K,n,m), λ (K,), (train, val losses))``.

    Whether the three train passes run the model or replay held factors is the runner's business.
    """
    acc_dtype, ghost, shapes, devices, main = (runner.acc_dtype, runner.ghost, runner.shapes, runner.devices,
                                                runner.device)
    compute = runner.precision.compute
    n, m_vec, k_mod = len(train), (len(val) if config.pairwise else 1), len(shapes)

    def zero_val_gradients() -> dict[str, Any]:
        return {"vecs": [torch.zeros(m_vec, o, i, dtype=acc_dtype, device=d)
                         for (o, i), d in zip(shapes, devices, strict=True)]}

    def add_val_gradients(state: dict[str, Any], index: list[int], factors: list[ModuleFactors]) -> None:
        for k, f in enumerate(factors):
            if config.pairwise:
                state["vecs"][k][index] = as_dtype(per_example_grads(f.a, f.b, acc_dtype, compute), acc_dtype)
            else:
                ones = torch.ones(len(index), 1, dtype=acc_dtype, device=f.a.device)
                state["vecs"][k] += f.weighted_sum(ones, acc_dtype, compute)

    val_pass = runner.run(PassSpec("pass0", "pass0_val", "LayerIF pass 0/3 (validation gradient)", val,
                                   zero_val_gradients, add_val_gradients, "val_losses", train=False))
    vecs = val_pass["vecs"]

    def add_norms_and_dots(state: dict[str, Any], index: list[int], factors: list[ModuleFactors]) -> None:
        for k, f in enumerate(factors):
            nrm, dot = f.norms_and_dots(vecs[k], acc_dtype, ghost[k], compute)
            state["norms"][k, index], state["cross"][k, index] = nrm.to(main), dot.to(main)

    norms_pass = runner.run(PassSpec("pass1", "pass1_train", "LayerIF pass 1/3 (norms, g·V)", train,
                                     lambda: {"norms": torch.zeros(k_mod, n, dtype=acc_dtype, device=main),
                                              "cross": torch.zeros(k_mod, n, m_vec, dtype=acc_dtype, device=main)},
                                     add_norms_and_dots, "train_losses"))
    norms, cross = norms_pass["norms"], norms_pass["cross"]
    numel = torch.tensor([o * i for o, i in shapes], dtype=acc_dtype, device=main)
    lam = config.damping * norms.mean(dim=1) / numel  # (K,)
    if bool((lam <= 0).any()):
        zero = [runner.targets[k].name for k in (lam <= 0).nonzero().flatten().tolist()]
        raise NumericsError(f"all train gradients are zero at {zero[:3]}: λ = 0, influence undefined")
    weights = cross / (lam[:, None, None] + norms[:, :, None])  # (K, n, m)

    def add_weighted_gradients(state: dict[str, Any], index: list[int], factors: list[ModuleFactors]) -> None:
        for k, f in enumerate(factors):
            state["us"][k] += f.weighted_sum(weights[k, index].to(devices[k]), acc_dtype, compute)

    us = runner.run(PassSpec("pass2", "pass2_train", "LayerIF pass 2/3 (weighted gradient u)", train,
                             lambda: {"us": [torch.zeros_like(v) for v in vecs]}, add_weighted_gradients))["us"]

    def add_projections(state: dict[str, Any], index: list[int], factors: list[ModuleFactors]) -> None:
        for k, f in enumerate(factors):
            state["proj"][k, index] = f.dots(us[k], acc_dtype, ghost[k], compute).to(main)

    proj = runner.run(PassSpec("pass3", "pass3_train", "LayerIF pass 3/3 (g·u)", train,
                               lambda: {"proj": torch.zeros(k_mod, n, m_vec, dtype=acc_dtype, device=main)},
                               add_projections))["proj"]
    influence = -(cross - proj / n) / lam[:, None, None]  # (K, n, m): Σ over modules of a layer = IF_l
    return influence, lam, (norms_pass["train_losses"], val_pass["val_losses"])


def _to_result(
    model: nn.Module,
    targets: list[LinearModule],
    influence: torch.Tensor,
    lam: torch.Tensor,
    pairwise: bool,
    train_losses: torch.Tensor,
    val_losses: torch.Tensor,
    timings: dict[str, float],
) -> InfluenceResult:
    n_layers = num_layers(model)
    influence = influence.double().cpu()
    per_module_s = influence.sum(dim=2)  # (K, n)
    layer_of = torch.tensor([t.layer for t in targets])
    per_example = torch.zeros(per_module_s.shape[1], n_layers, dtype=torch.float64)
    per_example.index_add_(1, layer_of, per_module_s.T)
    pair = None
    if pairwise:
        pair = torch.zeros(n_layers, *influence.shape[1:], dtype=torch.float64)
        pair.index_add_(0, layer_of, influence)
    return InfluenceResult(
        layer_scores=aggregate_positive(per_example).tolist(),
        per_example=per_example,
        per_module={t.name: per_module_s[k] for k, t in enumerate(targets)},
        lambdas={t.name: float(lam[k]) for k, t in enumerate(targets)},
        module_layers={t.name: t.layer for t in targets},
        pairwise=pair,
        train_losses=train_losses,
        val_losses=val_losses,
        timings=timings,
    )


def batch_size_for(model: nn.Module, train: Examples, val: Examples, pad_id: int, config: InfluenceConfig) -> int:
    """The batch size :func:`~layerif_plugins.engine.passes.compute_influence` would use with ``config``
    (benchmarks run their plain fwd+bwd with it, so that both see the same batches)."""
    targets = block_linears(model, config.params)
    precision = stats_precision(config, model, targets)
    budget = factor_budget(config, model.get_input_embeddings().weight.device)
    was_training = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            return choose_batch_size(model, targets, [weight_shape(t) for t in targets], train, val, pad_id, config,
                                     budget, precision)
    finally:
        model.train(was_training)


__all__ = ["accumulation_dtype", "batch_size_for", "choose_ghost", "compute_influence", "factor_budget",
           "stats_precision"]
