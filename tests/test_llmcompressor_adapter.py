"""The llm-compressor adapter end to end on the real stories260K with the real ``oneshot``.

Every pruned model is reloaded from disk with ``AutoModelForCausalLM`` and its zeros are
counted independently of the library: Wanda must hit ``rows · int(cols · s_l)`` zeros in
every module (its row rounding), SparseGPT the target within its per-block rounding.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from layerif_plugins.allocate.sparsity import layerwise_sparsity, owl_sparsity, weighted_mean
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

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "pruning"
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
    assert len(files) == 16
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
    with pytest.raises(ConfigError, match="N:M"):
        LayerIFWandaPruningModifier(sparsity=0.5, mask_structure="2:4")
    with pytest.raises(ConfigError, match="N:M"):
        LayerIFSparseGPTModifier(sparsity=0.5, mask_structure="2:4", allocation="uniform")
    with pytest.raises(AllocationError, match="one global sparsity"):
        LayerIFWandaPruningModifier(sparsity=[0.5, 0.6])
    with pytest.raises(AllocationError, match="in \\(0, 1\\)"):
        LayerIFSparseGPTModifier(sparsity=1.5)
    with pytest.raises(ConfigError, match="allocation: owl"):
        LayerIFWandaPruningModifier(sparsity=0.5, sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    with pytest.raises(ConfigError, match="uses no scores"):
        LayerIFWandaPruningModifier(sparsity=0.5, allocation="uniform", scores="x.json")
    with pytest.raises(ValueError, match="allocation"):
        LayerIFWandaPruningModifier(sparsity=0.5, allocation="random")
    mod = LayerIFWandaPruningModifier(sparsity=0.7, scores="s.json")
    assert mod.allocation == "layerif" and mod.epsilon == 0.1 and mod.mask_structure == "0:0"


def test_yaml_nm_recipe_refused():
    from llmcompressor.recipe import Recipe

    recipe = """
pruning_stage:
  sparsity_modifiers:
    LayerIFWandaPruningModifier: {sparsity: 0.5, mask_structure: "2:4", allocation: uniform}
"""
    with pytest.raises(ConfigError, match="N:M"):
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
