"""The `layerif` command end to end (in-process), including its one-line errors."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from layerif_plugins.cli import main


def test_convert_score_show(tmp_path, stories_bin, tinystories_train, tinystories_valid, capsys):
    out_dir = tmp_path / "hf"
    assert main(["convert", str(stories_bin), "--out", str(out_dir)]) == 0
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()
    scores = tmp_path / "s.json"
    args = ["score", "--model", str(out_dir), "--train", str(tinystories_train), "--val", str(tinystories_valid),
            "--n-train", "8", "--n-val", "4", "--max-length", "32", "--params", "mlp", "--quiet",
            "--per-example", "--out", str(scores)]
    assert main(args) == 0
    data = json.loads(scores.read_text())
    assert data["params"]["params"] == "mlp" and data["params"]["max_length"] == 32
    assert len(data["per_example"]) == 8
    # the same run straight from the llama2.c checkpoint gives the same scores
    scores_bin = tmp_path / "s_bin.json"
    assert main([*args[:2], str(stories_bin), *args[3:-1], str(scores_bin)]) == 0
    assert json.loads(scores_bin.read_text())["scores"] == data["scores"]
    png = tmp_path / "s.png"
    assert main(["show", str(scores), str(scores_bin), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| layer |" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, stories_bin, tinystories_valid, capsys):
    rc = main(["score", "--model", str(stories_bin), "--train", str(tmp_path / "missing.txt"),
               "--val", str(tinystories_valid), "--out", str(tmp_path / "s.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "data file not found" in err and "Traceback" not in err
    rc = main(["score", "--model", str(stories_bin), "--train", str(tinystories_valid), "--val",
               str(tinystories_valid), "--out", str(tmp_path / "nodir" / "s.json"), "--quiet"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(["score", "--model", str(stories_bin), "--train", str(tinystories_valid), "--n-train", "9999",
               "--val", str(tinystories_valid), "--out", str(tmp_path / "s.json"), "--quiet"])
    assert rc == 2 and "only 500" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_score_variability_from_labelled_jsonl(tmp_path, stories_bin, tinystories_valid, shakespeare):
    from layerif_plugins.data import read_records

    rows = [{"text": t, "label": "story"} for t in read_records(tinystories_valid)[:8]]
    rows += [{"text": t, "label": "play"} for t in read_records(shakespeare)[:8]]
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "nu.json"
    assert main(["score", "--model", str(stories_bin), "--method", "variability", "--calib", str(labelled),
                 "--label-field", "label", "--n-calib", "16", "--max-length", "32", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["method"] == "variability" and len(data["scores"]) == 5
    assert data["data"]["labels"] == {"n": 16, "classes": 2}
    assert all(s > 0 for s in data["scores"])


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert", "score", "show", "demo", "prune", "moe", "finetune", "drop", "heal",
                    "select-layers", "eval", "vllm-check", "plan", "lora-layout", "quantize"):
        assert command in out


# ----------------------------------------------------------------------------- options from the config dataclasses


def _subparser(name: str):
    from layerif_plugins.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return parser, sub.choices[name]


def test_score_options_come_from_influence_config():
    import dataclasses

    from layerif_plugins.cli.score import INFLUENCE_OPTIONS
    from layerif_plugins.engine import InfluenceConfig

    parser, score = _subparser("score")
    base = ["score", "--model", "m", "--out", "o.json"]
    args = parser.parse_args(base)
    # every field but show_progress (that is --quiet) is an option, and the defaults are the dataclass's
    flags = {opt for a in score._actions for opt in a.option_strings}
    fields = [f.name for f in dataclasses.fields(InfluenceConfig) if f.name != "show_progress"]
    assert all(f"--{f.replace('_', '-')}" in flags for f in fields)
    assert INFLUENCE_OPTIONS.build(args) == InfluenceConfig()
    assert INFLUENCE_OPTIONS.build(args, show_progress=not args.quiet) == InfluenceConfig(show_progress=True)
    # the historical names and values still parse, into the config's types
    args = parser.parse_args([*base, "--params", "mlp", "--damping", "0.25", "--batch-size", "3", "--pairwise",
                              "--grad-mode", "ghost", "--max-tokens-per-batch", "256", "--checkpoint-dir", "ck",
                              "--gradient-checkpointing", "--quiet"])
    cfg = INFLUENCE_OPTIONS.build(args, show_progress=not args.quiet)
    assert cfg == dataclasses.replace(InfluenceConfig(), params="mlp", damping=0.25, batch_size=3, pairwise=True,
                                      grad_mode="ghost", max_tokens_per_batch=256, checkpoint_dir="ck",
                                      gradient_checkpointing=True, show_progress=False)
    assert isinstance(cfg.damping, float) and isinstance(cfg.batch_size, int)
    with pytest.raises(SystemExit):  # a Literal field keeps its choices
        parser.parse_args([*base, "--grad-mode", "fastest"])


def test_heal_drop_finetune_options_come_from_their_configs():
    from layerif_plugins.cli.drop import heal_options
    from layerif_plugins.cli.finetune import TRAIN_OPTIONS
    from layerif_plugins.depth.heal import HealConfig
    from layerif_plugins.training import TrainConfig

    parser, _ = _subparser("heal")
    args = parser.parse_args(["heal", "--model", "m", "--data", "d.txt", "--steps", "7", "--out", "o"])
    assert heal_options("").build(args) == HealConfig(steps=7)
    args = parser.parse_args(["heal", "--model", "m", "--data", "d.txt", "--steps", "7", "--out", "o",
                              "--lr", "0.01", "--rank", "4", "--alpha", "8", "--batch-size", "2", "--params", "all",
                              "--seed", "3"])
    assert heal_options("").build(args) == HealConfig(steps=7, lr=0.01, r=4, lora_alpha=8, batch_size=2,
                                                      params="all", seed=3)
    drop = ["drop", "--model", "m", "--n-layers", "1", "--by", "last", "--out", "o"]
    args = parser.parse_args([*drop, "--heal-steps", "5", "--heal-rank", "2", "--heal-alpha", "4"])
    assert heal_options().build(args) == HealConfig(steps=5, r=2, lora_alpha=4)
    assert parser.parse_args(drop).heal_lr == HealConfig().lr and parser.parse_args(drop).heal_steps == 0
    ft = ["finetune", "--model", "m", "--adapter", "a", "--train", "t.txt", "--out", "o"]
    assert TRAIN_OPTIONS.build(parser.parse_args(ft)) == TrainConfig()
    args = parser.parse_args([*ft, "--max-steps", "12", "--epochs", "2", "--lr", "0.002", "--grad-accum", "2",
                              "--warmup-ratio", "0.1", "--gradient-checkpointing"])
    assert TRAIN_OPTIONS.build(args) == TrainConfig(max_steps=12, epochs=2.0, lr=0.002, grad_accum=2,
                                                    warmup_ratio=0.1, gradient_checkpointing=True)


def test_config_options_generator_handles_every_scalar_kind():
    import argparse
    from dataclasses import dataclass, field

    from layerif_plugins.cli.common import ConfigOptions

    @dataclass
    class Cfg:
        """A config.

        Args:
            mode: how to run; ``"a"`` or ``"b"``.
            budget: bytes or a size
                such as 4GB.
        """

        mode: Literal["a", "b"] = "a"
        budget: int | str | None = None
        ratio: float = 0.5
        count: int | None = None
        name: str = "x"
        fast: bool = False
        progress: bool = True
        tags: list[str] = field(default_factory=list)  # no command-line form: left out
        note: str = field(default="", metadata={"help": "from the metadata"})

    options = ConfigOptions(Cfg, prefix="c-")
    p = argparse.ArgumentParser()
    options.add_to(p)
    assert options.build(p.parse_args([])) == Cfg()
    args = p.parse_args(["--c-mode", "b", "--c-budget", "4GB", "--c-ratio", "1", "--c-count", "3", "--c-name", "y",
                         "--c-fast", "--c-no-progress"])
    assert options.build(args) == Cfg(mode="b", budget="4GB", ratio=1.0, count=3, name="y", fast=True,
                                      progress=False)
    assert options.build(p.parse_args(["--c-budget", "1024"])).budget == 1024
    helps = {a.dest: a.help for a in p._actions}
    assert helps["c_budget"].startswith("bytes or a size such as 4GB") and helps["c_note"] == "from the metadata"
    assert "c_tags" not in helps


def test_allocation_and_layout_choices_have_one_source():
    from layerif_plugins.allocate.experts import LAYOUTS
    from layerif_plugins.allocate.layers import DROP_RULES
    from layerif_plugins.allocate.sparsity import ALLOCATIONS
    from layerif_plugins.integrations.llmcompressor import ALLOCATIONS as MODIFIER_ALLOCATIONS

    choices = {}
    for name, dest in (("prune", "allocation"), ("moe", "layout"), ("drop", "by")):
        _, p = _subparser(name)
        choices[name] = tuple(next(a for a in p._actions if a.dest == dest).choices)
    assert choices == {"prune": ALLOCATIONS, "moe": LAYOUTS, "drop": DROP_RULES}
    assert MODIFIER_ALLOCATIONS is ALLOCATIONS


def test_every_output_option_is_declared_for_the_checks():
    """Every command's output paths go through the one `--out` rule (``declare_paths``), with ``--overwrite``."""
    from layerif_plugins.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parsers = dict(sub.choices)
    models = parsers.pop("models")
    parsers.update({f"models {k}": v for k, v in
                    next(a for a in models._actions if a.dest == "models_command").choices.items()})
    outputs = {"out", "png", "save_scores", "task_dir"}
    checked = 0
    for name, p in parsers.items():
        dests = {a.dest for a in p._actions} & outputs
        if name == "demo" or not dests:  # the demo checks its --out itself (it resumes into its own output)
            continue
        spec = p.get_default("path_spec")
        assert spec is not None, name
        assert dests <= {*spec.dirs, *spec.files, *spec.into}, name
        assert "--overwrite" in p._option_string_actions, name
        checked += 1
    assert checked >= 12


def test_float_options_refuse_non_finite_values(capsys):
    for argv in (["heal", "--model", "m", "--data", "d", "--steps", "1", "--out", "o", "--lr", "nan"],
                 ["score", "--model", "m", "--out", "o.json", "--damping", "inf"],
                 ["moe", "--model", "m", "--budget", "8", "--out", "o", "--beta=-inf"],
                 ["prune", "--model", "m", "--calib", "c", "--out", "o", "--sparsity", "NaN"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "not a finite number" in err and len(err.splitlines()) == 1
