"""Serve a saved (pruned) model with vLLM: perplexity from ``prompt_logprobs``, generation tokens/s.

vLLM 0.33 needs CUDA torch 2.14.0 and pins ``compressed-tensors==0.17.0`` while
llm-compressor 0.14 pins 0.19.0, so vLLM lives in its **own environment** and runs in a
subprocess: :mod:`layerif_plugins.integrations.vllm_backend.worker` is started with the interpreter
``python=`` / ``$LAYERIF_VLLM_PYTHON`` / ``.venv-vllm/bin/python`` (built by ``make
vllm-env`` on a GPU machine); requests and results travel as JSON files. Everything that
needs no GPU happens here, in the main environment: tokenizing, rolling windows (the same
scheme as :func:`layerif_plugins.evaluation.perplexity.perplexity`), and :func:`check_vllm_dir`, which
verifies on CPU that a saved directory has what vLLM needs::

    check_vllm_dir("pruned")                        # raises ModelError naming what is wrong
    res = run_vllm("pruned", texts="valid.txt", prompts=["Once upon a time"])
    res.perplexity.word_perplexity, res.gen_tokens_per_s
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerif_plugins.errors import ConfigError, DataError, ModelError
from layerif_plugins.evaluation.checks import check_vllm_dir
from layerif_plugins.evaluation.documents import read_perplexity_docs
from layerif_plugins.evaluation.perplexity import PerplexityResult, rolling_windows

logger = logging.getLogger(__name__)

ENV_VAR = "LAYERIF_VLLM_PYTHON"
DEFAULT_PYTHON = Path(".venv-vllm") / "bin" / "python"
WORKER = Path(__file__).with_name("worker.py")
BUILD_HINT = (
    "build it with `make vllm-env` on a machine with an NVIDIA GPU (a separate venv with vllm==0.33.0, "
    "CUDA torch 2.14.0, lm-eval), or set LAYERIF_VLLM_PYTHON to a python that has vllm installed"
)


# ---------------------------------------------------------------- the directory check (CPU)


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


_PROBE = (
    "import json, sys\n"
    "try:\n    import vllm\nexcept Exception as e:\n"
    "    print(json.dumps({'vllm': None, 'error': f'{type(e).__name__}: {e}'})); sys.exit(0)\n"
    "import torch\n"
    "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, 'cuda': torch.cuda.is_available(),"
    " 'devices': torch.cuda.device_count()}))\n"
)


def probe_vllm(python: str | Path | None = None, timeout: float = 300) -> dict[str, Any]:
    """Check that the vLLM interpreter imports vllm and sees a CUDA device; return versions."""
    exe = vllm_python(python)
    try:
        proc = subprocess.run([str(exe), "-I", "-c", _PROBE], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"could not run the vLLM interpreter {exe}: {exc}; {BUILD_HINT}") from exc
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise ConfigError(
            f"{exe} failed to report its vllm version (exit {proc.returncode}): {proc.stderr.strip()[-400:]}; "
            f"{BUILD_HINT}"
        ) from None
    if not info.get("vllm"):
        raise ConfigError(f"{exe} has no vllm ({info.get('error')}); {BUILD_HINT}")
    if not info.get("cuda"):
        raise ConfigError(
            f"{exe} has vllm {info['vllm']} (torch {info.get('torch')}) but sees no CUDA device; vLLM 0.33 cannot "
            "start on a CPU-only machine ('Device string must not be empty'). Run on a GPU machine"
        )
    return {"python": str(exe), **info}


def vllm_unavailable_reason(python: str | Path | None = None) -> str | None:
    """None when vLLM can run here, else why not (used to skip tests and demo steps)."""
    try:
        probe_vllm(python)
    except ConfigError as exc:
        return str(exc)
    return None


def run_worker(request: Mapping[str, Any], python: str | Path | None = None, timeout: float | None = None) -> dict:
    """Run the worker with ``request`` in the vLLM environment; its output streams to our stderr; return the response.

    The interpreter is probed first (vllm importable, a CUDA device visible) so that a wrong
    environment fails with instructions rather than a traceback from inside vLLM.
    """
    exe = vllm_python(python)
    probe_vllm(exe)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    with tempfile.TemporaryDirectory(prefix="layerif-vllm-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(dict(request)), encoding="utf-8")
        tail: deque[str] = deque(maxlen=40)
        cmd = [str(exe), "-I", str(WORKER), str(req_path), str(resp_path)]
        logger.info("vLLM worker: %s", " ".join(cmd))
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                sys.stderr.write(line)
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
        if "Device string must not be empty" in resp.get("error", "") or "vllm._C" in resp.get("error", ""):
            hint = " (vLLM found no GPU: it cannot run on a CPU-only machine)"
        raise ModelError(f"vLLM failed: {resp.get('error')}{hint}\n{resp.get('traceback', '')}")
    return resp


# ---------------------------------------------------------------- perplexity + generation


def perplexity_windows(
    tokenizer: Any, docs: Sequence[str], context_length: int
) -> tuple[list[tuple[list[int], int]], int]:
    """``([(prompt_ids, n_score), ...], n_tokens)``: the rolling windows of every document as vLLM prompts.

    The same windows as :func:`layerif_plugins.evaluation.perplexity.perplexity` with the same
    ``context_length``: each prompt is ``[BOS] + doc`` sliced so that its last ``n_score``
    tokens are the ones the window predicts (a prompt is at most ``context_length + 1`` long).
    """
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[list[int], int]] = []
    n_tokens = 0
    for text in docs:
        toks = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        seq = [prefix, *toks]
        n_tokens += len(toks)
        for s, e, n_pred in rolling_windows(len(toks), context_length):
            out.append((seq[s : e + 1], n_pred))
    return out, n_tokens


@dataclass
class VllmResult:
    model: str
    perplexity: PerplexityResult | None
    generations: list[str]
    gen_tokens: int
    gen_seconds: float
    prompt_tokens: int
    score_seconds: float
    load_seconds: float
    versions: dict[str, str]

    @property
    def gen_tokens_per_s(self) -> float:
        return self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.score_seconds if self.score_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "perplexity": self.perplexity.to_dict() if self.perplexity else None,
                "generations": self.generations, "gen_tokens": self.gen_tokens, "gen_seconds": self.gen_seconds,
                "gen_tokens_per_s": self.gen_tokens_per_s, "prompt_tokens": self.prompt_tokens,
                "score_seconds": self.score_seconds, "prompt_tokens_per_s": self.prompt_tokens_per_s,
                "load_seconds": self.load_seconds, "versions": self.versions}


def run_vllm(
    model_dir: str | Path,
    texts: str | Path | Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    max_tokens: int = 64,
    context_length: int | None = None,
    max_docs: int | None = None,
    python: str | Path | None = None,
    llm_args: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> VllmResult:
    """Load ``model_dir`` with ``vllm.LLM`` once: perplexity on ``texts`` and greedy generation for ``prompts``.

    ``context_length`` defaults to ``max_position_embeddings - 1`` so that every prompt fits
    ``max_model_len``; ``llm_args`` go to ``vllm.LLM`` (``dtype``, ``gpu_memory_utilization`` …).
    """
    from transformers import AutoTokenizer


    check = check_vllm_dir(model_dir)
    exe = vllm_python(python)
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    max_pos = int(config.get("max_position_embeddings") or 2048)
    ctx = context_length or max_pos - 1
    if ctx + 1 > max_pos:
        raise ConfigError(f"context_length={ctx}: prompts of {ctx + 1} tokens exceed max_position_embeddings={max_pos}")
    windows: list[tuple[list[int], int]] = []
    docs: list[str] = []
    n_tokens = 0
    if texts is not None:
        docs = read_perplexity_docs(texts, max_docs=max_docs) if isinstance(texts, (str, Path)) else list(texts)
        if not docs:
            raise DataError("no documents to score")
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        windows, n_tokens = perplexity_windows(tok, docs, ctx)
    if not windows and not prompts:
        raise ConfigError("nothing to do: give texts (perplexity) and/or prompts (generation)")
    request = {"mode": "score", "model": str(Path(model_dir).resolve()), "windows": windows,
               "prompts": list(prompts or []), "max_tokens": max_tokens,
               "llm_args": {"max_model_len": ctx + 1, **(llm_args or {})}}
    logger.info("vLLM: %s (%s), %d windows, %d prompts", model_dir, check.architecture, len(windows),
                len(prompts or []))
    resp = run_worker(request, exe, timeout)
    ppl = None
    if windows:
        nll = -sum(resp["window_logprobs"])
        ppl = PerplexityResult(nll=nll, tokens=n_tokens, words=_words(docs),
                               bytes=sum(len(d.encode("utf-8")) for d in docs), docs=len(docs))
    return VllmResult(model=str(model_dir), perplexity=ppl, generations=resp.get("generations", []),
                      gen_tokens=int(resp.get("gen_tokens", 0)), gen_seconds=float(resp.get("gen_seconds", 0.0)),
                      prompt_tokens=int(resp.get("prompt_tokens", 0)),
                      score_seconds=float(resp.get("score_seconds", 0.0)),
                      load_seconds=float(resp.get("load_seconds", 0.0)), versions=resp.get("versions", {}))


def _words(docs: Sequence[str]) -> int:
    return sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval's word count, as in evaluate.perplexity


def run_lm_eval_vllm(
    model_dir: str | Path,
    task_dir: str | Path,
    groups: Sequence[tuple[list[str], bool | None]],
    *,
    batch_size: int | str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    python: str | Path | None = None,
    llm_args: Mapping[str, Any] | None = None,
    tokenizer: str | Path | None = None,
) -> dict[str, Any]:
    """lm-eval's ``vllm`` model in the vLLM environment on the task files of ``task_dir``; raw lm-eval results."""
    check_vllm_dir(model_dir)
    args: dict[str, Any] = {"dtype": dtype, **(llm_args or {})}
    if max_length:
        args["max_model_len"] = max_length
    request = {"mode": "lm_eval", "model": str(Path(model_dir).resolve()),
               "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None,
               "include_path": str(Path(task_dir).resolve()), "groups": [[list(n), b] for n, b in groups],
               "batch_size": batch_size, "llm_args": args}
    return run_worker(request, python)["results"]
