"""benchmarks/engine_profile.py: a CPU smoke run profiles a plain fwd+bwd and the one-pass engine on stories260K
and writes a page whose shares and tables come from the profiler."""

from __future__ import annotations

import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def prof():
    return load_benchmark("engine_profile")


def test_profile_page_on_cpu(prof, shared, tmp_path):
    out = tmp_path / "profile.md"
    args = prof.parse_args(["--device", "cpu", "--dtype", "float32", "--model", "stories260k", "--n", "8",
                            "--length", "32", "--batch-size", "8", "--stats-precision", "fp32", "--rows", "6",
                            "--out", str(out)])
    res = prof.profile_cell(args)
    assert res["batch_size"] == 8 and res["device"] == "cpu"
    assert set(res["seconds"]) == {"fwd+bwd", "one-pass"}
    assert all(len(s) == 2 and min(s) > 0 for s in res["seconds"].values())
    for name, shares in res["shares"].items():
        assert set(shares) == set(prof.WATCHED)
        assert 0 < shares["aten::mm"] <= 1 and sum(shares.values()) <= 1 + 1e-9, name
        assert res["profiled_ms"][name] > 0 and "aten::mm" in res["tables"][name]
    page = prof.report(args, res)
    assert page.startswith("# Engine profile: stories260k, n 8, T 32, one-pass")
    assert page.count("```") == 4 and "| one-pass |" in page and "| fwd+bwd |" in page
