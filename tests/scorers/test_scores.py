"""The LayerScores file: round trip, atomic writes, fingerprint checks."""

from __future__ import annotations

import json

import pytest

from layerif_plugins.data import load_examples
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.errors import ConfigError, ScoresError
from layerif_plugins.models import fingerprint
from layerif_plugins.scorers import ScoringData, score_layers
from layerif_plugins.scores import LayerScores


@pytest.fixture()
def scored(stories, tinystories_train, tinystories_valid):
    model, tok = stories
    data = ScoringData(train=load_examples(tinystories_train, tok, 48, n=8),
                       val=load_examples(tinystories_valid, tok, 48, n=4), pad_id=0)
    return model, score_layers(model, "layerif", data, config=InfluenceConfig(show_progress=False), per_example=True)


def test_round_trip_and_contents(scored, tmp_path):
    model, s = scored
    path = s.save(tmp_path / "scores.json")
    raw = json.loads(path.read_text())
    assert raw["format_version"] == 1 and raw["method"] == "layerif"
    assert raw["model"]["num_layers"] == 5 and raw["model"]["architecture"] == "LlamaForCausalLM"
    assert raw["data"]["train"]["n"] == 8 and raw["data"]["val"]["n"] == 4
    assert len(raw["per_example"]) == 8 and len(raw["per_example"][0]) == 5
    assert raw["params"]["params"] == "attn" and raw["params"]["damping"] == 0.1
    assert "torch" in raw["versions"]
    back = LayerScores.load(path)
    assert back.scores == s.scores and back.model == s.model
    # S^l recomputed from the stored per-example s_i^l
    recomputed = [sum(max(0.0, -row[layer]) for row in back.per_example) for layer in range(5)]
    assert back.scores == pytest.approx(recomputed, rel=1e-12)
    back.check_model(model)
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # no temp files left


def test_other_model_is_refused_naming_the_field(scored):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, s = scored
    cfg = model.config.to_dict()
    cfg.update(num_hidden_layers=4)
    other = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with pytest.raises(ScoresError, match="num_layers is 5 in the scores"):
        s.check_model(other)
    cfg.update(num_hidden_layers=5, rms_norm_eps=1e-6)
    other = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with pytest.raises(ScoresError, match="config_hash"):
        s.check_model(other)


def test_bad_files(tmp_path, scored):
    _, s = scored
    with pytest.raises(ScoresError, match="not found"):
        LayerScores.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScoresError, match="not valid JSON"):
        LayerScores.load(tmp_path / "bad.json")
    d = s.to_dict()
    d["format_version"] = 99
    with pytest.raises(ScoresError, match="format_version 99"):
        LayerScores.from_dict(d)
    d = s.to_dict()
    d["scores"] = d["scores"][:3]
    with pytest.raises(ScoresError, match="3 scores for a model with 5"):
        LayerScores.from_dict(d)
    with pytest.raises(ConfigError, match="does not exist"):
        s.save(tmp_path / "missing_dir" / "s.json")


def test_uniform_scorer(stories):
    model, _ = stories
    s = score_layers(model, "uniform")
    assert s.scores == [1.0] * 5 and s.model == fingerprint(model)


# ----------------------------------------------------------------------------- direction


def test_direction_is_stored_and_round_trips(stories, tmp_path):
    from layerif_plugins.scores import ScoreDirection

    model, _ = stories
    fp = fingerprint(model)
    s = LayerScores(scores=[3.0, 1.0, 2.0, 5.0, 4.0], method="my_method", model=fp,
                    direction=ScoreDirection.HIGHER_PROTECTS)
    raw = json.loads(s.save(tmp_path / "s.json").read_text())
    assert raw["direction"] == "higher_protects" and raw["format_version"] == 1
    assert "LESS sparsity" in raw["higher_is"]  # the words follow the direction when a scorer gives none
    back = LayerScores.load(tmp_path / "s.json")
    assert back.direction is ScoreDirection.HIGHER_PROTECTS and back.higher_is == raw["higher_is"]
    # the value string is accepted as well as the member; anything else is refused naming the choices
    assert LayerScores(scores=[1.0] * 5, method="x", model=fp, direction="lower_adapts").direction \
        is ScoreDirection.LOWER_ADAPTS
    raw["direction"] = "sideways"
    with pytest.raises(ScoresError, match="unknown score direction 'sideways'.*higher_prunes"):
        LayerScores.from_dict(raw)


def test_old_file_without_direction_loads(stories, tmp_path):
    """A format_version 1 file written before the field: the direction comes from its method, higher_is is kept."""
    from layerif_plugins.scores import ScoreDirection

    model, _ = stories
    for method, expected in (("owl", ScoreDirection.HIGHER_PROTECTS), ("variability", ScoreDirection.LOWER_ADAPTS),
                             ("layerif", ScoreDirection.HIGHER_PRUNES), ("angular", ScoreDirection.HIGHER_PRUNES)):
        d = LayerScores(scores=[1.0, 2.0, 3.0, 4.0, 5.0], method=method, model=fingerprint(model)).to_dict()
        del d["direction"]
        d["higher_is"] = "an old free-text description"
        (tmp_path / f"{method}.json").write_text(json.dumps(d))
        old = LayerScores.load(tmp_path / f"{method}.json")
        assert old.direction is expected and old.higher_is == "an old free-text description"
        assert old.scores == [1.0, 2.0, 3.0, 4.0, 5.0]
    del d["higher_is"]
    assert LayerScores.from_dict(d).higher_is == ScoreDirection.HIGHER_PRUNES.description


def test_every_scorer_declares_a_direction_that_its_files_carry(stories):
    from layerif_plugins.scorers import SCORERS
    from layerif_plugins.scores import ScoreDirection, direction_of_method

    assert SCORERS["owl"].direction is ScoreDirection.HIGHER_PROTECTS
    assert SCORERS["variability"].direction is ScoreDirection.LOWER_ADAPTS
    assert SCORERS["layerif"].direction is ScoreDirection.HIGHER_PRUNES
    # old files of every registered method get the direction its scorer declares today
    assert {n: direction_of_method(n) for n in SCORERS} == {n: s.direction for n, s in SCORERS.items()}
    model, _ = stories
    assert score_layers(model, "uniform").direction is SCORERS["uniform"].direction


def test_registry_stamps_its_direction_on_results(stories):
    from layerif_plugins.scorers import SCORERS, register_scorer
    from layerif_plugins.scores import ScoreDirection

    @register_scorer("test_protect", direction=ScoreDirection.HIGHER_PROTECTS)
    def score_protect(model, data):
        return LayerScores(scores=[1.0] * 5, method="test_protect", model=fingerprint(model))

    try:
        model, _ = stories
        s = score_layers(model, "test_protect")
        assert s.direction is ScoreDirection.HIGHER_PROTECTS and "LESS sparsity" in s.higher_is
        with pytest.raises(ConfigError, match="unknown inputs \\['calibration'\\]"):
            register_scorer("test_bad", needs=("calibration",))
    finally:
        SCORERS.pop("test_protect", None)


# ----------------------------------------------------------------------------- resolve_scores


def test_resolve_scores_reads_checks_or_computes(scored, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif_plugins.errors import DataError
    from layerif_plugins.scorers import resolve_scores

    model, s = scored
    path = s.save(tmp_path / "layerif.json")
    back = resolve_scores(model, "layerif", path)
    assert back.scores == s.scores and back.method == "layerif"
    assert resolve_scores(model, None, path).scores == s.scores  # method=None: any method
    assert resolve_scores(None, "layerif", path).scores == s.scores  # model=None: no model check
    # a file of another method is refused, naming both and the knob that chose the method
    with pytest.raises(ScoresError, match="holds 'layerif' scores but allocation is 'owl'"):
        resolve_scores(model, "owl", path, role="allocation")
    with pytest.raises(ScoresError, match="holds 'layerif' scores but method is 'angular'"):
        resolve_scores(model, "angular", path)
    # a file of another model is refused, naming the field
    cfg = model.config.to_dict()
    cfg.update(num_hidden_layers=5, rms_norm_eps=1e-6)
    other = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    with pytest.raises(ScoresError, match="computed for another model: config_hash"):
        resolve_scores(other, "layerif", path)
    # no file: the registry's needs= decide, and the error names the missing inputs and the alternative
    with pytest.raises(DataError, match=r"needs --scores FILE .*needs \['train', 'val'\]"):
        resolve_scores(model, "layerif")
    with pytest.raises(DataError, match=r"needs \['calib'\]"):
        resolve_scores(model, "block_influence", data=ScoringData())
    with pytest.raises(ConfigError, match="no scores file and no scoring method"):
        resolve_scores(model, None)
    assert resolve_scores(model, "uniform").scores == [1.0] * 5


def test_score_values_are_numbers_and_not_negative(stories):
    """Negative scores of an unsigned method are refused (they would invert every allocation), as are non-numbers."""
    from layerif_plugins.scores import SIGNED_METHODS

    model, _ = stories
    fp = fingerprint(model)
    with pytest.raises(ScoresError, match=r"negative 'layerif' scores at layers \[1, 3\]: \[-2.0, -0.5\]"):
        LayerScores(scores=[1.0, -2.0, 3.0, -0.5, 0.0], method="layerif", model=fp)
    # Block Influence's score is a mean cosine in [-1, 1]: signed by construction
    assert "block_influence" in SIGNED_METHODS
    assert LayerScores(scores=[0.9, -0.2, 0.5, 0.1, 0.3], method="block_influence", model=fp).scores[1] == -0.2
    # float rounding below zero (relative 1e-9) is not a sign
    assert LayerScores(scores=[1.0, -1e-12, 3.0, 2.0, 0.0], method="variability", model=fp).scores[1] == -1e-12
    d = LayerScores(scores=[1.0, 2.0, 3.0, 4.0, 5.0], method="layerif", model=fp).to_dict()
    for bad, words in ((["1", 2, 3, 4, 5], r'layer 0 is "1" \(str\), not a number'),
                       ([1, 2, None, 4, 5], r"layer 2 is null \(NoneType\)"),
                       ([1, 2, 3, False, 5], r"layer 3 is false \(bool\)"),
                       ({"0": 1}, "must be a list of numbers"),
                       ([1, 2, float("nan"), 4, 5], r"non-finite scores at layers \[2\]")):
        with pytest.raises(ScoresError, match=words):
            LayerScores.from_dict({**d, "scores": bad}, source="s.json")
