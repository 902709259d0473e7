"""benchmarks/quality_precision.py: its seeds, the pooled perplexity and the paired per-paragraph statistics.

The statistics are checked against independent sums written out here; the calibration draws of two
seeds against each other (disjoint roles inside a draw, a different draw per seed, the same test).
"""

from __future__ import annotations

import math
import statistics

import pytest
from benchmark_modules import load_benchmark

from layerif_plugins.models import load_model_and_tokenizer
from layerif_plugins.paths import stories260k_checkpoint


@pytest.fixture(scope="module")
def prec():
    return load_benchmark("quality_precision")


def test_pooled_perplexity_is_the_token_weighted_one(prec):
    docs = [(10.0, 4), (3.0, 2), (7.5, 5)]
    assert prec.pooled_perplexity(docs) == pytest.approx(math.exp(20.5 / 11))


def test_paired_nats_is_the_mean_and_standard_error_of_per_document_differences(prec):
    a = [[(10.0, 4), (3.0, 2)], [(9.0, 4), (4.0, 2)]]
    b = [[(8.0, 4), (3.5, 2)], [(8.0, 4), (3.0, 2)]]
    d = [0.5, -0.25, 0.25, 0.5]
    mean, se = prec.paired_nats(a, b)
    assert mean == pytest.approx(statistics.mean(d))
    assert se == pytest.approx(statistics.stdev(d) / 2)
    with pytest.raises(ValueError, match="documents differ"):
        prec.paired_nats([[(1.0, 3)]], [[(1.0, 4)]])


def test_seeds_are_parsed_and_bad_ones_refused(prec, capsys):
    assert prec.parse_args(["--seeds", "0, 2"]).seed_list == [0, 2]
    for bad in ("a", "1,1", ""):
        with pytest.raises(SystemExit):
            prec.parse_args(["--seeds", bad])
        assert "--seeds" in capsys.readouterr().err


def test_each_seed_draws_other_calibration_paragraphs_and_the_same_test(prec):
    _, tok = load_model_and_tokenizer(str(stories260k_checkpoint()))
    args = prec.parse_args(["--quick"])
    first, second = prec.splits(args.task, tok, args, 0), prec.splits(args.task, tok, args, 1)
    for draw in (first, second):
        roles = [set(draw[k]) for k in ("train", "val", "sens")]
        assert all(not (x & y) for i, x in enumerate(roles) for y in roles[i + 1:])
        assert len(draw["sens"]) == args.n_sens
    assert first["eval"] == second["eval"]
    assert first["sens"] != second["sens"]
