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
