"""The `layerif` command end to end (in-process), including its one-line errors."""

from __future__ import annotations

import json

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
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert", "score", "show", "demo", "prune", "moe", "finetune", "drop", "heal",
                    "select-layers", "eval", "vllm-check"):
        assert command in out
