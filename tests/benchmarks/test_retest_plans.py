"""benchmarks/retest_plans.py on a real planner cell of stories260K: the cell's weights again, paired per document."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
    # its non-default sizes name the plan (quality_pruning's variant suffix)
    return out / "plan_stories260k_wikitext2_wanda_0.5_0_n_holdout-16_sensitivity_examples-8.json", rows


@pytest.mark.slow
def test_retest_reproduces_the_cell_and_pairs_documents(rp, cell, tmp_path, capsys):
    plan, cell_rows = cell
    argv = ["--model", "stories260k", "--plans", str(plan), "--eval-docs", "12", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path), "--cell-rows", str(plan.parent / "quality_pruning_stories260k.jsonl")]
    assert rp.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "retest_plans_stories260k.jsonl").read_text().splitlines()]
    tested = {r["variant"]: r for r in cell_rows if r.get("allocation") == "plan"}
    assert {r["threads"] for r in tested.values()} == {2}  # the cell's rows record the torch threads it ran with
    assert {r["column"] for r in rows} == set(tested) and "plan_auto" in tested
    for r in rows:
        mine = tested[r["column"]]
        assert len(r["doc_nll"]) == len(r["doc_tokens"]) == 12
        # the cell's 8 test documents give the cell's perplexity again (same plan, calibration, weights; one
        # document at a time instead of batches of 2: summation order only)
        assert sum(r["doc_tokens"][:8]) == mine["eval_tokens"]
        assert r["ppl_first"] == pytest.approx(mine["ppl"], rel=1e-6) and r["cell_ppl"] == mine["ppl"]
        assert r["layer_sparsity"] == mine["layer_sparsity"] and r["threads"] == 2  # the default --threads
        # the saved model is the candidate the search judged: its held-out perplexity is the search's figure
        assert r["holdout_ppl_saved"] == pytest.approx(r["holdout_ppl"], rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(sum(r["doc_nll"]) / sum(r["doc_tokens"])))
    # the report's paired difference, by hand: per-document mean token loss, auto − uniform, mean ± std/√n
    by = {r["column"]: r for r in rows}
    per_doc = {c: np.array(by[c]["doc_nll"]) / np.array(by[c]["doc_tokens"]) for c in ("plan_auto", "plan_uniform")}
    d = per_doc["plan_auto"] - per_doc["plan_uniform"]
    report = (tmp_path / "retest_plans_stories260k.md").read_text()
    assert f"| uniform | {by['plan_uniform']['ppl']:.2f} | {by['plan_uniform']['ppl_first']:.2f} |" in report
    assert ("**wikitext2 wanda 50% seed 0 (n_holdout-16_sensitivity_examples-8), 2 threads** — WikiText-2 test, "
            "12 documents") in report
    assert f"{d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(12):.4f}" in report
    # the tally: auto against the baseline with the lowest test perplexity, by hand
    best = min((c for c in rp.BASELINES if c in by), key=lambda c: by[c]["ppl"])
    if by[best]["layer_sparsity"] == by["plan_auto"]["layer_sparsity"]:
        diff, word = "0 (same list)", "tie"
    else:
        e = per_doc["plan_auto"] - np.array(by[best]["doc_nll"]) / np.array(by[best]["doc_tokens"])
        mean, se = e.mean(), e.std(ddof=1) / np.sqrt(12)
        diff, word = f"{mean:+.4f} ± {se:.4f}", "tie" if abs(mean) <= 2 * se else ("better" if mean < 0 else "worse")
    assert (f"| {by[best]['label']} {by[best]['ppl']:.2f} | {by['plan_auto']['ppl']:.2f} | {diff} | {word} |"
            in report)
    # the current rule taken again on the plan's saved candidates: this plan was made by it, so the same choice
    now = rp.column_now(plan)
    assert by[now]["layer_sparsity"] == by["plan_auto"]["layer_sparsity"]
    assert f"| {diff} | {word} | same |" in report and "*current rule*" in report
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


def _column(column: str, per_doc_loss: list[float], layers: list[float]) -> dict:
    """A retest row whose documents have one token each: doc_nll is the per-document mean loss itself."""
    return {"column": column, "label": column.removeprefix("plan_"), "layer_sparsity": layers,
            "doc_nll": per_doc_loss, "doc_tokens": [1] * len(per_doc_loss),
            "ppl": math.exp(sum(per_doc_loss) / len(per_doc_loss))}


def test_verdict_pairs_auto_with_the_baseline_of_lowest_test_perplexity(rp):
    uniform = _column("plan_uniform", [3.0, 3.2, 3.4, 3.6], [0.5, 0.5])
    atp = _column("plan_atp", [2.0, 2.2, 2.4, 2.6], [0.4, 0.6])
    # auto 0.10, 0.12, 0.08, 0.10 nats below ATP: mean −0.10, SE = stdev(0.02·[0, 1, −1, 0]) / 2
    better = rp.verdict([uniform, atp, _column("plan_auto", [1.9, 2.08, 2.32, 2.5], [0.3, 0.7])])
    assert better["best"] == "atp" and better["best_ppl"] == pytest.approx(math.exp(2.3))
    assert better["mean"] == pytest.approx(-0.10)
    assert better["se"] == pytest.approx(np.std([0, 0.02, -0.02, 0], ddof=1) / 2)
    assert better["verdict"] == "better"
    # auto worse on two documents and better on two by as much: mean 0, a tie
    tie = rp.verdict([uniform, atp, _column("plan_auto", [2.1, 2.1, 2.5, 2.5], [0.3, 0.7])])
    assert tie["mean"] == pytest.approx(0.0) and tie["verdict"] == "tie"
    worse = rp.verdict([uniform, atp, _column("plan_auto", [2.2, 2.41, 2.59, 2.8], [0.3, 0.7])])
    assert worse["mean"] == pytest.approx(0.2) and worse["verdict"] == "worse"
    # auto kept ATP's list: no pairing, a tie by construction
    same = rp.verdict([uniform, atp, _column("plan_auto", atp["doc_nll"], atp["layer_sparsity"])])
    assert (same["mean"], same["se"], same["verdict"]) == (0.0, 0.0, "tie")
    # sensitivity is the planner's own column, never the rival; a cell without auto has no verdict
    sens = _column("plan_sensitivity", [1.0, 1.0, 1.0, 1.0], [0.2, 0.8])
    assert rp.verdict([uniform, atp, sens, _column("plan_auto", atp["doc_nll"], [0.4, 0.6])])["best"] == "atp"
    assert rp.verdict([uniform, atp, sens]) is None
    # another column standing for auto (the current rule's choice on an older plan)
    again = rp.verdict([uniform, atp, sens, _column("plan_auto", atp["doc_nll"], [0.4, 0.6])], "plan_sensitivity")
    assert again["auto_ppl"] == sens["ppl"] and again["mean"] == pytest.approx(-1.3) and again["verdict"] == "better"


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_heldout_and_test_pairs_match_a_by_hand_computation_on_a_kept_cell(rp):
    """WikiText-2 Wanda 70 %, seed 1 (kept rows and plan; auto chose sensitivity): auto vs ATP*, both sides by numpy."""
    name = "plan_smollm2-135m_wikitext2_wanda_0.7_1.json"
    plan = json.loads((RESULTS / name).read_text())
    rows = [r for r in rp.read_rows(RESULTS / "retest_plans_smollm2-135m.jsonl")
            if r["plan"] == name and r["eval_docs"] == 32 and r["threads"] == 1]
    found = {f["column"]: f for f in rp.heldout_and_test(rows, plan)}
    # held-out: the chosen candidate's per-example losses minus those of ATP's lowest-loss candidate
    atp = min((c for c in plan["candidates"] if c["provider"] == "atp" and c["loss"] is not None),
              key=lambda c: c["loss"])
    held = np.array(plan["candidates"][plan["chosen"]["index"]]["example_losses"]) - np.array(atp["example_losses"])
    assert found["plan_atp"]["held"] == pytest.approx(held.mean(), rel=1e-12)
    assert found["plan_atp"]["held_se"] == pytest.approx(held.std(ddof=1) / math.sqrt(len(held)), rel=1e-12)
    # test: per-document mean token loss, auto minus ATP*
    by = {r["column"]: r for r in rows}
    per_doc = {c: np.array(by[c]["doc_nll"]) / np.array(by[c]["doc_tokens"]) for c in ("plan_auto", "plan_atp")}
    test = per_doc["plan_auto"] - per_doc["plan_atp"]
    assert found["plan_atp"]["test"] == pytest.approx(test.mean(), rel=1e-12)
    assert found["plan_atp"]["test_se"] == pytest.approx(test.std(ddof=1) / math.sqrt(32), rel=1e-12)
    # every column whose list differs from auto's is a pair
    assert set(found) == {c for c in ("plan_uniform", "plan_owl", "plan_alpha_hill", "plan_atp", "plan_layerif",
                                      "plan_sensitivity")
                          if by[c]["layer_sparsity"] != by["plan_auto"]["layer_sparsity"]}


def test_heldout_vs_test_section_counts_every_pair_once(rp):
    paths = {p.name: p for p in RESULTS.glob("plan_smollm2-135m_*.json")}
    rows = rp.read_rows(RESULTS / "retest_plans_smollm2-135m.jsonl")
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["eval_docs"] == 32:
            groups.setdefault((r["plan"], r["eval_docs"], rp.threads_of(r)), []).append(r)
    lines = rp.heldout_vs_test_section(groups, paths)
    pairs = [x for x in lines[4].splitlines()[2:]]  # the per-pair table
    cross = lines[2].splitlines()[2:]
    assert sum(int(c) for row in cross for c in row.strip("|").split("|")[1:]) == len(pairs)
    assert f"{len(pairs)} pairs" in lines[0]
    cells = [p.split("|")[1].strip() for p in pairs]
    plans = {c.rsplit(",", 1)[0] for c in cells}
    assert len(plans) == len(set(cells))  # each plan once, at one thread count
    assert not any("before-batch-fix" in c for c in cells)  # the search judged another model there


def test_search_cost_section_has_one_row_per_auto_plan_and_the_search_total(rp):
    paths = {p.name: p for p in RESULTS.glob("plan_smollm2-135m_*.json")}
    plans = {n: json.loads(p.read_text()) for n, p in paths.items()}
    auto = sorted(n for n, p in plans.items() if p["allocation"] == "auto")
    lines = rp.search_cost_section(paths)
    rows = lines[2].splitlines()[2:]
    resumed = {n for n in auto if plans[n]["cost"].get("resumed")}
    assert resumed  # two SparseGPT 50 % searches were interrupted and resumed (2026-12-07)
    assert [r.split("|")[1].strip() for r in rows] == [n.removeprefix("plan_").removesuffix(".json")
                                                       + (" (resumed)" if n in resumed else "") for n in auto]
    for row, name in zip(rows, auto, strict=True):
        cost = plans[name]["cost"]
        if name not in resumed:
            assert row.split("|")[-2].strip() == (f"{cost['prunes']} + {cost['layer_prunes']} layer, "
                                                  f"{cost['seconds'] / 60:.1f} min")
            continue
        # a resumed search: the interrupted run's candidates and table rows count too, and its minutes
        cell = row.split("|")[-2].strip()
        prunes, layers, minutes = re.fullmatch(r"(\d+) \+ (\d+) layer, ([0-9.]+) min", cell).groups()
        assert (int(prunes), int(layers)) == (cost["prunes"] + cost["resumed"], 210)
        assert float(minutes) > cost["seconds"] / 60 + 30
