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

    # the same command again resumes: the pruned models and their evaluations are reused, same report numbers
    first = {k: v["weighted_mean_measured"] for k, v in summary["sparsity"].items()}
    assert main(["demo", "--out", str(out), "--sparsity", "0.5", "--n-train", "8", "--n-val", "8",
                 "--n-eval-docs", "4", "--n-mc", "8", "--n-calib", "8", "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert {k: v["weighted_mean_measured"] for k, v in again["sparsity"].items()} == first
    assert again["eval"] == summary["eval"]
    assert again["seconds"].get("prune (llm-compressor oneshot)", 0.0) < 1.0  # nothing was pruned again


# ----------------------------------------------------------------------------- the demo pipeline (configuration)


def test_demo_config_builds_the_steps():
    """`layerif demo` is a DemoConfig; another model / tasks / sparsities is another config, same code."""
    from layerif_plugins.paths import shared_data
    from layerif_plugins.pipelines.demo import DemoTask, model_label, parse_sparsities, steps, stories260k_config

    cfg = stories260k_config()
    assert [t.name for t in cfg.tasks] == ["tinystories", "shakespeare"] and cfg.scores_task.name == "tinystories"
    assert cfg.sparsities == (0.3, 0.5, 0.7) and cfg.allocations == ("uniform", "owl", "layerif")
    assert (cfg.spread("owl"), cfg.spread("layerif")) == (0.08, 0.1)
    s = steps(cfg)
    assert s[:3] == ["convert", "score layerif on tinystories", "score layerif on shakespeare"]
    assert s[3:12] == [f"prune {model_label(x, a)}" for x in (0.3, 0.5, 0.7) for a in ("uniform", "owl", "layerif")]
    assert s[12] == "evaluate dense" and s[-1] == "vLLM dir check wanda70-layerif" and len(s) == 3 + 9 + 10 + 10
    assert steps(stories260k_config(skip_prune=True)) == ["convert", "score layerif on tinystories",
                                                          "score layerif on shakespeare", "evaluate dense",
                                                          "vLLM dir check dense"]
    assert steps(stories260k_config(sparsities=(0.5,), allocations=("uniform",), depth_methods=("angular", "last"),
                                    depth_k=2, vllm_check=False)) == [
        "convert", "score layerif on tinystories", "score layerif on shakespeare", "prune wanda50-uniform",
        "drop drop2-angular", "drop drop2-last", "evaluate dense", "evaluate wanda50-uniform",
        "evaluate drop2-angular", "evaluate drop2-last"]
    # a WikiText-2 + TinyStories run at 50/60/70 % is configuration only
    wiki = DemoTask("wikitext2", "WikiText-2", shared_data("wikitext-2", "valid.txt"),
                    shared_data("wikitext-2", "test.txt"), heldout="WikiText-2 test paragraphs")
    other = stories260k_config("smollm2-135m", title="SmolLM2-135M", tasks=(wiki, cfg.tasks[0]),
                               sparsities=parse_sparsities("0.7,0.5,0.6"), epsilon=0.05, vllm_check=False)
    assert other.sparsities == (0.5, 0.6, 0.7) and other.scores_task.name == "wikitext2"
    assert other.spread("owl") == other.spread("layerif") == 0.05
    assert steps(other)[1:3] == ["score layerif on wikitext2", "score layerif on tinystories"]
    assert "prune wanda60-owl" in steps(other) and not any(x.startswith("vLLM") for x in steps(other))
    with pytest.raises(ConfigError, match="give numbers in"):
        parse_sparsities("0.5,1.5")
    with pytest.raises(ConfigError, match="not one of the tasks"):
        stories260k_config(prune_scores_task="wikitext2")
    with pytest.raises(ConfigError, match="distinct"):
        stories260k_config(tasks=(wiki, wiki))
    with pytest.raises(ConfigError, match="choose from angular"):
        stories260k_config(depth_methods=("deepest",))


def test_demo_heldout_documents_follow_the_scored_ones(tmp_path: Path):
    """Evaluation documents come after everything the scorer read, per task (real shared data)."""
    from layerif_plugins.data import read_records
    from layerif_plugins.pipelines.demo import stories260k_config, write_heldout

    cfg = stories260k_config(n_train=8, n_val=4, n_eval_docs=3, n_mc=5)
    files = write_heldout(cfg, tmp_path)
    assert list(files) == ["tinystories", "shakespeare", "tinystories_mc"]
    stories, plays = cfg.tasks
    valid = read_records(stories.val)
    assert cfg.heldout_start(stories) == 64 and read_records(files["tinystories"]) == valid[64:67]
    assert cfg.heldout_start(plays) == 24 and read_records(files["shakespeare"]) == read_records(plays.train)[24:27]
    assert len(files["tinystories_mc"].read_text().splitlines()) == 5
    with pytest.raises(ConfigError, match="not enough held-out TinyStories"):
        write_heldout(stories260k_config(n_eval_docs=10**7), tmp_path / "x")


@pytest.mark.integration
@pytest.mark.slow
def test_demo_pipeline_depth_methods_by_configuration(tmp_path: Path):
    """A depth-pruning comparison is configuration too: the pipeline drops, evaluates and reports it."""
    import json

    from layerif_plugins.allocate.layers import layers_to_drop
    from layerif_plugins.pipelines.demo import run_demo, stories260k_config
    from layerif_plugins.pipelines.demo_report import write_report
    from layerif_plugins.scores import LayerScores

    cfg = stories260k_config(skip_prune=True, depth_methods=("layerif", "last"), n_train=8, n_val=8, n_calib=8,
                             n_eval_docs=4, n_mc=8, vllm_check=False, show_progress=False)
    result = run_demo(cfg, tmp_path / "demo")
    assert list(result.evals) == ["dense", "drop1-layerif", "drop1-last"]
    scores = LayerScores.load(tmp_path / "demo" / "scores_tinystories.json")
    assert result.depth["drop1-layerif"]["dropped"] == layers_to_drop(scores, 1)
    assert result.depth["drop1-last"]["dropped"] == [4] and result.depth["drop1-last"]["layers"] == 4
    record = json.loads((tmp_path / "demo" / "models" / "drop1-last" / "layer_drop.json").read_text())
    assert record["dropped"] == [4] and record["method"] == "last"
    report = write_report(result).read_text()
    assert "## Depth pruning: 1 of 5 decoder layers dropped" in report and "## 2. Wanda" not in report
    ppl = result.evals["drop1-last"].metric("tinystories", "word_perplexity")
    assert ppl > result.evals["dense"].metric("tinystories", "word_perplexity")  # a block less: worse
    assert f"| drop1-last | last | [4] | 4 | {ppl:.4g} |" in report
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["depth"]["drop1-last"]["dropped"] == [4] and summary["sparsity"] == {}

    # a second run into the same directory resumes: every step reused, the same numbers
    said: list[str] = []
    again = run_demo(cfg, tmp_path / "demo", progress=lambda _t, msg: said.append(msg))
    assert sum(m.startswith("reusing") for m in said) == 1 + 2 + 2  # dense, two scores files, two dropped models
    assert all("(reusing the earlier run's)" in m for m in said if m.startswith("lm-eval"))
    assert again.evals["drop1-last"].metric("tinystories", "word_perplexity") == ppl
    assert again.scores["tinystories"].scores == scores.scores
    # other settings: the dependent steps are recomputed, not reused
    said.clear()
    run_demo(stories260k_config(skip_prune=True, depth_methods=("last",), n_train=8, n_val=8, n_calib=8,
                                n_eval_docs=5, n_mc=8, vllm_check=False, show_progress=False),
             tmp_path / "demo", progress=lambda _t, msg: said.append(msg))
    assert any(m == "lm-eval 2/2: drop1-last" for m in said)  # 5 documents now: evaluated again


def test_smollm2_demo_is_a_configuration():
    """`layerif demo --model smollm2-135m` picks its own DemoConfig: WikiText-2 + TinyStories, 50/60/70 %, vLLM."""
    from layerif_plugins.cli import build_parser
    from layerif_plugins.cli.demo import config_from_args
    from layerif_plugins.pipelines.demo import config_for, steps

    cfg = config_for("smollm2-135m")
    assert cfg.model == "smollm2-135m" and [t.name for t in cfg.tasks] == ["wikitext2", "tinystories"]
    assert cfg.sparsities == (0.5, 0.6, 0.7) and cfg.depth_methods == ("angular", "layerif", "last")
    assert cfg.quantize == ("W8A8", "W8A8@wanda50-layerif", "mixed-20")
    assert cfg.vllm_serve and steps(cfg)[-4:] == ["vLLM serve drop4-last", "vLLM serve w8a8",
                                                  "vLLM serve wanda50-layerif-w8a8", "vLLM serve mixed20"]
    assert config_for(None).title == "stories260K" and not config_for(None).vllm_serve
    args = build_parser().parse_args(["demo", "--model", "smollm2-135m", "--n-train", "64", "--out", "o"])
    got = config_from_args(args)  # only what the command line gives overrides the model's configuration
    assert (got.n_train, got.n_val, got.sparsities, got.log_dir) == (64, cfg.n_val, cfg.sparsities, Path("o/logs"))


def test_demo_quantize_entries_are_parsed_and_bad_ones_refused_before_any_work():
    """`quantize` entries name a scheme (or a mixed budget) and a model the run makes; anything else is refused."""
    from layerif_plugins.pipelines.demo import steps, stories260k_config
    from layerif_plugins.pipelines.demo_config import QuantizeSpec

    assert QuantizeSpec.parse("W8A8") == QuantizeSpec("W8A8", None, "dense")
    assert QuantizeSpec.parse(" mixed-20@drop1-last ") == QuantizeSpec(None, 20.0, "drop1-last")
    assert [QuantizeSpec.parse(t).label for t in ("W8A8", "W8A8@wanda50-uniform", "mixed-12.5")] == [
        "w8a8", "wanda50-uniform-w8a8", "mixed12.5"]
    cfg = stories260k_config(sparsities=(0.5,), allocations=("uniform",), depth_methods=("last",),
                             quantize=("W8A8@wanda50-uniform", "mixed-20@drop1-last"), vllm_check=False)
    assert steps(cfg)[3:] == ["prune wanda50-uniform", "drop drop1-last", "quantize wanda50-uniform-w8a8",
                              "quantize drop1-last-mixed20", "evaluate dense", "evaluate wanda50-uniform",
                              "evaluate drop1-last", "evaluate wanda50-uniform-w8a8", "evaluate drop1-last-mixed20"]
    bad = {
        ("W4A16",): "cannot be served by vLLM on cpu",
        ("W3A3",): "unknown scheme 'W3A3'",
        ("mixed-x",): "not a number of bits",
        ("mixed-8",): "cheapest scheme of the cpu menu",
        ("W8A8@",): "SCHEME",
        ("W8A8@wanda90-uniform",): "this run makes no model of that name",
        ("W8A8", "W8A8@dense"): "named twice",
    }
    for entries, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            stories260k_config(sparsities=(0.5,), quantize=entries)
    with pytest.raises(ConfigError, match="device_target"):
        stories260k_config(quantize=("W8A8",), quantize_target="tpu")
    assert stories260k_config(quantize=("W4A16",), quantize_target="gpu").quantize_specs[0].scheme == "W4A16"


@pytest.mark.integration
@pytest.mark.slow
def test_demo_quantizes_evaluates_and_reports_the_quantized_models(tmp_path: Path):
    """W8A8 of the dense and of a pruned model, a mixed one ordered by the LayerIF scores: built with the real
    ``oneshot``, saved compressed, evaluated, reported; a second run reuses them."""
    import json

    from layerif_plugins.allocate.precision import cpu_menu, precision_from_scores
    from layerif_plugins.integrations.llmcompressor.quantize import layer_params
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.pipelines.demo import run_demo, stories260k_config
    from layerif_plugins.pipelines.demo_report import write_report
    from layerif_plugins.scores import LayerScores

    cfg = stories260k_config(sparsities=(0.5,), allocations=("uniform",), quantize=("W8A8", "W8A8@wanda50-uniform",
                             "mixed-20"), n_train=8, n_val=8, n_calib=8, n_eval_docs=4, n_mc=8, vllm_check=False,
                             show_progress=False)
    out = tmp_path / "demo"
    result = run_demo(cfg, out)
    assert list(result.evals) == ["dense", "wanda50-uniform", "w8a8", "wanda50-uniform-w8a8", "mixed20"]
    dense_bytes = sum(f.stat().st_size for f in (out / "models" / "dense").glob("*.safetensors"))
    for label in ("w8a8", "wanda50-uniform-w8a8", "mixed20"):
        config = json.loads((out / "models" / label / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert result.quantized[label]["bytes_on_disk"] < dense_bytes
    assert set(result.quantized["w8a8"]["schemes"]) == {"W8A8"}
    assert result.quantized["wanda50-uniform-w8a8"]["source"] == "wanda50-uniform"
    assert result.extra["wanda50-uniform-w8a8"]["sparsity"] == result.extra["wanda50-uniform"]["sparsity"]
    # the mixed model: each layer's scheme exactly as the allocation computes it from the TinyStories scores
    model, _ = load_model_and_tokenizer(out / "models" / "dense")
    expected = precision_from_scores(LayerScores.load(out / "scores_tinystories.json"), layer_params(model), 20.0,
                                     cpu_menu(32))
    assert result.quantized["mixed20"]["schemes"] == list(expected.schemes)
    assert "dense" in expected.schemes and "W8A8" in expected.schemes
    w8a8_ppl = result.evals["w8a8"].metric("tinystories", "word_perplexity")
    assert w8a8_ppl != result.evals["dense"].metric("tinystories", "word_perplexity")
    report = write_report(result).read_text()
    assert "## Quantization (llm-compressor, saved compressed)" in report and f"{w8a8_ppl:.4g}" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantized"]["mixed20"]["schemes"] == list(expected.schemes)

    said: list[str] = []
    again = run_demo(cfg, out, progress=lambda _t, msg: said.append(msg))
    assert {m for m in said if m.startswith("reusing") and "quantized" in m} == {
        f"reusing {label} (quantized the same way by an earlier run)"
        for label in ("w8a8", "wanda50-uniform-w8a8", "mixed20")}
    assert again.evals["w8a8"].metric("tinystories", "word_perplexity") == w8a8_ppl


@pytest.mark.vllm
def test_demo_vllm_section_skips_a_model_vllm_cannot_serve(stories_dir: Path, tinystories_valid: Path):
    """stories260K (head_dim 8) cannot be served by vLLM on CPU: the section says why instead of failing."""
    import shutil

    from layerif_plugins.integrations.vllm_backend import vllm_unavailable_reason
    from layerif_plugins.pipelines.demo import StageClock, serve_all, stories260k_config

    if vllm_unavailable_reason() is not None or shutil.which("nvidia-smi"):
        pytest.skip("needs the CPU vLLM environment (make vllm-env)")
    said: list[str] = []
    out = serve_all({"dense": stories_dir}, tinystories_valid, stories260k_config(vllm_docs=2), StageClock(),
                    progress=lambda _t, msg: said.append(msg))
    assert "head_dim" in out["skipped"] and said and said[-1].startswith("vLLM section skipped")
