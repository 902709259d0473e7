"""Pruning baselines: AlphaPruning's Hill α (alpha_hill) and OWL outlier ratios (owl).

alpha_hill is checked against a hand-computed spectrum, a slow loop that follows the
reference code line by line, and power-law samples of known exponent. owl is checked
against llm-compressor's own ``_infer_owl_layer_sparsity`` on the same model and data.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerif_plugins.allocate.sparsity import owl_sparsity, sparsity_from_scores
from layerif_plugins.data import Examples, load_examples, pad_id_of
from layerif_plugins.models import block_linears
from layerif_plugins.scorers import SCORERS, ScoringData, score_layers
from layerif_plugins.scorers.alpha_hill import esd, hill_fit

# ----------------------------------------------------------------------------- alpha_hill

def slow_reference_alpha(eigs: torch.Tensor, bins: int = 100) -> tuple[float, float]:
    """AlphaPruning's ``xmin_peak`` loop, statement by statement (float64), as the oracle."""
    nz = torch.sort(eigs.to(torch.float64)).values
    n_total = len(nz)
    log_nz = torch.log(nz)
    h = torch.log10(nz)
    counts = torch.histc(h, bins, min=float(h.min()), max=float(h.max()))
    boundaries = torch.linspace(float(h.min()), float(h.max()), bins + 1, dtype=torch.float64)
    xmin2 = 10 ** boundaries[torch.argmax(counts)]
    xmin_min = torch.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    alphas = torch.zeros(n_total - 1, dtype=torch.float64)
    ds = torch.ones(n_total - 1, dtype=torch.float64)
    for i, xmin in enumerate(nz[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(n_total - i)
        seq = torch.arange(n, dtype=torch.float64)
        alpha = 1 + n / (torch.sum(log_nz[i:]) - n * log_nz[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = torch.max(torch.abs(1 - (nz[i:] / xmin) ** (-alpha + 1) - seq / n))
    best = torch.argmin(ds)
    return float(alphas[best]), float(nz[best])


def test_hand_checkable_spectrum():
    # λ = 1, e, e²: the histogram peak is the first bin (λ = 1), only xmin = 1 is ≤ 1.5 × peak;
    # α = 1 + 3 / (0 + 1 + 2 − 3·0) = 2 and D = max(0, 1 − 1/e − 1/3, 1 − 1/e² − 2/3)
    fit = hill_fit(torch.tensor([1.0, math.e, math.e**2], dtype=torch.float64))
    assert fit.alpha == pytest.approx(2.0, abs=1e-12)
    assert fit.xmin == pytest.approx(1.0, abs=1e-12)
    assert fit.ks_distance == pytest.approx(1 - math.exp(-1) - 1 / 3, abs=1e-12)
    assert fit.num_candidates == 1
    # the same spectrum from a matrix: singular values sqrt(λ) in a rotated basis
    q1, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    w = q1 @ torch.diag(torch.tensor([1.0, math.exp(0.5), math.e], dtype=torch.float64))
    assert hill_fit(esd(w)).alpha == pytest.approx(2.0, abs=1e-5)


@pytest.mark.parametrize("shape,seed", [((12, 20), 0), ((30, 30), 1), ((64, 172), 2), ((40, 25), 3)])
def test_matches_slow_reference_loop(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails: a random matrix plus a few strong rank-one directions
    w = torch.randn(*shape, generator=g) + sum(
        3.0 * (k + 1) * torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g)) / shape[1]
        for k in range(3))
    eigs = esd(w)
    fit = hill_fit(eigs)
    ref_alpha, ref_xmin = slow_reference_alpha(eigs)
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-10)
    assert fit.xmin == pytest.approx(ref_xmin, rel=1e-12)


def test_power_law_samples_recover_exponent():
    g = torch.Generator().manual_seed(0)
    for alpha_true in (2.5, 3.5):
        u = torch.rand(4000, generator=g, dtype=torch.float64)
        lam = (1 - u) ** (-1.0 / (alpha_true - 1.0))  # p(λ) ∝ λ^{-α}, λ ≥ 1
        assert hill_fit(torch.sort(lam).values).alpha == pytest.approx(alpha_true, abs=0.15)
    # and through a matrix whose squared singular values are such samples
    u = torch.rand(400, generator=g, dtype=torch.float64)
    lam = (1 - u) ** (-1.0 / 2.0)  # α = 3
    q1, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    w = q1 @ torch.diag(lam.sqrt()) @ q2.T
    assert hill_fit(esd(w)).alpha == pytest.approx(3.0, abs=0.35)


def test_alpha_hill_scorer_on_stories(stories):
    model, _ = stories
    assert SCORERS["alpha_hill"].needs == ()
    s = score_layers(model, "alpha_hill")
    linears = block_linears(model, "all")
    assert s.method == "alpha_hill" and s.num_layers == 5 and len(s.per_module) == len(linears) == 35
    for lin in linears[:7]:
        assert s.per_module[lin.name] == pytest.approx(slow_reference_alpha(esd(lin.module.weight))[0], rel=1e-10)
    for layer in range(5):
        mods = [s.per_module[lin.name] for lin in linears if lin.layer == layer]
        assert s.scores[layer] == pytest.approx(sum(mods) / len(mods), rel=1e-12)
    assert all(1.0 < a < 10.0 for a in s.scores)


# ----------------------------------------------------------------------------- owl

def equal_length_examples(tok, path, n: int, length: int) -> Examples:
    ex = load_examples(path, tok, max_length=length, n=4 * n)
    keep = [i for i, ids in enumerate(ex.input_ids) if len(ids) == length][:n]
    assert len(keep) == n
    return ex.subset(keep)


def llmcompressor_owl(model, batches_, sparsity: float, m: int = 5, lmbda: float = 0.08) -> list[float]:
    """llm-compressor 0.14's own OWL helper, called directly inside an initialised (empty) session."""
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    session = active_session()
    session.reset()
    session.initialize(model=model, recipe=[], calib_data=batches_)
    try:
        mod = WandaPruningModifier(sparsity=sparsity, sparsity_profile="owl", owl_m=m, owl_lmbda=lmbda)
        layers = dict(match_named_modules(model, ["LlamaDecoderLayer"]))
        out = mod._infer_owl_layer_sparsity(model, layers, batches_)
    finally:
        session.reset()
    return [float(out[f"model.layers.{i}"]) for i in range(len(layers))]


@pytest.mark.integration
def test_owl_matches_llmcompressor(stories, tinystories_train):
    model, tok = stories
    calib = equal_length_examples(tok, tinystories_train, n=6, length=48)
    ours = score_layers(model, "owl", ScoringData(calib=calib, pad_id=pad_id_of(tok)), batch_size=len(calib))
    batch = [{"input_ids": torch.tensor(calib.input_ids), "attention_mask": torch.ones(len(calib), 48,
                                                                                        dtype=torch.long)}]
    for target in (0.5, 0.7):
        theirs = llmcompressor_owl(model, batch, target)
        assert owl_sparsity(ours.scores, target, lmbda=0.08) == pytest.approx(theirs, abs=1e-9)
        assert sparsity_from_scores(ours.scores, ours.method, None, target, 0.08) == pytest.approx(theirs, abs=1e-9)


def test_owl_scorer_fields_and_padding_invariance(stories, tinystories_train):
    model, tok = stories
    full = load_examples(tinystories_train, tok, max_length=64, n=8)
    calib = Examples(tuple(ids[: 16 + 6 * i] for i, ids in enumerate(full.input_ids)), full.source)
    assert len({len(x) for x in calib.input_ids}) == 8  # ragged: batches are padded
    data = ScoringData(calib=calib, pad_id=pad_id_of(tok))
    padded = score_layers(model, "owl", data, batch_size=8)
    single = score_layers(model, "owl", data, batch_size=1)
    assert padded.scores == pytest.approx(single.scores, abs=1e-9)
    assert padded.method == "owl" and "LESS sparsity" in padded.higher_is
    assert padded.params["m"] == 5.0 and padded.params["allocation"] == "owl_sparsity"
    assert padded.data["calib"]["n"] == 8
    assert all(0.0 <= d <= 100.0 for d in padded.scores)
    assert len(padded.per_module) == 35
    with pytest.raises(Exception, match="calib"):
        score_layers(model, "owl", ScoringData(pad_id=0))


def test_owl_outlier_ratio_by_hand(stories, tinystories_train):
    """D_l recomputed from scratch: per-example hooks, Wanda scores, threshold M·mean."""
    model, tok = stories
    calib = load_examples(tinystories_train, tok, max_length=32, n=3)
    s = score_layers(model, "owl", ScoringData(calib=calib, pad_id=pad_id_of(tok)), batch_size=2)
    lins = [lin for lin in block_linears(model, "all") if lin.layer == 2]
    acc = {lin.name: torch.zeros(lin.module.weight.shape[1]) for lin in lins}

    def accumulate(name):
        def hook(_mod, args):
            acc[name].add_((args[0][0] ** 2).sum(0))  # returns None: the input is left alone

        return hook

    hooks = [lin.module.register_forward_pre_hook(accumulate(lin.name)) for lin in lins]
    with torch.no_grad():
        for ids in calib.input_ids:
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    a = torch.cat([(lin.module.weight.abs() * (acc[lin.name] / 3).sqrt()).flatten() for lin in lins])
    assert s.scores[2] == pytest.approx(100.0 * int((a > 5 * a.mean()).sum()) / a.numel(), abs=1e-12)


# ----------------------------------------------------------------------------- depth_ramp (docs/method.md §5 control)

def test_depth_ramp_is_the_layer_index(stories, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif_plugins.scorers import resolve_scores
    from layerif_plugins.scores import LayerScores, ScoreDirection

    model, _ = stories
    spec = SCORERS["depth_ramp"]
    assert spec.needs == () and spec.direction is ScoreDirection.HIGHER_PRUNES
    s = score_layers(model, "depth_ramp")
    assert s.scores == [0.0, 1.0, 2.0, 3.0, 4.0] and s.method == "depth_ramp"
    assert s.direction is ScoreDirection.HIGHER_PRUNES and "deeper" in s.higher_is
    # any depth, no data
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=7,
                      num_attention_heads=2, num_key_value_heads=2)
    assert score_layers(LlamaForCausalLM(cfg), "depth_ramp").scores == [float(i) for i in range(7)]
    # through resolve_scores, computed and from a file (checked against the model and the method)
    path = s.save(tmp_path / "ramp.json")
    assert resolve_scores(model, "depth_ramp").scores == s.scores
    loaded = resolve_scores(model, "depth_ramp", path)
    assert loaded.scores == s.scores and loaded.direction is ScoreDirection.HIGHER_PRUNES
    assert LayerScores.load(path).method == "depth_ramp"
    with pytest.raises(Exception, match="'depth_ramp' scores but method is 'owl'"):
        resolve_scores(model, "owl", path)
    # §2b: deeper layers get more sparsity, exactly the layerwise mapping of the index
    params = [10, 10, 10, 10, 10]
    ratios = sparsity_from_scores(s.scores, s.direction, params, 0.6, 0.1)
    assert ratios == pytest.approx([0.54, 0.57, 0.6, 0.63, 0.66], abs=1e-12)


def test_depth_ramp_from_the_command_line(stories_dir, tmp_path, capsys):
    from layerif_plugins.cli import main
    from layerif_plugins.scores import LayerScores

    out = tmp_path / "ramp.json"
    assert main(["score", "--method", "depth_ramp", "--model", str(stories_dir), "--out", str(out),
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    scores = LayerScores.load(out)
    assert scores.method == "depth_ramp" and scores.scores == [0.0, 1.0, 2.0, 3.0, 4.0]
