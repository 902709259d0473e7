"""The batch size from free memory (``InfluenceConfig.auto_batch_size``), so that a large card is kept busy.

A fixed batch of 8 leaves an H200 mostly idle on small models (benchmarks/README.md). On CUDA the
engine instead measures what one more example costs and fills the memory that is left:

1. **probe**: a capture (forward + backward with the module hooks, exactly what every pass runs)
   of the longest train/validation example in a batch of 1 and then of 2; the peak allocated bytes
   above the resting level give ``per_example = peak(2) - peak(1)`` and
   ``fixed = peak(1) - per_example`` (workspaces, anything that does not grow with the batch);
2. **statistics**, which run after the capture on what it kept, are bounded analytically and added:
   per example ``acc·2T²`` (ghost ``AAᵀ``, ``BBᵀ``) ``+ T·m·d_out·(acc + compute)`` (ghost ``A Xᵀ``
   and the weighted ``B`` of the ``u`` pass, with their cast), and a fixed
   ``3 · materialize_limit_bytes`` (a materialized per-example gradient, its cast and its square: the
   materialized path is only taken below that limit);
3. **what is left**: the device's free memory (the driver's, plus what torch's allocator caches)
   minus what the one-pass store will hold (the factor budget, or the whole train set's factors when
   they take less: measured per example on the probe) and the gradient-sized vectors ``V`` and ``u``
   (``2 · m · Σ d_out·d_in`` accumulation numbers);
4. :func:`batch_from_memory` takes the largest ``b`` with ``fixed + b · per_example ≤ SAFETY · left``,
   at least 1 and at most the number of examples. ``SAFETY = 0.5`` covers the allocator's
   fragmentation, batches of other shapes and everything the two bounds above miss.

On CPU the configured ``batch_size`` is kept (a bigger batch does not make a CPU faster, and host
memory is shared with everything else); a model spread over several devices is probed on its first.
The batch size changes no number beyond float rounding (it is a runtime option of the checkpoints).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from layerif_plugins.data import Examples, collate
from layerif_plugins.engine.capture import capture
from layerif_plugins.engine.config import InfluenceConfig
from layerif_plugins.engine.factors import choose_materialized, free_memory, input_leaders
from layerif_plugins.engine.stats import Precision
from layerif_plugins.models import LinearModule

logger = logging.getLogger(__name__)

#: fraction of the memory left that the batches may use
SAFETY = 0.5


def batch_from_memory(per_example_bytes: int, free_bytes: int, fixed_bytes: int = 0, safety: float = SAFETY,
                      cap: int | None = None) -> int:
    """Largest ``b`` with ``fixed_bytes + b · per_example_bytes ≤ safety · free_bytes``; at least 1, at most ``cap``.

    At least 1 even when nothing fits: the engine then runs one example at a time and the device's own
    out-of-memory error names the problem (as it would with ``batch_size=1``).
    """
    if per_example_bytes <= 0:
        raise ValueError(f"per_example_bytes must be > 0, got {per_example_bytes}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    usable = safety * max(free_bytes, 0) - fixed_bytes
    b = max(1, int(usable // per_example_bytes)) if usable > 0 else 1
    return b if cap is None else max(1, min(b, cap))


class CudaMeter:
    """Allocated and peak-allocated bytes of one CUDA device (what the probe reads)."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def probe_capture_bytes(model: nn.Module, targets: Sequence[LinearModule], ids: tuple[int, ...], pad_id: int,
                        meter: CudaMeter) -> tuple[int, int, int]:
    """``(fixed, per_example, factors_per_example)`` bytes of capturing ``ids`` in batches of 1 and 2.

    The first two come from the peak allocated bytes above the resting level (see module docstring); the
    third is what the one-pass store holds per example of this length at most (every module as its
    factors, inputs shared by several modules counted once:
    :func:`~layerif_plugins.engine.factors.choose_materialized`).
    """
    device = model.get_input_embeddings().weight.device
    peaks, factors = [], 0
    for b in (1, 2):
        batch = collate(Examples((ids,) * b), range(b), pad_id).to(device)
        rest = meter.allocated()
        meter.reset_peak()
        cap = capture(model, targets, batch)
        peaks.append(meter.peak() - rest)
        if b == 1:
            shapes = [(g.shape[-1], a.shape[-1]) for a, g in zip(cap.inputs, cap.grads, strict=True)]
            _, factors = choose_materialized(1, len(ids), shapes, input_leaders(cap.inputs), [True] * len(shapes),
                                             cap.inputs[0].element_size(), cap.inputs[0].element_size())
        del cap, batch
    per_example = max(peaks[1] - peaks[0], 1)
    return max(peaks[0] - per_example, 0), per_example, factors


def stats_bytes(shapes: Sequence[tuple[int, int]], length: int, m_vec: int, precision: Precision,
                materialize_limit: int) -> tuple[int, int]:
    """``(fixed, per_example)`` bounds of the statistics' transient memory (see module docstring)."""
    acc = torch.finfo(precision.acc).bits // 8
    compute = torch.finfo(precision.compute).bits // 8
    max_out = max(o for o, _ in shapes)
    per_example = acc * 2 * length * length + length * m_vec * max_out * (acc + compute)
    return 3 * materialize_limit, per_example


def choose_batch_size(model: nn.Module, targets: Sequence[LinearModule], shapes: Sequence[tuple[int, int]],
                      train: Examples, val: Examples, pad_id: int, config: InfluenceConfig, factor_budget: int,
                      precision: Precision) -> int:
    """The batch size of a run (``config.batch_size`` unless ``auto_batch_size`` on CUDA); the model must be
    in eval mode with frozen parameters (as :func:`~layerif_plugins.engine.passes.compute_influence` has it)."""
    device = model.get_input_embeddings().weight.device
    if not config.auto_batch_size or device.type != "cuda":
        if config.auto_batch_size:
            logger.info("auto_batch_size on %s: keeping batch_size=%d (the probe is for CUDA devices)", device,
                        config.batch_size)
        return config.batch_size
    longest = max(train.input_ids + val.input_ids, key=len)
    fixed, per_example, factors_per_example = probe_capture_bytes(model, targets, longest, pad_id,
                                                                  CudaMeter(device))
    m_vec = len(val) if config.pairwise else 1
    s_fixed, s_per = stats_bytes(shapes, len(longest), m_vec, precision, config.materialize_limit_bytes)
    acc = torch.finfo(precision.acc).bits // 8
    vectors = 2 * m_vec * sum(o * i for o, i in shapes) * acc
    free = free_memory(device)  # the driver's free memory and the allocator's cached blocks
    held = min(factor_budget, len(train) * factors_per_example)  # the store never holds more than the train set
    left = free - held - vectors
    batch = batch_from_memory(per_example + s_per, left, fixed + s_fixed, SAFETY,
                              cap=max(len(train), len(val)))
    logger.info("auto_batch_size: %d examples per batch (probe: %.1f MiB per example of %d tokens + %.1f MiB "
                "fixed; %.2f GiB free, %.2f GiB for the one-pass factors, %.2f GiB for V and u)", batch,
                (per_example + s_per) / 2**20, len(longest), (fixed + s_fixed) / 2**20, free / 2**30,
                held / 2**30, vectors / 2**30)
    return batch


__all__ = ["SAFETY", "CudaMeter", "batch_from_memory", "choose_batch_size", "probe_capture_bytes",
           "stats_bytes"]
