"""benchmarks/collect_results.py on the kept SmolLM2 rows: a cell taken out and collected back is the same results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from benchmark_modules import load_benchmark

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
TAG = "smollm2-135m"
CELLS = f"quality_pruning_{TAG}.jsonl"
RETESTS = f"retest_plans_{TAG}.jsonl"
PLAN = f"plan_{TAG}_wikitext2_sparsegpt_0.7_1.json"  # one finished cell: its rows, its plan, its retest rows


@pytest.fixture(scope="module")
def cr():
    return load_benchmark("collect_results")


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _of_cell(line: str) -> bool:
    r = json.loads(line)
    return (r["task"], r["algorithm"], r["sparsity"], r["seed"]) == ("wikitext2", "sparsegpt", 0.7, 1)


@pytest.fixture
def split(tmp_path):
    """The kept results without one cell (``kept``) and that cell as its scratch folder would hold it (``cell``)."""
    kept, cell = tmp_path / "results", tmp_path / "cell"
    shutil.copytree(RESULTS, kept)
    (cell / "retest").mkdir(parents=True)
    for name, folder in ((CELLS, cell), (RETESTS, cell / "retest")):
        lines = _lines(RESULTS / name)
        mine = [x for x in lines if _of_cell(x)]
        assert mine, f"{name} holds no row of the cell"
        (folder / name).write_text("".join(x + "\n" for x in mine))
        (kept / name).write_text("".join(x + "\n" for x in lines if not _of_cell(x)))
    shutil.move(kept / PLAN, cell / PLAN)
    return kept, cell


def test_a_cell_collected_back_gives_the_kept_results_and_a_second_run_adds_nothing(cr, split, capsys):
    kept, cell = split
    n_cell = len(_lines(cell / CELLS))
    assert cr.main([str(cell), "--results", str(kept)]) == 0
    out = capsys.readouterr().out
    assert f"{CELLS}: +{n_cell}" in out and f"copied {PLAN}" in out
    for name in (CELLS, RETESTS):  # the same rows (the cell's now at the end)
        assert sorted(_lines(kept / name)) == sorted(_lines(RESULTS / name))
    assert (kept / PLAN).read_bytes() == (RESULTS / PLAN).read_bytes()
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert cr.main([str(cell), "--results", str(kept)]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_the_dense_row_is_kept_once_per_task_and_sizes(cr, split):
    kept, cell = split
    dense = next(
        json.loads(x)
        for x in _lines(RESULTS / CELLS)
        if json.loads(x)["algorithm"] == "dense" and json.loads(x)["task"] == "wikitext2"
    )
    with (cell / CELLS).open("a") as fh:  # another seed's dense row: the same model, the same test documents
        fh.write(json.dumps({**dense, "seed": 7, "eval_s": 1.0}) + "\n")
    assert cr.main([str(cell), "--results", str(kept)]) == 0
    assert sorted(_lines(kept / CELLS)) == sorted(_lines(RESULTS / CELLS))


def test_a_rerun_with_other_numbers_is_refused_whole_unless_replace(cr, split, capsys):
    kept, cell = split
    assert cr.main([str(cell), "--results", str(kept)]) == 0
    rows = [json.loads(x) for x in _lines(cell / CELLS)]
    auto = next(r for r in rows if r["variant"] == "plan_auto")
    auto["ppl"] += 1.0
    (cell / CELLS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = json.loads((cell / PLAN).read_text())
    plan["note"] = "a rerun"
    (cell / PLAN).write_text(json.dumps(plan))
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert cr.main([str(cell), "--results", str(kept)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("nothing written") and "other numbers" in out and f"{PLAN} exists with other content" in out
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before  # not one file touched
    assert cr.main([str(cell), "--results", str(kept), "--replace"]) == 0
    now = [json.loads(x) for x in _lines(kept / CELLS)]
    assert len(now) == len(_lines(RESULTS / CELLS))  # replaced in place, not added
    assert [r["ppl"] for r in now if _of_cell(json.dumps(r)) and r["variant"] == "plan_auto"] == [auto["ppl"]]
    assert json.loads((kept / PLAN).read_text())["note"] == "a rerun"


def test_a_folder_without_cell_rows_is_refused_naming_the_file(cr, tmp_path):
    with pytest.raises(SystemExit, match=f"has no {CELLS}.*--model"):
        cr.main([str(tmp_path), "--results", str(RESULTS)])


def test_two_collections_at_once_never_drop_rows(cr, split):
    """The rows file rewritten (by another process's rename) after ours read it: refused, our version kept beside."""
    import os

    from layerif_plugins.errors import ConfigError

    kept, cell = split
    merge = cr.Merge(kept, TAG)
    merge.cell(cell)
    theirs = kept / f".{CELLS}.theirs"
    theirs.write_text((kept / CELLS).read_text() + json.dumps({"task": "x", "algorithm": "dense"}) + "\n")
    os.replace(theirs, kept / CELLS)  # what another collection's atomic write does meanwhile
    before = (kept / CELLS).read_bytes()
    with pytest.raises(ConfigError, match="conflict"):
        merge.write()
    assert (kept / CELLS).read_bytes() == before  # their rows stay; ours are beside, whole, to collect again
    beside = list(kept.glob(f"{CELLS}*conflict*")) + list(kept.glob(f"*{Path(CELLS).stem}*conflict*"))
    assert beside and sorted(_lines(beside[0])) == sorted(_lines(RESULTS / CELLS))
