"""benchmarks/quality_peft.py: method names, AdaLoRA's schedule, the paired statistics, and a small real run."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def qp():
    return load_benchmark("quality_peft")


def test_method_names(qp):
    assert qp.method_parts("lora") == ("lora", "uniform", False)
    assert qp.method_parts("eva") == ("eva", "uniform", False)
    assert qp.method_parts("lora-alpha_hill") == ("lora", "alpha_hill", False)
    assert qp.method_parts("moe-layerif:2.5@other") == ("moe", "layerif:2.5", True)
    assert qp.method_parts("lora-layerif-inv@other") == ("lora", "layerif-inv", True)  # the same scores, inverted
    assert qp.SCORER_OF["layerif-inv"] == "layerif"
    for name in qp.METHODS:
        qp.method_parts(name)
    for bad in ("lora-owl", "moe-layerif@mine", "lora-depth_ramp@other", "dora"):
        with pytest.raises(SystemExit):
            qp.method_parts(bad)


def test_adalora_schedule(qp):
    assert qp.adalora_schedule(300) == {"tinit": 30, "tfinal": 60, "deltaT": 7, "total_step": 300}
    assert qp.adalora_schedule(6) == {"tinit": 1, "tfinal": 1, "deltaT": 1, "total_step": 6}
    with pytest.raises(SystemExit, match="AdaLoRA needs more steps"):
        qp.adalora_schedule(2)


def test_paired_differences_and_verdict(qp):
    ref = {0: 5.0, 1: 5.2, 2: 4.9}
    rows = [{"seed": 0, "test_loss": 4.9}, {"seed": 1, "test_loss": 5.05}, {"seed": 2, "test_loss": 4.82}]
    mean, se = qp.paired_stats(rows, ref)
    d = [-0.1, -0.15, -0.08]
    assert mean == pytest.approx(sum(d) / 3)
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3))
    assert qp.paired(rows, ref) == f"{mean:+.4f} ± {se:.4f} *"
    assert qp.beats(rows, ref)
    noisy = [{"seed": 0, "test_loss": 4.5}, {"seed": 1, "test_loss": 5.6}, {"seed": 2, "test_loss": 4.9}]
    assert not qp.beats(noisy, ref) and "*" not in qp.paired(noisy, ref)


def test_parse_args_refuses_bad_names(qp):
    with pytest.raises(SystemExit):
        qp.parse_args(["--tasks", "shakespeare,klingon"])
    with pytest.raises(SystemExit):
        qp.parse_args(["--r", "6", "--expert-r", "4"])


@pytest.mark.slow
@pytest.mark.integration
def test_quick_subset_runs_and_resumes(qp, tmp_path, capsys):
    """Three methods of `--quick` on one task: equal parameters for the rank pattern, a curve, resumable JSONL."""
    argv = ["--quick", "--tasks", "shakespeare", "--methods", "lora,lora-depth_ramp,adalora,moe-uniform",
            "--out", str(tmp_path)]
    assert qp.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"]) for r in rows] == [("lora", 0), ("lora", 1), ("lora-depth_ramp", 0),
                                                         ("lora-depth_ramp", 1), ("adalora", 0), ("adalora", 1),
                                                         ("moe-uniform", 0), ("moe-uniform", 1)]
    by = {(r["method"], r["seed"]): r for r in rows}
    # quick: r = 4 on q,v,down of stories260K (c_l = 460): 4 · 460 · 5 parameters for both
    assert by["lora", 0]["trainable"] == by["lora-depth_ramp", 0]["trainable"] == 4 * 460 * 5
    assert by["lora", 0]["ranks"] == [12] * 5 and by["lora-depth_ramp", 0]["ranks"] == [6, 9, 12, 15, 18]
    assert by["lora-depth_ramp", 0]["pattern_ranks"] == [2, 3, 4, 5, 6]
    assert sum(by["adalora", 0]["final_ranks"]) == 4 * 3 * 5  # AdaLoRA's final budget: target_r per module
    # LoRA-MoE at LoRA's 9,200: rank-2 experts cost 2 · 460 per layer, a router n · (64 + 64 + 172) where n > 1;
    # [2,2,2,2,1] would be 8,280 + 8 · 300 = 10,680, so [2,2,2,1,1]: 7,360 + 6 · 300 = 9,160
    assert by["moe-uniform", 0]["experts"] == [2, 2, 2, 1, 1] and by["moe-uniform", 0]["trainable"] == 9160
    assert by["moe-uniform", 0]["sizes"]["moe_params"] == "lora" and "moe_params" not in by["lora", 0]["sizes"]
    for r in rows:
        assert [s for s, _ in r["curve"]] == [3, 6] and r["curve"][-1][1] == pytest.approx(r["test_loss"])
        assert math.isfinite(r["test_loss"]) and r["step_s_wall"] > 0
    report = (tmp_path / "quality_peft_stories260K.md").read_text()
    assert "| lora-depth_ramp | 9,200 | 6-9-12-15-18 |" in report
    assert "Influence-based layouts with a lower test loss" in report
    capsys.readouterr()
    assert qp.main(argv) == 0  # resumed: every cell is already in the JSONL
    assert len((tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()) == 8
    assert "seed 0: test loss" not in capsys.readouterr().out


def test_windows_split_keeps_paragraphs_apart(qp, tmp_path):
    """WikiText-style split: headings dropped, windows ≤ max_length and ≥ 8 tokens, no paragraph in two parts."""
    paragraphs = [" = Heading = "] + [" ".join([f"p{i}"] * (5 + 7 * (i % 6))) for i in range(1, 40)]
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")

    def tok(text: str, add_special_tokens: bool = True, truncation: bool = False,
            max_length: int | None = None) -> dict[str, list[int]]:
        ids = [int(w[1:]) if w.startswith("p") else -1 for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}

    args = qp.parse_args(["--max-length", "10", "--n-test", "4", "--n-score-val", "2", "--n-train", "12"])
    parts = qp.split_task(str(path), tok, args, windows=True)
    assert [len(parts[k].input_ids) for k in ("test", "val", "train")] == [4, 2, 12]
    owners = {k: {t for w in v.input_ids for t in w} for k, v in parts.items()}
    assert -1 not in set().union(*owners.values())  # the heading is not an example
    assert not owners["test"] & owners["train"] and not owners["val"] & owners["train"]
    assert not owners["test"] & owners["val"]
    for v in parts.values():
        for w in v.input_ids:
            assert 8 <= len(w) <= 10 and len(set(w)) == 1  # one paragraph per window
    # a 40-token paragraph is cut into four consecutive windows: 10 + 10 + 10 + 10; a 12-token one keeps 10
    counts = {}
    for w in parts["train"].input_ids:
        counts[w[0]] = counts.get(w[0], 0) + 1
    for pid, n in counts.items():
        length = 5 + 7 * (pid % 6)
        full = [min(10, length - s) for s in range(0, length, 10)]
        assert n <= sum(1 for x in full if x >= 8)
    args = qp.parse_args(["--max-length", "10", "--n-test", "400"])
    with pytest.raises(SystemExit, match="not enough 10-token windows for the test split"):
        qp.split_task(str(path), tok, args, windows=True)


def test_report_pairs_moe_layouts_with_the_uniform_moe_layout(qp):
    """A LoRA-MoE layout is also judged against the uniform LoRA-MoE layout (same seed, ± SE, verdict)."""
    losses = {"lora": [3.60, 3.61, 3.59], "eva": [3.58, 3.62, 3.57], "moe-uniform": [3.63, 3.62, 3.64],
              "moe-layerif:2.5": [3.61, 3.605, 3.62], "lora-layerif": [3.59, 3.60, 3.60]}
    rows = [{"method": m, "seed": s, "test_loss": v, "test_ppl": math.exp(v), "trainable": 10, "ranks": [1, 2],
             "curve": [[0, 5.0], [1, v]], "step_s_wall": 1.0, "step_s_cpu": 1.0, "peak_mib": 1.0}
            for m, vals in losses.items() for s, v in enumerate(vals)]
    report = qp.task_report("t", rows, list(losses), 5.0)
    d = [a - b for a, b in zip(losses["moe-layerif:2.5"], losses["moe-uniform"], strict=True)]
    se = statistics.stdev(d) / math.sqrt(3)
    line = next(x for x in report.splitlines() if x.startswith("| moe-layerif:2.5 |"))
    assert f"| {statistics.mean(d):+.4f} ± {se:.4f} * |" in line  # −0.0183 ± 0.0017: beyond two SE
    assert next(x for x in report.splitlines() if x.startswith("| lora-layerif |")).count("| - |") == 1
    assert "than the uniform LoRA-MoE layout beyond two standard errors: moe-layerif:2.5." in report
    assert "depth ramp" not in report  # no ramp rows: no line against it
    ramp = [3.595, 3.605, 3.60]
    rows += [{**rows[-1], "method": "lora-depth_ramp", "seed": s, "test_loss": v} for s, v in enumerate(ramp)]
    report = qp.task_report("t", rows, [*losses, "lora-depth_ramp"], 5.0)
    d = [a - b for a, b in zip(losses["lora-layerif"], ramp, strict=True)]
    want = f"{statistics.mean(d):+.4f} ± {statistics.stdev(d) / math.sqrt(3):.4f}"
    assert f"Against the data-free depth ramp (`lora-depth_ramp`, paired): lora-layerif {want}." in report


def test_lr_options_are_parsed_and_refused_early(qp):
    args = qp.parse_args(["--method-lr", "adalora=0.01, eva=3e-3"])
    assert args.method_lr == {"adalora": 0.01, "eva": 0.003} and args.tune_lr == [] and args.n_tune == 0
    assert qp.method_lr(args, "adalora") == 0.01 and qp.method_lr(args, "lora") == args.lr == 1e-3
    assert qp.sizes(args, "adalora")["lr"] == 0.01 and "heldout" not in qp.sizes(args, "adalora")
    tune = qp.parse_args(["--tune-lr", "1e-3,1e-2"])
    assert tune.tune_lr == [1e-3, 1e-2] and tune.n_tune == 64
    assert qp.sizes(tune, "lora")["heldout"] == "tune"
    assert [a.lr for a in qp.lr_runs(tune)] == [1e-3, 1e-2]
    assert qp.tune_sources("lora-layerif@other") == ["lora-layerif", "lora"] and qp.tune_sources("lora") == ["lora"]
    assert qp.tune_sources("eva") == ["eva", "lora"] and qp.tune_sources("moe-layerif:2.5") == ["moe-layerif:2.5",
                                                                                                 "moe-uniform"]
    for bad in (["--method-lr", "adalora=fast"], ["--method-lr", "nope=0.1"], ["--tune-lr", "0,1e-3"],
                ["--tune-lr", "1e-3", "--method-lr", "adalora=0.01"], ["--tune-lr", "1e-3", "--lr-from-tune"],
                ["--lr-from-tune", "--method-lr", "adalora=0.01"]):
        with pytest.raises(SystemExit):
            qp.parse_args(bad)


@pytest.mark.slow
@pytest.mark.integration
def test_lr_search_reads_the_tune_part_and_keeps_its_rows_apart(qp, tmp_path, capsys):
    """`--tune-lr` trains at each rate, measures a part dealt after train, and its rows never serve a test run."""
    argv = ["--quick", "--tasks", "shakespeare", "--methods", "lora", "--out", str(tmp_path)]  # 2 seeds
    assert qp.main([*argv, "--tune-lr", "1e-3,1e-2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()]
    assert [(r["sizes"]["lr"], r["sizes"]["heldout"], r["seed"]) for r in rows] == [
        (1e-3, "tune", 0), (1e-3, "tune", 1), (1e-2, "tune", 0), (1e-2, "tune", 1)]
    mean = {lr: statistics.mean(r["test_loss"] for r in rows if r["sizes"]["lr"] == lr) for lr in (1e-3, 1e-2)}
    best = min(mean, key=mean.__getitem__)
    report = (tmp_path / "quality_peft_stories260K_lr.md").read_text()
    assert report.count(f"| {best:g} |") == 1 and "the test part is not read" in report
    # --report: a wider grid from the finished rows alone; the rate never trained shows '-'
    assert qp.main([*argv, "--tune-lr", "1e-3,1e-2,3e-2", "--report"]) == 0
    assert len((tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()) == 4
    line = next(x for x in (tmp_path / "quality_peft_stories260K_lr.md").read_text().splitlines()
                if x.startswith("| lora |"))
    assert line.endswith(f"| - | {best:g} |")
    assert qp.main([*argv, "--method-lr", f"lora={best}"]) == 0  # the test run does not reuse a tune row
    rows = [json.loads(line) for line in (tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()]
    tuned = {r["seed"]: r["test_loss"] for r in rows[:4] if r["sizes"]["lr"] == best}
    assert len(rows) == 6 and all("heldout" not in r["sizes"] and r["sizes"]["lr"] == best for r in rows[4:])
    assert all(r["test_loss"] != tuned[r["seed"]] for r in rows[4:])  # measured on the test part, not tune
    assert f"lora: {best:g}" in (tmp_path / "quality_peft_stories260K.md").read_text()
    # --lr-from-tune: lora at the searched rate (its rows above are reused), a rank pattern at its family's
    assert qp.main([*argv[:4], "lora,lora-depth_ramp", *argv[5:], "--lr-from-tune"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "quality_peft_stories260K.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and [(r["method"], r["sizes"]["lr"]) for r in rows[6:]] == [("lora-depth_ramp", best)] * 2
    report = (tmp_path / "quality_peft_stories260K_tuned.md").read_text()
    assert f"rates chosen on the tune part of shakespeare: lora {best:g}, lora-depth_ramp {best:g}" in report
    with pytest.raises(SystemExit, match="no --tune-lr rows of this sizing"):
        qp.main([*argv[:4], "eva", *argv[5:], "--lr-from-tune", "--spread", "0.3"])
    capsys.readouterr()
