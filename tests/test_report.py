"""Markdown tables and PNG plots: exact table text for hand-made inputs, valid PNG files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from layerif_plugins.errors import ConfigError
from layerif_plugins.integrations.lm_eval import EvalResult, TaskResult
from layerif_plugins.models import ModelFingerprint
from layerif_plugins.report import (
    allocations_markdown,
    eval_markdown,
    experts_markdown,
    markdown_table,
    normalized,
    plot_allocations,
    plot_expert_layouts,
    plot_layer_scores,
    plot_metric,
    plot_sweep,
    scores_markdown,
    sweep_markdown,
)
from layerif_plugins.scores import LayerScores


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _scores(values: list[float], method: str = "layerif") -> LayerScores:
    fp = ModelFingerprint("toy", "LlamaForCausalLM", "llama", len(values), 8, "0" * 16)
    return LayerScores(scores=values, method=method, model=fp)


def test_markdown_table_formats_floats():
    assert markdown_table(["a", "b"], [[1, 0.123456], ["x", 2.0]]) == (
        "| a | b |\n|---:|---:|\n| 1 | 0.1235 |\n| x | 2 |"
    )


def test_scores_side_by_side(tmp_path: Path):
    a, b = _scores([1.0, 3.0]), _scores([2.0, 2.0])
    assert normalized(a.scores) == [0.25, 0.75]
    table = scores_markdown([a, b], ["tiny", "shake"])
    assert table.splitlines()[0] == "| layer | tiny score | tiny share | shake score | shake share |"
    assert table.splitlines()[2] == "| 0 | 1 | 0.25 | 2 | 0.5 |"
    w, h = _png_size(plot_layer_scores([a, b], ["tiny", "shake"], tmp_path / "s.png"))
    assert w > 100 and h > 100


def test_allocations_table_and_plot(tmp_path: Path):
    alloc = {"uniform": [0.7, 0.7, 0.7], "layerif": [0.6, 0.7, 0.8]}
    assert allocations_markdown(alloc) == (
        "| layer | uniform | layerif |\n|---:|---:|---:|\n"
        "| 0 | 0.7 | 0.6 |\n| 1 | 0.7 | 0.7 |\n| 2 | 0.7 | 0.8 |\n| mean | 0.7 | 0.7 |"
    )
    assert "mean" not in allocations_markdown(alloc, with_mean=False)
    _png_size(plot_allocations(alloc, tmp_path / "alloc.png"))
    with pytest.raises(ConfigError, match="no allocations"):
        allocations_markdown({})


def test_expert_layouts(tmp_path: Path):
    layouts = {"uniform": [2, 2, 2, 2], "layerif": [1, 2, 2, 3]}
    table = experts_markdown(layouts, top_k={"layerif": [1, 2, 2, 2]})
    lines = table.splitlines()
    assert lines[2] == "| 0 | 2 | 1 (top-1) |"
    assert lines[-1] == "| total | 8 | 8 |"
    _png_size(plot_expert_layouts(layouts, tmp_path / "experts.png"))


def test_eval_table_from_results_and_dicts(tmp_path: Path):
    dense = EvalResult("dense", "hf", {
        "ppl": TaskResult("ppl", "perplexity", "f", 8, {"word_perplexity": 18.3, "bits_per_byte": 0.84}),
        "mc": TaskResult("mc", "mc", "g", 32, {"acc": 0.5, "acc_norm": 0.53}),
    }, seconds=1.0)
    pruned = EvalResult("p", "hf", {"ppl": TaskResult("ppl", "perplexity", "f", 8, {"word_perplexity": 40.0})},
                        seconds=1.0)
    table = eval_markdown({"dense": dense, "pruned": pruned.to_dict()}, metrics=["word_perplexity", "acc"],
                          extra={"pruned": {"sparsity": 0.7}})
    assert table == (
        "| model | sparsity | ppl word_perplexity | mc acc |\n|---:|---:|---:|---:|\n"
        "| dense |  | 18.3 | 0.5 |\n| pruned | 0.7 | 40 |  |"
    )
    w, _ = _png_size(plot_metric({"dense": 0.5, "pruned": 0.3}, tmp_path / "acc.png", "acc", "accuracy",
                                 reference=0.25))
    assert w > 100
    with pytest.raises(ConfigError):
        eval_markdown({})


def test_sweep_table_bolds_the_best_and_plots(tmp_path: Path):
    values = {"uniform": {0.0: 20.0, 0.5: 40.0, 0.7: 90.0}, "layerif": {0.0: 20.0, 0.5: 35.0}}
    assert sweep_markdown(values) == (
        "| method | 0% | 50% | 70% |\n|---:|---:|---:|---:|\n"
        "| uniform | 20 | 40 | 90 |\n| layerif | 20 | **35** |  |"
    )
    acc = sweep_markdown({"a": {0.5: 0.4}, "b": {0.5: 0.3}}, lower_is_better=False, first="allocation")
    assert acc.splitlines()[2] == "| a | **0.4** |"
    _png_size(plot_sweep({k: list(v.items()) for k, v in values.items()}, tmp_path / "sweep.png", "ppl",
                         "sparsity", "ppl", logy=True, reference=25.0, reference_label="dense"))


@pytest.mark.integration
@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path: Path):
    """`layerif demo` with tiny settings: every stage runs, the report holds numbers that check out."""
    import json

    from layerif_plugins.cli import main
    from layerif_plugins.evaluation.perplexity import perplexity
    from layerif_plugins.models import load_model_and_tokenizer

    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--sparsity", "0.5", "--n-train", "8", "--n-val", "8",
                 "--n-eval-docs", "4", "--n-mc", "8", "--n-calib", "8", "--quiet"])
    assert code == 0
    report = (out / "report.md").read_text()
    for heading in ("## 1. LayerIF scores", "## 2. Wanda pruning", "## 3. All evaluations", "Total time"):
        assert heading in report
    for png in ("layer_scores.png", "sparsity.png", "eval_perplexity.png", "eval_mc.png"):
        assert f"]({png})" in report
        _png_size(out / png)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sparsity"]) == {"wanda50-uniform", "wanda50-owl", "wanda50-layerif"}
    for rep in summary["sparsity"].values():
        assert rep["weighted_mean_measured"] == pytest.approx(0.5, abs=0.02)
    dense = summary["eval"]["dense"]["tasks"]["tinystories"]["metrics"]["word_perplexity"]
    ref = perplexity(*load_model_and_tokenizer(out / "models" / "dense"), out / "data" / "tinystories_heldout.txt")
    assert dense == pytest.approx(ref.word_perplexity, rel=0.01)
    assert f"{dense:.4g}" in report
