"""Runs inside the vLLM environment; started by :mod:`layerif_plugins.integrations.vllm_backend`, never imported there.

vLLM 0.33 needs CUDA torch 2.14.0 and compressed-tensors 0.17.0, which cannot live next to
llm-compressor, so this script imports only the standard library, ``vllm`` and (for the
lm-eval mode) ``lm_eval``. It is run as ``python -I worker.py REQUEST.json RESPONSE.json``
(``-I``: the vLLM environment's own packages only, no user site or ``PYTHONPATH``). The
request says what to do:

* ``mode="score"``: load ``model`` with ``vllm.LLM``; for every ``windows`` entry
  ``[token_ids, n_score]`` sum the prompt log-probabilities of its last ``n_score`` tokens
  (``prompt_logprobs=0``; perplexity is computed by the caller); greedily generate
  ``max_tokens`` tokens for every ``prompts`` entry and time both (tokens/s).
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


def _llm(req: dict[str, Any]) -> Any:
    from vllm import LLM

    args = {"dtype": "auto", "enforce_eager": True, "seed": 0, **req.get("llm_args", {})}
    return LLM(model=req["model"], tokenizer=req.get("tokenizer") or req["model"], **args)


def _score(req: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = _llm(req)
    out: dict[str, Any] = {"load_seconds": time.perf_counter() - t0}
    windows = req.get("windows") or []
    if windows:
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        t1 = time.perf_counter()
        res = llm.generate([{"prompt_token_ids": ids} for ids, _ in windows], params, use_tqdm=True)
        out["score_seconds"] = time.perf_counter() - t1
        out["window_logprobs"] = [
            sum_prompt_logprobs(r.prompt_logprobs, ids, n) for r, (ids, n) in zip(res, windows, strict=True)
        ]
        out["prompt_tokens"] = sum(len(ids) for ids, _ in windows)
    prompts = req.get("prompts") or []
    if prompts:
        params = SamplingParams(max_tokens=int(req.get("max_tokens", 64)), temperature=0.0, ignore_eos=True)
        t1 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=True)
        out["gen_seconds"] = time.perf_counter() - t1
        out["generations"] = [r.outputs[0].text for r in res]
        out["gen_tokens"] = sum(len(r.outputs[0].token_ids) for r in res)
    return out


def _lm_eval(req: dict[str, Any]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.vllm_causallms import VLLM
    from lm_eval.tasks import TaskManager

    args = {"dtype": "auto", "enforce_eager": True, **req.get("llm_args", {})}
    lm = VLLM(pretrained=req["model"], tokenizer=req.get("tokenizer") or req["model"],
              batch_size=req.get("batch_size", "auto"), **args)
    manager = TaskManager(include_path=req["include_path"], include_defaults=False)
    results: dict[str, Any] = {}
    for names, bos in req["groups"]:
        lm.add_bos_token = bos  # read at every tok_encode; see adapters/lm_eval.py
        res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, bootstrap_iters=0,
                                      log_samples=False)
        results.update(res["results"])
    return {"results": results}


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
