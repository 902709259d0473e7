"""Per-example gradient factors of a captured train batch, and the store that holds them (one-pass mode).

A linear module's per-example gradient is ``g_i = B_iᵀ A_i``, so a captured batch keeps every
train-side quantity the engine needs: ``||g_i||²``, ``g_iᵀX`` and ``Σ_i w_i g_i``
(:mod:`layerif_plugins.engine.stats`). Holding those factors from the first train pass lets the
later passes (``u`` and ``gᵀu``) replay them instead of running the model again.

Each module of a batch is represented either by its factors ``(A, B)`` (in the model's dtype;
modules fed the same input, like q/k/v, share one ``A``) or, for modules on the materialized
path whose ``(b, d_out, d_in)`` gradient is smaller than their factors, by that gradient. The
choice depends only on the batch's shapes, and the *same* representation is used whether a batch
is replayed from memory or captured again, so every mode of the engine gives bit-identical
scores on CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from layerif_plugins.engine.capture import Captured
from layerif_plugins.engine.stats import Precision, as_dtype, dots, norms_and_dots, per_example_grads, weighted_sum
from layerif_plugins.errors import ConfigError

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``4GB`` → 4·10⁹, ``512MiB`` → 512·2²⁰, ``1e9`` / ``1000`` → bytes; ``None`` stays ``None``."""
    if value is None or isinstance(value, int | float):
        if value is not None and value < 0:
            raise ConfigError(f"max_factor_memory must be >= 0, got {value}")
        return None if value is None else int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a memory size; write bytes or e.g. 4GB, 512MiB, 1.5e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device`` (CUDA: the driver's free memory plus the blocks
    PyTorch's caching allocator holds but no tensor uses; CPU: MemAvailable).

    Why the cached blocks count: after a plain training step (or an earlier run) the allocator keeps its
    freed blocks reserved, and the driver reports them as used. Counting only the driver's figure shrank the
    one-pass budget of the Llama-3-8B shape on an H200 from 31 to 21 GiB over three runs in one process, and
    the batches left out were run through the model twice more (benchmarks/README.md, 2026-12-04).
    """
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + max(cached, 0))
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


#: CPU: what the default one-pass budget leaves of the available memory to the passes' own working set
#: (a batch's activations and output gradients, the statistics' temporaries) and to the rest of the machine
CPU_RESERVE_FRACTION = 0.25
CPU_RESERVE_MIN_BYTES = 2 * 2**30


def release_freed_memory() -> bool:
    """Hand memory this process has freed back to the OS (glibc ``malloc_trim(0)``); True when it ran.

    Why: glibc keeps freed heap pages of earlier work (a model load, a plain training step) mapped, so
    ``MemAvailable`` under-counts what the one-pass store could use. Linux with glibc only; elsewhere a
    no-op.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def default_factor_budget(free_bytes: int, device_type: str) -> int:
    """The one-pass budget when ``max_factor_memory`` is not set, from the device's free memory.

    CUDA: half of it (``auto_batch_size`` sizes the batches from what the store leaves). CPU: all but
    ``max(CPU_RESERVE_MIN_BYTES, CPU_RESERVE_FRACTION · free)`` — host memory is where a CPU run keeps
    everything, and on the 2-core benchmark machine half of it held 2.97 of the 10.6 GB that SmolLM2's
    256 train examples need, so 86 model batches ran instead of 40 (benchmarks/README.md).
    """
    free = max(int(free_bytes), 0)
    if device_type == "cuda":
        return free // 2
    return max(free - max(CPU_RESERVE_MIN_BYTES, int(CPU_RESERVE_FRACTION * free)), 0)


@dataclass
class ModuleFactors:
    """One module's per-example gradients for a batch: factors ``a`` (b,T,i), ``b`` (b,T,o), or ``g`` (b,o,i)."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    g: torch.Tensor | None = None

    def norms_and_dots(self, x: torch.Tensor, dtype: torch.dtype, ghost: bool,
                       compute: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||g_i||², g_iᵀX_j)``; a held gradient (possibly bf16) is read in the accumulation dtype."""
        if self.g is not None:
            g = as_dtype(self.g, dtype)
            return g.pow(2).sum(dim=(1, 2)), torch.einsum("boi,moi->bm", g, x.to(dtype))
        return norms_and_dots(self.a, self.b, x, dtype, ghost, compute)

    def dots(self, x: torch.Tensor, dtype: torch.dtype, ghost: bool,
             compute: torch.dtype | None = None) -> torch.Tensor:
        """``g_iᵀX_j`` (b, m)."""
        if self.g is not None:
            return torch.einsum("boi,moi->bm", as_dtype(self.g, dtype), x.to(dtype))
        return dots(self.a, self.b, x, dtype, ghost, compute)

    def weighted_sum(self, w: torch.Tensor, dtype: torch.dtype, compute: torch.dtype | None = None) -> torch.Tensor:
        """``Σ_i w[i, j] g_i`` (m, o, i)."""
        if self.g is not None:
            return torch.einsum("bm,boi->moi", w.to(dtype), as_dtype(self.g, dtype))
        return weighted_sum(self.a, self.b, w, dtype, compute)


def input_leaders(inputs: Sequence[torch.Tensor]) -> list[int]:
    """For each module, the first module that reads the very same input tensor (q/k/v share one)."""
    first: dict[tuple, int] = {}
    out = []
    for k, a in enumerate(inputs):
        key = (a.untyped_storage().data_ptr(), a.storage_offset(), tuple(a.shape), a.stride())
        out.append(first.setdefault(key, k))
    return out


def choose_materialized(
    b: int, t: int, shapes: Sequence[tuple[int, int]], leaders: Sequence[int], ghost: Sequence[bool],
    model_bytes: int, acc_bytes: int,
) -> tuple[list[bool], int]:
    """Per module: hold the materialized gradient (True) or the factors; and the batch's bytes held.

    Only modules on the materialized path (``not ghost``) may be held as gradients, and only when
    ``b·o·i`` accumulation-dtype numbers are fewer bytes than their factors (``A`` counted once
    per shared input).
    """
    a_held: set[int] = set()
    choice, total = [], 0
    for k, (o, i) in enumerate(shapes):
        a_cost = 0 if leaders[k] in a_held else b * t * i * model_bytes
        factor_cost = b * t * o * model_bytes + a_cost
        grad_cost = b * o * i * acc_bytes
        use_grad = not ghost[k] and grad_cost < factor_cost
        if not use_grad:
            a_held.add(leaders[k])
        choice.append(use_grad)
        total += grad_cost if use_grad else factor_cost
    return choice, total


def represent(cap: Captured, shapes: Sequence[tuple[int, int]], ghost: Sequence[bool],
              precision: Precision) -> tuple[list[ModuleFactors], int]:
    """A captured train batch as per-module factors (see module docstring) and its bytes held.

    Materialized gradients are held in ``precision.compute`` (bf16 under ``stats_precision="bf16"``: half
    the bytes; read back in the accumulation dtype).
    """
    a0 = cap.inputs[0]
    compute = precision.compute
    choice, nbytes = choose_materialized(a0.shape[0], a0.shape[1], shapes, input_leaders(cap.inputs), ghost,
                                         a0.element_size(), torch.finfo(compute).bits // 8)
    out = [ModuleFactors(g=per_example_grads(a, b, precision.acc, compute)) if mat else ModuleFactors(a=a, b=b)
           for a, b, mat in zip(cap.inputs, cap.grads, choice, strict=True)]
    return out, nbytes


@dataclass
class HeldBatch:
    factors: list[ModuleFactors]
    losses: torch.Tensor


class FactorStore:
    """Holds train batches' factors (by batch number) until ``budget`` bytes are used."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.held: dict[int, HeldBatch] = {}
        self.refused = 0

    def offer(self, batch_no: int, factors: list[ModuleFactors], losses: torch.Tensor, nbytes: int) -> bool:
        """Keep the batch when it fits in what is left of the budget."""
        if self.used + nbytes > self.budget:
            self.refused += 1
            return False
        self.held[batch_no] = HeldBatch(factors, losses)
        self.used += nbytes
        return True

    def get(self, batch_no: int) -> HeldBatch | None:
        return self.held.get(batch_no)

    def clear(self) -> None:
        self.held.clear()
        self.used = 0
