"""The fast, exact LayerIF engine: all layers in four batched passes, no stored per-example gradients.

DataInf's influence summed over the validation set (METHOD.md §1, DESIGN.md "The engine")
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
checkpointed and a rerun resumes from the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Examples, collate, plan_batches
from layerif_plugins.engine import distributed as dd
from layerif_plugins.engine.capture import Captured, capture, frozen_parameters
from layerif_plugins.engine.checkpoint import PassCheckpoints
from layerif_plugins.engine.config import InfluenceConfig, InfluenceResult, aggregate_positive
from layerif_plugins.engine.stats import norms_and_dots, per_example_grads, weighted_sum
from layerif_plugins.errors import ConfigError, DataError, NumericsError
from layerif_plugins.models import LinearModule, block_linears, fingerprint, num_layers

logger = logging.getLogger(__name__)

PassCallback = Callable[[str], None]


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """fp64 for fp64 models (tests), fp32 otherwise (bf16/fp16 models accumulate in fp32)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _weight_shape(t: LinearModule) -> tuple[int, int]:
    w = t.module.weight
    # Conv1D keeps (in, out); the engine only needs a consistent orientation: (out, in).
    return (w.shape[1], w.shape[0]) if type(t.module).__name__ == "Conv1D" else (w.shape[0], w.shape[1])


def choose_ghost(targets: Sequence[LinearModule], config: InfluenceConfig, itemsize: int) -> list[bool]:
    """Per module: ghost products (memory-light) or materialized per-example gradients (FLOP-light)."""
    if config.grad_mode == "ghost":
        return [True] * len(targets)
    if config.grad_mode == "materialize":
        return [False] * len(targets)
    if config.grad_mode != "auto":
        raise ConfigError(f"grad_mode must be auto|ghost|materialize, got {config.grad_mode!r}")
    out = []
    for t in targets:
        o, i = _weight_shape(t)
        out.append(config.batch_size * o * i * itemsize > config.materialize_limit_bytes)
    return out


class _Passes:
    """Runs one pass over this rank's shard of a dataset, checking every captured value for NaN/inf."""

    def __init__(self, model: nn.Module, targets: list[LinearModule], pad_id: int, config: InfluenceConfig):
        self.model, self.targets, self.pad_id, self.config = model, targets, pad_id, config
        self.device = model.get_input_embeddings().weight.device

    def run(self, examples: Examples, desc: str, fn: Callable[[list[int], Captured], None]) -> torch.Tensor:
        """Apply ``fn(global indices, captured)`` to every batch; return the (n,) per-example losses."""
        losses = torch.zeros(len(examples), dtype=torch.float64)
        mine = dd.shard(len(examples))
        plan = plan_batches(examples, mine, self.config.batch_size, self.config.max_tokens_per_batch)
        show = self.config.show_progress and dd.is_main()
        bar = tqdm(total=len(mine), desc=desc, disable=not show, leave=False)
        for index in plan:
            batch = collate(examples, index, self.pad_id).to(self.device)
            cap = capture(self.model, self.targets, batch)
            self._check_finite(cap, index, examples.source)
            fn(index, cap)
            losses[index] = cap.losses.double().cpu()
            bar.update(len(index))
        bar.close()
        return dd.all_reduce_sum(losses.to(self.device)).cpu()

    def _check_finite(self, cap: Captured, index: list[int], source: str) -> None:
        bad = ~torch.isfinite(cap.losses)
        if bool(bad.any()):
            i = index[int(bad.nonzero()[0])]
            raise NumericsError(f"non-finite loss for example {i} of {source}; check the model weights and dtype")
        for t, g in zip(self.targets, cap.grads, strict=True):
            finite = torch.isfinite(g).flatten(1).all(dim=1)
            if not bool(finite.all()):
                i = index[int((~finite).nonzero()[0])]
                raise NumericsError(
                    f"non-finite gradient at {t.name} (layer {t.layer}) for example {i} of {source}; "
                    "try float32 instead of float16, or a shorter --max-length"
                )


def _run_fingerprint(model: nn.Module, train: Examples, val: Examples, config: InfluenceConfig) -> dict[str, Any]:
    return {"model": fingerprint(model).to_dict(), "train": train.digest(), "val": val.digest(),
            "n_train": len(train), "n_val": len(val), **config.numeric_options()}


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
    if config.damping <= 0:
        raise ConfigError(f"damping must be > 0, got {config.damping}")
    targets = block_linears(model, config.params)
    acc = accumulation_dtype(model)
    ghost = choose_ghost(targets, config, torch.finfo(acc).bits // 8)
    n, m_vec, k_mod = len(train), (len(val) if config.pairwise else 1), len(targets)
    devices = [t.module.weight.device for t in targets]
    main = model.get_input_embeddings().weight.device
    shapes = [_weight_shape(t) for t in targets]
    ckpt = PassCheckpoints(config.checkpoint_dir, _run_fingerprint(model, train, val, config))
    passes = _Passes(model, targets, pad_id, config)
    timings: dict[str, float] = {}
    notify = on_pass_end or (lambda _name: None)
    was_training, was_ckpt = model.training, getattr(model, "is_gradient_checkpointing", False)
    model.eval()
    if config.gradient_checkpointing and not was_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()  # HF only recomputes in train mode for some models; eval keeps dropout off either way
    try:
        with frozen_parameters(model):
            # ---------------------------------------------------------------- pass 0: V
            state = ckpt.load("pass0")
            t0 = time.perf_counter()
            if state is None:
                vecs = [torch.zeros(m_vec, o, i, dtype=acc, device=d)
                        for (o, i), d in zip(shapes, devices, strict=True)]

                def pass0(index: list[int], cap: Captured) -> None:
                    for k, (a, b) in enumerate(zip(cap.inputs, cap.grads, strict=True)):
                        if config.pairwise:
                            vecs[k][index] = per_example_grads(a, b, acc)
                        else:
                            ones = torch.ones(len(index), 1, dtype=acc, device=a.device)
                            vecs[k] += weighted_sum(a, b, ones, acc)

                val_losses = passes.run(val, "LayerIF pass 0/3 (validation gradient)", pass0)
                for v in vecs:
                    dd.all_reduce_sum(v)
                ckpt.save("pass0", {"vecs": vecs, "val_losses": val_losses})
            else:
                vecs = [v.to(d) for v, d in zip(state["vecs"], devices, strict=True)]
                val_losses = state["val_losses"]
            timings["pass0_val"] = time.perf_counter() - t0
            notify("pass0")

            # ---------------------------------------------------------------- pass 1: norms, g·V
            state = ckpt.load("pass1")
            t0 = time.perf_counter()
            if state is None:
                norms = torch.zeros(k_mod, n, dtype=acc, device=main)
                cross = torch.zeros(k_mod, n, m_vec, dtype=acc, device=main)

                def pass1(index: list[int], cap: Captured) -> None:
                    for k, (a, b) in enumerate(zip(cap.inputs, cap.grads, strict=True)):
                        nrm, dot = norms_and_dots(a, b, vecs[k], acc, ghost[k])
                        norms[k, index], cross[k, index] = nrm.to(main), dot.to(main)

                train_losses = passes.run(train, "LayerIF pass 1/3 (norms, g·V)", pass1)
                dd.all_reduce_sum(norms)
                dd.all_reduce_sum(cross)
                ckpt.save("pass1", {"norms": norms, "cross": cross, "train_losses": train_losses})
            else:
                norms, cross = state["norms"].to(main), state["cross"].to(main)
                train_losses = state["train_losses"]
            timings["pass1_train"] = time.perf_counter() - t0
            notify("pass1")

            numel = torch.tensor([o * i for o, i in shapes], dtype=acc, device=main)
            lam = config.damping * norms.mean(dim=1) / numel  # (K,)
            if bool((lam <= 0).any()):
                zero = [targets[k].name for k in (lam <= 0).nonzero().flatten().tolist()]
                raise NumericsError(f"all train gradients are zero at {zero[:3]}: λ = 0, influence undefined")
            weights = cross / (lam[:, None, None] + norms[:, :, None])  # (K, n, m)

            # ---------------------------------------------------------------- pass 2: u
            state = ckpt.load("pass2")
            t0 = time.perf_counter()
            if state is None:
                us = [torch.zeros_like(v) for v in vecs]

                def pass2(index: list[int], cap: Captured) -> None:
                    for k, (a, b) in enumerate(zip(cap.inputs, cap.grads, strict=True)):
                        us[k] += weighted_sum(a, b, weights[k, index].to(a.device), acc)

                passes.run(train, "LayerIF pass 2/3 (weighted gradient u)", pass2)
                for u in us:
                    dd.all_reduce_sum(u)
                ckpt.save("pass2", {"us": us})
            else:
                us = [u.to(d) for u, d in zip(state["us"], devices, strict=True)]
            timings["pass2_train"] = time.perf_counter() - t0
            notify("pass2")

            # ---------------------------------------------------------------- pass 3: g·u
            state = ckpt.load("pass3")
            t0 = time.perf_counter()
            if state is None:
                proj = torch.zeros(k_mod, n, m_vec, dtype=acc, device=main)

                def pass3(index: list[int], cap: Captured) -> None:
                    for k, (a, b) in enumerate(zip(cap.inputs, cap.grads, strict=True)):
                        proj[k, index] = norms_and_dots(a, b, us[k], acc, ghost[k])[1].to(main)

                passes.run(train, "LayerIF pass 3/3 (g·u)", pass3)
                dd.all_reduce_sum(proj)
                ckpt.save("pass3", {"proj": proj})
            else:
                proj = state["proj"].to(main)
            timings["pass3_train"] = time.perf_counter() - t0
            notify("pass3")
    finally:
        if config.gradient_checkpointing and not was_ckpt:
            model.gradient_checkpointing_disable()
        model.train(was_training)

    influence = -(cross - proj / n) / lam[:, None, None]  # (K, n, m): Σ over modules of a layer = IF_l
    return _assemble(model, targets, influence, lam, config.pairwise, train_losses, val_losses, timings)


def _assemble(
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
