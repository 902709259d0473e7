"""The llm-compressor adapter end to end on the real stories260K with the real ``oneshot``.

Every pruned model is reloaded from disk with ``AutoModelForCausalLM`` and its zeros are
counted independently of the library: Wanda must hit ``rows · int(cols · s_l)`` zeros in
every module (its row rounding), SparseGPT the target within its per-block rounding.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from layerif_plugins.allocate.sparsity import layerwise_sparsity, owl_sparsity, sparsity_from_scores, weighted_mean
from layerif_plugins.data import load_examples, pad_id_of
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.errors import AllocationError, ConfigError, DataError, ScoresError
from layerif_plugins.integrations.llmcompressor import (
    LayerIFSparseGPTModifier,
    LayerIFWandaPruningModifier,
    prune_model,
)
from layerif_plugins.models import block_linears, load_model_and_tokenizer
from layerif_plugins.scorers import ScoringData, score_layers

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "pruning"
N_CALIB, MAX_LEN = 16, 64

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def layerif_scores(stories_dir, tinystories_train, tinystories_valid, tmp_path_factory) -> Path:
    model, tok = load_model_and_tokenizer(stories_dir)
    data = ScoringData(train=load_examples(tinystories_train, tok, 64, n=16),
                       val=load_examples(tinystories_valid, tok, 64, n=8), pad_id=pad_id_of(tok))
    scores = score_layers(model, "layerif", data, config=InfluenceConfig(show_progress=False))
    return scores.save(tmp_path_factory.mktemp("scores") / "layerif.json")


@pytest.fixture(scope="module")
def block_params(stories_dir) -> list[int]:
    model, _ = load_model_and_tokenizer(stories_dir)
    counts = [0] * 5
    for lin in block_linears(model, "all"):
        counts[lin.layer] += lin.numel
    return counts


def reload_and_count(out: Path) -> dict[str, tuple[int, int, int, int]]:
    """name → (layer, zeros, rows, cols) of every block linear of the saved model, read back from disk."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    return {lin.name: (lin.layer, int((lin.module.weight == 0).sum()), *lin.module.weight.shape)
            for lin in block_linears(model, "all")}


def wanda_expected_zeros(rows: int, cols: int, s: float) -> int:
    return rows * int(cols * s)


def prune(stories_dir, out, calib, **kw):
    kw.setdefault("n_calib", N_CALIB)
    kw.setdefault("max_length", MAX_LEN)
    return prune_model(stories_dir, out, calib=calib, show_progress=False, **kw)


def assert_vllm_loadable_dir(out: Path) -> None:
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "sparsity_report.json", "tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in json.dumps(config) and "quantization_config" not in config
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp dirs left


# ----------------------------------------------------------------------------- real oneshot runs

@pytest.mark.slow
def test_layerif_wanda_end_to_end(stories_dir, tinystories_train, layerif_scores, block_params, tmp_path):
    from layerif_plugins.scores import LayerScores

    out = tmp_path / "wanda70"
    report = prune(stories_dir, out, tinystories_train, algorithm="wanda", sparsity=0.7,
                   allocation="layerif", scores=layerif_scores)
    assert_vllm_loadable_dir(out)
    expected = layerwise_sparsity(LayerScores.load(layerif_scores).scores, block_params, 0.7, epsilon=0.1)
    targets = [row["target"] for row in report["layers"]]
    assert targets == pytest.approx(expected, abs=1e-12)
    assert weighted_mean(targets, block_params) == pytest.approx(0.7, abs=1e-12)
    assert max(targets) - min(targets) > 0.05  # a real per-layer allocation, not uniform
    counted = reload_and_count(out)
    zeros = [0] * 5
    for name, (layer, z, rows, cols) in counted.items():
        assert z == wanda_expected_zeros(rows, cols, expected[layer]), name
        assert report["modules"][name]["measured"] == pytest.approx(z / (rows * cols), abs=1e-15)
        zeros[layer] += z
    measured = [z / p for z, p in zip(zeros, block_params, strict=True)]
    assert [row["measured"] for row in report["layers"]] == pytest.approx(measured, abs=1e-15)
    # Wanda rounds each row down: at most one weight per row below the target
    assert 0.7 - 1 / 64 <= report["weighted_mean_measured"] <= 0.7
    assert report["weighted_mean_measured"] == pytest.approx(sum(zeros) / sum(block_params), abs=1e-15)
    assert json.loads((out / "sparsity_report.json").read_text()) == json.loads(json.dumps(report))
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    mod = next(iter(next(iter(recipe.values())).values()))["LayerIFWandaPruningModifier"]
    assert mod["sparsity"] == 0.7 and mod["allocation"] == "layerif" and mod["scores"] == str(layerif_scores)
    # embeddings and lm_head untouched
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    original = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    assert torch.equal(reloaded.lm_head.weight, original.lm_head.weight)
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)


@pytest.mark.slow
def test_layerif_sparsegpt_end_to_end_overwrites(stories_dir, tinystories_train, layerif_scores, block_params,
                                                 tmp_path):
    out = tmp_path / "sgpt50"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / ".layerif-output").write_text("")  # a directory layerif wrote earlier (only those are replaced)
    report = prune(stories_dir, out, tinystories_train, algorithm="sparsegpt", sparsity=0.5,
                   allocation="layerif", scores=str(layerif_scores), overwrite=True)
    assert not (out / "stale.txt").exists()
    assert_vllm_loadable_dir(out)
    targets = [row["target"] for row in report["layers"]]
    assert weighted_mean(targets, block_params) == pytest.approx(0.5, abs=1e-12)
    counted = reload_and_count(out)
    for layer in range(5):
        z = sum(c[1] for c in counted.values() if c[0] == layer)
        assert z / block_params[layer] == pytest.approx(targets[layer], abs=2e-3)
    total = sum(c[1] for c in counted.values()) / sum(block_params)
    assert total == pytest.approx(0.5, abs=1e-3)
    assert report["algorithm"] == "sparsegpt" and report["scores_method"] == "layerif"


@pytest.mark.slow
def test_yaml_recipe_from_recipes_dir_runs(stories_dir, tinystories_train, layerif_scores, block_params,
                                           monkeypatch):
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    from layerif_plugins.scores import LayerScores

    monkeypatch.setenv("LAYERIF_SCORES", str(layerif_scores))
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    ex = load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB)
    ds = Dataset.from_dict({"input_ids": [list(x) for x in ex.input_ids],
                            "attention_mask": [[1] * len(x) for x in ex.input_ids]})
    model = oneshot(model=str(stories_dir), recipe=str(RECIPES / "wanda_layerif_50.yaml"), dataset=ds,
                    num_calibration_samples=N_CALIB, max_seq_length=MAX_LEN)
    expected = layerwise_sparsity(LayerScores.load(layerif_scores).scores, block_params, 0.5, epsilon=0.1)
    for lin in block_linears(model, "all"):
        rows, cols = lin.module.weight.shape
        assert int((lin.module.weight == 0).sum()) == wanda_expected_zeros(rows, cols, expected[lin.layer])
    assert not bool((model.lm_head.weight == 0).any())


def test_every_recipe_parses_to_the_right_modifier():
    from llmcompressor.recipe import Recipe

    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) == 32
    for path in files:
        algo, pct = path.stem.split("_")[0], path.stem.split("_")[-1]
        alloc = path.stem[len(algo) + 1: -len(pct) - 1]
        (modifier,) = Recipe.create_instance(str(path)).modifiers
        cls = LayerIFWandaPruningModifier if algo == "wanda" else LayerIFSparseGPTModifier
        assert type(modifier) is cls, path
        assert modifier.allocation == alloc and modifier.sparsity == int(pct) / 100, path
        assert (modifier.scores == "$LAYERIF_SCORES") == (alloc == "layerif"), path


@pytest.mark.slow
def test_owl_from_calibration_data_matches_scorer(stories_dir, tinystories_train, tmp_path):
    """allocation=owl without a file: outlier ratios from llm-compressor's calibration dataloader."""
    out = tmp_path / "owl"
    report = prune(stories_dir, out, tinystories_train, algorithm="sparsegpt", sparsity=0.6, allocation="owl",
                   epsilon=0.08)
    model, tok = load_model_and_tokenizer(stories_dir)
    calib = load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB)
    ours = score_layers(model, "owl", ScoringData(calib=calib, pad_id=pad_id_of(tok)), batch_size=1)
    assert report["layer_scores"] == pytest.approx(ours.scores, abs=1e-9)
    assert [r["target"] for r in report["layers"]] == pytest.approx(owl_sparsity(ours.scores, 0.6, 0.08), abs=1e-12)


@pytest.mark.slow
def test_alpha_hill_via_cli_from_llama2c_bin(stories_bin, tinystories_train, block_params, tmp_path, capsys):
    from layerif_plugins.cli import main

    out = tmp_path / "alpha"
    rc = main(["prune", "--model", str(stories_bin), "--algorithm", "wanda", "--sparsity", "0.6",
               "--allocation", "alpha_hill", "--epsilon", "0.2", "--calib", str(tinystories_train),
               "--n-calib", "8", "--max-length", "32", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    model, _ = load_model_and_tokenizer(stories_bin)
    expected = layerwise_sparsity(score_layers(model, "alpha_hill").scores, block_params, 0.6, epsilon=0.2)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert [r["target"] for r in report["layers"]] == pytest.approx(expected, abs=1e-12)
    for name, (layer, z, rows, cols) in reload_and_count(out).items():
        assert z == wanda_expected_zeros(rows, cols, expected[layer]), name


# ----------------------------------------------------------------------------- refusals (nothing written)

def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.slow
def test_fingerprint_mismatch_refused_naming_field(stories_dir, tinystories_train, layerif_scores, tmp_path):
    from layerif_plugins.scores import LayerScores

    scores = LayerScores.load(layerif_scores)
    scores.model = dataclasses.replace(scores.model, hidden_size=128)
    bad = scores.save(tmp_path / "other_model.json")
    out = tmp_path / "never"
    with pytest.raises(ScoresError, match="hidden_size is 128 in the scores"):
        prune(stories_dir, out, tinystories_train, scores=bad, n_calib=4, max_length=16)
    assert_nothing_written(out)


def test_bad_inputs_refused_before_work(stories_dir, tinystories_train, layerif_scores, tmp_path):
    out = tmp_path / "never"
    for sparsity in (0.0, 1.0, 1.2, -0.5):
        with pytest.raises(AllocationError, match="sparsity"):
            prune(stories_dir, out, tinystories_train, allocation="uniform", sparsity=sparsity)
    with pytest.raises(ConfigError, match="needs a scores file"):
        prune(stories_dir, out, tinystories_train, allocation="layerif")
    with pytest.raises(ConfigError, match="algorithm"):
        prune(stories_dir, out, tinystories_train, algorithm="magnitude", allocation="uniform")
    with pytest.raises(ConfigError, match="allocation"):
        prune(stories_dir, out, tinystories_train, allocation="random")
    with pytest.raises(ScoresError, match="'layerif' scores but allocation is 'owl'"):
        prune(stories_dir, out, tinystories_train, allocation="owl", scores=layerif_scores)
    with pytest.raises(ScoresError, match="not found"):
        prune(stories_dir, out, tinystories_train, scores=tmp_path / "missing.json")
    with pytest.raises(DataError, match="not found"):
        prune(stories_dir, out, tmp_path / "missing.txt", allocation="uniform")
    short = tmp_path / "short.txt"
    short.write_text("one story.\n\nanother story.\n\na third one.\n")
    with pytest.raises(DataError, match="only 3"):
        prune(stories_dir, out, short, allocation="uniform")
    with pytest.raises(AllocationError, match="epsilon"):
        prune(stories_dir, out, tinystories_train, allocation="uniform", epsilon=-1.0)
    assert_nothing_written(out)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        prune(stories_dir, full, tinystories_train, allocation="uniform")
    assert (full / "keep.txt").read_text() == "mine"


def test_modifier_validation():
    """Field values are checked by pydantic validators: ValidationError (a ValueError) naming the value."""
    cases = [
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "mask_structure": "2:4"}, "N:M"),
        (LayerIFSparseGPTModifier, {"sparsity": 0.5, "mask_structure": "2:4", "allocation": "uniform"}, "N:M"),
        (LayerIFWandaPruningModifier, {"sparsity": [0.5, 0.6]}, "one global sparsity"),
        (LayerIFSparseGPTModifier, {"sparsity": 1.5}, "in \\(0, 1\\)"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08},
         "allocation: owl"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "allocation": "uniform", "scores": "x.json"}, "uses no scores"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "allocation": "random"}, "allocation"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "epsilon": 1.5}, "epsilon"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "epsilon": "wide"}, "epsilon"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "epsilon_grid": [0.1, -0.2]}, "epsilon_grid value"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "holdout": 0}, "holdout"),
        (LayerIFWandaPruningModifier, {"sparsity": 0.5, "holdout": 1.5}, "holdout"),
    ]
    for cls, kwargs, match in cases:
        with pytest.raises(ValidationError, match=match):
            cls(**kwargs)
    mod = LayerIFWandaPruningModifier(sparsity=0.7, scores="s.json")
    assert mod.allocation == "layerif" and mod.epsilon == 0.1 and mod.mask_structure == "0:0"
    assert mod.targets is None and mod.invert is False and mod.holdout == 0.125
    auto = LayerIFSparseGPTModifier(sparsity=0.5, allocation="depth_ramp", epsilon="auto", holdout=4)
    assert auto.epsilon == "auto" and auto.holdout == 4


def test_build_modifier_raises_the_projects_error():
    """prune_model / the CLI build modifiers from options: the LayerIFError inside the ValidationError comes out."""
    from layerif_plugins.integrations.llmcompressor.modifiers import build_modifier

    with pytest.raises(AllocationError, match="epsilon must be in \\[0, 1\\]"):
        build_modifier(LayerIFWandaPruningModifier, sparsity=0.5, epsilon=-1.0)
    with pytest.raises(ConfigError, match="N:M"):
        build_modifier(LayerIFWandaPruningModifier, sparsity=0.5, mask_structure="2:4")
    with pytest.raises(ConfigError, match="invalid LayerIFWandaPruningModifier options"):
        build_modifier(LayerIFWandaPruningModifier, sparsity=0.5, no_such_field=1)


def test_yaml_nm_recipe_refused():
    from llmcompressor.recipe import Recipe

    recipe = """
pruning_stage:
  sparsity_modifiers:
    LayerIFWandaPruningModifier: {sparsity: 0.5, mask_structure: "2:4", allocation: uniform}
"""
    with pytest.raises(ValidationError, match="N:M"):
        Recipe.create_instance(recipe)


def test_unset_scores_env_var_refused():
    from layerif_plugins.integrations.llmcompressor.modifiers import resolve_scores_path

    with pytest.raises(ConfigError, match="LAYERIF_SCORES"):
        resolve_scores_path("$LAYERIF_SCORES_SURELY_UNSET_123")


def test_cli_error_exit_code(stories_dir, tinystories_train, tmp_path, capsys):
    from layerif_plugins.cli import main

    rc = main(["prune", "--model", str(stories_dir), "--sparsity", "1.3", "--allocation", "uniform",
               "--calib", str(tinystories_train), "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "sparsity" in capsys.readouterr().err


@pytest.mark.slow
def test_import_is_lazy_and_yaml_resolves_in_fresh_process():
    """Importing the adapter does not import llm-compressor, yet a YAML recipe naming the modifier resolves."""
    import subprocess
    import sys

    code = (
        "import sys, layerif_plugins.integrations.llmcompressor\n"
        "assert 'llmcompressor' not in sys.modules, 'adapter import pulled in llmcompressor'\n"
        "from llmcompressor.recipe import Recipe\n"
        f"m, = Recipe.create_instance({str(RECIPES / 'sparsegpt_alpha_hill_70.yaml')!r}).modifiers\n"
        "print(type(m).__module__, type(m).__name__, m.allocation, m.sparsity, m.epsilon)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-5:] == ["layerif_plugins.integrations.llmcompressor.modifiers",
                                      "LayerIFSparseGPTModifier", "alpha_hill", "0.7", "0.2"]


def test_epsilon_defaults_to_each_references_spread():
    from layerif_plugins.integrations.llmcompressor import LayerIFSparseGPTModifier, LayerIFWandaPruningModifier

    assert LayerIFWandaPruningModifier(sparsity=0.5, allocation="owl").epsilon == 0.08
    assert LayerIFWandaPruningModifier(sparsity=0.5, allocation="alpha_hill").epsilon == 0.2
    assert LayerIFSparseGPTModifier(sparsity=0.5, allocation="layerif", scores="x.json").epsilon == 0.1
    assert LayerIFWandaPruningModifier(sparsity=0.5, allocation="owl", epsilon=0.05).epsilon == 0.05


# ----------------------------------------------------------------------------- depth ramp, epsilon auto

def test_depth_ramp_allocation_needs_no_scores_file(stories_dir, tinystories_train, tmp_path):
    report = prune(stories_dir, tmp_path / "ramp", tinystories_train, allocation="depth_ramp", sparsity=0.5,
                   n_calib=4, max_length=32)
    assert report["scores_method"] == "depth_ramp" and report["layer_scores"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert report["epsilon"] is None and report["epsilon_used"] == 0.1  # as passed / as run
    assert report["invert"] is False and report["epsilon_search"] is None
    assert [r["target"] for r in report["layers"]] == pytest.approx([0.45, 0.475, 0.5, 0.525, 0.55], abs=1e-12)
    # a depth_ramp scores file (`layerif score --method depth_ramp`) works as any other, inverted here
    model, _ = load_model_and_tokenizer(stories_dir)
    path = score_layers(model, "depth_ramp").save(tmp_path / "ramp.json")
    inverted = prune(stories_dir, tmp_path / "ramp-inv", tinystories_train, allocation="depth_ramp",
                     scores=path, invert=True, sparsity=0.5, n_calib=4, max_length=32)
    assert inverted["scores"] == str(path) and inverted["invert"] is True
    assert [r["target"] for r in inverted["layers"]] == pytest.approx([0.55, 0.525, 0.5, 0.475, 0.45], abs=1e-12)


def heldout_perplexity(out: Path, held) -> float:
    """Token perplexity of the saved model on ``held``, recomputed from disk, independently of the search."""
    from transformers import AutoModelForCausalLM

    from layerif_plugins.evaluation.perplexity import mean_token_loss

    return math.exp(mean_token_loss(AutoModelForCausalLM.from_pretrained(str(out)), held, pad_id=0)[0])


@pytest.mark.slow
def test_epsilon_auto_never_worse_than_uniform(stories_dir, tinystories_train, layerif_scores, block_params,
                                               tmp_path):
    from transformers import AutoTokenizer

    from layerif_plugins.scores import LayerScores

    n_hold = 8
    out = tmp_path / "auto"
    report = prune(stories_dir, out, tinystories_train, algorithm="wanda", sparsity=0.6, allocation="layerif",
                   scores=layerif_scores, epsilon="auto", n_holdout=n_hold)
    search = report["epsilon_search"]
    sweep = search["sweep"]
    assert [(c["epsilon"], c["invert"]) for c in sweep] == [(0.0, False)] + [
        (e, inv) for e in (0.05, 0.1, 0.2, 0.3) for inv in (False, True)]
    ppl = [c["perplexity"] for c in sweep]
    assert all(math.isfinite(p) for p in ppl) and search["pruning_passes"] == 9
    best = search["chosen"]["index"]
    assert ppl[best] == min(ppl) <= ppl[0] and best == ppl.index(min(ppl))  # ties go to the earliest (uniform)
    assert (report["epsilon_used"], report["invert"]) == (sweep[best]["epsilon"], sweep[best]["invert"])
    assert report["epsilon"] == "auto"
    assert search["uniform_perplexity"] == ppl[0] and search["chosen_perplexity"] == ppl[best]
    assert search["gain_vs_uniform"] == pytest.approx(ppl[0] - ppl[best], abs=1e-12)
    # the targets are the chosen candidate's list
    scores = LayerScores.load(layerif_scores)
    expected = sparsity_from_scores(scores.scores, scores.direction, block_params, 0.6,
                                    epsilon=report["epsilon_used"], invert=report["invert"])
    assert [r["target"] for r in report["layers"]] == pytest.approx(expected, abs=1e-12)
    assert sweep[best]["layer_sparsity"] == pytest.approx(expected, abs=1e-12)
    assert sweep[0]["layer_sparsity"] == pytest.approx([0.6] * 5, abs=1e-12)
    # the held-out slice: the n_hold examples after the first N_CALIB, disjoint from the pruning examples
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    both = load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB + n_hold)
    calib, held = both.subset(range(N_CALIB)), both.subset(range(N_CALIB, N_CALIB + n_hold))
    assert report["calib"]["sha256"] == calib.digest() and report["calib"]["n"] == N_CALIB
    assert search["holdout"]["sha256"] == held.digest() and search["holdout"]["examples"] == [N_CALIB,
                                                                                              N_CALIB + n_hold]
    assert not set(held.input_ids) & set(calib.input_ids)
    # the saved model is the winning candidate, and the ε = 0 candidate is the plain uniform prune
    assert heldout_perplexity(out, held) == pytest.approx(ppl[best], rel=1e-9)
    prune(stories_dir, tmp_path / "uniform", tinystories_train, algorithm="wanda", sparsity=0.6,
          allocation="uniform")
    assert heldout_perplexity(tmp_path / "uniform", held) == pytest.approx(ppl[0], rel=1e-9)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    mod = next(iter(next(iter(saved.values())).values()))["LayerIFWandaPruningModifier"]
    assert (mod["epsilon"], mod["invert"]) == (report["epsilon_used"], report["invert"])
    assert json.loads((out / "sparsity_report.json").read_text()) == json.loads(json.dumps(report))


@pytest.mark.slow
def test_owl_lambda_auto_from_the_command_line(stories_dir, tinystories_train, tmp_path, capsys):
    """OWL's λ searched the same way; λ pushing a layer above the 0.99 cap is skipped and recorded."""
    from layerif_plugins.cli import main

    out = tmp_path / "owl-auto"
    rc = main(["prune", "--model", str(stories_dir), "--algorithm", "wanda", "--sparsity", "0.7",
               "--allocation", "owl", "--epsilon", "auto", "--calib", str(tinystories_train), "--n-calib", "8",
               "--max-length", "32", "--n-holdout", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "epsilon auto: chose" in printed and "held-out perplexity" in printed
    report = json.loads((out / "sparsity_report.json").read_text())
    search = report["epsilon_search"]
    assert search["grid"] == [0.0, 0.05, 0.08, 0.1, 0.2, 0.3]  # OWL's reference λ 0.08 is tried
    # a candidate is skipped exactly when OWL's mapping puts a layer outside [0, 0.99] (here λ 0.3 as scored)
    for c in search["sweep"]:
        scores = [-x for x in report["layer_scores"]] if c["invert"] else report["layer_scores"]
        try:
            owl_sparsity(scores, 0.7, c["epsilon"])
            assert c["error"] is None and math.isfinite(c["perplexity"])
        except AllocationError:
            assert "outside [0, 0.99]" in c["error"] and c["perplexity"] is None
    assert [(c["epsilon"], c["invert"]) for c in search["sweep"] if c["error"]] == [(0.3, False)]
    ok = [c for c in search["sweep"] if not c["error"]]
    assert search["chosen_perplexity"] == min(c["perplexity"] for c in ok) <= search["uniform_perplexity"]
    assert search["holdout"]["examples"] == [8, 12] and search["pruning_batches"] == 8
    assert [r["target"] for r in report["layers"]] == pytest.approx(
        sparsity_from_scores(report["layer_scores"], "owl", None, 0.7, report["epsilon_used"],
                             invert=report["invert"]),
        abs=1e-12)


def test_epsilon_auto_options_refused_without_auto(stories_dir, tinystories_train, tmp_path):
    with pytest.raises(ConfigError, match="belong to epsilon='auto'"):
        prune(stories_dir, tmp_path / "x", tinystories_train, allocation="depth_ramp", n_holdout=4)
    with pytest.raises(AllocationError, match="epsilon"):
        prune(stories_dir, tmp_path / "x", tinystories_train, allocation="depth_ramp", epsilon="sometimes")
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"story number {i} is short." for i in range(10)) + "\n")
    with pytest.raises(DataError, match="holds out the 8 examples after the first 4"):
        prune(stories_dir, tmp_path / "x", short, allocation="depth_ramp", epsilon="auto", n_calib=4, n_holdout=8)
    assert not (tmp_path / "x").exists()


def test_search_tie_rule_and_holdout_split():
    from layerif_plugins.integrations.llmcompressor.search import batches_to_examples, holdout_positions, split_batches
    from layerif_plugins.plan import Evaluation, plan_allocation
    from layerif_plugins.plan.providers import Proposal, Provider

    class Fixed(Provider):
        """Candidates with given held-out losses (one example each side of the pairing: two equal examples)."""

        def __init__(self, name: str, losses: list[tuple[list[float] | None, float]]):
            self.name, self.losses = name, losses

        def propose(self, mine, everything):
            return [] if mine else [Proposal(self.name, {"k": i}, ls, None if ls else "above the cap")
                                    for i, (ls, _) in enumerate(self.losses)]

    losses = {(0.5, 0.5): 10.0, (0.4, 0.6): 10.0, (0.6, 0.4): 9.5, (0.45, 0.55): 9.5, (0.3, 0.7): math.nan}

    def evaluate(ls):
        return Evaluation([losses[tuple(ls)]] * 2, [1, 1])

    sweep = Fixed("x", [([0.5, 0.5], 0), ([0.4, 0.6], 0), ([0.6, 0.4], 0), ([0.45, 0.55], 0)])
    assert plan_allocation([sweep], evaluate).chosen == 2  # the lowest; among equals the earliest
    tie = Fixed("x", [([0.5, 0.5], 0), ([0.4, 0.6], 0)])
    assert plan_allocation([tie], evaluate).chosen == 0  # a tie with uniform (first) keeps uniform
    failed = Fixed("x", [([0.5, 0.5], 0), (None, 0), ([0.3, 0.7], 0)])
    assert plan_allocation([failed], evaluate).chosen == 0
    with pytest.raises(AllocationError, match="no candidate"):
        plan_allocation([Fixed("x", [([0.3, 0.7], 0)])], evaluate)
    assert holdout_positions(16, 0.125) == [4, 12] and holdout_positions(8, 2) == [2, 6]
    assert holdout_positions(10, 3) == [1, 5, 8]
    with pytest.raises(DataError, match="holds out 4 of 4"):
        holdout_positions(4, 4)
    batches = [{"input_ids": torch.tensor([[i, i + 1, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
               for i in range(1, 9)]
    prune_b, held_b = split_batches(batches, [2, 6])
    assert len(prune_b) == 6 and len(held_b) == 2 and not {id(b) for b in prune_b} & {id(b) for b in held_b}
    assert batches_to_examples(held_b, "held").input_ids == ((3, 4), (7, 8))  # padding dropped


def test_batched_calibration_prunes_like_one_at_a_time(stories_dir, tinystories_train, tmp_path):
    """oneshot's ``batch_size`` reaches the pipeline: equal-length examples give the same masks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    assert all(len(ids) == 16 for ids in load_examples(tinystories_train, tok, 16, n=8).input_ids)  # no truncation
    one = prune(stories_dir, tmp_path / "bs1", tinystories_train, allocation="uniform", n_calib=8, max_length=16)
    four = prune(stories_dir, tmp_path / "bs4", tinystories_train, allocation="uniform", n_calib=8, max_length=16,
                 batch_size=4)
    assert one["calib"]["batch_size"] == 1 and four["calib"]["batch_size"] == 4
    assert four["weighted_mean_measured"] == one["weighted_mean_measured"]
    masks = [{n: p == 0 for n, p in AutoModelForCausalLM.from_pretrained(str(d)).named_parameters()}
             for d in (tmp_path / "bs1", tmp_path / "bs4")]
    differ = sum(int((masks[0][n] != masks[1][n]).sum()) for n in masks[0])
    total = sum(m.numel() for m in masks[0].values())
    assert differ <= 1e-3 * total  # only float-summation-order ties may move
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
            prune(stories_dir, tmp_path / "x", tinystories_train, allocation="uniform", batch_size=bad)
    assert not (tmp_path / "x").exists()


def test_cli_invert_and_batch_size(stories_dir, tinystories_train, tmp_path, capsys):
    from layerif_plugins.cli import main

    out = tmp_path / "ramp-inv"
    rc = main(["prune", "--model", str(stories_dir), "--sparsity", "0.5", "--allocation", "depth_ramp", "--invert",
               "--calib", str(tinystories_train), "--n-calib", "8", "--max-length", "16", "--batch-size", "4",
               "--out", str(out), "--quiet"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["invert"] is True and report["calib"]["batch_size"] == 4
    assert [r["target"] for r in report["layers"]] == pytest.approx([0.55, 0.525, 0.5, 0.475, 0.45], abs=1e-12)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert next(iter(next(iter(recipe.values())).values()))["LayerIFWandaPruningModifier"]["invert"] is True


@pytest.mark.slow
def test_epsilon_auto_judges_at_holdout_length(stories_dir, tinystories_train, tmp_path, capsys):
    """``--holdout-length``: 16-token calibration, candidates judged on 64-token held-out examples."""
    from transformers import AutoTokenizer

    from layerif_plugins.cli import main

    out = tmp_path / "auto64"
    rc = main(["prune", "--model", str(stories_dir), "--sparsity", "0.6", "--allocation", "depth_ramp",
               "--epsilon", "auto", "--calib", str(tinystories_train), "--n-calib", "8", "--max-length", "16",
               "--n-holdout", "4", "--holdout-length", "64", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert rc == 0 and "epsilon auto: chose" in capsys.readouterr().out
    report = json.loads((out / "sparsity_report.json").read_text())
    search = report["epsilon_search"]
    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    held = load_examples(tinystories_train, tok, 64, n=12).subset(range(8, 12))
    assert search["holdout"]["max_length"] == 64 and search["holdout"]["sha256"] == held.digest()
    assert max(len(x) for x in held.input_ids) == 64
    assert report["calib"]["sha256"] == load_examples(tinystories_train, tok, 16, n=8).digest()
    assert report["calib"]["max_length"] == 16
    assert heldout_perplexity(out, held) == pytest.approx(search["chosen_perplexity"], rel=1e-9)
    with pytest.raises(ConfigError, match="holdout_length"):
        prune(stories_dir, tmp_path / "x", tinystories_train, allocation="depth_ramp", holdout_length=64)
    with pytest.raises(ConfigError, match="holdout_length must be an integer >= 1"):
        prune(stories_dir, tmp_path / "x", tinystories_train, allocation="depth_ramp", epsilon="auto",
              holdout_length=0)
    assert not (tmp_path / "x").exists()
