"""Copy finished planner cells from scratch folders into ``benchmarks/results/``, once each.

A planner cell is run in its own scratch folder (``quality_pruning.py --out bench_out/<cell>``,
then ``retest_plans.py --out bench_out/<cell>/retest``) so that two cells can run side by side
without sharing a JSONL. ``bench_out/`` does not survive a change of machine; the rows behind
docs/quality.md are kept in ``benchmarks/results/``. This script is the step between the two:

* cell rows (``quality_pruning_<model>.jsonl``) are added unless a row of the same cell, column,
  sizes and thread count is there; the dense row of a task and sizes only once (it does not depend
  on the seed; a rerun's differs in float order only, ≈ 1e-5 relative, and the first is kept);
* plan files (``plan_<model>_*.json``) are copied; a LayerIF scores file (``scores_<model>_*.json``, named
  by a hash of its configuration) only when none of its name is kept: a rerun's scores differ from the
  kept ones in float summation order only (≈ 1e-5 relative), and the kept file is the one the tables cite;
* retest rows (``retest/retest_plans_<model>.jsonl``) are added unless a row of the same plan,
  column, document count and thread count is there.

A row or file that is already there with *other numbers* (a rerun of the same cell) is a conflict:
nothing is written and the conflicts are listed, unless ``--replace`` says the new measurement
replaces the old one. Every file is written whole and atomically, and a signal waits until all are
written, so a stopped run leaves the results as they were or fully collected; two collections at
once: the later one to finish finds its files changed and keeps its versions beside them
(``NAME.layerif-conflict-PID``, the project's rule for racing outputs) instead of dropping rows.
Then rebuild the report:
``python benchmarks/retest_plans.py --report --out benchmarks/results --eval-docs 32``.

Usage: ``python benchmarks/collect_results.py bench_out/wt_sg60_s1 bench_out/ts_sg60_s1``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_pruning import REPO, cell_key, model_tag, read_rows, row_sizes  # noqa: E402
from retest_plans import threads_of  # noqa: E402

from layerif_plugins.errors import ConfigError  # noqa: E402
from layerif_plugins.io import atomic_write_text, deferred_signals, expect  # noqa: E402

#: what two measurements of the same key must agree on to be the same measurement
CELL_NUMBERS = ("ppl", "layer_sparsity", "holdout_ppl")
RETEST_NUMBERS = ("doc_nll", "layer_sparsity")


def cell_row_key(row: dict[str, Any]) -> tuple:
    """The cell, column, sizes and thread count; a dense row: its task and sizes (the same for every seed)."""
    if row["algorithm"] == "dense":
        return ("dense", row["task"], tuple(row_sizes(row).values()))
    return (*cell_key(row), row.get("threads"))


def retest_row_key(row: dict[str, Any]) -> tuple:
    return (row["plan"], row["column"], row["eval_docs"], threads_of(row))


class Merge:
    """What one collection adds to the results, decided before anything is written."""

    def __init__(self, results: Path, tag: str, replace: bool = False) -> None:
        self.results, self.tag, self.replace = results, tag, replace
        self.texts: dict[Path, str] = {}  # file → its new whole text
        self.added: dict[str, int] = {}
        self.conflicts: list[str] = []

    def rows(self, name: str, new: list[dict[str, Any]], key, numbers: tuple[str, ...], source: Path) -> None:
        """Add ``new`` to ``results/name`` (rows of the same key: skipped when equal, a conflict when not)."""
        path = self.results / name
        if path not in self.texts:
            expect(path)  # another collection writing it meanwhile makes ours fail at the swap, not drop its rows
        old = read_rows(path) if path not in self.texts else [json.loads(x) for x in self.texts[path].splitlines()]
        at = {key(r): i for i, r in enumerate(old)}
        count = 0
        for row in new:
            k = key(row)
            if k not in at:
                at[k] = len(old)
                old.append(row)
                count += 1
            elif k[0] != "dense" and any(old[at[k]].get(n) != row.get(n) for n in numbers):
                if not self.replace:
                    self.conflicts.append(f"{source}: a row of {name} for {k} has other numbers than the one kept")
                    continue
                old[at[k]] = row
                count += 1
        if count:
            self.texts[path] = "".join(json.dumps(r) + "\n" for r in old)
            self.added[name] = self.added.get(name, 0) + count

    def file(self, src: Path, keep_first: bool = False) -> None:
        """Copy a plan / scores file; a plan of the same name with other content is a conflict."""
        dst = self.results / src.name
        expect(dst)
        text = src.read_text(encoding="utf-8")
        json.loads(text)  # a cut file is refused here, not copied
        if dst.is_file() and (keep_first or dst.read_text(encoding="utf-8") == text):
            return
        if dst.is_file() and not self.replace:
            self.conflicts.append(f"{src}: {dst} exists with other content")
            return
        self.texts[dst] = text
        self.added[src.name] = 1

    def cell(self, folder: Path) -> None:
        cells = folder / f"quality_pruning_{self.tag}.jsonl"
        if not cells.is_file():
            raise SystemExit(
                f"error: {folder} has no {cells.name}: is it a quality_pruning.py --out folder "
                f"of model {self.tag!r}? (--model names another model)"
            )
        self.rows(cells.name, read_rows(cells), cell_row_key, CELL_NUMBERS, folder)
        for src in sorted(folder.glob(f"plan_{self.tag}_*.json")):
            self.file(src)
        for src in sorted(folder.glob(f"scores_{self.tag}_*.json")):
            self.file(src, keep_first=True)
        retest = folder / "retest" / f"retest_plans_{self.tag}.jsonl"
        if retest.is_file():
            self.rows(retest.name, read_rows(retest), retest_row_key, RETEST_NUMBERS, folder)

    def write(self) -> None:
        """Each file whole by one rename; Ctrl-C / SIGTERM wait until all are written (no half-collected cell)."""
        with deferred_signals():
            for path, text in self.texts.items():
                atomic_write_text(path, text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cells", nargs="+", help="scratch folders of finished cells (quality_pruning.py --out)")
    p.add_argument("--model", default="smollm2-135m", help="the model of the cells (catalogue name / dir)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where the kept rows live")
    p.add_argument(
        "--replace",
        action="store_true",
        help="a rerun's rows and plans replace the ones kept (default: refuse and list them)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        raise SystemExit(f"error: --results {results} is not a folder")
    merge = Merge(results, model_tag(args.model), args.replace)
    for folder in map(Path, args.cells):
        merge.cell(folder)
    if merge.conflicts:
        print("nothing written: these were measured before with other numbers (--replace to take the new ones)")
        print("\n".join(f"- {c}" for c in merge.conflicts))
        return 1
    try:
        merge.write()
    except ConfigError as exc:  # another collection wrote a file meanwhile: ours is beside it, named in the message
        print(f"error: {exc}\nrun the collection again: what the other one added is kept, ours is added once")
        return 2
    for name, count in sorted(merge.added.items()):
        print(f"{name}: +{count}" if name.endswith(".jsonl") else f"copied {name}")
    if not merge.added:
        print("nothing new: every row and file is in", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
