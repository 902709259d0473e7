"""Depth scorers (angular distance, Block Influence, hidden-state variability), the labelled
loader and the layer-selection rules: hand-computed values on tiny tensors, and the
scorers on tiny random Llamas checked against independent per-example computations
from HF's ``output_hidden_states`` (with the last entry replaced by the pre-norm state)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layerif_plugins.allocate.layers import (
    check_k,
    last_layers,
    layers_to_adapt,
    layers_to_drop,
    lowest_distance_block,
    top_k_layers,
)
from layerif_plugins.data import Examples, collate
from layerif_plugins.data.labelled import load_labelled, read_labelled
from layerif_plugins.errors import AllocationError, ConfigError, DataError, NumericsError, ScoresError
from layerif_plugins.models import fingerprint
from layerif_plugins.scorers import ScoringData, score_layers
from layerif_plugins.scorers.angular import angular_distance, block_distances, distance_matrix, redundancy_scores
from layerif_plugins.scorers.block_influence import cosine_sums
from layerif_plugins.scorers.hidden_states import block_states, last_token, last_token_index, masked_mean
from layerif_plugins.scorers.variability import variability
from layerif_plugins.scores import LayerScores

# ----------------------------------------------------------------------------- hand-computed tensors


def test_angular_distance_hand_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [5.0, 0.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.5, 0.25, 1.0, 0.0], abs=1e-7)


def test_distance_matrix_hand_values():
    # (L+1=3 states, N=2 examples, d=2); see the comments for each angle
    h0 = [[1.0, 0.0], [0.0, 1.0]]
    h1 = [[1.0, 1.0], [0.0, 1.0]]
    h2 = [[0.0, 1.0], [-1.0, 0.0]]
    dist = distance_matrix(torch.tensor([h0, h1, h2]))
    # d(0,1): 45° and 0° → (0.25 + 0)/2; d(1,2): 45° and 90° → (0.25+0.5)/2; d(0,2): 90°, 90°
    assert float(dist[0, 1]) == pytest.approx(0.125)
    assert float(dist[1, 2]) == pytest.approx(0.375)
    assert float(dist[0, 2]) == pytest.approx(0.5)
    assert torch.allclose(dist, dist.T) and float(dist.diagonal().abs().max()) < 1e-6
    assert block_distances(dist, 1) == pytest.approx([0.125, 0.375])
    assert block_distances(dist, 2) == pytest.approx([0.5])


def test_redundancy_scores_hand_values():
    # 4 layers, blocks of 2: d(0,2)=0.3, d(1,3)=0.1, d(2,4)=0.2
    assert redundancy_scores([0.3, 0.1, 0.2], 2, 4) == pytest.approx([0.7, 0.9, 0.9, 0.8])
    assert redundancy_scores([0.4, 0.1, 0.3], 1, 3) == pytest.approx([0.6, 0.9, 0.7])


def test_last_token_and_masked_mean_respect_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3]
    h = torch.arange(3 * 4 * 2, dtype=torch.float32).view(3, 4, 2)
    assert last_token(h, right).tolist() == [h[0, 2].tolist(), h[1, 0].tolist(), h[2, 3].tolist()]
    mean = masked_mean(h, right)
    assert mean[0].tolist() == pytest.approx(h[0, :3].mean(0).tolist())
    assert mean[1].tolist() == pytest.approx(h[1, 0].tolist())


def test_cosine_sums_skip_padding():
    # one example, 2 real tokens + 1 pad whose (opposite) vectors must not count
    h0 = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]])
    h1 = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [-1.0, 0.0]]])
    sums, n = cosine_sums([h0, h1], torch.tensor([[1, 1, 0]]))
    assert n == 2
    assert float(sums[0]) == pytest.approx(1 / math.sqrt(2) + 1.0)


def test_variability_hand_value_1d():
    # class A {0, 2}, class B {4, 6}: μ=1, 5; μ_G=3; Σ_w = 1, Σ_b = 4 → ν = (1/4)/2
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    assert variability(x, [0, 0, 1, 1]) == pytest.approx(0.125)
    # scaling the within-class spread by 2 multiplies ν by 4
    x2 = torch.tensor([[-1.0], [3.0], [3.0], [7.0]])
    assert variability(x2, [0, 0, 1, 1]) == pytest.approx(0.5)


def _nu_numpy(x: np.ndarray, y: np.ndarray) -> float:
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    mu_g = means.mean(0)
    centred = x - means[np.searchsorted(classes, y)]
    sw = centred.T @ centred / len(x)
    sb = (means - mu_g).T @ (means - mu_g) / len(classes)
    return float(np.trace(sw @ np.linalg.pinv(sb, hermitian=True)) / len(classes))


def test_variability_matches_numpy_pinv():
    rng = np.random.default_rng(0)
    y = np.array([0] * 5 + [1] * 7 + [2] * 4)
    x = rng.normal(size=(16, 6)) + 3.0 * rng.normal(size=(3, 6))[y]
    assert variability(torch.tensor(x), y.tolist()) == pytest.approx(_nu_numpy(x, y), rel=1e-9)


def test_variability_errors():
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
    with pytest.raises(DataError, match="two classes"):
        variability(x, [1, 1, 1, 1])
    with pytest.raises(NumericsError, match="identical"):
        variability(torch.tensor([[0.0], [2.0], [2.0], [0.0]]), [0, 0, 1, 1])


# ----------------------------------------------------------------------------- labelled JSONL


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_labelled_loader(tmp_path, stories):
    _, tok = stories
    p = _write(tmp_path / "lab.jsonl", [
        json.dumps({"text": "Once upon a time", "label": "pos"}),
        "",
        json.dumps({"text": "The dog ran", "label": "neg"}),
        json.dumps({"text": "A cat sat", "label": "pos"}),
    ])
    lab = load_labelled(p, tok, max_length=16)
    assert lab.classes == ("neg", "pos")
    assert lab.labels == (1, 0, 1)
    assert lab.examples.input_ids[0] == tuple(tok("Once upon a time")["input_ids"])
    ints = _write(tmp_path / "ints.jsonl", [json.dumps({"t": "a b", "y": 3}), json.dumps({"t": "c", "y": 1})])
    assert [lab for _, lab in read_labelled(ints, "t", "y")] == [3, 1]
    assert load_labelled(ints, tok, text_field="t", label_field="y").labels == (1, 0)


@pytest.mark.parametrize("line, msg", [
    ("{not json", "bad.jsonl:2: not valid JSON"),
    (json.dumps({"text": "x"}), "bad.jsonl:2: no 'label' field"),
    (json.dumps({"label": "a"}), "bad.jsonl:2: no non-empty 'text'"),
    (json.dumps({"text": "x", "label": 1}), "bad.jsonl:2: label 1 is a int"),
    (json.dumps({"text": "x", "label": True}), "bad.jsonl:2: label True must be"),
    ("[1, 2]", "bad.jsonl:2: expected a JSON object"),
])
def test_labelled_loader_errors_name_the_line(tmp_path, line, msg):
    p = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine", "label": "a"}), line])
    with pytest.raises(DataError, match=msg.replace("(", r"\(")):
        read_labelled(p)


# ----------------------------------------------------------------------------- tiny models: indexing


def _tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _examples(n: int = 7, seed: int = 0) -> Examples:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 12, (n,), generator=g).tolist()
    return Examples(tuple(tuple(torch.randint(1, 64, (k,), generator=g).tolist()) for k in lens), "random")


def _reference_states(model, ids: tuple[int, ...]) -> list[np.ndarray]:
    """[h^0 … h^L] of one unpadded example from output_hidden_states, last entry taken before the final norm."""
    captured = {}
    h = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.setdefault("pre", args[0].detach()))
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    h.remove()
    hs = [t[0].double().numpy() for t in out.hidden_states[:-1]] + [captured["pre"][0].double().numpy()]
    return hs


def test_block_states_are_block_inputs_and_outputs():
    model = _tiny_llama()
    ex = _examples(3)
    batch = collate(ex, [0, 1, 2], pad_id=0)
    states = block_states(model, batch)
    L = model.config.num_hidden_layers
    assert len(states) == L + 1
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    for i in range(L):  # hidden_states[i] = input of block i
        assert torch.allclose(states[i], out.hidden_states[i], atol=1e-6)
    # HF's last entry is normalised; ours is the raw output of the last block
    assert torch.allclose(model.model.norm(states[L]), out.hidden_states[L], atol=1e-5)
    assert not torch.allclose(states[L], out.hidden_states[L], atol=1e-2)


def test_angular_scorer_matches_per_example_reference():
    model = _tiny_llama()
    ex = _examples(7)
    L = model.config.num_hidden_layers
    s = score_layers(model, "angular", ScoringData(calib=ex, pad_id=0), n=2, batch_size=3)
    ref = np.zeros((L + 1, L + 1))
    for ids in ex.input_ids:
        last = [h[-1] for h in _reference_states(model, ids)]
        for a in range(L + 1):
            for b in range(L + 1):
                c = last[a] @ last[b] / (np.linalg.norm(last[a]) * np.linalg.norm(last[b]))
                ref[a, b] += np.arccos(np.clip(c, -1, 1)) / np.pi / len(ex)
    for n in range(1, L):
        assert s.extras["distances"][str(n)] == pytest.approx([ref[i, i + n] for i in range(L - n + 1)], abs=1e-6)
    d2 = [ref[i, i + 2] for i in range(L - 1)]
    assert s.extras["angular_distance"] == pytest.approx(d2, abs=1e-6)
    assert s.extras["best_start"] == int(np.argmin(d2))
    assert s.scores == pytest.approx(redundancy_scores(d2, 2, L), abs=1e-6)
    assert s.method == "angular" and s.params["n"] == 2 and s.data["calib"]["n"] == 7
    assert layers_to_drop(s, 2) == [int(np.argmin(d2)), int(np.argmin(d2)) + 1]
    d3 = [ref[i, i + 3] for i in range(L - 2)]
    assert layers_to_drop(s, 3) == list(range(int(np.argmin(d3)), int(np.argmin(d3)) + 3))


def test_block_influence_matches_per_token_reference():
    model = _tiny_llama(seed=1)
    ex = _examples(6, seed=1)
    L = model.config.num_hidden_layers
    s = score_layers(model, "block_influence", ScoringData(calib=ex, pad_id=0), batch_size=4)
    sums, tokens = np.zeros(L), 0
    for ids in ex.input_ids:
        hs = _reference_states(model, ids)
        for i in range(L):
            a, b = hs[i], hs[i + 1]
            sums[i] += (np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).sum()
        tokens += len(ids)
    bi = 1 - sums / tokens
    assert s.extras["block_influence"] == pytest.approx(bi.tolist(), abs=1e-6)
    assert s.scores == pytest.approx((1 - bi).tolist(), abs=1e-6)
    assert s.extras["tokens"] == tokens
    # ShortGPT: drop the lowest BI
    assert layers_to_drop(s, 2) == sorted(np.argsort(bi, kind="stable")[:2].tolist())


def test_variability_scorer_matches_numpy_reference():
    model = _tiny_llama(seed=2)
    ex = _examples(9, seed=2)
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 1]
    s = score_layers(model, "variability", ScoringData(calib=ex, labels=labels, pad_id=0), batch_size=4)
    L = model.config.num_hidden_layers
    feats = [[] for _ in range(L + 1)]
    for ids in ex.input_ids:
        for i, h in enumerate(_reference_states(model, ids)):
            feats[i].append(h.mean(0))
    ref = [_nu_numpy(np.stack(f), np.array(labels)) for f in feats]
    assert s.scores == pytest.approx(ref[1:], rel=1e-5)
    assert s.extras["nu_embeddings"] == pytest.approx(ref[0], rel=1e-5)
    assert s.extras["class_counts"] == {"0": 3, "1": 4, "2": 2}
    assert layers_to_adapt(s, 2) == sorted(np.argsort(ref[1:])[:2].tolist())  # lowest ν


def test_scorer_input_errors():
    model = _tiny_llama(layers=3)
    ex = _examples(4)
    with pytest.raises(DataError, match="needs \\['labels'\\]"):
        score_layers(model, "variability", ScoringData(calib=ex))
    with pytest.raises(DataError, match="same label"):
        score_layers(model, "variability", ScoringData(calib=ex, labels=[1, 1, 1, 1]))
    with pytest.raises(DataError, match="3 labels for 4"):
        score_layers(model, "variability", ScoringData(calib=ex, labels=[0, 1, 0]))
    with pytest.raises(DataError, match="needs \\['calib'\\]"):
        score_layers(model, "angular", ScoringData())
    with pytest.raises(ConfigError, match="n=3"):
        score_layers(model, "angular", ScoringData(calib=ex), n=3)


# ----------------------------------------------------------------------------- selection rules


def _scores(values, method, model, **extras) -> LayerScores:
    return LayerScores(scores=values, method=method, model=fingerprint(model), extras=extras)


def test_selection_rules_hand_values():
    assert top_k_layers([0.1, 0.5, 0.3, 0.5], 2) == [1, 3]
    assert top_k_layers([0.1, 0.5, 0.3, 0.5], 1) == [3]  # tie → deeper
    assert top_k_layers([0.1, 0.5, 0.3, 0.5], 2, highest=False) == [0, 2]
    assert top_k_layers([1.0] * 5, 2) == last_layers(5, 2) == [3, 4]
    assert lowest_distance_block([0.4, 0.2, 0.3], 2, 4) == [1, 2]
    assert lowest_distance_block([0.2, 0.4, 0.2], 2, 4) == [2, 3]  # tie → deeper
    model = _tiny_llama()
    bi = _scores([0.7, 0.9, 0.95, 0.8], "block_influence", model)  # scores = 1 − BI
    assert layers_to_drop(bi, 2) == [1, 2]
    lif = _scores([3.0, 1.0, 5.0, 2.0], "layerif", model)
    assert layers_to_drop(lif, 1) == [2]  # highest = least well-trained
    assert layers_to_adapt(lif, 2) == [0, 2]
    assert layers_to_adapt(lif, 2, rule="lowest") == [1, 3]
    nu = _scores([3.0, 1.0, 5.0, 2.0], "variability", model)
    assert layers_to_adapt(nu, 2) == [1, 3]
    ang = _scores([0.0] * 4, "angular", model, distances={"1": [0.3, 0.1, 0.2, 0.4], "2": [0.5, 0.45, 0.2]})
    assert layers_to_drop(ang, 1) == [1]
    assert layers_to_drop(ang, 2) == [2, 3]
    with pytest.raises(ScoresError, match="blocks of 3"):
        layers_to_drop(ang, 3)


def test_selection_follows_the_stored_direction_not_the_method():
    """The rules read ``LayerScores.direction``: the same numbers under another direction pick the other end."""
    from layerif_plugins.scores import ScoreDirection

    model = _tiny_llama()
    values = [3.0, 1.0, 5.0, 2.0]
    prunes = LayerScores(scores=values, method="my_scorer", model=fingerprint(model),
                         direction=ScoreDirection.HIGHER_PRUNES)
    adapts_low = LayerScores(scores=values, method="my_scorer", model=fingerprint(model),
                             direction=ScoreDirection.LOWER_ADAPTS)
    protects = LayerScores(scores=values, method="my_scorer", model=fingerprint(model),
                           direction=ScoreDirection.HIGHER_PROTECTS)
    assert layers_to_adapt(prunes, 2) == [0, 2] and layers_to_drop(prunes, 1) == [2]
    assert layers_to_adapt(adapts_low, 2) == [1, 3] and layers_to_drop(adapts_low, 1) == [2]
    # protect scores (OWL: more outliers = better trained): the fewest go first, whichever way
    assert layers_to_adapt(protects, 2) == [1, 3] and layers_to_drop(protects, 1) == [1]
    assert layers_to_adapt(protects, 2, rule="highest") == [0, 2]  # an explicit rule still wins


@pytest.mark.parametrize("k", [0, -1, 4, 5])
def test_k_out_of_range(k):
    with pytest.raises(AllocationError, match=f"cannot (drop|adapt) {k}"):
        check_k(k, 4)
    with pytest.raises(AllocationError):
        top_k_layers([1.0, 2.0, 3.0, 4.0], k, what="adapt")


def test_cli_select_layers_with_variability(stories_dir, tmp_path):
    from layerif_plugins.cli import main

    texts = [("Once upon a time there was a little dog.", "story"), ("The girl liked to play in the park.", "story"),
             ("Tom and Sue went to the shop.", "story"), ("First Citizen: speak, speak.", "play"),
             ("ROMEO: what light through yonder window breaks?", "play"), ("KING: thou art a villain.", "play")]
    data = _write(tmp_path / "lab.jsonl", [json.dumps({"text": t, "label": y}) for t, y in texts])
    rc = main(["select-layers", "--model", str(stories_dir), "--data", str(data), "--k", "2",
               "--save-scores", str(tmp_path / "nu.json"), "--out", str(tmp_path / "lora.json")])
    assert rc == 0
    nu = LayerScores.load(tmp_path / "nu.json")
    assert nu.method == "variability" and nu.data["labels"] == {"n": 6, "classes": 2}
    out = json.loads((tmp_path / "lora.json").read_text())
    assert out["rule"] == "lowest"
    assert out["layers_to_transform"] == sorted(np.argsort(nu.scores)[:2].tolist())
    assert out["lora_config"]["layers_pattern"] == "layers"
    assert "gate_proj" in out["lora_config"]["target_modules"]
