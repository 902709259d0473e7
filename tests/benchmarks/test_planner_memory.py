"""benchmarks/planner_memory.py end to end on stories260K: the graph's cost is visible, the losses are unchanged."""

from __future__ import annotations

import json

import pytest
from benchmark_modules import load_benchmark


@pytest.mark.slow
def test_planner_memory_reports_the_forward_side_by_side_and_every_phase(tmp_path, capsys):
    bench = load_benchmark("planner_memory", "planner_memory_bench")
    assert bench.main(["--model", "stories260k", "--task", "tinystories", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "planner_memory_stories260k.json").read_text())
    graph, plain = data["forward"]
    assert (graph["graph"], plain["graph"]) == (True, False) and graph["weights_require_grad"]
    assert graph["sums"] == plain["sums"]  # no_grad changes the memory, never a loss
    assert graph["peak_mib"] - graph["base_mib"] > plain["peak_mib"] - plain["base_mib"]
    phases = data["phases"]
    assert set(phases["peaks_mib"]) == {*bench.PHASES.values(), bench.OTHER}
    assert phases["prunes"] == 2 and phases["layer_prunes"] == 5 * 3  # uniform + the knapsack; 5 layers × 3 levels
    assert max(phases["peaks_mib"].values()) <= phases["process_peak_mib"] + 1
    after = data["repeat"]["rss_after_mib"]  # no model left behind per call (stories260K: a few MiB each)
    assert len(after) == 4 and after[-1] - after[1] < 64
    text = (tmp_path / "planner_memory_stories260k.md").read_text()
    assert text in capsys.readouterr().out and "| candidates (stock prune + held-out losses) |" in text
