"""The fast, exact LayerIF engine: all layers in four batched logical passes (one or three over the train set).

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
checkpointed and a rerun resumes from the last one. Every pass runs through one skeleton
(:class:`_Skeleton`: load checkpoint → run the batches → reduce across ranks → checkpoint).

**One-pass mode** (``InfluenceConfig.mode``): the first train pass also holds each batch's
per-example factors (:mod:`layerif_plugins.engine.factors`) up to ``max_factor_memory``; passes 2
and 3 replay the held batches instead of running the model, so when everything fits the model
sees the train set once. Batches past the budget are captured again (the four-pass cost for those
batches only). λ needs every norm and ``u`` every ``c_k / d_k``, so no pass can be fused with
another: holding the factors is what saves the model passes, and it changes no number - the
batches are visited in the same order, with the same per-batch representation, in every mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Examples, collate, plan_batches
from layerif_plugins.engine import distributed as dd
from layerif_plugins.engine.capture import Captured, capture, frozen_parameters
from layerif_plugins.engine.checkpoint import PassCheckpoints
from layerif_plugins.engine.config import InfluenceConfig, InfluenceResult, aggregate_positive
from layerif_plugins.engine.factors import FactorStore, ModuleFactors, free_memory, parse_bytes, represent
from layerif_plugins.engine.stats import per_example_grads
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


@dataclass
class _Pass:
    """One pass of the skeleton: which examples, what it accumulates and what it does per batch.

    ``state`` holds the pass's results (tensors on the main device, or per-module lists on each
    module's device); ``step(state, index, factors)`` adds one batch; ``losses_key`` names where the
    per-example losses go (``None``: not kept); ``train`` passes may hold / replay factors.
    """

    name: str
    timing: str
    desc: str
    examples: Examples
    state: Callable[[], dict[str, Any]]
    step: Callable[[dict[str, Any], list[int], list[ModuleFactors]], None]
    losses_key: str | None = None
    train: bool = True


class _Skeleton:
    """load checkpoint → run the batches → reduce across ranks → checkpoint, the same for every pass.

    Train batches are turned into per-module factors (:func:`factors.represent`); the first train
    pass offers them to the :class:`FactorStore`, and the later ones replay what it holds and
    capture only the rest, in the same batch order (so every mode sums in the same order).
    """

    def __init__(self, model: nn.Module, targets: list[LinearModule], pad_id: int, config: InfluenceConfig,
                 ckpt: PassCheckpoints, store: FactorStore, ghost: list[bool], acc: torch.dtype,
                 notify: PassCallback):
        self.model, self.targets, self.pad_id, self.config = model, targets, pad_id, config
        self.ckpt, self.store, self.ghost, self.acc, self.notify = ckpt, store, ghost, acc, notify
        self.device = model.get_input_embeddings().weight.device
        self.devices = [t.module.weight.device for t in targets]
        self.shapes = [_weight_shape(t) for t in targets]
        self.timings: dict[str, float] = {}
        self.model_passes = 0
        self._offer = True  # only the first train pass run in this process fills the store

    def run(self, spec: _Pass) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = self.ckpt.load(spec.name)
        if loaded is not None:
            state = self._place(loaded)
            if spec.train:
                self._offer = False  # a resumed run holds no factors of the passes it skipped
        else:
            state = spec.state()
            losses = self._batches(spec, lambda index, facs: spec.step(state, index, facs))
            for value in state.values():
                for t in value if isinstance(value, list) else [value]:
                    dd.all_reduce_sum(t)
            if spec.losses_key:
                state[spec.losses_key] = losses
            self.ckpt.save(spec.name, state)
        self.timings[spec.timing] = time.perf_counter() - t0
        self.notify(spec.name)
        return state

    def _place(self, loaded: dict[str, Any]) -> dict[str, Any]:
        """Checkpointed state back where a fresh pass keeps it: per-module lists on each module's device."""
        out: dict[str, Any] = {}
        for key, value in loaded.items():
            if isinstance(value, list):
                out[key] = [v.to(d) for v, d in zip(value, self.devices, strict=True)]
            else:
                out[key] = value if key.endswith("_losses") else value.to(self.device)
        return out

    def _batches(self, spec: _Pass, fn: Callable[[list[int], list[ModuleFactors]], None]) -> torch.Tensor:
        """Apply ``fn(global indices, factors)`` to every batch of this rank's shard; (n,) losses."""
        examples = spec.examples
        losses = torch.zeros(len(examples), dtype=torch.float64)
        mine = dd.shard(len(examples))
        plan = plan_batches(examples, mine, self.config.batch_size, self.config.max_tokens_per_batch)
        offer = spec.train and self._offer and self.store.budget > 0
        bar = tqdm(total=len(mine), desc=spec.desc, disable=not (self.config.show_progress and dd.is_main()),
                   leave=False)
        for batch_no, index in enumerate(plan):
            held = self.store.get(batch_no) if spec.train else None
            if held is not None:
                facs, batch_losses = held.factors, held.losses
            else:
                batch = collate(examples, index, self.pad_id).to(self.device)
                cap = capture(self.model, self.targets, batch)
                self.model_passes += 1
                self._check_finite(cap, index, examples.source)
                batch_losses = cap.losses
                if spec.train:
                    facs, nbytes = represent(cap, self.shapes, self.ghost, self.acc)
                    if offer:
                        self.store.offer(batch_no, facs, batch_losses, nbytes)
                else:
                    facs = [ModuleFactors(a=a, b=b) for a, b in zip(cap.inputs, cap.grads, strict=True)]
                del cap
            fn(index, facs)
            losses[index] = batch_losses.double().cpu()
            bar.update(len(index))
        bar.close()
        if offer:
            self._offer = False
            self._log_store(len(plan))
        return dd.all_reduce_sum(losses.to(self.device)).cpu()

    def _log_store(self, n_batches: int) -> None:
        held, gib = len(self.store.held), self.store.used / 2**30
        if held == n_batches:
            logger.info("one-pass: holding the factors of all %d train batches (%.2f GiB of a %.2f GiB budget)",
                        held, gib, self.store.budget / 2**30)
            return
        log = logger.warning if self.config.mode == "one-pass" else logger.info
        log("one-pass: the factors of %d of %d train batches fit in max_factor_memory=%.2f GiB (%.2f GiB held); "
            "the other %d batches are run through the model twice more (exact either way; raise "
            "max_factor_memory to avoid it)", held, n_batches, self.store.budget / 2**30, gib,
            n_batches - held)

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


def factor_budget(config: InfluenceConfig, device: torch.device) -> int:
    """Bytes the train factors may hold: 0 for four-pass, else ``max_factor_memory`` or half the free memory."""
    if config.mode not in ("auto", "one-pass", "four-pass"):
        raise ConfigError(f"mode must be auto|one-pass|four-pass, got {config.mode!r}")
    if config.mode == "four-pass":
        return 0
    budget = parse_bytes(config.max_factor_memory)
    if budget is None:
        budget = free_memory(device) // 2
        logger.info("max_factor_memory not set: using half the free memory of %s, %.2f GiB", device, budget / 2**30)
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
    if config.damping <= 0:
        raise ConfigError(f"damping must be > 0, got {config.damping}")
    targets = block_linears(model, config.params)
    acc = accumulation_dtype(model)
    ghost = choose_ghost(targets, config, torch.finfo(acc).bits // 8)
    main = model.get_input_embeddings().weight.device
    store = FactorStore(factor_budget(config, main))
    ckpt = PassCheckpoints(config.checkpoint_dir, _run_fingerprint(model, train, val, config))
    run = _Skeleton(model, targets, pad_id, config, ckpt, store, ghost, acc, on_pass_end or (lambda _name: None))
    was_training, was_ckpt = model.training, getattr(model, "is_gradient_checkpointing", False)
    model.eval()
    if config.gradient_checkpointing and not was_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.eval()  # HF only recomputes in train mode for some models; eval keeps dropout off either way
    try:
        with frozen_parameters(model):
            influence, lam, losses = _four_passes(run, train, val, config)
    finally:
        held_bytes = store.used
        store.clear()
        if config.gradient_checkpointing and not was_ckpt:
            model.gradient_checkpointing_disable()
        model.train(was_training)
    result = _assemble(model, targets, influence, lam, config.pairwise, *losses, run.timings)
    result.model_batches, result.factor_bytes = run.model_passes, held_bytes
    return result


def _four_passes(run: _Skeleton, train: Examples, val: Examples, config: InfluenceConfig
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The four logical passes of the module docstring; returns ``(IF (K,n,m), λ (K,), (train, val losses))``."""
    acc, ghost, shapes, devices, main = run.acc, run.ghost, run.shapes, run.devices, run.device
    n, m_vec, k_mod = len(train), (len(val) if config.pairwise else 1), len(shapes)

    def pass0_state() -> dict[str, Any]:
        return {"vecs": [torch.zeros(m_vec, o, i, dtype=acc, device=d) for (o, i), d in zip(shapes, devices,
                                                                                            strict=True)]}

    def pass0(state: dict[str, Any], index: list[int], facs: list[ModuleFactors]) -> None:
        for k, f in enumerate(facs):
            if config.pairwise:
                state["vecs"][k][index] = per_example_grads(f.a, f.b, acc)
            else:
                state["vecs"][k] += f.weighted_sum(torch.ones(len(index), 1, dtype=acc, device=f.a.device), acc)

    p0 = run.run(_Pass("pass0", "pass0_val", "LayerIF pass 0/3 (validation gradient)", val, pass0_state, pass0,
                       "val_losses", train=False))
    vecs = p0["vecs"]

    def pass1(state: dict[str, Any], index: list[int], facs: list[ModuleFactors]) -> None:
        for k, f in enumerate(facs):
            nrm, dot = f.norms_and_dots(vecs[k], acc, ghost[k])
            state["norms"][k, index], state["cross"][k, index] = nrm.to(main), dot.to(main)

    p1 = run.run(_Pass("pass1", "pass1_train", "LayerIF pass 1/3 (norms, g·V)", train,
                       lambda: {"norms": torch.zeros(k_mod, n, dtype=acc, device=main),
                                "cross": torch.zeros(k_mod, n, m_vec, dtype=acc, device=main)},
                       pass1, "train_losses"))
    norms, cross = p1["norms"], p1["cross"]
    numel = torch.tensor([o * i for o, i in shapes], dtype=acc, device=main)
    lam = config.damping * norms.mean(dim=1) / numel  # (K,)
    if bool((lam <= 0).any()):
        zero = [run.targets[k].name for k in (lam <= 0).nonzero().flatten().tolist()]
        raise NumericsError(f"all train gradients are zero at {zero[:3]}: λ = 0, influence undefined")
    weights = cross / (lam[:, None, None] + norms[:, :, None])  # (K, n, m)

    def pass2(state: dict[str, Any], index: list[int], facs: list[ModuleFactors]) -> None:
        for k, f in enumerate(facs):
            state["us"][k] += f.weighted_sum(weights[k, index].to(devices[k]), acc)

    us = run.run(_Pass("pass2", "pass2_train", "LayerIF pass 2/3 (weighted gradient u)", train,
                       lambda: {"us": [torch.zeros_like(v) for v in vecs]}, pass2))["us"]

    def pass3(state: dict[str, Any], index: list[int], facs: list[ModuleFactors]) -> None:
        for k, f in enumerate(facs):
            state["proj"][k, index] = f.dots(us[k], acc, ghost[k]).to(main)

    proj = run.run(_Pass("pass3", "pass3_train", "LayerIF pass 3/3 (g·u)", train,
                         lambda: {"proj": torch.zeros(k_mod, n, m_vec, dtype=acc, device=main)}, pass3))["proj"]
    influence = -(cross - proj / n) / lam[:, None, None]  # (K, n, m): Σ over modules of a layer = IF_l
    return influence, lam, (p1["train_losses"], p0["val_losses"])


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
