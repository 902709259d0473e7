"""The quality benchmarks' argument handling and resumption (no model is run here)."""

from __future__ import annotations

import json

import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def qp():
    return load_benchmark("quality_pruning")


def test_plan_orders_auto_last_and_adds_noise_seeds(qp):
    args = qp.parse_args(["--allocations", "uniform,layerif_auto,depth_ramp", "--sparsities", "0.5,0.6",
                          "--algorithms", "wanda", "--noise-allocations", "uniform", "--noise-seeds", "1",
                          "--noise-sparsities", ""])
    cells = qp.planned_cells(args)
    assert [(c["variant"], c["sparsity"], c["seed"]) for c in cells] == [
        ("uniform", 0.5, 0), ("uniform", 0.5, 1), ("depth_ramp", 0.5, 0),
        ("uniform", 0.6, 0), ("uniform", 0.6, 1), ("depth_ramp", 0.6, 0),
        ("layerif_auto", 0.5, 0), ("layerif_auto", 0.6, 0),
    ]


def test_unknown_allocation_or_task_is_refused(qp, capsys):
    with pytest.raises(SystemExit):
        qp.parse_args(["--allocations", "uniform,lyerif"])
    assert "lyerif" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qp.parse_args(["--tasks", "c4"])
    assert "c4" in capsys.readouterr().err


def test_resume_skips_done_cells_of_the_same_sizes_only(qp, tmp_path):
    args = qp.parse_args(["--allocations", "uniform", "--sparsities", "0.5", "--algorithms", "wanda",
                          "--noise-seeds", ""])
    jsonl = tmp_path / "rows.jsonl"
    done = {**qp.planned_cells(args)[0], "ppl": 40.0, "sizes": qp.sizes(args)}
    other = {**done, "sizes": {**qp.sizes(args), "n_calib": 1}}
    qp.append_row(jsonl, done)
    qp.append_row(jsonl, other)
    with jsonl.open("a") as fh:
        fh.write('{"task": "wikitext2", "trunc')  # a run killed mid-write
    rows = qp.read_rows(jsonl)
    assert [r["sizes"]["n_calib"] for r in rows] == [args.n_calib, 1]
    keys = {qp.cell_key(r) for r in rows}
    todo = [c for c in qp.planned_cells(args) if qp.cell_key({**c, "sizes": qp.sizes(args)}) not in keys]
    assert todo == []
    bigger = qp.parse_args(["--allocations", "uniform", "--sparsities", "0.5", "--algorithms", "wanda",
                            "--noise-seeds", "", "--n-calib", "7"])
    assert qp.cell_key({**qp.planned_cells(bigger)[0], "sizes": qp.sizes(bigger)}) not in keys


def test_planner_knobs_are_part_of_a_cell_and_old_rows_read_as_the_defaults(qp):
    base = qp.parse_args(["--allocations", "planner", "--sparsities", "0.7", "--algorithms", "wanda",
                          "--noise-seeds", ""])
    cell = qp.planned_cells(base)[0]
    old_row = {**cell, "sizes": {k: v for k, v in qp.sizes(base).items()
                                 if k not in ("n_holdout", "sensitivity_examples", "confirm_examples",
                                              "planner_allocation", "sensitivity_around", "max_moves")}}
    assert qp.cell_key(old_row) == qp.cell_key({**cell, "sizes": qp.sizes(base)})  # written before the knobs
    for extra in (["--sensitivity-around", "uniform"], ["--planner-allocation", "sensitivity"], ["--max-moves", "0"],
                  ["--confirm-examples", "16", "--n-holdout", "48"], ["--n-holdout", "48"],
                  ["--sensitivity-examples", "8"]):
        other = qp.parse_args(["--allocations", "planner", "--sparsities", "0.7", "--algorithms", "wanda",
                               "--noise-seeds", "", *extra])
        assert qp.cell_key({**cell, "sizes": qp.sizes(other)}) != qp.cell_key(old_row), extra
        assert qp.plan_file_name(cell, other) != qp.plan_file_name(cell, base), extra  # kept side by side


def test_plan_file_names_say_the_cell_and_every_non_default_knob(qp):
    base = qp.parse_args(["--allocations", "planner", "--sparsities", "0.6", "--algorithms", "wanda",
                          "--noise-seeds", "", "--tasks", "tinystories", "--seeds", "1"])
    cell = qp.planned_cells(base)[0]
    assert qp.plan_file_name(cell, base) == "plan_smollm2-135m_tinystories_wanda_0.6_1.json"
    other = qp.parse_args(["--allocations", "planner", "--sparsities", "0.6", "--algorithms", "wanda",
                           "--noise-seeds", "", "--tasks", "tinystories", "--seeds", "1", "--n-holdout", "64",
                           "--confirm-examples", "16"])
    assert qp.plan_file_name(cell, other) == ("plan_smollm2-135m_tinystories_wanda_0.6_1_n_holdout-64_"
                                              "confirm_examples-16.json")


def test_report_tables_noise_and_auto(qp, tmp_path):
    args = qp.parse_args(["--out", str(tmp_path)])
    base = {"task": "wikitext2", "algorithm": "wanda", "sparsity": 0.6, "sizes": qp.sizes(args), "auto": {},
            "measured": 0.6, "eval_tokens": 100}
    rows = [
        {**base, "variant": "dense", "algorithm": "dense", "sparsity": 0.0, "seed": 0, "ppl": 30.0},
        {**base, "variant": "uniform", "seed": 0, "ppl": 50.0},
        {**base, "variant": "uniform", "seed": 1, "ppl": 51.0},
        {**base, "variant": "depth_ramp", "seed": 0, "ppl": 45.0},
        {**base, "variant": "layerif_auto", "seed": 0, "ppl": 49.0,
         "auto": {"epsilon": 0.1, "invert": True, "holdout_uniform_ppl": 60.0, "holdout_chosen_ppl": 58.0,
                  "pruning_passes": 9, "search_s": 300.0}},
    ]
    text = qp.write_report(args, rows, tmp_path)
    assert "| wanda | 0.60 | 50.00 (0.600) | **45.00 (0.600)** | 49.00 (0.600) |" in text
    assert "median 2.0 %" in text  # (51 − 50) / 50.5
    assert ("| wanda | LayerIF ε auto | 0.60 | 0 | 49.00 | 50.00 | -2.0 % | yes | 0.1 inverted | 60.00 → 58.00 "
            "| 9 | 300 |") in text
    assert "a spread > 0 chosen in 1 of 1 cells, -2.0 % perplexity vs uniform on average where it was" in text
    assert "within the calibration-seed noise (2.0 %) in 1 of 1" in text


@pytest.mark.slow  # imports torch, transformers and PEFT
def test_moe_layout_beta():
    moe = load_benchmark("quality_moe")
    assert moe.layout_beta("layerif:1", 2.5) == ("layerif", 1.0)
    assert moe.layout_beta("uniform", 2.5) == ("uniform", 2.5)
    args = moe.parse_args(["--quick", "--model", "stories260k"])
    assert args.model.endswith("stories260K.bin") and args.steps == 5


def test_planner_report_shows_every_column_with_deltas_and_cost(qp, tmp_path):
    args = qp.parse_args(["--out", str(tmp_path), "--allocations", "planner"])
    assert [c["variant"] for c in qp.planned_cells(args)] == ["planner"] * 6
    base = {"task": "wikitext2", "algorithm": "wanda", "sparsity": 0.7, "seed": 0, "sizes": qp.sizes(args),
            "measured": 0.7, "eval_tokens": 100, "holdout_ppl": 1.0, "chosen": {"provider": "atp"},
            "search": {"plan_prunes": 36, "layer_prunes": 210, "plan_s": 600.0, "why": ["start from uniform()"]}}
    ppl = {"plan_uniform": 100.0, "plan_owl": 90.0, "plan_alpha_hill": 95.0, "plan_atp": 80.0,
           "plan_layerif": 99.0, "plan_sensitivity": 85.0, "plan_auto": 80.0}
    rows = [{**base, "variant": v, "ppl": p} for v, p in ppl.items()]
    rows.append({"task": "wikitext2", "algorithm": "wanda", "sparsity": 0.7, "seed": 0, "variant": "planner",
                 "sizes": qp.sizes(args), "done": True})
    text = qp.write_report(args, rows, tmp_path)
    assert ("| wanda | 0.70 | 100.00 | 90.00 (-10.0 %) | 95.00 (-5.0 %) | 80.00 (-20.0 %) | 99.00 (-1.0 %) "
            "| 85.00 (-15.0 %) | 80.00 (-20.0 %) | atp; 36 prunes + 210 layer prunes, 10.0 min |") in text
    assert "wanda 0.70 seed 0: start from uniform()" in text


def test_column_costs_add_up_to_the_search_they_came_from(qp):
    """Every kept auto plan: the columns' own prunes are the search's, their seconds fit inside its wall clock."""
    plans = sorted((qp.REPO / "benchmarks" / "results").glob("plan_smollm2-135m_*.json"))
    checked = 0
    for path in plans:
        plan = json.loads(path.read_text())
        if plan["allocation"] != "auto":
            continue
        costs = qp.column_costs(plan)
        own = [c for k, c in costs.items() if k != "plan_auto"]
        cost, table = plan["cost"], plan["extras"]["sensitivity"]
        # a search resumed from its journal counts the interrupted run's share too
        assert sum(p for p, _, _ in own) == cost["prunes"] + cost["resumed"] == costs["plan_auto"][0], path.name
        measured = len(plan["candidates"]) - sum(c["status"] in ("duplicate", "infeasible") for c in
                                                 plan["candidates"])
        assert costs["plan_auto"][0] == measured, path.name
        per_layer = 6 if table.get("around") == "uniform" else 7  # 7 levels; around uniform its centre is no prune
        assert sum(n for _, n, _ in own) == costs["plan_auto"][1] == 30 * per_layer, path.name
        # plans resumed before the journal kept the count: every resumed row took per_layer prunes
        assert table["layer_prunes"] + table.get("resumed_layer_prunes",
                                                 per_layer * table.get("resumed_layers", 0)) == 30 * per_layer
        assert costs["plan_uniform"][:2] == (1, 0)
        assert 0 < sum(s for _, _, s in own) <= costs["plan_auto"][2], path.name
        assert qp.resumed_search(plan) == bool(cost["resumed"]), path.name
        checked += 1
    assert checked >= 20


def test_a_resumed_search_costs_what_its_runs_spent_together(qp):
    """The interrupted run's candidates and table rows (read back from the journal) count in every column's cost."""
    cands = [{"provider": "uniform", "status": "resumed", "seconds": 60.0},
             {"provider": "atp", "status": "resumed", "seconds": 50.0},
             {"provider": "atp", "status": "evaluated", "seconds": 40.0},
             {"provider": "sensitivity", "status": "evaluated", "seconds": 30.0}]
    table = {"costs": [[0.1, 0.2, None], [0.3, 0.4, None]], "center": 1, "around": "dense", "seconds": 5.0,
             "layer_prunes": 2, "resumed_layers": 1, "resumed_layer_prunes": 2, "resumed_seconds": 100.0}
    plan = {"candidates": cands, "extras": {"sensitivity": table},
            "cost": {"seconds": 90.0, "prunes": 2, "resumed": 2, "layer_prunes": 2, "resumed_layers": 1}}
    costs = qp.column_costs(plan)
    assert costs["plan_uniform"] == (1, 0, 60.0) and costs["plan_atp"] == (2, 0, 90.0)
    assert costs["plan_sensitivity"] == (1, 4, 30.0 + 5.0 + 100.0)
    assert costs["plan_auto"] == (4, 4, 90.0 + 110.0 + 100.0)
    assert qp.resumed_search(plan)
    # around the uniform model the operating point is no prune
    assert qp.table_layer_prunes({**table, "around": "uniform"}) == 2
