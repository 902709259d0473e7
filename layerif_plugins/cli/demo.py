"""``layerif demo``: the whole story on the embedded stories260K model, in a few minutes on 2 CPU cores.

1. convert the llama2.c checkpoint to an HF directory;
2. score it with LayerIF on TinyStories (train → validation) and on Shakespeare (a task
   the model was not trained for);
3. prune it with llm-compressor's Wanda to 70% (parameter-weighted; by default also 30% and
   50%, where the 260K-parameter model still works) with uniform, OWL and LayerIF
   (TinyStories scores) per-layer ratios;
4. evaluate the dense model and the three pruned ones with lm-eval on held-out data
   (TinyStories and Shakespeare perplexity, the TinyStories next-sentence multiple choice)
   and check that each pruned directory is loadable by vLLM;
5. write ``report.md`` with the tables and PNG plots under ``--out``.

Held-out means: LayerIF's validation examples are the first ``--n-val`` TinyStories
validation stories, evaluation uses stories after them (and Shakespeare paragraphs far
after the scored ones), so the LayerIF ratios are not judged on the data that chose them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from layerif_plugins.allocate.sparsity import default_epsilon
from layerif_plugins.data import EOT_SEPARATOR, load_examples, pad_id_of, read_records
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.errors import ConfigError, LayerIFError
from layerif_plugins.io import atomic_write_text
from layerif_plugins.models import load_model_and_tokenizer, save_model_dir
from layerif_plugins.paths import shared_data, shared_dir, stories260k_checkpoint
from layerif_plugins.report import (
    allocations_markdown,
    eval_markdown,
    markdown_table,
    plot_allocations,
    plot_layer_scores,
    plot_metric,
    plot_sweep,
    scores_markdown,
    sweep_markdown,
)
from layerif_plugins.scorers import ScoringData, score_layers

ALLOCATIONS = ("uniform", "owl", "layerif")


def _spread(args: argparse.Namespace, allocation: str) -> float:
    return args.epsilon if args.epsilon is not None else default_epsilon(allocation)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="stories260K: LayerIF scores → Wanda 30/50/70%% (uniform/OWL/LayerIF) → lm-eval → report"
    )
    p.add_argument("--model", default=None, help="llama2.c .bin or HF dir (default: ../shared stories260K)")
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--params", default="attn", choices=["attn", "mlp", "all"])
    p.add_argument("--sparsity", default="0.3,0.5,0.7", help="global Wanda sparsities, comma-separated")
    p.add_argument("--epsilon", type=float, default=None,
                   help="per-layer spread for every allocation (default: each reference's, LayerIF ε 0.1, OWL λ 0.08)")
    p.add_argument("--n-calib", type=int, default=128, help="Wanda / OWL calibration examples (TinyStories train)")
    p.add_argument("--n-eval-docs", type=int, default=50, help="held-out documents per perplexity task")
    p.add_argument("--n-mc", type=int, default=200, help="items of the TinyStories multiple-choice task")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for this tiny model, and on a shared machine)")
    p.add_argument("--skip-prune", action="store_true", help="only score and evaluate the dense model")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


class _Clock:
    """Stage timings for the progress lines and the report."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def done(self, stage: str) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - self._last
        self._last = now
        return now - self.t0

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def _say(clock: _Clock, msg: str) -> None:
    print(f"[demo {clock.total:6.1f}s] {msg}", flush=True)


def _write_docs(path: Path, docs: list[str]) -> Path:
    return atomic_write_text(path, f"\n{EOT_SEPARATOR}\n".join(docs) + "\n")


def _held_out_data(out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Evaluation files under out/data: TinyStories / Shakespeare documents the scorer never saw, and the MC task."""
    from layerif_plugins.evaluation.tasks import write_tinystories_mc

    data = out / "data"
    data.mkdir(exist_ok=True)
    stories = [r for r in read_records(shared_data("tinystories", "valid.txt")) if isinstance(r, str)]
    plays = [r for r in read_records(shared_data("tinyshakespeare", "input.txt")) if isinstance(r, str)]
    first = max(args.n_val, 64)  # LayerIF validated on stories[:n_val]
    ppl_stories = stories[first : first + args.n_eval_docs]
    mc_stories = stories[first + args.n_eval_docs :]
    if len(ppl_stories) < args.n_eval_docs or len(mc_stories) < args.n_mc:
        raise ConfigError(f"not enough held-out TinyStories validation stories for --n-eval-docs {args.n_eval_docs} "
                          f"and --n-mc {args.n_mc} after the first {first}; lower them")
    start = 2 * (args.n_train + args.n_val)  # Shakespeare paragraphs well after the scored ones
    return {
        "tinystories": _write_docs(data / "tinystories_heldout.txt", ppl_stories),
        "shakespeare": _write_docs(data / "shakespeare_heldout.txt", plays[start : start + args.n_eval_docs]),
        "mc": write_tinystories_mc(data / "tinystories_mc.jsonl", stories=mc_stories, n=args.n_mc),
    }


def _score(model: Any, tok: Any, out: Path, args: argparse.Namespace, clock: _Clock) -> tuple[list, list[str]]:
    config = InfluenceConfig(params=args.params, batch_size=16, show_progress=not args.quiet)
    stories = (shared_data("tinystories", "train.txt"), shared_data("tinystories", "valid.txt"))
    shakespeare = shared_data("tinyshakespeare", "input.txt")
    results, labels = [], []
    for task in ("tinystories", "shakespeare"):
        if task == "shakespeare":
            # one file of paragraphs: the first n_train train, the next n_val validate
            train = load_examples(shakespeare, tok, args.max_length, n=args.n_train + args.n_val)
            train, val = train.subset(range(args.n_train)), train.subset(range(args.n_train, len(train)))
        else:
            train = load_examples(stories[0], tok, args.max_length, n=args.n_train)
            val = load_examples(stories[1], tok, args.max_length, n=args.n_val)
        scores = score_layers(model, "layerif", ScoringData(train=train, val=val, pad_id=pad_id_of(tok)), config=config)
        scores.params["max_length"] = args.max_length
        scores.save(out / f"scores_{task}.json")
        results.append(scores)
        labels.append(task)
        clock.done(f"LayerIF scores ({task})")
        _say(clock, f"LayerIF {task}: {', '.join(f'{s:.4g}' for s in scores.scores)} → scores_{task}.json")
    return results, labels


def _sparsities(spec: str) -> list[float]:
    try:
        values = sorted({float(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7") from None
    if not values or not all(0 < v < 1 for v in values):
        raise ConfigError(f"--sparsity {spec!r}: give numbers in (0, 1), comma-separated, e.g. 0.5,0.7")
    return values


def _label(sparsity: float, alloc: str) -> str:
    return f"wanda{round(100 * sparsity)}-{alloc}"


def _prune(hf_dir: Path, out: Path, args: argparse.Namespace, clock: _Clock) -> dict[str, dict[str, Any]]:
    """Every (sparsity, allocation) pair → its prune_model report, keyed by the model label."""
    from layerif_plugins.integrations.llmcompressor import prune_model

    reports = {}
    for sparsity in _sparsities(args.sparsity):
        for alloc in ALLOCATIONS:
            label = _label(sparsity, alloc)
            _say(clock, f"Wanda {sparsity:.0%} with {alloc} ratios → {label}")
            rep = prune_model(
                hf_dir, out / "models" / label, algorithm="wanda", sparsity=sparsity, allocation=alloc,
                scores=out / "scores_tinystories.json" if alloc == "layerif" else None, epsilon=args.epsilon,
                calib=shared_data("tinystories", "train.txt"), n_calib=args.n_calib, max_length=args.max_length,
                overwrite=True, show_progress=not args.quiet,
            )
            reports[label] = {**rep, "label": label, "alloc": alloc, "sparsity": sparsity}
            clock.done("prune (llm-compressor oneshot)")
            per_layer = ", ".join(format(row["measured"], ".3f") for row in rep["layers"])
            _say(clock, f"  per-layer {per_layer}; measured {rep['weighted_mean_measured']:.4f}")
    return reports


def _vllm_status(path: Path) -> str:
    from layerif_plugins.integrations.vllm_backend import check_vllm_dir

    try:
        check_vllm_dir(path)
    except LayerIFError as exc:
        return f"no: {str(exc)[:80]}"
    return "ok"


def run(args: argparse.Namespace) -> int:
    model_path = Path(args.model) if args.model else stories260k_checkpoint()
    if not model_path.exists():
        raise ConfigError(
            f"demo model not found at {model_path} (shared assets looked for in {shared_dir()}). "
            "Set LAYERIF_SHARED to the shared/ folder, or pass --model PATH (a llama2.c .bin or an HF dir)."
        )
    _sparsities(args.sparsity)  # fail before any work
    import torch

    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, model_path)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, model_path: Path) -> int:
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    model, tok = load_model_and_tokenizer(model_path, device="cpu")
    hf_dir = save_model_dir(model, tok, out / "models" / "dense")
    clock.done("convert")
    _say(clock, f"converted {model_path.name} → {hf_dir}")

    scores, labels = _score(model, tok, out, args, clock)
    png_scores = plot_layer_scores(scores, labels, out / "layer_scores.png")

    reports = {} if args.skip_prune else _prune(hf_dir, out, args, clock)
    models = {"dense": hf_dir, **{label: Path(r["out"]) for label, r in reports.items()}}

    data = _held_out_data(out, args)
    from layerif_plugins.integrations.lm_eval import TaskSpec, evaluate

    tasks = [TaskSpec("perplexity", data["tinystories"], name="tinystories"),
             TaskSpec("perplexity", data["shakespeare"], name="shakespeare"),
             TaskSpec("mc", data["mc"], name="tinystories_mc")]
    results = {}
    for k, (label, path) in enumerate(models.items(), 1):
        _say(clock, f"lm-eval {k}/{len(models)}: {label}")
        results[label] = evaluate(path, tasks, device="cpu", batch_size=16, task_dir=out / "lm_eval_tasks")
        results[label].save(out / "models" / f"eval_{label}.json")
        clock.done("lm-eval (hf backend)")
        r = results[label]
        _say(clock, f"  TinyStories word ppl {r.metric('tinystories', 'word_perplexity'):.4g}, "
                    f"Shakespeare bits/byte {r.metric('shakespeare', 'bits_per_byte'):.4g}, "
                    f"MC acc {r.metric('tinystories_mc', 'acc'):.3f}")

    extra: dict[str, dict[str, object]] = {"dense": {"sparsity": 0.0, "vLLM dir": _vllm_status(hf_dir)}}
    for label, rep in reports.items():
        extra[label] = {"sparsity": rep["weighted_mean_measured"], "vLLM dir": _vllm_status(Path(rep["out"]))}
    clock.done("vLLM dir checks")
    pngs = _plots(out, args, results, reports)
    clock.done("report")
    _write_report(out, model_path, hf_dir, model, args, scores, labels, png_scores, reports, results, extra, pngs,
                  clock)
    _say(clock, f"wrote {out / 'report.md'} (total {clock.total:.1f} s)")
    return 0


def _by_alloc(results: dict, reports: dict, task: str, metric: str) -> dict[str, dict[float, float]]:
    """``{allocation: {sparsity: value}}``, the dense model at sparsity 0 in every row."""
    out: dict[str, dict[float, float]] = {}
    for label, rep in reports.items():
        out.setdefault(rep["alloc"], {0.0: results["dense"].metric(task, metric)})
        out[rep["alloc"]][rep["sparsity"]] = results[label].metric(task, metric)
    return out


def _plots(out: Path, args: argparse.Namespace, results: dict, reports: dict) -> dict[str, Path]:
    pngs: dict[str, Path] = {}
    if not reports:
        pngs["word perplexity"] = plot_metric(
            {k: r.metric("tinystories", "word_perplexity") for k, r in results.items()}, out / "eval_perplexity.png",
            "TinyStories word perplexity", "word perplexity")
        return pngs
    pngs["word perplexity"] = plot_sweep(
        {a: list(v.items()) for a, v in _by_alloc(results, reports, "tinystories", "word_perplexity").items()},
        out / "eval_perplexity.png", "Wanda: held-out TinyStories word perplexity", "target sparsity",
        "word perplexity (log)", logy=True)
    pngs["multiple-choice accuracy"] = plot_sweep(
        {a: list(v.items()) for a, v in _by_alloc(results, reports, "tinystories_mc", "acc").items()},
        out / "eval_mc.png", "Wanda: TinyStories next-sentence accuracy", "target sparsity", "accuracy",
        reference=0.25, reference_label="chance (4 choices)")
    top = max(rep["sparsity"] for rep in reports.values())
    pngs["per-layer sparsity"] = plot_allocations(
        {rep["alloc"]: [row["target"] for row in rep["layers"]] for rep in reports.values() if rep["sparsity"] == top},
        out / "sparsity.png", f"Wanda {top:.0%}: per-layer sparsity by allocation")
    return pngs


def _write_report(out: Path, model_path: Path, hf_dir: Path, model: Any, args: argparse.Namespace, scores: list,
                  labels: list[str], png_scores: Path, reports: dict, results: dict, extra: dict, pngs: dict,
                  clock: _Clock) -> None:
    n_layers = model.config.num_hidden_layers
    lines = [
        "# LayerIF demo: stories260K",
        "",
        f"Model: `{model_path}` ({n_layers} decoder layers, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters), converted to `{hf_dir}`. "
        f"Generated by `layerif demo` in {clock.total:.0f} s.",
        "",
        "## 1. LayerIF scores",
        "",
        f"LayerIF ({args.params} projections), {args.n_train} train / {args.n_val} validation examples per task, "
        f"{args.max_length} tokens max. Higher score = less well-trained layer for that task "
        "(gets more sparsity / more LoRA experts).",
        "",
        scores_markdown(scores, labels),
        "",
        f"![per-layer scores]({png_scores.name})",
        "",
        "Mean validation loss: "
        + ", ".join(f"{lab} {s.extras['mean_val_loss']:.3f}" for lab, s in zip(labels, scores, strict=True)),
        "",
    ]
    if reports:
        ppl = _by_alloc(results, reports, "tinystories", "word_perplexity")
        acc = _by_alloc(results, reports, "tinystories_mc", "acc")
        bpb = _by_alloc(results, reports, "shakespeare", "bits_per_byte")
        targets = {f"{rep['alloc']} {rep['sparsity']:.0%}": [row["target"] for row in rep["layers"]]
                   for rep in reports.values()}
        lines += [
            "## 2. Wanda pruning: uniform vs OWL vs LayerIF per-layer sparsity",
            "",
            f"llm-compressor `oneshot` with Wanda, {args.n_calib} TinyStories calibration examples; each target is "
            "the parameter-weighted mean sparsity of the decoder blocks (embeddings and lm_head stay dense). "
            f"OWL: outlier ratios (M = 5, λ = {_spread(args, 'owl')}); LayerIF: the TinyStories scores above "
            f"mapped into [1−ε, 1+ε]·target, ε = {_spread(args, 'layerif')}. Sparsity 0% is the dense model. "
            "Best per column in bold. "
            "Wanda zeroes int(columns × s) weights per row, so the measured sparsity (section 3) can fall a little "
            "below the target, by different amounts for different allocations: compare with it.",
            "",
            "Held-out TinyStories word perplexity (lower is better):",
            "",
            sweep_markdown(ppl, lower_is_better=True, first="allocation"),
            "",
            "TinyStories next-sentence accuracy (4 choices, chance 0.25; higher is better):",
            "",
            sweep_markdown(acc, lower_is_better=False, first="allocation"),
            "",
            "Shakespeare bits per byte (a task the model was not trained on; lower is better):",
            "",
            sweep_markdown(bpb, lower_is_better=True, first="allocation"),
            "",
            f"![word perplexity]({pngs['word perplexity'].name}) ![accuracy]({pngs['multiple-choice accuracy'].name})",
            "",
            "Per-layer target sparsity of every run:",
            "",
            allocations_markdown(targets),
            "",
            f"![per-layer sparsity]({pngs['per-layer sparsity'].name})",
            "",
        ]
    lines += [
        "## 3. All evaluations (lm-eval, held-out data)",
        "",
        f"`lm_eval.simple_evaluate` (hf backend) on local tasks written by `layerif_plugins.integrations.lm_eval`: "
        f"rolling log-likelihood on {args.n_eval_docs} held-out TinyStories validation stories and "
        f"{args.n_eval_docs} Shakespeare paragraphs, and `tinystories-mc` ({args.n_mc} items: the true next "
        "sentence among 4) built from other held-out stories. `sparsity` is measured in the saved weights; "
        "`vLLM dir` is the CPU-side check that vLLM can load the saved directory.",
        "",
        eval_markdown(results, metrics=["word_perplexity", "bits_per_byte", "acc", "acc_norm"], extra=extra),
        "",
    ]
    if not reports:
        lines += [f"![word perplexity]({pngs['word perplexity'].name})", ""]
    lines += [
        "## Time",
        "",
        markdown_table(["stage", "seconds"], [[k, round(v, 1)] for k, v in clock.stages.items()]),
        "",
        f"Total time: {clock.total:.1f} s (torch threads: {args.threads}).",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "summary.json", json.dumps({
        "eval": {k: r.to_dict() for k, r in results.items()},
        "sparsity": {label: {k: r[k] for k in ("alloc", "sparsity", "layers", "weighted_mean_target",
                                               "weighted_mean_measured")} for label, r in reports.items()},
        "seconds": clock.stages, "total_seconds": clock.total}, indent=2) + "\n")
