"""Data parallelism through ``torch.distributed`` (``torchrun``): shards, reductions, rank-0 I/O.

The engine calls these helpers unconditionally; without an initialised process group they
are no-ops (world size 1), so one code path serves one process and many.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the current process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard(n: int) -> list[int]:
    """This rank's example indices (strided, so every rank gets a similar mix of lengths)."""
    size, rank = world()
    return list(range(rank, n, size))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (per-example arrays: each rank fills its own rows, zeros elsewhere)."""
    size, _ = world()
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world()[0] > 1:
        dist.barrier()


def is_main() -> bool:
    return world()[1] == 0


def init_from_env(device_type: str) -> torch.device | None:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    gloo on CPU, nccl on CUDA; returns this rank's device (``cuda:LOCAL_RANK`` on GPU) or None
    when not launched distributed.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return None
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the launcher (``--nproc``)

#: worker lines the parent replaces by its own report (a signal it forwarded, a stop after another rank failed)
_STOPPED_WORDS = ("error: terminated (SIGTERM)", "error: interrupted (Ctrl-C)")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Relay:
    """Copy the workers' stderr to ours, line by line: each error line once (every rank reports the same bad
    input), and none of the "terminated" lines of workers this launcher stopped (the parent reports that)."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.stopping = False
        self.threads: list[threading.Thread] = []

    def follow(self, stream: Any) -> None:
        import threading

        thread = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _copy(self, stream: Any) -> None:
        import sys

        for line in iter(stream.readline, ""):
            with self.lock:
                if ": error: " in line:
                    if line in self.seen or (self.stopping and any(w in line for w in _STOPPED_WORDS)):
                        continue
                    self.seen.add(line)
                sys.stderr.write(line)
                sys.stderr.flush()
        stream.close()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=10)


def launch_workers(cli_args: list[str], nproc: int, grace_s: float = 60.0) -> int:
    """Run ``python -m layerif_plugins.cli CLI_ARGS`` as ``nproc`` ranks of one process group on this machine.

    What ``torchrun --standalone --nproc-per-node N`` does for ``--nproc N`` (the same
    ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` environment, read by
    :func:`init_from_env`), with the guarantees a scheduler needs:

    * the workers form one process group of their own (a terminal's Ctrl-C reaches this
      process only, it is not the foreground group); a SIGINT / SIGTERM received here is forwarded to the whole group,
      and this function **waits until every worker has exited** (``grace_s`` seconds, then
      SIGKILL) before the signal is raised again here (``KeyboardInterrupt`` / the CLI's
      exit 143) - no worker is left running, or writing ``--out``, after the command reported;
    * a worker that fails stops the others (they would wait in a collective), and its exit
      code is returned; the bad input every rank reports is printed once.
    """
    import signal
    import subprocess
    import sys
    import threading
    import time

    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "NODE_RANK": "0"}
    received: list[tuple[int, float]] = []
    relay = _Relay()
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        received.append((signum, time.monotonic()))
        relay.stopping = True
        _killpg(procs[0].pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed: int | None = None
    try:
        for rank in range(nproc):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            group = procs[0].pid if procs else 0  # one new process group (a terminal's Ctrl-C goes to ours only)
            proc = subprocess.Popen([sys.executable, "-m", "layerif_plugins.cli", *cli_args], env=env,
                                    stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                                    process_group=group)
            procs.append(proc)
            relay.follow(proc.stderr)
        stop_at: float | None = None
        while any(p.poll() is None for p in procs):
            if failed is None and not received:
                codes = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if codes:
                    failed, relay.stopping = codes[0], True
                    _killpg(procs[0].pid, signal.SIGTERM)
            started = received[0][1] if received else None
            if stop_at is None and (started is not None or failed is not None):
                stop_at = (started or time.monotonic()) + grace_s
            if stop_at is not None and time.monotonic() > stop_at:
                _killpg(procs[0].pid, signal.SIGKILL)
                stop_at = time.monotonic() + grace_s
            time.sleep(0.1)
        _wait_group_gone(procs[0].pid, grace_s)
    finally:
        if procs and any(p.poll() is None for p in procs):  # an error in this function: leave nothing running
            _killpg(procs[0].pid, signal.SIGKILL)
            for p in procs:
                p.wait()
        relay.join()
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if received:
        signal.raise_signal(received[0][0])
    if failed is not None:
        return failed
    return next((p.returncode for p in procs if p.returncode != 0), 0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, grace_s: float) -> None:
    """Wait until no process of the group ``pgid`` is left (a worker's own children included); SIGKILL after grace."""
    import signal
    import time

    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            _killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + grace_s
        time.sleep(0.05)
