"""Quality of per-layer sparsity allocations for llm-compressor's Wanda and SparseGPT.

For each task × algorithm ∈ {wanda, sparsegpt} × allocation × global sparsity: prune the
model with the real ``oneshot`` (:func:`layerif_plugins.integrations.llmcompressor.prune_model`),
reload the saved directory and measure token perplexity on the task's fixed evaluation
subset (:func:`layerif_plugins.evaluation.perplexity.perplexity`, lm-eval's rolling-window
scheme). Allocations (``--allocations``):

* ``uniform``; ``owl`` (λ 0.08, from the calibration data); ``alpha_hill`` (AlphaPruning, ε 0.2);
* ``layerif_attn`` / ``layerif_all``: LayerIF scores of the task's own score-train →
  score-validation split (``attn`` / ``all`` parameter group), ε 0.1 (docs/method.md §2b);
* ``depth_ramp``: score = layer index, ε 0.1 — the control of docs/method.md §5;
* ``layerif_auto``: the ``layerif_attn`` scores with ``epsilon="auto"`` (ε and mapping
  direction chosen on a held-out slice of the calibration data; k oneshots per cell);
  ``layerif_auto_long``: the same, the candidates judged on 128-token held-out examples
  (``holdout_length``) instead of calibration-length ones; ``owl_auto``: OWL with λ searched.

Tasks (``--tasks``), every split disjoint and fixed (seed 1234):

* ``wikitext2``: ``wikitext-2/valid.txt`` paragraphs → score-train / score-validation /
  calibration pool; evaluation on the first ``--eval-docs`` paragraphs (no headings) of
  ``wikitext-2/test.txt``;
* ``tinystories``: TinyStories train → score-train and calibration pool; TinyStories valid →
  score-validation and (disjoint) evaluation stories.

The calibration set of seed ``s`` is ``--n-calib`` examples drawn from the pool with seed
``s``; the cells of ``--noise-allocations`` are also run with the seeds of ``--noise-seeds``,
which measures how much perplexity moves with the calibration sample alone (the noise a
difference between allocations must beat).

Resumable: every finished cell is appended to ``<out>/quality_pruning_<model>.jsonl`` and a
rerun with the same sizes skips the cells already there (scores files are cached beside it),
so a long run can be stopped and continued. Usage::

    python benchmarks/quality_pruning.py --model smollm2-135m            # full
    python benchmarks/quality_pruning.py --model smollm2-135m --quick    # smoke run
    python benchmarks/quality_pruning.py --model smollm2-135m --report   # tables from the JSONL only

Writes ``<out>/quality_pruning_<model>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402

#: variant → (label, allocation passed to prune_model, scores key or None, spread)
VARIANTS: dict[str, tuple[str, str, str | None, float | str | None]] = {
    "uniform": ("uniform", "uniform", None, None),
    "owl": ("OWL", "owl", None, None),
    "alpha_hill": ("AlphaPruning", "alpha_hill", "alpha_hill", None),
    "layerif_attn": ("LayerIF attn", "layerif", "layerif_attn", 0.1),
    "layerif_all": ("LayerIF all", "layerif", "layerif_all", 0.1),
    "depth_ramp": ("depth ramp", "depth_ramp", "depth_ramp", 0.1),
    "layerif_auto": ("LayerIF ε auto", "layerif", "layerif_attn", "auto"),
    "layerif_auto_long": ("LayerIF ε auto, 128-token held-out", "layerif", "layerif_attn", "auto"),
    "owl_auto": ("OWL λ auto", "owl", None, "auto"),
    # one `allocation: auto` plan per cell: every provider's best candidate becomes a column (its knob searched
    # on held-out calibration data), plus sensitivity and auto's own decision; each pruned once more and tested
    "planner": ("planner (auto)", "auto", "layerif_attn", "plan"),
}
#: the columns a planner cell reports: column → the providers whose best held-out candidate it takes
PLANNER_COLUMNS: dict[str, tuple[str, ...]] = {
    "plan_uniform": ("uniform",), "plan_owl": ("owl",), "plan_alpha_hill": ("alpha_hill",), "plan_atp": ("atp",),
    "plan_layerif": ("layerif",), "plan_sensitivity": ("sensitivity",), "plan_auto": (),
}
PLANNER_LABELS = {"plan_uniform": "uniform", "plan_owl": "OWL*", "plan_alpha_hill": "AlphaPruning*",
                  "plan_atp": "ATP*", "plan_layerif": "LayerIF*", "plan_sensitivity": "sensitivity",
                  "plan_auto": "auto"}
#: searched variants whose held-out examples are longer than the calibration examples (tokens)
HOLDOUT_LENGTH = {"layerif_auto_long": 128}
TASKS = ("wikitext2", "tinystories")
EVAL_NAMES = {"wikitext2": "WikiText-2 test", "tinystories": "TinyStories valid"}
SPLIT_SEED = 1234
#: row fields that must match for a JSONL row to count as done (the run's sizes)
SIZE_KEYS = ("n_calib", "max_length", "n_train", "n_val", "score_length", "eval_docs", "min_tokens", "batch_size",
             "n_holdout", "sensitivity_examples", "confirm_examples", "planner_allocation", "sensitivity_around",
             "max_moves", "judge_orders")
#: value of a size key in rows written before the key existed
SIZE_DEFAULTS = {"batch_size": 1, "n_holdout": 32, "sensitivity_examples": 16, "confirm_examples": 0,
                 "planner_allocation": "auto", "sensitivity_around": "dense", "max_moves": 8,
                 "judge_orders": 1}
#: the planner's sizes that name a plan file when not at their default (two variants of a cell never share a name)
PLAN_NAME_SIZES = ("n_holdout", "planner_allocation", "sensitivity_around", "max_moves", "sensitivity_examples",
                   "confirm_examples", "judge_orders")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir or llama2.c .bin")
    p.add_argument("--tasks", default="wikitext2", help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--algorithms", default="wanda,sparsegpt")
    p.add_argument("--allocations", default=",".join(v for v in VARIANTS if not is_auto(v)),
                   help=f"comma list of {', '.join(VARIANTS)} (default: all but the searched *_auto ones, which "
                        "cost one oneshot per candidate: ask for them)")
    p.add_argument("--sparsities", default="0.5,0.6,0.7")
    p.add_argument("--seeds", default="0", help="calibration seeds of every cell")
    p.add_argument("--noise-seeds", default="1", help="extra calibration seeds for --noise-allocations")
    p.add_argument("--noise-allocations", default="uniform,layerif_attn")
    p.add_argument("--noise-sparsities", default="0.6", help="sparsities that get the noise seeds (empty: all)")
    p.add_argument("--auto-grid", default="0,0.05,0.1,0.2,0.3", help="spread candidates of the *_auto variants")
    p.add_argument("--n-holdout", type=int, default=32, help="held-out calibration examples of the *_auto variants")
    p.add_argument("--planner-holdout-length", type=int, default=128,
                   help="tokens per held-out example of the planner cells")
    p.add_argument("--budget-prunes", type=int, default=None, help="planner cells: the most pruning passes")
    p.add_argument("--sensitivity-levels", type=int, default=3, help="planner cells: levels each side of the target")
    p.add_argument("--sensitivity-examples", type=int, default=16,
                   help="planner cells: examples of the sensitivity table (after the held-out ones: disjoint)")
    p.add_argument("--planner-allocation", choices=("auto", "sensitivity"), default="auto",
                   help="planner cells: every provider and the auto rule, or uniform + sensitivity alone (lowest)")
    p.add_argument("--sensitivity-around", choices=("dense", "uniform"), default="dense",
                   help="planner cells: measure the sensitivity table with the other layers dense or at the target")
    p.add_argument("--max-moves", type=int, default=8, help="planner cells: sensitivity's local-search moves")
    p.add_argument("--confirm-examples", type=int, default=0,
                   help="planner cells: the last N held-out examples judge only auto's final choice (raise "
                        "--n-holdout by as many to keep the search's own)")
    p.add_argument("--judge-orders", type=int, default=1,
                   help="planner cells: auto prunes each finalist at this many calibration orders and judges the "
                        "average (SparseGPT at high sparsity moves with the float order; +1 pass per finalist each)")
    p.add_argument("--n-calib", type=int, default=128, help="calibration examples")
    p.add_argument("--max-length", type=int, default=16, help="tokens per calibration example")
    p.add_argument("--batch-size", type=int, default=16,
                   help="calibration batch size of oneshot (every example is cut to --max-length, so no padding)")
    p.add_argument("--n-train", type=int, default=32, help="LayerIF score-train examples")
    p.add_argument("--n-val", type=int, default=16, help="LayerIF score-validation examples")
    p.add_argument("--score-length", type=int, default=128, help="tokens per LayerIF example")
    p.add_argument("--eval-docs", type=int, default=8, help="evaluation documents (fixed subset)")
    p.add_argument("--min-tokens", type=int, default=48, help="shortest paragraph/story used, in tokens")
    p.add_argument("--eval-batch", type=int, default=2, help="perplexity batch size")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="small everything: a smoke run (< 10 min)")
    p.add_argument("--report", action="store_true", help="only rebuild the tables from the JSONL")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    p.add_argument("--work", default=None,
                   help="keep calibration files, plans and the planner's journal here (an interrupted planner "
                        "cell resumes from its journal); default: a temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.algorithms, args.sparsities = "wanda", "0.5,0.7"
        args.n_calib, args.n_train, args.n_val, args.eval_docs = 32, 16, 8, 8
        args.allocations = "uniform,layerif_attn,depth_ramp,planner"
        args.budget_prunes, args.sensitivity_levels, args.n_holdout = 10, 1, 16
        args.noise_allocations, args.noise_sparsities = "uniform", "0.7"
    unknown = [a for a in split(args.allocations) if a not in VARIANTS]
    if unknown:
        p.error(f"unknown allocation(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.min_tokens < args.max_length:
        p.error(f"--min-tokens {args.min_tokens} < --max-length {args.max_length}: every calibration example must "
                "fill --max-length, or batches would be truncated to their shortest example")
    bad_tasks = [t for t in split(args.tasks) if t not in TASKS]
    if bad_tasks:
        p.error(f"unknown task(s) {bad_tasks}; choose from {', '.join(TASKS)}")
    return args


def is_auto(variant: str) -> bool:
    """Searched variants cost one oneshot per candidate: they run after the rest of their task."""
    return variant in VARIANTS and VARIANTS[variant][3] in ("auto", "plan")


def split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def model_tag(model: str) -> str:
    return Path(model).stem if ("/" in model or model.endswith(".bin")) else model


def sizes(args: argparse.Namespace) -> dict[str, int]:
    return {k: getattr(args, k) for k in SIZE_KEYS}


def row_sizes(row: dict[str, Any]) -> dict[str, Any]:
    """A row's sizes, with the value a key had before it was recorded (old rows stay comparable)."""
    return {k: row.get("sizes", {}).get(k, SIZE_DEFAULTS.get(k)) for k in SIZE_KEYS}


def cell_key(row: dict[str, Any]) -> tuple:
    return (row["task"], row["algorithm"], row["variant"], row["sparsity"], row["seed"],
            tuple(row_sizes(row).values()))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of the JSONL (a half-written last line from a killed run is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One JSON line, flushed and fsynced: a finished cell survives a killed run."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def planned_cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, algorithm, sparsity, variant, seed) of this run, in priority order."""
    allocs = split(args.allocations)
    seeds = [int(s) for s in split(args.seeds)]
    noise = [int(s) for s in split(args.noise_seeds)]
    noise_sp = [float(s) for s in split(args.noise_sparsities)] or None
    cells = []
    for task in split(args.tasks):
        for algo in split(args.algorithms):
            # auto cells last within a task/algorithm: they cost k oneshots each
            for with_auto in (False, True):
                for sp in [float(s) for s in split(args.sparsities)]:
                    for variant in allocs:
                        if is_auto(variant) != with_auto:
                            continue
                        extra = noise if variant in split(args.noise_allocations) and (
                            noise_sp is None or sp in noise_sp) else []
                        for seed in seeds + [s for s in extra if s not in seeds]:
                            cells.append({"task": task, "algorithm": algo, "variant": variant,
                                          "sparsity": sp, "seed": seed})
    return cells


# ---------------------------------------------------------------------------------------- data


def task_splits(task: str, tok: Any, args: argparse.Namespace) -> dict[str, list[str]]:
    """Disjoint text splits of a task: score-train, score-val, calibration pool, evaluation documents."""
    from layerif_plugins.data import read_records
    from layerif_plugins.paths import shared_data

    def long_enough(texts: Iterable[str]) -> list[str]:
        return [t for t in texts if not t.startswith("=")
                and len(tok(t, add_special_tokens=False)["input_ids"]) >= args.min_tokens]

    def shuffled(texts: list[str]) -> list[str]:
        out = list(texts)
        random.Random(SPLIT_SEED).shuffle(out)
        return out

    if task == "wikitext2":
        pool = shuffled(long_enough(read_records(shared_data("wikitext-2", "valid.txt"))))
        train, val, calib = pool[:args.n_train], pool[args.n_train:args.n_train + args.n_val], \
            pool[args.n_train + args.n_val:]
        evals = long_enough(read_records(shared_data("wikitext-2", "test.txt")))[:args.eval_docs]
    else:
        train_all = [str(r) for r in read_records(shared_data("tinystories", "train.txt"))]
        pool = shuffled(long_enough(train_all[:4000]))
        train, calib = pool[:args.n_train], pool[args.n_train:]
        valid = shuffled(long_enough(str(r) for r in read_records(shared_data("tinystories", "valid.txt"))))
        val, evals = valid[:args.n_val], valid[args.n_val:args.n_val + args.eval_docs]
    if len(calib) < args.n_calib or len(evals) < args.eval_docs:
        raise SystemExit(f"{task}: too few examples for --n-calib {args.n_calib} / --eval-docs {args.eval_docs}")
    return {"train": train, "val": val, "calib": calib, "eval": evals}


def calibration_file(work: Path, task: str, pool: list[str], n: int, seed: int, n_holdout: int,
                     n_table: int = 0) -> Path:
    """``n`` calibration examples drawn from the pool with ``seed``, then ``n_holdout`` (+ ``n_table``) more, as JSONL.

    prune_model calibrates on the first ``n``; ``epsilon="auto"`` holds out the ``n_holdout``
    after them; the planner's sensitivity table uses the ``n_table`` after those.
    ``random.sample`` draws sequentially, so the first ``n`` do not depend on ``n_holdout`` or
    ``n_table`` (for pools of more than 277 examples and ``n + n_holdout`` ≤ 85 it also takes the
    same branch; for pools of more than 1045 and 85 < ``n + n_holdout + n_table`` ≤ 341 as well):
    every cell of a seed calibrates on the same ``n`` examples.
    """
    path = work / f"calib_{task}_{n}_{seed}_{n_holdout}{f'_{n_table}' if n_table else ''}.jsonl"
    if not path.is_file():
        chosen = random.Random(seed).sample(pool, min(len(pool), n + n_holdout + n_table))
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen), encoding="utf-8")
    return path


def examples_of(texts: list[str], tok: Any, max_length: int, source: str):
    from layerif_plugins.data import Examples

    ids = [tuple(tok(t, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"])
           for t in texts]
    return Examples(tuple(ids), source)


# ---------------------------------------------------------------------------------------- scores


def task_scores(model: Any, tok: Any, task: str, splits: dict[str, list[str]], needed: set[str],
                args: argparse.Namespace, cache: Path) -> dict[str, Path]:
    """Scores files this task's variants need, computed once and cached beside the JSONL."""
    from layerif_plugins.data import pad_id_of
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.scorers import ScoringData, score_layers

    scoring = {k: getattr(args, k) for k in ("n_train", "n_val", "score_length", "min_tokens")}
    digest = hashlib.sha256(json.dumps([args.model, scoring, task]).encode()).hexdigest()[:10]
    out: dict[str, Path] = {}
    for key in sorted(needed):
        path = cache / f"scores_{model_tag(args.model)}_{task}_{key}_{digest}.json"
        out[key] = path
        if path.is_file():
            continue
        t0 = time.perf_counter()
        if key.startswith("layerif_"):
            data = ScoringData(train=examples_of(splits["train"], tok, args.score_length, f"{task}:score-train"),
                               val=examples_of(splits["val"], tok, args.score_length, f"{task}:score-val"),
                               pad_id=pad_id_of(tok))
            scores = score_layers(model, "layerif", data, config=InfluenceConfig(
                params=key.split("_", 1)[1], batch_size=8, show_progress=False))
        elif key == "depth_ramp":
            scores = score_layers(model, "depth_ramp")
        else:
            scores = score_layers(model, key)
        scores.save(path)
        print(f"[scores] {task} {key}: {time.perf_counter() - t0:.0f} s, "
              f"{[round(s, 4) for s in scores.scores]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------- cells


def evaluate(path: Path | str, docs: list[str], batch: int) -> dict[str, float]:
    from layerif_plugins.evaluation.perplexity import perplexity
    from layerif_plugins.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(path)
    t0 = time.perf_counter()
    res = perplexity(model, tok, docs, batch_size=batch)
    return {"ppl": res.perplexity, "eval_tokens": res.tokens, "eval_s": time.perf_counter() - t0}


def auto_details(report: dict[str, Any]) -> dict[str, Any]:
    """What the ε search wrote into the report: its choice, held-out perplexities and the sweep."""
    found = report.get("epsilon_search")
    if not found:
        return {}
    return {"epsilon": found["chosen"]["epsilon"], "invert": found["chosen"]["invert"],
            "holdout_uniform_ppl": found["uniform_perplexity"], "holdout_chosen_ppl": found["chosen_perplexity"],
            "pruning_passes": found.get("pruning_passes"), "search_s": found.get("seconds"),
            "sweep": [{k: c.get(k) for k in ("epsilon", "invert", "perplexity", "same_as", "error")}
                      for c in found.get("sweep", [])]}


def run_cell(cell: dict[str, Any], model_dir: Path, calib: Path, scores: dict[str, Path], docs: list[str],
             args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from layerif_plugins.integrations.llmcompressor import prune_model

    label, allocation, score_key, eps = VARIANTS[cell["variant"]]
    pruned = work / "pruned"
    t0 = time.perf_counter()
    extra = ({"epsilon_grid": [float(x) for x in split(args.auto_grid)], "n_holdout": args.n_holdout,
              "holdout_length": HOLDOUT_LENGTH.get(cell["variant"])} if eps == "auto" else {})
    report = prune_model(model_dir, pruned, algorithm=cell["algorithm"], sparsity=cell["sparsity"],
                         allocation=allocation, epsilon=eps, scores=scores[score_key] if score_key else None,
                         calib=calib, n_calib=args.n_calib, max_length=args.max_length, batch_size=args.batch_size,
                         overwrite=True, show_progress=False, **extra)
    prune_s = time.perf_counter() - t0
    result = evaluate(pruned, docs, args.eval_batch)
    shutil.rmtree(pruned, ignore_errors=True)
    return {**cell, "label": label, "allocation": allocation, "epsilon": report.get("epsilon", eps),
            "invert": report.get("invert", False),
            "measured": report["weighted_mean_measured"], "layer_sparsity": [r["target"] for r in report["layers"]],
            "layer_measured": [r["measured"] for r in report["layers"]], "oneshot_s": report["oneshot_seconds"],
            "prune_s": prune_s, **result, "auto": auto_details(report), "sizes": sizes(args)}


def column_plans(plan_path: Path, work: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """One plan file per planner column: the best held-out candidate of its provider(s); ``plan_auto``: the plan."""
    from dataclasses import replace

    from layerif_plugins.plan import AllocationPlan

    plan = AllocationPlan.load(plan_path)
    out: dict[str, tuple[Path, dict[str, Any]]] = {"plan_auto": (plan_path, plan.candidates[plan.chosen["index"]])}
    for column, (i, best) in column_candidates(plan.candidates).items():
        path = work / f"{column}.json"
        replace(plan, layer_sparsity=best["layer_sparsity"], chosen={**best, "index": i}).save(path)
        out[column] = (path, best)
    return out


def column_candidates(candidates: list[dict[str, Any]]) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each column's candidate of a plan: its provider(s)' lowest held-out loss, as (index, candidate)."""
    out = {}
    for column, providers in PLANNER_COLUMNS.items():
        mine = [(i, c) for i, c in enumerate(candidates) if c["provider"] in providers and c.get("loss") is not None]
        if mine:
            out[column] = min(mine, key=lambda ic: (ic[1]["loss"], ic[0]))
    return out


def column_costs(plan: dict[str, Any]) -> dict[str, tuple[int, int, float]]:
    """What each column of a planner cell cost inside its search: (prunes, single-layer prunes, seconds).

    A searched column's cost is its own candidates' (each one pruning pass plus its held-out losses);
    ``sensitivity`` adds its table (one single-layer prune per layer and level) to the knapsack's and the
    moves' candidates; ``auto`` is the whole search (every column, the scores check, loading). The seconds
    are the plan's own wall clock of each candidate, so they carry the machine's load at the time. A search
    resumed from its journal adds what the rows read back took in the interrupted run (not its loading or
    scoring, so a lower bound; table rows journaled before 2026-12-07 carry no time: missing from the
    seconds, not from the prunes).
    """
    out: dict[str, tuple[int, int, float]] = {}
    for column, providers in PLANNER_COLUMNS.items():
        mine = [c for c in plan["candidates"] if c["provider"] in providers]
        if mine:
            out[column] = (len(mine), 0, sum(c.get("seconds") or 0.0 for c in mine))
    table = plan.get("extras", {}).get("sensitivity") or {}
    table_prunes = table_layer_prunes(table)
    table_s = (table.get("seconds") or 0.0) + (table.get("resumed_seconds") or 0.0)
    if table and "plan_sensitivity" in out:
        n, _, sec = out["plan_sensitivity"]
        out["plan_sensitivity"] = (n, table_prunes, sec + table_s)
    cost = plan.get("cost", {})
    resumed_s = sum(c.get("seconds") or 0.0 for c in plan["candidates"] if c.get("status") == "resumed")
    out["plan_auto"] = (cost.get("prunes", 0) + cost.get("resumed", 0), table_prunes,
                        cost.get("seconds", 0.0) + resumed_s + (table.get("resumed_seconds") or 0.0))
    return out


def table_layer_prunes(table: dict[str, Any]) -> int:
    """The single-layer prunes a sensitivity table took, over every run that measured it: its measured entries
    (around the uniform model the operating point itself is no prune)."""
    center = table.get("center") if table.get("around") == "uniform" else None
    return sum(1 for row in table.get("costs", []) for k, c in enumerate(row) if c is not None and k != center)


def resumed_search(plan: dict[str, Any]) -> bool:
    """Whether the plan's search was interrupted and resumed from its journal (its cost is then summed over runs)."""
    cost = plan.get("cost", {})
    return bool(cost.get("resumed") or cost.get("resumed_layers"))


def plan_file_name(cell: dict[str, Any], args: argparse.Namespace) -> str:
    """The name a planner cell's plan is kept under: its cell, then each planner size not at its default."""
    variant = "".join(f"_{k}-{getattr(args, k)}" for k in PLAN_NAME_SIZES if getattr(args, k) != SIZE_DEFAULTS[k])
    return (f"plan_{model_tag(args.model)}_{cell['task']}_{cell['algorithm']}_{cell['sparsity']}_{cell['seed']}"
            f"{variant}.json")


def run_planner_cell(cell: dict[str, Any], model_dir: Path, calib: Path, scores: dict[str, Path], docs: list[str],
                     args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """``allocation: auto`` once (every provider searched, sensitivity, the decision), then each column tested."""
    from layerif_plugins.integrations.llmcompressor import prune_model
    from layerif_plugins.integrations.llmcompressor.prune import plan_pruning

    plan_path = work / "plan.json"
    t0 = time.perf_counter()
    auto = args.planner_allocation == "auto"
    plan = plan_pruning(model_dir, plan_path, algorithm=cell["algorithm"], sparsity=cell["sparsity"],
                        allocation=args.planner_allocation, scores=scores["layerif_attn"] if auto else None,
                        sensitivity_around=args.sensitivity_around, max_moves=args.max_moves, calib=calib,
                        n_calib=args.n_calib,
                        max_length=args.max_length, batch_size=args.batch_size, n_holdout=args.n_holdout,
                        holdout_length=args.planner_holdout_length, budget_prunes=args.budget_prunes,
                        sensitivity_levels=args.sensitivity_levels,
                        sensitivity_examples=args.sensitivity_examples, confirm_examples=args.confirm_examples,
                        judge_orders=args.judge_orders, overwrite=True, show_progress=False)
    plan_s = time.perf_counter() - t0
    shutil.copy(plan_path, Path(args.out) / plan_file_name(cell, args))
    rows = []
    for column, (path, cand) in column_plans(plan_path, work).items():
        pruned = work / "pruned"
        report = prune_model(model_dir, pruned, algorithm=cell["algorithm"], sparsity=cell["sparsity"],
                             allocation="uniform", plan=path, calib=calib, n_calib=args.n_calib,
                             max_length=args.max_length, batch_size=args.batch_size, overwrite=True,
                             show_progress=False)
        result = evaluate(pruned, docs, args.eval_batch)
        shutil.rmtree(pruned, ignore_errors=True)
        provider_cost = sum(1 for c in plan.candidates if c["provider"] in (PLANNER_COLUMNS[column] or ())
                            and c["status"] == "evaluated")
        rows.append({**cell, "variant": column, "label": PLANNER_LABELS[column], "allocation": "plan",
                     "chosen": {"provider": cand["provider"], "knobs": cand.get("knobs")},
                     "holdout_ppl": cand.get("perplexity"), "vs_uniform_holdout": cand.get("vs_uniform"),
                     "measured": report["weighted_mean_measured"],
                     "layer_sparsity": [r["target"] for r in report["layers"]],
                     "oneshot_s": report["oneshot_seconds"], **result,
                     "search": {"prunes": provider_cost if column != "plan_auto" else plan.cost.get("prunes"),
                                "plan_s": plan_s, "plan_prunes": plan.cost.get("prunes"),
                                "layer_prunes": plan.cost.get("layer_prunes"), "why": plan.decision.get("why")},
                     "sizes": sizes(args)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"quality_pruning_{model_tag(args.model)}.jsonl"
    if args.report:
        write_report(args, read_rows(jsonl), out)
        return 0
    import torch

    from layerif_plugins.models import load_model_and_tokenizer, model_dir_for

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    done = {cell_key(r) for r in read_rows(jsonl)}
    cells = planned_cells(args)
    todo = [c for c in cells if cell_key({**c, "sizes": sizes(args)}) not in done]
    print(f"[plan] {len(cells)} cells, {len(cells) - len(todo)} already in {jsonl}, {len(todo)} to run", flush=True)
    with contextlib.ExitStack() as stack:
        work = (Path(args.work) if args.work else
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quality-pruning-"))))
        work.mkdir(parents=True, exist_ok=True)
        # a .bin / .gguf is converted into a fresh directory (a reused --work keeps only calibration and plans)
        model_dir = model_dir_for(args.model, stack.enter_context(tempfile.TemporaryDirectory(prefix="qp-model-")))
        model, tok = load_model_and_tokenizer(model_dir)
        for task in split(args.tasks):
            task_cells = [c for c in todo if c["task"] == task]
            dense_key = cell_key({"task": task, "algorithm": "dense", "variant": "dense", "sparsity": 0.0,
                                  "seed": 0, "sizes": sizes(args)})
            if not task_cells and dense_key in done:
                continue
            splits = task_splits(task, tok, args)
            if dense_key not in done:
                row = {"task": task, "algorithm": "dense", "variant": "dense", "sparsity": 0.0, "seed": 0,
                       **evaluate(model_dir, splits["eval"], args.eval_batch), "sizes": sizes(args)}
                append_row(jsonl, row)
                print(f"[dense] {task}: ppl {row['ppl']:.3f} on {row['eval_tokens']} tokens ({row['eval_s']:.0f} s)",
                      flush=True)
            needed = {VARIANTS[c["variant"]][2] for c in task_cells} - {None}
            scores = task_scores(model, tok, task, splits, needed, args, out)
            for cell in task_cells:
                calib = calibration_file(work, task, splits["calib"], args.n_calib, cell["seed"], args.n_holdout,
                                         args.sensitivity_examples if cell["variant"] == "planner" else 0)
                if cell["variant"] == "planner":
                    for row in run_planner_cell(cell, model_dir, calib, scores, splits["eval"], args, work):
                        row["threads"] = torch.get_num_threads()  # SparseGPT moves with it (docs/quality.md §0)
                        append_row(jsonl, row)
                        print(f"[plan] {task} {cell['algorithm']} s={cell['sparsity']:.2f} seed={cell['seed']} "
                              f"{row['label']:14s} ppl={row['ppl']:.3f} held-out={row['holdout_ppl']:.3f} "
                              f"chosen={row['chosen']}", flush=True)
                    append_row(jsonl, {**cell, "sizes": sizes(args), "done": True})
                    continue
                row = {**run_cell(cell, model_dir, calib, scores, splits["eval"], args, work),
                       "threads": torch.get_num_threads()}
                append_row(jsonl, row)
                print(f"[cell] {task} {cell['algorithm']:9s} {cell['variant']:13s} s={cell['sparsity']:.2f} "
                      f"seed={cell['seed']} measured={row['measured']:.4f} ppl={row['ppl']:.3f} "
                      f"(prune {row['prune_s']:.0f} s, eval {row['eval_s']:.0f} s)"
                      + (f" auto={json.dumps(row['auto'])[:300]}" if row["auto"] else ""), flush=True)
    print(f"[done] {time.perf_counter() - t_start:.0f} s", flush=True)
    write_report(args, read_rows(jsonl), out)
    return 0


# ---------------------------------------------------------------------------------------- report


def write_report(args: argparse.Namespace, all_rows: list[dict[str, Any]], out: Path) -> str:
    """Markdown tables from the JSONL rows of this run's sizes (perplexity with measured sparsity)."""
    from layerif_plugins.io import atomic_write_text
    from layerif_plugins.report import markdown_table

    rows = [r for r in all_rows if row_sizes(r) == sizes(args) and not r.get("done")]
    parts = [f"# Per-layer sparsity allocations, `{args.model}` (llm-compressor oneshot)", "",
             f"Sizes: {json.dumps(sizes(args))}; calibration seeds {args.seeds} (+ {args.noise_seeds} for "
             f"{args.noise_allocations}). Cells: perplexity (measured weighted sparsity). Best of a row in bold.", ""]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    planner_rows = [r for r in rows if r["variant"] in PLANNER_COLUMNS]
    rows = [r for r in rows if r["variant"] not in PLANNER_COLUMNS]
    for task in TASKS:
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        dense = [r for r in trows if r["variant"] == "dense"]
        parts.append(f"## {task}: {EVAL_NAMES[task]} perplexity"
                     + (f" (dense {dense[0]['ppl']:.3f}, {dense[0]['eval_tokens']} tokens)" if dense else ""))
        parts.append("")
        table = []
        for algo in ("wanda", "sparsegpt"):
            for sp in sorted({r["sparsity"] for r in trows if r["algorithm"] == algo}):
                cells = {r["variant"]: r for r in trows
                         if r["algorithm"] == algo and r["sparsity"] == sp and r["seed"] == 0}
                if not cells:
                    continue
                best = min(c["ppl"] for c in cells.values())
                line = [algo, f"{sp:.2f}"]
                for v in variants:
                    c = cells.get(v)
                    if c is None:
                        line.append("–")
                        continue
                    txt = f"{c['ppl']:.2f} ({c['measured']:.3f})"
                    line.append(f"**{txt}**" if c["ppl"] == best else txt)
                table.append(line)
        parts += [markdown_table(["algorithm", "target", *[VARIANTS[v][0] for v in variants]], table), ""]
        spreads = [spread for _, spread in seed_spreads(trows)]
        parts += noise_section(trows) + auto_section(trows, max(spreads) if spreads else None)
    parts += planner_section(planner_rows, {r["task"]: r for r in rows if r["variant"] == "dense"})
    text = "\n".join(parts)
    atomic_write_text(out / f"quality_pruning_{model_tag(args.model)}.md", text)
    print(text)
    return text


def planner_section(rows: list[dict[str, Any]], dense: dict[str, dict[str, Any]]) -> list[str]:
    """The planner table: every column's test perplexity per seed, Δ vs uniform, and what the search cost."""
    from layerif_plugins.report import markdown_table

    if not rows:
        return []
    parts = ["## Planner cells (`allocation: auto`; * = knob searched on held-out calibration data)", "",
             "Test perplexity (calibration seed 0 / seed 1 where run); Δ = relative to uniform of the same seed. "
             "The search saw only held-out calibration examples, never the test paragraphs.", ""]
    columns = list(PLANNER_COLUMNS)
    for task in TASKS:
        trows = [r for r in rows if r["task"] == task]
        if not trows:
            continue
        table = []
        for algo in ("wanda", "sparsegpt"):
            for sp in sorted({r["sparsity"] for r in trows if r["algorithm"] == algo}):
                cell = [r for r in trows if r["algorithm"] == algo and r["sparsity"] == sp]
                if not cell:
                    continue
                line = [algo, f"{sp:.2f}"]
                for col in columns:
                    by_seed = {r["seed"]: r for r in cell if r["variant"] == col}
                    if not by_seed:
                        line.append("–")
                        continue
                    txt = []
                    for seed, r in sorted(by_seed.items()):
                        uni = next((u for u in cell if u["variant"] == "plan_uniform" and u["seed"] == seed), None)
                        delta = f" ({100 * (r['ppl'] / uni['ppl'] - 1):+.1f} %)" if uni and col != "plan_uniform" \
                            else ""
                        txt.append(f"{r['ppl']:.2f}{delta}")
                    line.append(" / ".join(txt))
                auto = next((r for r in cell if r["variant"] == "plan_auto"), None)
                if auto:
                    cost = auto["search"]
                    line.append(f"{auto['chosen']['provider']}; {cost['plan_prunes']} prunes + "
                                f"{cost['layer_prunes']} layer prunes, {cost['plan_s'] / 60:.1f} min")
                table.append(line)
        head = ["algorithm", "target", *[PLANNER_LABELS[c] for c in columns], "auto chose; search cost"]
        d = dense.get(task)
        parts += [f"### {task}" + (f" (dense {d['ppl']:.3f})" if d else ""), "", markdown_table(head, table), ""]
        for r in trows:
            if r["variant"] == "plan_auto" and r["search"].get("why"):
                parts.append(f"- {r['algorithm']} {r['sparsity']:.2f} seed {r['seed']}: "
                             + "; ".join(r["search"]["why"]))
        parts.append("")
    return parts


def seed_groups(rows: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    """(algorithm, variant, sparsity) → {calibration seed: perplexity}."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r["variant"] != "dense":
            groups.setdefault((r["algorithm"], r["variant"], r["sparsity"]), {})[r["seed"]] = r["ppl"]
    return groups


def seed_spreads(rows: list[dict[str, Any]]) -> list[tuple[tuple, float]]:
    """(max − min) / mean perplexity of every cell run with ≥ 2 calibration seeds."""
    out = []
    for key, by_seed in sorted(seed_groups(rows).items()):
        if len(by_seed) >= 2:
            vals = list(by_seed.values())
            out.append((key, (max(vals) - min(vals)) / statistics.mean(vals)))
    return out


def noise_section(rows: list[dict[str, Any]]) -> list[str]:
    """Calibration-seed noise: relative perplexity change between seeds of the same cell."""
    groups = seed_groups(rows)
    spreads = seed_spreads(rows)
    if not spreads:
        return []
    rel = [spread for _, spread in spreads]
    table = [[algo, VARIANTS[variant][0], f"{sp:.2f}",
              " / ".join(f"{groups[(algo, variant, sp)][s]:.2f}" for s in sorted(groups[(algo, variant, sp)])),
              f"{100 * spread:.1f} %"] for (algo, variant, sp), spread in spreads]
    from layerif_plugins.report import markdown_table

    paired = []
    for (algo, variant, sp), by_seed in sorted(groups.items()):
        uni = groups.get((algo, "uniform", sp), {})
        common = sorted(set(by_seed) & set(uni))
        if variant != "uniform" and len(common) >= 2:
            paired.append([algo, VARIANTS[variant][0], f"{sp:.2f}",
                           " / ".join(f"{100 * (by_seed[s] / uni[s] - 1):+.1f} %" for s in common)])
    out = ["Calibration-seed noise (same cell, different calibration sample): "
           f"median {100 * statistics.median(rel):.1f} %, max {100 * max(rel):.1f} % of the perplexity.", "",
           markdown_table(["algorithm", "allocation", "target", "ppl by seed", "(max − min) / mean"], table), ""]
    if paired:
        out += ["Paired with uniform (same calibration sample), per seed:", "",
                markdown_table(["algorithm", "allocation", "target", "ppl vs uniform, seed by seed"], paired), ""]
    return out


def auto_section(rows: list[dict[str, Any]], noise: float | None = None) -> list[str]:
    """The searched cells against uniform (same algorithm, sparsity and seed) and what the search chose.

    ``noise``: the largest calibration-seed spread measured for this task; a cell passes the
    acceptance ("≤ uniform within the noise") when its perplexity ≤ uniform's × (1 + noise).
    """
    from layerif_plugins.report import markdown_table

    table, passed, gains, picked = [], 0, [], 0
    for r in rows:
        if not is_auto(r["variant"]):
            continue
        uni = next((u for u in rows if u["variant"] == "uniform" and u["algorithm"] == r["algorithm"]
                    and u["sparsity"] == r["sparsity"] and u["seed"] == r["seed"]), None)
        a = r["auto"]
        rel = r["ppl"] / uni["ppl"] - 1 if uni else None
        ok = None if rel is None or noise is None else rel <= noise
        passed += bool(ok)
        if a.get("epsilon", 0) > 0:
            picked += 1
            if rel is not None:
                gains.append(rel)
        table.append([r["algorithm"], VARIANTS[r["variant"]][0], f"{r['sparsity']:.2f}", r["seed"], f"{r['ppl']:.2f}",
                      f"{uni['ppl']:.2f}" if uni else "–", f"{100 * rel:+.1f} %" if rel is not None else "–",
                      {True: "yes", False: "**no**", None: "–"}[ok],
                      f"{a.get('epsilon')}{' inverted' if a.get('invert') else ''}",
                      f"{a['holdout_uniform_ppl']:.2f} → {a['holdout_chosen_ppl']:.2f}" if a else "–",
                      a.get("pruning_passes", "–"), f"{a['search_s']:.0f}" if a.get("search_s") else "–"])
    if not table:
        return []
    summary = (f"Searched spread (ε of the LayerIF attn scores, OWL's λ; with the mapping direction, picked on "
               f"held-out calibration data): a spread > 0 chosen in {picked} of {len(table)} cells"
               + (f", {100 * statistics.mean(gains):+.1f} % perplexity vs uniform on average where it was"
                  if gains else "")
               + (f"; ≤ uniform within the calibration-seed noise ({100 * noise:.1f} %) in {passed} of {len(table)}."
                  if noise is not None else "."))
    return [summary, "",
            markdown_table(["algorithm", "allocation", "target", "seed", "eval ppl", "uniform ppl", "vs uniform",
                            "≤ uniform + noise", "chosen spread", "held-out ppl uniform → chosen", "pruning passes",
                            "search s"], table), ""]

if __name__ == "__main__":
    sys.exit(main())
