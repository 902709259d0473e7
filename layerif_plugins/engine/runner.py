"""How every pass of the engine runs: load its checkpoint → run the batches → reduce across ranks → checkpoint.

A :class:`PassSpec` says what one logical pass of :mod:`layerif_plugins.engine.passes` reads
(validation or train examples) and adds up per batch; :class:`PassRunner` does the rest the same
way for every pass: resume from a finished pass's checkpoint, plan this rank's batches, capture
module inputs and output gradients (or replay the train factors the one-pass mode holds, in the
same batch order, so every mode sums in the same order), check them for non-finite values,
all-reduce the pass's state under ``torchrun`` and save it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerif_plugins.data import Examples, collate, plan_batches
from layerif_plugins.engine import distributed
from layerif_plugins.engine.capture import Captured, capture
from layerif_plugins.engine.checkpoint import PassCheckpoints
from layerif_plugins.engine.config import InfluenceConfig
from layerif_plugins.engine.factors import FactorStore, ModuleFactors, represent
from layerif_plugins.engine.stats import Precision
from layerif_plugins.errors import NumericsError
from layerif_plugins.models import LinearModule

logger = logging.getLogger(__name__)

#: called with a pass's name once it is finished (and checkpointed)
PassCallback = Callable[[str], None]


def weight_shape(t: LinearModule) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear module's weight (GPT-2's Conv1D stores it transposed)."""
    w = t.module.weight
    # Conv1D keeps (in, out); the engine only needs a consistent orientation: (out, in).
    return (w.shape[1], w.shape[0]) if type(t.module).__name__ == "Conv1D" else (w.shape[0], w.shape[1])


@dataclass
class PassSpec:
    """One logical pass: which examples, what it accumulates and what it does per batch.

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


class PassRunner:
    """Runs every pass the same way: load its checkpoint → run the batches → reduce across ranks → checkpoint.

    Train batches are turned into per-module factors (:func:`factors.represent`); the first train
    pass offers them to the :class:`FactorStore`, and the later ones replay what it holds and
    capture only the rest, in the same batch order (so every mode sums in the same order).
    """

    def __init__(self, model: nn.Module, targets: list[LinearModule], pad_id: int, config: InfluenceConfig,
                 ckpt: PassCheckpoints, store: FactorStore, ghost: list[bool], precision: Precision,
                 notify: PassCallback):
        self.model, self.targets, self.pad_id, self.config = model, targets, pad_id, config
        self.ckpt, self.store, self.ghost, self.notify = ckpt, store, ghost, notify
        self.precision, self.acc_dtype = precision, precision.acc
        self.device = model.get_input_embeddings().weight.device
        self.devices = [t.module.weight.device for t in targets]
        self.shapes = [weight_shape(t) for t in targets]
        self.timings: dict[str, float] = {}
        self.model_passes = 0
        self._offer = True  # only the first train pass run in this process fills the store

    def run(self, spec: PassSpec) -> dict[str, Any]:
        t0 = time.perf_counter()
        loaded = self.ckpt.load(spec.name)
        if loaded is not None:
            state = self._place(loaded)
            if spec.train:
                self._offer = False  # a resumed run holds no factors of the passes it skipped
        else:
            state = spec.state()
            losses = self._batches(spec, lambda index, factors: spec.step(state, index, factors))
            for value in state.values():
                for t in value if isinstance(value, list) else [value]:
                    distributed.all_reduce_sum(t)
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

    def _batches(self, spec: PassSpec, fn: Callable[[list[int], list[ModuleFactors]], None]) -> torch.Tensor:
        """Apply ``fn(global indices, factors)`` to every batch of this rank's shard; (n,) losses."""
        examples = spec.examples
        losses = torch.zeros(len(examples), dtype=torch.float64)
        mine = distributed.shard(len(examples))
        plan = plan_batches(examples, mine, self.config.batch_size, self.config.max_tokens_per_batch)
        offer = spec.train and self._offer and self.store.budget > 0
        bar = tqdm(total=len(mine), desc=spec.desc, disable=not (self.config.show_progress and distributed.is_main()),
                   leave=False)
        for batch_no, index in enumerate(plan):
            held = self.store.get(batch_no) if spec.train else None
            if held is not None:
                factors, batch_losses = held.factors, held.losses
            else:
                batch = collate(examples, index, self.pad_id).to(self.device)
                cap = capture(self.model, self.targets, batch)
                self.model_passes += 1
                self._check_finite(cap, index, examples.source)
                batch_losses = cap.losses
                if spec.train:
                    with self.precision.matmuls():
                        factors, nbytes = represent(cap, self.shapes, self.ghost, self.precision)
                    if offer:
                        self.store.offer(batch_no, factors, batch_losses, nbytes)
                else:
                    factors = [ModuleFactors(a=a, b=b) for a, b in zip(cap.inputs, cap.grads, strict=True)]
                del cap
            with self.precision.matmuls():  # the statistics only: the model's passes keep the process's setting
                fn(index, factors)
            losses[index] = batch_losses.double().cpu()
            bar.update(len(index))
        bar.close()
        if offer:
            self._offer = False
            self._log_store(len(plan))
        return distributed.all_reduce_sum(losses.to(self.device)).cpu()

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


__all__ = ["PassCallback", "PassRunner", "PassSpec", "weight_shape"]
