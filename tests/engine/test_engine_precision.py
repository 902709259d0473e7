"""``stats_precision``: bf16 statistics within a stated tolerance of the fp64 oracle, fp32 unchanged, and
a checkpoint of one precision never resumed under another."""

from __future__ import annotations

import copy

import pytest
import torch

from layerif_plugins.data import Examples, load_examples
from layerif_plugins.engine import InfluenceConfig, compute_influence, reference_influence
from layerif_plugins.errors import ConfigError

#: bf16 statistics of an fp32 model vs the fp64 oracle (CPU, this task, batch 4), relative to the oracle's
#: largest value: per-example scores of the worst layer, layer scores, λ. Measured: materialized 8.9e-4 /
#: 2.1e-4 / 2.9e-3, ghost 1.25e-3 / 7.1e-4 / 3.6e-3. The broken path (statistics and their sums held in bf16)
#: measured 2.9e-3 / 3.3e-3 (materialized) and 2.8e-3 / 2.4e-3 (ghost): it fails the first two bounds.
BF16_EXAMPLE, BF16_LAYER, BF16_LAMBDA = 2e-3, 1.5e-3, 8e-3


@pytest.fixture(scope="module")
def task(stories_dir, tinystories_train, tinystories_valid):
    """12 train examples of 12 lengths (padding exercised), 6 validation examples."""
    from layerif_plugins.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(stories_dir)
    train = load_examples(tinystories_train, tok, max_length=80, n=12)
    train = Examples(tuple(ids[: 20 + 5 * i] for i, ids in enumerate(train.input_ids)), train.source)
    return train, load_examples(tinystories_valid, tok, max_length=48, n=6)


def _cfg(**kw) -> InfluenceConfig:
    return InfluenceConfig(params="all", batch_size=4, show_progress=False, **kw)


def _errors(got, oracle) -> tuple[float, float]:
    """(per-example of the worst layer, layer scores) relative to the oracle's largest value."""
    diff = (got.per_example - oracle.per_example).abs().amax(dim=0)
    example = float((diff / oracle.per_example.abs().amax(dim=0)).max())
    low, ref = torch.tensor(got.layer_scores), torch.tensor(oracle.layer_scores)
    return example, float((low - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("grad_mode", ["materialize", "ghost"])
def test_bf16_statistics_within_tolerance_of_fp64(stories, task, grad_mode):
    model, _ = stories
    train, val = task
    oracle = compute_influence(copy.deepcopy(model).double(), train, val, 0, _cfg(grad_mode=grad_mode))
    fp32 = compute_influence(model, train, val, 0, _cfg(grad_mode=grad_mode))
    bf16 = compute_influence(model, train, val, 0, _cfg(grad_mode=grad_mode, stats_precision="bf16"))
    example, layer = _errors(bf16, oracle)
    assert example < BF16_EXAMPLE and layer < BF16_LAYER, (example, layer)
    assert max(_errors(fp32, oracle)) < 1e-4  # fp32 statistics: float rounding only
    assert not torch.equal(bf16.per_example, fp32.per_example)  # the option did change the arithmetic
    assert bf16.lambdas.keys() == fp32.lambdas.keys()
    for name, lam in oracle.lambdas.items():  # λ (mean ||g||²) follows too
        assert abs(bf16.lambdas[name] - lam) <= BF16_LAMBDA * lam, name


def test_fp32_is_todays_engine(stories, task):
    """Explicit fp32 = the default (bit for bit); it equals the per-pair oracle as before; one-pass = four-pass."""
    model, _ = stories
    train, val = task
    default = compute_influence(model, train, val, 0, _cfg(pairwise=True))
    explicit = compute_influence(model, train, val, 0, _cfg(pairwise=True, stats_precision="fp32"))
    assert torch.equal(default.per_example, explicit.per_example) and torch.equal(default.pairwise,
                                                                                   explicit.pairwise)
    ref = reference_influence(model, train, val, params="all")
    assert float((default.pairwise - ref).abs().max() / ref.abs().max()) < 1e-4
    one = compute_influence(model, train, val, 0, _cfg(mode="one-pass", stats_precision="fp32"))
    four = compute_influence(model, train, val, 0, _cfg(mode="four-pass"))
    assert torch.equal(four.per_example, one.per_example) and one.model_batches < four.model_batches


def test_bf16_one_pass_equals_four_pass_bit_for_bit(stories, task):
    """Held bf16 gradients are read back exactly as re-captured ones: every mode gives the same bits."""
    model, _ = stories
    train, val = task
    four = compute_influence(model, train, val, 0, _cfg(stats_precision="bf16", mode="four-pass"))
    one = compute_influence(model, train, val, 0, _cfg(stats_precision="bf16", mode="one-pass",
                                                       max_factor_memory="1GB"))
    assert torch.equal(one.per_example, four.per_example)
    assert one.model_batches < four.model_batches and one.factor_bytes > 0


def test_precision_is_part_of_the_fingerprint(stories, task, tmp_path):
    model, _ = stories
    train, val = task
    assert "stats_precision" not in InfluenceConfig().numeric_options()  # older (fp32) directories still resume
    assert InfluenceConfig(stats_precision="bf16").numeric_options()["stats_precision"] == "bf16"
    ck = str(tmp_path / "ck")
    compute_influence(model, train, val, 0, _cfg(checkpoint_dir=ck))
    with pytest.raises(ConfigError, match="different run: stats_precision was None there and is 'bf16' now"):
        compute_influence(model, train, val, 0, _cfg(checkpoint_dir=ck, stats_precision="bf16"))


def test_bad_and_cpu_only_precisions(stories, task):
    model, _ = stories
    train, val = task
    with pytest.raises(ConfigError, match=r"stats_precision must be one of \['fp32', 'tf32', 'bf16'\]"):
        InfluenceConfig(stats_precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="stats_precision='tf32' needs a CUDA device.*layers on cpu"):
        compute_influence(model, train, val, 0, _cfg(stats_precision="tf32"))


def test_tf32_switch_is_scoped_to_the_statistics():
    """TF32 is on only inside ``Precision.matmuls`` (the statistics), in both of torch's views of the flag."""
    from layerif_plugins.engine.stats import Precision

    matmul = torch.backends.cuda.matmul
    before = torch.get_float32_matmul_precision()
    with Precision.of("tf32", torch.float32).matmuls():
        assert matmul.fp32_precision == "tf32" and matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == before and not matmul.allow_tf32
    with Precision.of("bf16", torch.float32).matmuls():  # bf16 / fp32: the process's setting is left alone
        assert not matmul.allow_tf32
