"""The demo's evaluation: held-out data files, lm-eval of every model, vLLM serving and directory checks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, TextIO

from layerif_plugins.data import EOT_SEPARATOR, read_records
from layerif_plugins.errors import ConfigError, LayerIFError
from layerif_plugins.io import atomic_write_text
from layerif_plugins.pipelines.demo_config import DemoConfig
from layerif_plugins.pipelines.demo_result import Progress, StageClock, log_progress


def _write_docs(path: Path, docs: Sequence[str]) -> Path:
    return atomic_write_text(path, f"\n{EOT_SEPARATOR}\n".join(docs) + "\n")


def write_heldout(config: DemoConfig, out: Path) -> dict[str, Path]:
    """Evaluation files under ``out/data``: per task, documents the scorer never saw (and the MC items)."""
    from layerif_plugins.evaluation.tasks import write_tinystories_mc

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    mc: dict[str, Path] = {}
    for task in config.tasks:
        docs = [r for r in read_records(task.val or task.train) if isinstance(r, str)]
        first = config.heldout_start(task)
        ppl_docs = docs[first : first + config.n_eval_docs]
        mc_docs = docs[first + config.n_eval_docs :]
        if len(ppl_docs) < config.n_eval_docs or (task.mc and len(mc_docs) < config.n_mc):
            raise ConfigError(
                f"not enough held-out {task.label} documents for --n-eval-docs {config.n_eval_docs}"
                + (f" and --n-mc {config.n_mc}" if task.mc else "") + f" after the first {first}; lower them")
        files[task.name] = _write_docs(data / f"{task.name}_heldout.txt", ppl_docs)
        if task.mc:
            mc[task.mc_name] = write_tinystories_mc(data / f"{task.mc_name}.jsonl", stories=mc_docs, n=config.n_mc)
    return {**files, **mc}


def evaluate_all(models: dict[str, Path], heldout: dict[str, Path], config: DemoConfig, out: Path,
                 clock: StageClock, progress: Progress = log_progress,
                 reused: set[str] | None = None) -> dict[str, Any]:
    """lm-eval (hf backend) of every model on every held-out task; each result saved beside the models.

    A model in ``reused`` (made by an earlier run) keeps that run's evaluation when it covered the same
    tasks with the same numbers of documents.
    """
    from layerif_plugins.integrations.lm_eval import EvalResult, TaskSpec, evaluate

    mc_names = {t.mc_name for t in config.tasks if t.mc}
    tasks = [TaskSpec("mc" if name in mc_names else "perplexity", path, name=name) for name, path in heldout.items()]
    results = {}
    want_docs = {name: config.n_mc if name in mc_names else config.n_eval_docs for name in heldout}
    for k, (label, path) in enumerate(models.items(), 1):
        saved = out / "models" / f"eval_{label}.json"
        earlier = EvalResult.load(saved) if label in (reused or set()) and saved.is_file() else None
        if earlier is not None and {n: t.docs for n, t in earlier.tasks.items()} == want_docs:
            progress(clock.total, f"lm-eval {k}/{len(models)}: {label} (reusing the earlier run's)")
            results[label] = earlier
            continue
        progress(clock.total, f"lm-eval {k}/{len(models)}: {label}")
        with _output_to_log(config.log_dir, "lm_eval.log"):
            results[label] = evaluate(path, tasks, device="cpu", batch_size=config.eval_batch_size,
                                      task_dir=out / "lm_eval_tasks")
        results[label].save(saved)
        clock.done("lm-eval (hf backend)")
        r = results[label]
        progress(clock.total, "  " + ", ".join(f"{v.short} {r.metric(v.task, v.metric):{v.fmt}}"
                                               for v in config.metrics))
    return results


@contextmanager
def _output_to_log(log_dir: Path | None, name: str) -> Iterator[None]:
    """Send what a host library prints (lm-eval's progress bars, vLLM's start-up) to ``log_dir/name``.

    Also at the file-descriptor level: lm-eval runs ``git describe`` in a subprocess for its
    record, which prints "fatal: not a git repository" on the terminal outside a repository.
    """
    if log_dir is None:
        yield
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / name).open("a", encoding="utf-8") as fh, _descriptors_to(fh), redirect_stderr(fh), \
            redirect_stdout(fh):
        yield


@contextmanager
def _descriptors_to(fh: TextIO) -> Iterator[None]:
    """Point file descriptors 1 and 2 at ``fh`` (subprocesses, C code) while the block runs; put them back."""
    for stream in (sys.stdout, sys.stderr, fh):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        yield
    finally:
        fh.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _first_sentences(docs: Sequence[str], n: int) -> list[str]:
    from layerif_plugins.evaluation.tasks import split_sentences

    prompts = []
    for doc in docs:
        sentences = split_sentences(doc.strip())
        if sentences:
            prompts.append(sentences[0])
        if len(prompts) == n:
            break
    return prompts


def serve_all(models: dict[str, Path], heldout: Path, config: DemoConfig, clock: StageClock,
              progress: Progress = log_progress) -> dict[str, Any]:
    """Every model in one vLLM worker: perplexity beside the HF evaluator's on the same windows, tokens/s.

    Returns ``{"models": {label: {...}}, "device", "versions", "docs", "context"}``, or
    ``{"skipped": reason}`` when vLLM cannot run here (no vLLM environment, a model it cannot serve).
    """
    from layerif_plugins.evaluation.perplexity import perplexity, perplexity_documents
    from layerif_plugins.integrations.vllm_backend import VllmOptions, run_vllm_models, vllm_unavailable_reason
    from layerif_plugins.models import load_model_and_tokenizer

    reason = vllm_unavailable_reason()
    if reason is not None:
        progress(clock.total, f"vLLM section skipped: {reason}")
        return {"skipped": reason}
    docs = perplexity_documents(heldout, max_docs=config.vllm_docs)
    prompts = _first_sentences(docs, config.vllm_prompts)
    progress(clock.total, f"vLLM: {len(models)} models in one worker, {len(docs)} documents, {len(prompts)} prompts "
                          f"× {config.vllm_max_tokens} tokens")
    try:
        with _output_to_log(config.log_dir, "vllm.log"):
            results = run_vllm_models(list(models.values()), docs, prompts, max_tokens=config.vllm_max_tokens,
                                      context_length=config.vllm_context,
                                      options=VllmOptions(kv_cache_gib=config.vllm_kv_cache_gib))
    except LayerIFError as exc:
        progress(clock.total, f"vLLM section skipped: {exc}")
        return {"skipped": str(exc)}
    clock.done("vLLM serving")
    rows: dict[str, Any] = {}
    for (label, path), res in zip(models.items(), results, strict=True):
        model, tok = load_model_and_tokenizer(path, device="cpu")
        hf = perplexity(model, tok, docs, context_length=config.vllm_context)
        vllm_ppl = res.perplexity.perplexity if res.perplexity else float("nan")
        rows[label] = {"hf_token_perplexity": hf.perplexity, "vllm_token_perplexity": vllm_ppl,
                       "relative_difference": abs(vllm_ppl - hf.perplexity) / hf.perplexity,
                       "gen_tokens": res.gen_tokens, "gen_seconds": res.gen_seconds,
                       "gen_tokens_per_s": res.gen_tokens_per_s, "layers": model.config.num_hidden_layers,
                       "bytes_on_disk": sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))}
        progress(clock.total, f"  {label}: HF ppl {hf.perplexity:.4f}, vLLM {vllm_ppl:.4f}, "
                              f"{res.gen_tokens_per_s:.0f} generated tokens/s")
    clock.done("HF perplexity (vLLM comparison)")
    device = results[0].device if results else "?"
    return {"models": rows, "device": device, "versions": results[0].versions if results else {},
            "docs": len(docs), "context": config.vllm_context, "prompts": len(prompts),
            "max_tokens": config.vllm_max_tokens}


def vllm_status(path: Path) -> str:
    """``"ok"`` when vLLM can load the directory (CPU-side check), else ``"no: <reason>"``."""
    from layerif_plugins.integrations.vllm_backend import check_vllm_dir

    try:
        check_vllm_dir(path)
    except LayerIFError as exc:
        return f"no: {str(exc)[:80]}"
    return "ok"



__all__ = ["evaluate_all", "serve_all", "vllm_status", "write_heldout"]
