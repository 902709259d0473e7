"""lm-eval on local files: perplexity and multiple-choice tasks, offline, with the hf or vllm backend.

lm-eval finds tasks through YAML files; this adapter writes them for you. Every task's
data is first validated and normalised into a JSONL file next to its YAML (so errors name
the bad line, field mappings and string labels are resolved once, and ``data_files``
is an absolute path under the ``test`` split), then ``lm_eval.simple_evaluate`` runs with
``TaskManager(include_path=task_dir, include_defaults=False)``::

    from layerif_plugins.integrations.lm_eval import evaluate
    res = evaluate("pruned-dir", ["perplexity:valid.txt", "mc:qa.jsonl", "tinystories-mc"])
    res.metric("ppl_valid", "word_perplexity")

Task kinds:

* ``perplexity:FILE`` (``ppl:FILE``): ``loglikelihood_rolling`` over the documents of a
  text file (split like :func:`layerif_plugins.data.read_records`: ``<|endoftext|>`` lines
  or blank lines; ``.jsonl`` with a text field) → ``word_perplexity``, ``byte_perplexity``,
  ``bits_per_byte``. Every document is scored on its own after the BOS token, exactly as
  :func:`layerif_plugins.evaluation.perplexity.perplexity` does: the model runs with
  ``add_bos_token=False`` for these tasks, because the rolling windows already start with
  BOS (lm-eval's default would score a second BOS).
* ``mc:FILE``: multiple choice from JSONL objects ``{"question": str, "choices": [str, ...],
  "label": int | str}`` (``fields=`` maps other field names) → ``acc``, ``acc_norm``.
  The answer is scored as ``question + " " + choice``, the tokenizer's default special
  tokens apply (BOS for Llama-like models).
* ``tinystories-mc``: the built-in next-sentence task (:mod:`layerif_plugins.evaluation.tasks`);
  ``tinystories-ppl``: perplexity on the TinyStories validation split.

Offline: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` default to 1 and the datasets cache is
a folder inside the task directory, never the user's home.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from layerif_plugins.errors import ConfigError
from layerif_plugins.evaluation.checks import check_model_dir
from layerif_plugins.evaluation.documents import read_mc_items, read_perplexity_docs
from layerif_plugins.evaluation.tasks import BUILTIN_TASKS, builtin_task_rows
from layerif_plugins.io import atomic_write_json, atomic_write_text
from layerif_plugins.report import markdown_table

if TYPE_CHECKING:
    from layerif_plugins.integrations.vllm_backend import VllmOptions

logger = logging.getLogger(__name__)

TaskKind = Literal["perplexity", "mc"]
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
MC_METRICS = ("acc", "acc_norm")
_KIND_ALIASES = {"perplexity": "perplexity", "ppl": "perplexity", "mc": "mc", "multiple_choice": "mc"}


@dataclass(frozen=True)
class TaskSpec:
    """One task to evaluate.

    Attributes:
        kind: ``"perplexity"`` or ``"mc"``.
        path: the data file (None for a built-in task, which is built on demand).
        name: lm-eval task name (default: ``ppl_<stem>`` / ``mc_<stem>``).
        max_docs: keep the first N documents / items (None: all).
        fields: for ``mc``, the names of the question / choices / label fields in the file.
        text_field: for ``perplexity`` on ``.jsonl``, the text field.
        builtin: the built-in task's name, when this is one.
    """

    kind: TaskKind
    path: Path | None = None
    name: str | None = None
    max_docs: int | None = None
    fields: Mapping[str, str] | None = None
    text_field: str = "text"
    builtin: str | None = None

    def task_name(self) -> str:
        if self.name:
            return self.name
        if self.builtin:
            return self.builtin.replace("-", "_")
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(self.path or "task").stem).strip("_") or "task"
        return f"{'ppl' if self.kind == 'perplexity' else 'mc'}_{stem}"


def parse_task(spec: str | TaskSpec, max_docs: int | None = None, fields: Mapping[str, str] | None = None) -> TaskSpec:
    """``"perplexity:FILE"`` / ``"ppl:FILE"``, ``"mc:FILE"``, ``"tinystories-mc"``, ``"tinystories-ppl"`` → TaskSpec."""
    if isinstance(spec, TaskSpec):
        return spec
    spec = spec.strip()
    if spec in BUILTIN_TASKS:
        kind: TaskKind = "mc" if spec.endswith("-mc") else "perplexity"
        return TaskSpec(kind=kind, builtin=spec, max_docs=max_docs)
    kind_s, sep, path = spec.partition(":")
    if not sep or kind_s not in _KIND_ALIASES or not path:
        raise ConfigError(
            f"task {spec!r}: use perplexity:FILE, mc:FILE, or a built-in task ({', '.join(BUILTIN_TASKS)})"
        )
    kind = "perplexity" if _KIND_ALIASES[kind_s] == "perplexity" else "mc"
    return TaskSpec(kind=kind, path=Path(path), max_docs=max_docs, fields=fields if kind == "mc" else None)


# ---------------------------------------------------------------- reading and validating task data


# ---------------------------------------------------------------- writing lm-eval task files


@dataclass(frozen=True)
class BuiltTask:
    name: str
    kind: TaskKind
    source: str
    docs: int
    yaml: Path


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def _task_yaml(name: str, kind: TaskKind, data_file: Path, cache_dir: Path) -> str:
    head = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {_yaml_str(str(data_file.resolve()))}",
        f"  cache_dir: {_yaml_str(str(cache_dir.resolve()))}",
        "test_split: test",
    ]
    if kind == "perplexity":
        body = [
            "output_type: loglikelihood_rolling",
            'doc_to_text: ""',
            'doc_to_target: "{{text}}"',
            "metric_list:",
            *(f"  - metric: {m}\n    aggregation: {'bits_per_byte' if m == 'bits_per_byte' else 'weighted_perplexity'}"
              "\n    higher_is_better: false" for m in PERPLEXITY_METRICS),
        ]
    else:
        body = [
            "output_type: multiple_choice",
            'doc_to_text: "{{question}}"',
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{label}}"',
            "metric_list:",
            *(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in MC_METRICS),
        ]
    return "\n".join([*head, *body, "metadata:", "  version: 1.0", ""])


def write_tasks(specs: Sequence[TaskSpec], task_dir: str | Path) -> list[BuiltTask]:
    """Validate each task's data, write ``<name>.jsonl`` + ``<name>.yaml`` into ``task_dir``."""
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = task_dir / "datasets_cache"
    built: list[BuiltTask] = []
    seen: set[str] = set()
    for spec in specs:
        name = spec.task_name()
        if name in seen:
            raise ConfigError(f"two tasks are named {name!r} (a file task is named after its kind and file name): "
                              "copy one file under another name (--tasks ppl:a/valid.txt,ppl:b/valid-b.txt), or in "
                              "Python give one TaskSpec a distinct name=…")
        seen.add(name)
        if spec.builtin:
            rows, source = builtin_task_rows(spec.builtin, spec.max_docs)
        elif spec.path is None:
            raise ConfigError(f"task {name!r} has neither a file nor a built-in name")
        elif spec.kind == "perplexity":
            rows = [{"text": d} for d in read_perplexity_docs(spec.path, spec.text_field, spec.max_docs)]
            source = str(spec.path)
        else:
            rows = read_mc_items(spec.path, spec.fields, spec.max_docs)
            source = str(spec.path)
        data_file = task_dir / f"{name}.jsonl"
        atomic_write_text(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        yaml = atomic_write_text(task_dir / f"{name}.yaml", _task_yaml(name, spec.kind, data_file, cache_dir))
        built.append(BuiltTask(name, spec.kind, source, len(rows), yaml))
    return built


# ---------------------------------------------------------------- results


@dataclass
class TaskResult:
    name: str
    kind: TaskKind
    source: str
    docs: int
    metrics: dict[str, float]


@dataclass
class EvalResult:
    """Metrics per task, plus what was evaluated and how (JSON-friendly via :meth:`to_dict`)."""

    model: str
    backend: str
    tasks: dict[str, TaskResult]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)

    def metric(self, task: str, metric: str) -> float:
        if task not in self.tasks:
            raise ConfigError(f"no task {task!r} in these results (have {sorted(self.tasks)})")
        if metric not in self.tasks[task].metrics:
            raise ConfigError(f"task {task!r} has no metric {metric!r} (have {sorted(self.tasks[task].metrics)})")
        return self.tasks[task].metrics[metric]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        d["tasks"] = {k: TaskResult(**v) for k, v in d["tasks"].items()}
        return cls(**d)

    def table(self) -> str:
        rows = [[t.name, t.kind, t.docs, m, v] for t in self.tasks.values() for m, v in t.metrics.items()]
        return markdown_table(["task", "kind", "docs", "metric", "value"], rows)


def _collect(raw: Mapping[str, Any], built: Sequence[BuiltTask]) -> dict[str, TaskResult]:
    out = {}
    for t in built:
        if t.name not in raw:
            raise ConfigError(f"lm-eval returned no result for task {t.name!r} (got {sorted(raw)})")
        metrics = {}
        for key, val in raw[t.name].items():
            metric, _, _filter = key.partition(",")
            if _filter and isinstance(val, (int, float)) and not isinstance(val, bool):
                metrics[metric] = float(val)
        out[t.name] = TaskResult(t.name, t.kind, t.source, t.docs, metrics)
    return out


# ---------------------------------------------------------------- running


@contextmanager
def offline_env() -> Iterator[None]:
    """Hub and datasets offline unless the user chose otherwise; restored afterwards."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.setdefault(k, "1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def task_groups(built: Sequence[BuiltTask]) -> list[tuple[list[str], bool | None]]:
    """Tasks grouped by the ``add_bos_token`` they need: False for rolling perplexity, tokenizer default for MC."""
    ppl = [t.name for t in built if t.kind == "perplexity"]
    mc = [t.name for t in built if t.kind == "mc"]
    groups: list[tuple[list[str], bool | None]] = [(ppl, False), (mc, None)]
    return [(names, bos) for names, bos in groups if names]


def evaluate(
    model: Any,
    tasks: Sequence[str | TaskSpec],
    *,
    tokenizer: Any = None,
    backend: Literal["hf", "vllm"] = "hf",
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    max_length: int | None = None,
    max_docs: int | None = None,
    fields: Mapping[str, str] | None = None,
    task_dir: str | Path | None = None,
    vllm_python: str | Path | None = None,
    vllm_args: Mapping[str, Any] | None = None,
    vllm_options: VllmOptions | None = None,
) -> EvalResult:
    """Evaluate a model with lm-eval on local-file tasks.

    Args:
        model: an HF model directory, or (hf backend) an in-memory causal LM (then pass ``tokenizer``).
        tasks: ``"perplexity:FILE"``, ``"mc:FILE"``, built-in names, or :class:`TaskSpec` objects.
        tokenizer: a tokenizer object (in-memory model) or a tokenizer directory (default: the model dir).
        backend: ``"hf"`` in this process, or ``"vllm"`` (lm-eval's ``vllm`` model) in the vLLM
            environment, on CPU or GPU (see :mod:`layerif_plugins.integrations.vllm_backend`).
        device / dtype: hf backend placement (``auto``: cuda when available) and weight dtype
            (default ``float32`` for both backends: vLLM's ``auto`` would run a float32 checkpoint
            in bfloat16 / float16).
        max_length: context length for the model (default: the model config's).
        max_docs: keep the first N documents / items of every task without its own ``max_docs``.
        fields: multiple-choice field mapping applied to ``mc:`` tasks given as strings.
        task_dir: where the YAML + JSONL files and the datasets cache go (default: a temp dir, removed after).
        vllm_python / vllm_args: the vLLM interpreter and extra ``vllm.LLM`` arguments (vllm backend).
        vllm_options: KV-cache size, threads … (:class:`~layerif_plugins.integrations.vllm_backend.VllmOptions`);
            ``dtype`` and ``vllm_args``, when given, override its fields.
    """
    specs = [parse_task(t, fields=fields) for t in tasks]
    if not specs:
        raise ConfigError("no tasks given; e.g. perplexity:valid.txt, mc:items.jsonl, tinystories-mc")
    specs = [s if s.max_docs or not max_docs else TaskSpec(**{**s.__dict__, "max_docs": max_docs}) for s in specs]
    if backend not in ("hf", "vllm"):
        raise ConfigError(f"unknown backend {backend!r}; use hf or vllm")
    in_memory = not isinstance(model, (str, Path))
    if in_memory:
        if backend != "hf":
            raise ConfigError("an in-memory model is evaluated with backend='hf' only; save it to a directory first")
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            raise ConfigError("an in-memory model needs its tokenizer object: evaluate(model, tasks, tokenizer=tok)")
    else:
        check_model_dir(model, tokenizer if isinstance(tokenizer, (str, Path)) else None)
    _check_max_length(model, max_length)
    if dtype is None:
        dtype = vllm_options.dtype if backend == "vllm" and vllm_options is not None else "float32"
    tmp = None
    if task_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="layerif-lm-eval-")
        task_dir = tmp.name
    try:
        built = write_tasks(specs, task_dir)
        t0 = time.perf_counter()
        if backend == "hf":
            raw = _run_hf(model, tokenizer, built, task_dir, batch_size, device, dtype, max_length)
        else:
            from layerif_plugins.integrations.vllm_backend import VllmOptions, run_lm_eval_vllm

            opts = vllm_options or VllmOptions()
            opts = replace(opts, dtype=dtype, llm_args={**opts.llm_args, **(vllm_args or {})})
            raw = run_lm_eval_vllm(model, task_dir, task_groups(built), batch_size=batch_size,
                                   max_length=max_length, python=vllm_python, options=opts,
                                   tokenizer=tokenizer if isinstance(tokenizer, (str, Path)) else None)
        seconds = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    if in_memory:
        name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    else:
        name = str(model)
    import lm_eval

    config = {"batch_size": batch_size, "dtype": dtype, "max_length": max_length,
              "lm_eval": getattr(lm_eval, "__version__", "?"),
              "tasks": [asdict(s) | {"path": str(s.path) if s.path else None} for s in specs]}
    return EvalResult(model=name, backend=backend, tasks=_collect(raw, built), seconds=seconds, config=config)


def _check_max_length(model: Any, max_length: int | None) -> None:
    """A context longer than the model's positions is refused before any loading.

    Learned position tables would index out of range; RoPE models would run on positions
    they never saw and report a meaningless score.
    """
    if max_length is None:
        return
    if isinstance(model, (str, Path)):
        positions = json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    else:
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and max_length > int(positions):
        raise ConfigError(f"max_length {max_length} is longer than the model's {positions} positions "
                          f"(max_position_embeddings): use --max-length {positions} or less")


def _run_hf(
    model: Any, tokenizer: Any, built: Sequence[BuiltTask], task_dir: str | Path, batch_size: int,
    device: str, dtype: str, max_length: int | None,
) -> dict[str, Any]:
    from layerif_plugins.models import resolve_device

    with offline_env():
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        if isinstance(model, (str, Path)):
            tok = str(tokenizer) if tokenizer is not None else str(model)
            lm = HFLM(pretrained=str(model), tokenizer=tok, device=str(resolve_device(device)), dtype=dtype,
                      batch_size=batch_size, max_length=max_length)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        raw: dict[str, Any] = {}
        for names, bos in task_groups(built):
            # HFLM reads add_bos_token at every tok_encode: one loaded model serves both groups
            lm.add_bos_token = bos
            logger.info("lm-eval (hf): %s with add_bos_token=%s", ", ".join(names), bos)
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=batch_size,
                                          bootstrap_iters=0, log_samples=False)
            raw.update(out["results"])
    return raw
