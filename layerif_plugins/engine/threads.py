"""CPU thread defaults that survive a busy machine.

Measured on a 2-core machine shared with other jobs (issue 15): the engine with two OpenMP
threads took 62 s instead of 19 s, because OpenMP's default wait policy lets idle threads
*spin* for a while at every barrier, and a spinning thread competes with the thread that still
has work (and with everyone else's processes). ``OMP_WAIT_POLICY=PASSIVE`` makes waiting
threads sleep and restored most of the loss; a plain fwd+bwd suffered far less.

:func:`configure_threads` applies two defaults, each only when the user has not chosen:

* ``OMP_WAIT_POLICY`` (default ``PASSIVE``) - set in ``os.environ`` unless already there;
* torch intra-op threads (default: the CPUs this process may run on, ``os.sched_getaffinity``)
  - ``torch.set_num_threads`` unless ``OMP_NUM_THREADS`` is set.

Override with the standard variables (``OMP_WAIT_POLICY=ACTIVE``, ``OMP_NUM_THREADS=4``) or
the arguments.

**When the wait policy takes effect.** The OpenMP runtime (libgomp in the Linux torch wheels)
reads ``OMP_WAIT_POLICY`` once, when it is loaded - that is, during ``import torch``. So:

* set in the shell (``OMP_WAIT_POLICY=PASSIVE layerif score ...``): always works;
* set by :func:`configure_threads` **before** ``torch`` is imported (first thing in a CLI
  entry point): works, the runtime is loaded afterwards;
* set after ``torch`` was imported: has no effect on this process (only on subprocesses,
  which inherit ``os.environ``); the function then reports ``wait_policy_effective=False``
  and logs how to fix it. :func:`threads_env` builds the environment for a subprocess.

The intra-op thread count can be changed at any time.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

WAIT_POLICIES = ("PASSIVE", "ACTIVE")


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` decided, and where each value came from."""

    num_threads: int
    num_threads_source: str  # "argument" | "OMP_NUM_THREADS" | "default"
    wait_policy: str
    wait_policy_source: str  # "argument" | "OMP_WAIT_POLICY" | "default"
    wait_policy_effective: bool  # False when torch was imported before the policy was set


def _check_policy(policy: str) -> str:
    policy = policy.upper()
    if policy not in WAIT_POLICIES:
        from layerif_plugins.errors import ConfigError

        raise ConfigError(f"wait_policy must be one of {WAIT_POLICIES}, got {policy!r}")
    return policy


def threads_env(num_threads: int | None = None, wait_policy: str | None = "PASSIVE",
                base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess with the defaults applied (user's variables kept unless given)."""
    env = dict(os.environ if base is None else base)
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = _check_policy(wait_policy)
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
    return env


def env_threads() -> int:
    """``OMP_NUM_THREADS`` as a thread count >= 1; else :class:`ConfigError` naming the variable.

    OpenMP takes the first entry of a comma list (nested levels), so ``"4,2"`` is 4.
    """
    from layerif_plugins.errors import ConfigError

    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    first = text.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise ConfigError(f"OMP_NUM_THREADS={text!r} is not a thread count: set it to a whole number >= 1 "
                          "(e.g. OMP_NUM_THREADS=2), or unset it to use every available CPU")
    return int(first)


def configure_threads(num_threads: int | None = None, wait_policy: str | None = None) -> ThreadSettings:
    """Apply the thread defaults (see module docstring); arguments win over variables over defaults.

    ``num_threads=None`` keeps ``OMP_NUM_THREADS`` when set, else uses :func:`available_cpus`;
    ``wait_policy=None`` keeps ``OMP_WAIT_POLICY`` when set, else ``PASSIVE``.
    """
    torch_loaded = "torch" in sys.modules
    if wait_policy is not None:
        policy, policy_source = _check_policy(wait_policy), "argument"
    elif os.environ.get("OMP_WAIT_POLICY"):
        policy, policy_source = os.environ["OMP_WAIT_POLICY"].upper(), "OMP_WAIT_POLICY"
    else:
        policy, policy_source = "PASSIVE", "default"
    effective = True
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != policy:
        os.environ["OMP_WAIT_POLICY"] = policy
        if torch_loaded:
            effective = False
            logger.info("OMP_WAIT_POLICY=%s set after torch was imported: it applies to subprocesses only; "
                        "export it in the shell (or call configure_threads before importing torch)", policy)

    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int):
            raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
        threads, source = num_threads, "argument"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        threads, source = env_threads(), "OMP_NUM_THREADS"
    else:
        threads, source = available_cpus(), "default"
    if threads < 1:
        from layerif_plugins.errors import ConfigError

        raise ConfigError(f"num_threads must be >= 1, got {threads}")
    if source != "OMP_NUM_THREADS":
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the runtime if torch is imported later
    if torch_loaded:
        import torch

        torch.set_num_threads(threads)
    settings = ThreadSettings(threads, source, policy, policy_source, effective)
    logger.debug("threads: %s", settings)
    return settings


REEXEC_MARK = "LAYERIF_THREADS_REEXEC"


def reexec_with_wait_policy(policy: str = "PASSIVE") -> None:
    """Restart this very command with ``OMP_WAIT_POLICY`` set, when torch is loaded and the user set none.

    ``import layerif_plugins`` loads torch (and the OpenMP runtime) before any of our code runs,
    so a command-line entry point can only apply the policy by re-executing itself
    (``os.execve`` with ``sys.orig_argv``, once: a marker variable prevents a loop). Call it first
    thing in a console-script / ``__main__`` entry point - never from library code or from a
    ``main(argv)`` that tests call in-process, since it replaces the running process.
    """
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get(REEXEC_MARK):
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = _check_policy(policy)
        return
    env = {**os.environ, "OMP_WAIT_POLICY": _check_policy(policy), REEXEC_MARK: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
