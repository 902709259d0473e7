"""Re-measure the columns of finished planner cells on more test documents, paired per document.

A planner cell of ``quality_pruning.py`` tests each column (uniform, OWL*, AlphaPruning*, ATP*,
LayerIF*, sensitivity, auto) on ``--eval-docs`` documents (8 by default): one perplexity per
column and no error bar on the test side, so "beyond the noise" could only be judged against
the calibration-seed spread. This script reads the plans those cells saved
(``plan_<model>_<task>_<algorithm>_<sparsity>_<seed>[variant].json``, kept in
``benchmarks/results/``), prunes every column once more with the cell's own calibration examples
(same examples, same plan: the same weights) and measures each test document on its own, so:

* the cell's test perplexity is reproduced on its first ``8`` documents (a check that these are
  the cell's weights: ``ppl_first`` beside the cell's row, when its JSONL is at hand);
* every column gets a perplexity on ``--eval-docs`` documents (the first 8 included; WikiText-2:
  the test paragraphs in file order; TinyStories: the validation stories after the scoring ones);
* each column's difference to ``auto`` comes with a paired standard error over documents
  (mean of per-document mean token losses; ``*`` = beyond two standard errors), the test-side
  noise the calibration-seed spread does not show;
* the report checks the search's own judgement against unseen documents: for every default ``auto``
  plan, auto − each other column on the held-out examples the search decided on (from the plan) beside
  the same pair on the test documents, cross-counted by verdict (beyond two standard errors or not).

No search runs here: the plans fix every per-layer list. Cost: one ``oneshot`` and one
evaluation per column (SmolLM2: ≈ 15 s / 60 s per Wanda / SparseGPT prune, ≈ 1.4 s per test
paragraph on 2 cores). Rows go to ``bench_out/retest_plans_<model>.jsonl`` (one per plan, column
and document count; a rerun skips them), the report to ``retest_plans_<model>.md``, the host libraries'
logs and bars to ``retest_plans_<model>.log``.

Usage: ``python benchmarks/retest_plans.py --model smollm2-135m --eval-docs 64``
(default plans: ``benchmarks/results/plan_<model>_*.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_pruning import (  # noqa: E402  (sets the offline environment, puts the repo on sys.path)
    EVAL_NAMES,
    PLANNER_COLUMNS,
    PLANNER_LABELS,
    REPO,
    append_row,
    calibration_file,
    column_candidates,
    column_costs,
    column_plans,
    model_tag,
    read_rows,
    resumed_search,
    task_splits,
)
from quality_pruning import parse_args as cell_args  # noqa: E402

from layerif_plugins.console import host_output  # noqa: E402
from layerif_plugins.io import atomic_write_text  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402

PLAN_NAME = re.compile(r"plan_(?P<tag>.+)_(?P<task>wikitext2|tinystories)_(?P<algorithm>wanda|sparsegpt)_"
                       r"(?P<sparsity>[0-9.]+)_(?P<seed>\d+)(?P<variant>(_.+)?)\.json$")
CALIB_NAME = re.compile(r"calib_(?P<task>[a-z0-9]+)_(?P<n>\d+)_(?P<seed>\d+)_(?P<n_holdout>\d+)(_(?P<n_table>\d+))?"
                        r"\.jsonl$")
#: documents the planner cells were tested on (quality_pruning.py --eval-docs default)
CELL_DOCS = 8
#: torch threads of rows written before the field existed (this script's default then)
DEFAULT_THREADS = 2


def threads_of(row: dict[str, Any]) -> int:
    return int(row.get("threads", DEFAULT_THREADS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="the model the plans were made for (catalogue name / dir)")
    p.add_argument("--plans", nargs="*", default=None,
                   help="plan files of planner cells (default: benchmarks/results/plan_<model>_*.json)")
    p.add_argument("--eval-docs", type=int, default=64, help="test documents per column (the cell's 8 first)")
    p.add_argument("--cell-rows", default=None,
                   help="quality_pruning JSONL with the cells' rows, to print the cell's own test perplexity "
                        "(default: bench_out/quality_pruning_<model>.jsonl, then benchmarks/results/)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="calibration files and pruned models (default: a temp directory)")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    p.add_argument("--report", action="store_true", help="only write the report from the JSONL")
    args = p.parse_args(argv)
    if args.eval_docs < 2:
        p.error("--eval-docs must be at least 2 (a paired standard error needs two documents)")
    tag = model_tag(args.model)
    if args.plans is None:
        args.plans = [str(p) for p in sorted((REPO / "benchmarks" / "results").glob(f"plan_{tag}_*.json"))]
    bad = [p for p in args.plans if not PLAN_NAME.search(Path(p).name) or not Path(p).is_file()]
    if bad:
        p.error(f"not a planner cell's plan file (plan_<model>_<task>_<algorithm>_<sparsity>_<seed>….json): {bad}")
    return args


def cell_of(plan_path: Path) -> dict[str, Any]:
    """Task, algorithm, sparsity, seed and variant suffix of a planner cell, from its plan file's name."""
    m = PLAN_NAME.search(plan_path.name)
    assert m is not None  # parse_args checked the names
    return {"plan": plan_path.name, "task": m["task"], "algorithm": m["algorithm"], "sparsity": float(m["sparsity"]),
            "seed": int(m["seed"]), "variant": m["variant"].lstrip("_")}


def calibration_of(plan: Any, work: Path, pool: list[str]) -> tuple[Path, dict[str, Any]]:
    """The cell's calibration file, made again from its name (the draw is deterministic), and its sizes."""
    calibration = plan.data.get("calibration") or {}
    m = CALIB_NAME.search(Path(str(calibration.get("source", ""))).name)
    if m is None:
        raise SystemExit(f"the plan's calibration source {calibration.get('source')!r} is not a quality_pruning "
                         "calibration file: only plans of planner cells can be retested")
    path = calibration_file(work, m["task"], pool, int(m["n"]), int(m["seed"]), int(m["n_holdout"]),
                            int(m["n_table"] or 0))
    return path, {"n_calib": int(calibration["n"]), "max_length": int(calibration["max_length"]),
                  "batch_size": int(calibration["batch_size"])}


def document_losses(path: Path, docs: list[str], held: Any = None) -> tuple[list[float], list[int], float | None]:
    """Summed token loss and token count of each document (the windows of ``perplexity``, one document at a time),
    and the held-out perplexity of the same model on ``held`` (the examples the search judged it on), if given."""
    from layerif_plugins.evaluation.perplexity import example_token_losses, perplexity
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.plan.decide import token_mean

    model, tok = load_model_and_tokenizer(path)
    nll, tokens = [], []
    for doc in docs:
        res = perplexity(model, tok, [doc], batch_size=1)
        nll.append(res.nll)
        tokens.append(res.tokens)
    held_ppl = None
    if held is not None:
        sums, counts = example_token_losses(model, held, pad_id=0)  # as the planner measures a candidate
        held_ppl = math.exp(token_mean(sums, counts))
    return nll, tokens, held_ppl


def judged_examples(plan: Any, tok: Any, calib: Path) -> Any:
    """The held-out examples the plan's search judged its candidates on: in a planner cell, the ones after the
    calibration examples in the cell's calibration file (made again as ``calib``), less the last
    ``confirm_examples`` (those judge only auto's decision; a candidate's recorded loss is over the rest);
    None when the plan says otherwise."""
    from layerif_plugins.data import load_examples

    held = plan.data.get("holdout_file") or {}
    if not isinstance(held.get("examples"), list) or Path(str(held.get("file"))).name != calib.name:
        return None
    first, end = held["examples"]
    search_end = end - int(plan.options.get("confirm_examples") or 0)
    return load_examples(calib, tok, max_length=int(held["max_length"]), n=end).subset(range(first, search_end))


def ppl(nll: list[float], tokens: list[int]) -> float:
    return math.exp(sum(nll) / sum(tokens))


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Mean ± standard error over documents of (a − b) per-document mean token loss."""
    diffs = [x / n - y / m for x, n, y, m in zip(a["doc_nll"], a["doc_tokens"], b["doc_nll"], b["doc_tokens"],
                                                  strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def cell_row(cell_rows: list[dict[str, Any]], cell: dict[str, Any], column: str,
             holdout: float | None) -> dict[str, Any] | None:
    """The cell's own row of this column (matched by cell and held-out perplexity), if recorded."""
    for r in cell_rows:
        if (r.get("task"), r.get("algorithm"), r.get("sparsity"), r.get("seed"), r.get("variant")) == (
                cell["task"], cell["algorithm"], cell["sparsity"], cell["seed"], column) \
                and holdout is not None and r.get("holdout_ppl") is not None \
                and math.isclose(r["holdout_ppl"], holdout, rel_tol=1e-9):
            return r
    return None


def cell_sizes(cell_rows: list[dict[str, Any]], cell: dict[str, Any], chosen_ppl: float | None) -> dict | None:
    """The sizes the cell ran at (its data splits depend on them), from its ``auto`` row."""
    row = cell_row(cell_rows, cell, "plan_auto", chosen_ppl)
    return None if row is None else row.get("sizes")


def cell_ppl(cell_rows: list[dict[str, Any]], cell: dict[str, Any], column: str, holdout: float | None) -> float | None:
    """The cell's own test perplexity of this column, if recorded."""
    row = cell_row(cell_rows, cell, column, holdout)
    return None if row is None else row["ppl"]


def retest(plan_path: Path, args: argparse.Namespace, model_dir: Path, tok: Any, work: Path,
           done: set[tuple], cell_rows: list[dict[str, Any]], jsonl: Path) -> None:
    from layerif_plugins.integrations.llmcompressor import prune_model
    from layerif_plugins.plan import AllocationPlan

    cell = cell_of(plan_path)
    plan = AllocationPlan.load(plan_path)
    sizes_of_cell = cell_sizes(cell_rows, cell, plan.chosen.get("perplexity"))
    if sizes_of_cell is None:
        print(f"[retest] {cell['plan']}: no row of this cell in the cell JSONL; its data splits are taken at "
              "quality_pruning's default sizes", flush=True)
    split_args = {**vars(cell_args([])), **(sizes_of_cell or {}), "eval_docs": args.eval_docs}
    splits = task_splits(cell["task"], tok, argparse.Namespace(**split_args))
    calib, sizes = calibration_of(plan, work, splits["calib"])
    held = judged_examples(plan, tok, calib)
    for column, (path, cand) in column_plans(plan_path, work).items():
        if (cell["plan"], column, args.eval_docs, args.threads) in done:
            continue
        pruned = work / "pruned"
        t0 = time.perf_counter()
        report = prune_model(model_dir, pruned, algorithm=cell["algorithm"], sparsity=cell["sparsity"],
                             allocation="uniform", plan=path, calib=calib, overwrite=True, show_progress=False,
                             **sizes)
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        nll, tokens, held_ppl = document_losses(pruned, splits["eval"], held)
        eval_s = time.perf_counter() - t0
        shutil.rmtree(pruned, ignore_errors=True)
        row = {**cell, "column": column, "label": PLANNER_LABELS[column], "eval_docs": args.eval_docs,
               "layer_sparsity": [r["target"] for r in report["layers"]], "holdout_ppl": cand.get("perplexity"),
               "holdout_ppl_saved": held_ppl,
               "doc_nll": nll, "doc_tokens": tokens, "ppl": ppl(nll, tokens),
               "ppl_first": ppl(nll[:CELL_DOCS], tokens[:CELL_DOCS]),
               "cell_ppl": cell_ppl(cell_rows, cell, column, cand.get("perplexity")),
               "threads": args.threads, "prune_s": prune_s, "eval_s": eval_s}
        append_row(jsonl, row)
        print(f"[retest] {cell['plan']} {row['label']:14s} ppl {row['ppl']:.3f} on {sum(tokens)} tokens; first "
              f"{CELL_DOCS} docs {row['ppl_first']:.3f} (cell: {row['cell_ppl']}); held-out judged "
              f"{row['holdout_ppl']}, saved model {held_ppl} (prune {prune_s:.0f} s, eval {eval_s:.0f} s)", flush=True)


def cell_name(head: dict[str, Any]) -> str:
    """``tinystories sparsegpt 70% seed 0 (variant), 1 thread``: the cell and the torch threads it was pruned with.

    Why the threads: SparseGPT's result follows the float order of its sums, which changes with
    the thread count (at 70 % on SmolLM2-135M one column's test perplexity moved by up to 27 %).
    """
    variant = f" ({head['variant']})" if head["variant"] else ""
    threads = threads_of(head)
    return (f"{head['task']} {head['algorithm']} {head['sparsity']:.0%} seed {head['seed']}{variant}, "
            f"{threads} thread{'s' if threads > 1 else ''}")


def cell_table(rows: list[dict[str, Any]]) -> list[str]:
    """One cell: every column's test perplexity and its paired difference to ``auto`` over documents."""
    auto = next((r for r in rows if r["column"] == "plan_auto"), None)
    order = list(PLANNER_LABELS)
    table = []
    for r in sorted(rows, key=lambda r: order.index(r["column"])):
        if auto is None or r is auto:
            delta = "-"
        elif r["layer_sparsity"] == auto["layer_sparsity"]:
            delta = "0 (auto's list)"
        else:
            mean, se = paired(auto, r)
            delta = f"{mean:+.4f} ± {se:.4f}{' *' if abs(mean) > 2 * se else ''}"
        cell = "-" if r.get("cell_ppl") is None else f"{r['cell_ppl']:.2f}"
        judged = "-" if r.get("holdout_ppl") is None else f"{r['holdout_ppl']:.2f}"
        saved = "-" if r.get("holdout_ppl_saved") is None else f"{r['holdout_ppl_saved']:.2f}"
        table.append([r["label"], f"{r['ppl']:.2f}", f"{r['ppl_first']:.2f}", cell, f"{judged} / {saved}", delta])
    head = rows[0]
    n_tokens = sum(head["doc_tokens"])
    title = (f"**{cell_name(head)}** — {EVAL_NAMES[head['task']]}, "
             f"{head['eval_docs']} documents, {n_tokens:,} tokens (`{head['plan']}`)")
    return [title, "", markdown_table(
        ["column", f"test ppl ({head['eval_docs']} docs)", f"first {CELL_DOCS} docs", "cell's test ppl",
         "held-out ppl: judged / saved model", "auto − column, nats/doc (paired ± SE)"], table), ""]


#: columns that are baselines (every knob searched on held-out data); the rest are the planner's own
BASELINES = ("plan_uniform", "plan_owl", "plan_alpha_hill", "plan_atp", "plan_layerif")


def column_now(plan_path: Path) -> str | None:
    """The column ``auto`` keeps under the current decision rule, taken again on the plan's saved candidates.

    Why: the rule changed after some plans were made (2026-12-06: the sensitivity list is a tier of its
    own); the plan records every candidate's per-example held-out losses, so the report can show what
    the current code would have kept, and how that column did on test, without another search.
    """
    from layerif_plugins.plan.planner import decide_saved

    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    if plan.get("allocation") != "auto":
        return None
    k, _, _ = decide_saved(plan["candidates"], plan["options"])
    provider = plan["candidates"][k]["provider"]
    return next((col for col, names in PLANNER_COLUMNS.items() if provider in names), None)


def verdict(rows: list[dict[str, Any]], column: str = "plan_auto") -> dict[str, Any] | None:
    """One cell against the issue's bar: ``auto`` vs the best baseline on the retest's documents.

    The best baseline is the one with the lowest test perplexity on these documents (the strongest
    rival after the fact, which favours the baselines); ``auto − best`` is the paired mean ± standard
    error over documents (0 when auto kept that very list), and the verdict is *better* / *worse*
    beyond two standard errors, else *tie*. ``None`` when the cell lacks auto or every baseline.
    ``column``: the column that stands for auto (``column_now``'s choice for the current rule).
    """
    by = {r["column"]: r for r in rows}
    rivals = [by[c] for c in BASELINES if c in by]
    if column not in by or not rivals:
        return None
    auto, best = by[column], min(rivals, key=lambda r: r["ppl"])
    same = auto["layer_sparsity"] == best["layer_sparsity"]
    mean, se = (0.0, 0.0) if same else paired(auto, best)
    word = "tie" if abs(mean) <= 2 * se else ("better" if mean < 0 else "worse")
    return {"best": best["label"], "best_ppl": best["ppl"], "auto_ppl": auto["ppl"], "same_list": same, "mean": mean,
            "se": se, "verdict": word}


def tally_table(groups: dict[tuple, list[dict[str, Any]]], now: dict[str, str | None] | None = None) -> list[str]:
    """All cells in one table: auto vs the best baseline, and how many cells are better / tie / worse.

    ``now`` (plan name → column): auto's choice under the current rule (:func:`column_now`); its own
    verdict and tally sit beside the plan's.
    """
    now = now or {}
    table, counts, counts_now = [], {"better": 0, "tie": 0, "worse": 0}, {"better": 0, "tie": 0, "worse": 0}
    for key in sorted(groups):
        v = verdict(groups[key])
        if v is None:
            continue
        head = groups[key][0]
        counts[v["verdict"]] += 1
        diff = "0 (same list)" if v["same_list"] else f"{v['mean']:+.4f} ± {v['se']:.4f}"
        col = now.get(head["plan"])
        w = verdict(groups[key], col) if col else None
        if w is not None:
            counts_now[w["verdict"]] += 1
        again = "-" if w is None else ("same" if w["auto_ppl"] == v["auto_ppl"] else
                                       f"{PLANNER_LABELS[col]} {w['auto_ppl']:.2f}: " +  # type: ignore[index]
                                       ("0 (same list)" if w["same_list"] else f"{w['mean']:+.4f} ± {w['se']:.4f}")
                                       + f", {w['verdict']}")
        table.append([cell_name(head), f"{v['best']} {v['best_ppl']:.2f}", f"{v['auto_ppl']:.2f}", diff,
                      v["verdict"], again])
    if not table:
        return []
    lines = ["**auto vs the best baseline of each cell** (the baseline with the lowest test perplexity on these "
             "documents; *better* / *worse*: beyond two paired standard errors): "
             f"{counts['better']} better, {counts['tie']} tie, {counts['worse']} worse."]
    if any(now.values()):
        lines[0] += (" *current rule*: what auto keeps when the current decision rule is applied to the plan's "
                     "saved candidates (`decide_saved`; *same*: the plan's choice): "
                     f"{counts_now['better']} better, {counts_now['tie']} tie, {counts_now['worse']} worse.")
    return [*lines, "", markdown_table(["cell", "best baseline (test ppl)", "auto (test ppl)",
                                        "auto − best, nats/doc (± SE)", "verdict", "current rule"], table), ""]


def reproduces_search(row: dict[str, Any]) -> bool:
    """The retest pruned the very model the search judged: its held-out perplexity is the search's figure."""
    judged, saved = row.get("holdout_ppl"), row.get("holdout_ppl_saved")
    return judged is not None and saved is not None and abs(saved / judged - 1) < 1e-3


def paired_examples(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean ± standard error of (a − b) over paired held-out examples."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def heldout_and_test(rows: list[dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """auto vs every other column of one retested cell, on the search's held-out examples and on the test documents.

    The held-out side is what the search saw when it decided (each column's candidate's per-example
    losses, saved in the plan); the test side is :func:`paired` on the retest's documents. Only
    columns whose retest pruned the model the search judged (:func:`reproduces_search`), and not
    auto's own list.
    """
    by = {r["column"]: r for r in rows if reproduces_search(r)}
    if "plan_auto" not in by:
        return []
    candidates = plan["candidates"]
    auto_losses = candidates[plan["chosen"]["index"]]["example_losses"]
    out = []
    for column, (_, cand) in column_candidates(candidates).items():
        r = by.get(column)
        if r is None or r["layer_sparsity"] == by["plan_auto"]["layer_sparsity"] or not cand.get("example_losses"):
            continue
        held, held_se = paired_examples(auto_losses, cand["example_losses"])
        test, test_se = paired(by["plan_auto"], r)
        out.append({"column": column, "label": r["label"], "held": held, "held_se": held_se, "test": test,
                    "test_se": test_se})
    return out


def beyond(mean: float, se: float, sigmas: float = 2.0) -> str:
    return "tie" if abs(mean) <= sigmas * se else ("better" if mean < 0 else "worse")


def heldout_vs_test_section(groups: dict[tuple, list[dict[str, Any]]], paths: dict[str, Path]) -> list[str]:
    """How far the search's held-out verdicts carry to unseen documents (each default ``auto`` plan once).

    Why: ``auto`` keeps a candidate because it beat the others on the held-out examples by more than
    two paired standard errors, and the same examples chose the knobs and the moves, so its held-out
    margins are biased in its favour (the best of many). This tells a user how much of a held-out
    margin to expect on their test data: for every pair (auto, another column) the held-out verdict
    against the test verdict, and the test margin as a share of the held-out one.
    """
    pairs: list[tuple[str, dict[str, Any]]] = []
    closest: list[dict[str, Any]] = []
    seen: set[str] = set()
    for key in sorted(groups, key=lambda k: (k[0], k[2])):  # per plan: the fewest threads first
        head = groups[key][0]
        path = paths.get(head["plan"])
        if head["variant"] or head["plan"] in seen or path is None or not path.is_file():
            continue
        plan = json.loads(path.read_text(encoding="utf-8"))
        if plan.get("allocation") != "auto":
            continue
        found = heldout_and_test(groups[key], plan)
        if found:
            seen.add(head["plan"])
            pairs += [(cell_name(head), f) for f in found]
            closest.append(max(found, key=lambda f: f["held"]))  # the rival auto beat by the least on held-out
    if not pairs:
        return []
    near = {w: sum(beyond(f["test"], f["test_se"]) == w for f in closest) for w in ("better", "tie", "worse")}
    counts: dict[tuple[str, str], int] = {}
    for _, f in pairs:
        k = (beyond(f["held"], f["held_se"]), beyond(f["test"], f["test_se"]))
        counts[k] = counts.get(k, 0) + 1
    cross = [[f"held-out: auto {h}" + (" (within 2 SE)" if h == "tie" else " (beyond 2 SE)"),
              *(str(counts.get((h, t), 0)) for t in ("better", "tie", "worse"))]
             for h in ("better", "tie", "worse") if any(counts.get((h, t)) for t in ("better", "tie", "worse"))]
    won = [f["test"] / f["held"] for _, f in pairs if beyond(f["held"], f["held_se"]) == "better"]
    share = (f" Where auto won on held-out data beyond 2 SE, the test margin was a median "
             f"{statistics.median(won):.0%} of the held-out one (quartiles "
             f"{statistics.quantiles(won, n=4)[0]:.0%} – {statistics.quantiles(won, n=4)[2]:.0%})."
             if len(won) >= 2 else "")
    table = [[name, f["label"], f"{f['held']:+.4f} ± {f['held_se']:.4f}", f"{f['test']:+.4f} ± {f['test_se']:.4f}",
              beyond(f["held"], f["held_se"]), beyond(f["test"], f["test_se"])] for name, f in pairs]
    return [f"**Held-out verdicts on unseen documents** ({len(seen)} default `auto` plans, each once at the "
            f"thread count that reproduces its search; {len(pairs)} pairs of auto and another column). Held-out: "
            "auto − column over the search's held-out examples (nats/example; the same examples chose the knobs "
            "and the moves, so these margins favour auto); test: the same pair on the test documents "
            f"(nats/doc).{share} Against each cell's closest rival on held-out data (the column auto beat by "
            f"the least): {near['better']} better, {near['tie']} tie, {near['worse']} worse on test.", "",
            markdown_table(["held-out verdict", "test: auto better", "test: tie", "test: auto worse"], cross), "",
            markdown_table(["cell", "column", "held-out auto − column", "test auto − column", "held-out", "test"],
                           table), ""]


def search_cost_section(paths: dict[str, Path]) -> list[str]:
    """Each column's own search cost in every saved plan: what a user pays for that column alone.

    Why: the issue behind the planner asks for the cost of each column beside its quality; a user who
    can afford 6 pruning passes but not 36 wants to know what ATP alone costs next to ``auto``.
    """
    table = []
    for name, path in sorted(paths.items()):
        if not path.is_file():
            continue
        plan = json.loads(path.read_text(encoding="utf-8"))
        if plan.get("allocation") != "auto":
            continue
        costs = column_costs(plan)
        line = [name.removeprefix("plan_").removesuffix(".json") + (" (resumed)" if resumed_search(plan) else "")]
        for column in PLANNER_COLUMNS:
            if column not in costs:
                line.append("-")
                continue
            prunes, layers, sec = costs[column]
            line.append(f"{prunes}" + (f" + {layers} layer" if layers else "") + f", {sec / 60:.1f} min")
        table.append(line)
    if not table:
        return []
    return ["**Search cost of each column** (from the saved plans: pruning passes, + single-layer prunes of the "
            "sensitivity table, and wall minutes of that column's own candidates; *auto*: the whole search, every "
            "column plus loading and the checks). A column's candidates are its knob grid; *sensitivity*'s are the "
            "knapsack and the local moves. "
            "Minutes carry the machine's load at the time (most cells ran two or three side by side on 2 cores). "
            "*(resumed)*: the search was interrupted and resumed from its journal; its cost adds what the rows read "
            "back took in the interrupted run (a sensitivity table journaled before 2026-12-07 kept no time: "
            "its minutes are missing there, its prunes are not).",
            "", markdown_table(["plan", *[PLANNER_LABELS[c] for c in PLANNER_COLUMNS]], table), ""]


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path) -> str:
    paths = {Path(p).name: Path(p) for p in args.plans}
    now = {name: column_now(path) for name, path in paths.items() if path.is_file()}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["plan"], r["eval_docs"], threads_of(r)), []).append(r)
    lines = [f"# Planner cells retested on more documents (`{args.model}`)", "",
             "Each column's plan pruned again with the cell's calibration examples and every test document "
             "measured on its own; *auto − column* is the mean over documents of the difference in mean token "
             "loss (negative: auto is better), ± its standard error; `*` beyond two standard errors. "
             f"*first {CELL_DOCS} docs* is the cell's own test set (it should equal *cell's test ppl*). "
             "*held-out ppl*: the search's figure for the column's candidate, then the saved model's on the same "
             "held-out examples (they differ when the search did not prune the model it judged: SparseGPT plans "
             "made before 2026-12-04; `-`: not recorded). *threads*: the torch threads of the retest's prunes; "
             "SparseGPT at another thread count than the cell's makes another model (its sums run in another "
             "float order), so there neither figure reproduces the cell's: a second numerical draw of each "
             "column.", ""]
    lines += tally_table(groups, now)
    lines += heldout_vs_test_section(groups, paths)
    lines += search_cost_section(paths)
    for key in sorted(groups):
        lines += cell_table(groups[key])
    lines.append(f"Command: `python benchmarks/retest_plans.py --model {args.model} --eval-docs {args.eval_docs}`")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / f"retest_plans_{model_tag(args.model)}.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    jsonl = out / f"retest_plans_{tag}.jsonl"
    if not args.report:
        import torch

        from layerif_plugins.models import load_model_and_tokenizer, model_dir_for

        torch.set_num_threads(args.threads)
        cell_jsonl = Path(args.cell_rows) if args.cell_rows else out / f"quality_pruning_{tag}.jsonl"
        if not cell_jsonl.is_file() and not args.cell_rows:
            cell_jsonl = REPO / "benchmarks" / "results" / f"quality_pruning_{tag}.jsonl"
        cell_rows = read_rows(cell_jsonl)
        done = {(r["plan"], r["column"], r["eval_docs"], threads_of(r)) for r in read_rows(jsonl)}
        with tempfile.TemporaryDirectory(prefix="retest-plans-") as tmp, host_output(out / f"retest_plans_{tag}.log"):
            work = Path(args.work) if args.work else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            model_dir = model_dir_for(args.model, tmp)  # a .bin / .gguf is converted here, afresh each run
            _, tok = load_model_and_tokenizer(model_dir)
            for plan_path in args.plans:
                retest(Path(plan_path), args, model_dir, tok, work, done, cell_rows, jsonl)
    wanted = {Path(p).name for p in args.plans}
    rows = [r for r in read_rows(jsonl) if r["plan"] in wanted and r["eval_docs"] == args.eval_docs]
    print(write_report(rows, args, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
