"""benchmarks/retest_plans.py on a real planner cell of stories260K: the cell's weights again, paired per document."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from benchmark_modules import load_benchmark

CELL = ["--model", "stories260k", "--tasks", "wikitext2", "--allocations", "planner", "--algorithms", "wanda",
        "--sparsities", "0.5", "--seeds", "0", "--noise-seeds", "", "--n-calib", "32", "--n-train", "16",
        "--n-val", "8", "--eval-docs", "8", "--budget-prunes", "12", "--sensitivity-levels", "1",
        "--n-holdout", "16", "--sensitivity-examples", "8"]


@pytest.fixture(scope="module")
def rp():
    return load_benchmark("retest_plans")


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """One small planner cell (quality_pruning.py): its plan file and its rows."""
    qp = load_benchmark("quality_pruning")
    out = tmp_path_factory.mktemp("cell")
    assert qp.main([*CELL, "--work", str(out / "work"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "quality_pruning_stories260k.jsonl").read_text().splitlines()]
    return out / "plan_stories260k_wikitext2_wanda_0.5_0.json", rows


@pytest.mark.slow
def test_retest_reproduces_the_cell_and_pairs_documents(rp, cell, tmp_path, capsys):
    plan, cell_rows = cell
    argv = ["--model", "stories260k", "--plans", str(plan), "--eval-docs", "12", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path), "--cell-rows", str(plan.parent / "quality_pruning_stories260k.jsonl")]
    assert rp.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "retest_plans_stories260k.jsonl").read_text().splitlines()]
    tested = {r["variant"]: r for r in cell_rows if r.get("allocation") == "plan"}
    assert {r["column"] for r in rows} == set(tested) and "plan_auto" in tested
    for r in rows:
        mine = tested[r["column"]]
        assert len(r["doc_nll"]) == len(r["doc_tokens"]) == 12
        # the cell's 8 test documents give the cell's perplexity again (same plan, calibration, weights; one
        # document at a time instead of batches of 2: summation order only)
        assert sum(r["doc_tokens"][:8]) == mine["eval_tokens"]
        assert r["ppl_first"] == pytest.approx(mine["ppl"], rel=1e-6) and r["cell_ppl"] == mine["ppl"]
        assert r["layer_sparsity"] == mine["layer_sparsity"]
        # the saved model is the candidate the search judged: its held-out perplexity is the search's figure
        assert r["holdout_ppl_saved"] == pytest.approx(r["holdout_ppl"], rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(sum(r["doc_nll"]) / sum(r["doc_tokens"])))
    # the report's paired difference, by hand: per-document mean token loss, auto − uniform, mean ± std/√n
    by = {r["column"]: r for r in rows}
    per_doc = {c: np.array(by[c]["doc_nll"]) / np.array(by[c]["doc_tokens"]) for c in ("plan_auto", "plan_uniform")}
    d = per_doc["plan_auto"] - per_doc["plan_uniform"]
    report = (tmp_path / "retest_plans_stories260k.md").read_text()
    assert f"| uniform | {by['plan_uniform']['ppl']:.2f} | {by['plan_uniform']['ppl_first']:.2f} |" in report
    assert f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(12):.4f}" in report
    capsys.readouterr()
    assert rp.main(argv) == 0  # resumed: nothing is pruned again
    assert "[retest]" not in capsys.readouterr().out
    assert len((tmp_path / "retest_plans_stories260k.jsonl").read_text().splitlines()) == len(rows)


def test_refuses_a_file_that_is_not_a_planner_cells_plan(rp, tmp_path, capsys):
    other = tmp_path / "plan.json"
    other.write_text("{}")
    with pytest.raises(SystemExit) as exc:
        rp.parse_args(["--plans", str(other)])
    assert exc.value.code == 2 and "not a planner cell's plan file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rp.parse_args(["--eval-docs", "1"])
    assert "at least 2" in capsys.readouterr().err
