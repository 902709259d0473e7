"""Hostile models, data and scores through the `layerif` command: one clear error, exit 2, nothing touched.

Every case runs the real command in-process (``layerif_plugins.cli.main``) on a broken
copy of the converted stories260K or a broken data / scores file, and checks that

* the command exits with code 2 and prints exactly one ``layerif CMD: error: …`` line
  (no traceback) that names the problem (the missing tensor, the file and line …);
* no input file changed, no output appeared, and no temp dir was left behind.

The broken models are built once per module from the session's converted stories260K
(config vs weights, truncated / garbage safetensors, a NaN in a ``v_proj``, no tokenizer).
The "good" rows at the end are the controls: the same checks pass the intact model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from layerif_plugins.cli import main


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _edit_weights(path: Path, name: str, index: tuple[int, ...], value: float) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    weights[name][index] = value
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def broken(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken copies of the converted stories260K (5 layers, 512 positions, vocabulary 512), by name."""
    root = tmp_path_factory.mktemp("broken-models")
    out: dict[str, Path] = {}

    def copy(name: str) -> Path:
        out[name] = Path(shutil.copytree(stories_dir, root / name))
        return out[name]

    _edit_config(copy("six_layers"), num_hidden_layers=6)  # weights for 5: layer 5 would be random
    _edit_config(copy("four_layers"), num_hidden_layers=4)  # layer 4's weights would be dropped
    _edit_config(copy("mlp_170"), intermediate_size=170)  # every MLP weight of another shape
    trunc = copy("truncated") / "model.safetensors"
    with trunc.open("r+b") as fh:
        fh.truncate(500_000)
    (copy("garbage") / "model.safetensors").write_bytes(b"\xff" * 4096)
    _edit_weights(copy("nan_v_proj"), "model.layers.2.self_attn.v_proj.weight", (3, 4), float("nan"))
    _edit_weights(copy("inf_embed"), "model.embed_tokens.weight", (7, 0), float("inf"))
    (copy("no_tokenizer") / "tokenizer.json").unlink()
    out["good"] = stories_dir
    return out


@pytest.fixture(scope="module")
def files(broken: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken data and scores files, by name (plus ``valid``: real TinyStories text)."""
    from layerif_plugins.models import fingerprint, load_model_and_tokenizer
    from layerif_plugins.paths import shared_data
    from layerif_plugins.scores import LayerScores

    root = tmp_path_factory.mktemp("bad-files")
    f: dict[str, Path] = {"valid": shared_data("tinystories", "valid.txt")}

    def jsonl(name: str, *rows: dict) -> None:
        f[name] = root / f"{name}.jsonl"
        f[name].write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("ids_over_vocab", {"input_ids": [1, 5, 6]}, {"input_ids": [1, 40, 512, 7]})
    jsonl("ids_negative", {"input_ids": [1, 5, -3, 6]})
    jsonl("ids_booleans", {"input_ids": [True, False, True]})
    jsonl("over_length", {"input_ids": [1] + [100] * 799})  # 800 tokens, the model has 512 positions
    f["bad_utf8"] = root / "bad_utf8.txt"
    f["bad_utf8"].write_bytes(b"Once upon a time there was a cat.\n\nThe cat sat.\n\xff\xfe oops\n")
    f["bad_utf8_jsonl"] = root / "bad_utf8.jsonl"
    f["bad_utf8_jsonl"].write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    f["binary"] = root / "binary.txt"
    f["binary"].write_bytes(b"Once upon a time\x00\x00\x01\x02 more\n")
    f["empty"] = root / "empty.txt"
    f["empty"].write_text("\n\n<|endoftext|>\n")

    model, _ = load_model_and_tokenizer(broken["good"])
    good = LayerScores(scores=[1.0, 2.0, 3.0, 4.0, 5.0], method="layerif", model=fingerprint(model)).to_dict()
    for name, scores in (("scores_negative", [-1.0, -2.0, -3.0, -4.0, -5.0]),
                         ("scores_string", [1.0, "high", 3.0, 4.0, 5.0]),
                         ("scores_null", [1.0, 2.0, None, 4.0, 5.0]),
                         ("scores_bool", [True, 2.0, 3.0, 4.0, 5.0])):
        f[name] = root / f"{name}.json"
        f[name].write_text(json.dumps({**good, "scores": scores}))
    return f


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` with its size and modification time."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


# (id, argv template, words the error line must contain). In the argv: {m:NAME} → a broken model dir,
# {f:NAME} → a bad file, {out} → an output path that must not appear, {raw:TEXT} → TEXT as is.
_TRAIN = ["--n-train", "2", "--n-val", "2", "--max-length", "16", "--quiet"]
CASES = [
    # ---- the model check, on every command that reads a model
    ("score-config-6-layers-weights-5", ["score", "--model", "{m:six_layers}", "--train", "{f:valid}", "--val",
                                         "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["config.json and the weights disagree", "missing", "layer 5", "model.layers.5.self_attn.q_proj.weight"]),
    ("score-config-4-layers-weights-5", ["score", "--model", "{m:four_layers}", "--train", "{f:valid}", "--val",
                                         "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["not in the model", "layer 4", "model.layers.4.mlp.down_proj.weight"]),
    ("score-shape-mismatch", ["score", "--model", "{m:mlp_170}", "--train", "{f:valid}", "--val", "{f:valid}",
                              *_TRAIN, "--out", "{out}"],
     ["another shape", "model.layers.0.mlp.down_proj.weight [64, 172] (config: [64, 170])"]),
    ("score-truncated-safetensors", ["score", "--model", "{m:truncated}", "--train", "{f:valid}", "--val",
                                     "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["model.safetensors is truncated", "495,136"]),
    ("score-garbage-safetensors", ["score", "--model", "{m:garbage}", "--train", "{f:valid}", "--val", "{f:valid}",
                                   *_TRAIN, "--out", "{out}"],
     ["model.safetensors is not a safetensors file"]),
    ("score-nan-v-proj", ["score", "--model", "{m:nan_v_proj}", "--train", "{f:valid}", "--val", "{f:valid}",
                          *_TRAIN, "--out", "{out}"],
     ["non-finite weights", "model.layers.2.self_attn.v_proj.weight", "1 NaN"]),
    ("score-no-tokenizer", ["score", "--model", "{m:no_tokenizer}", "--train", "{f:valid}", "--val", "{f:valid}",
                            *_TRAIN, "--out", "{out}"],
     ["no tokenizer in", "--tokenizer"]),
    ("score-tokenizer-path-missing", ["score", "--model", "{m:good}", "--tokenizer", "{raw:./no-such-tokenizer}",
                                      "--train", "{f:valid}", "--val", "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["tokenizer not found", "no-such-tokenizer"]),
    ("score-missing-relative-path", ["score", "--model", "{raw:./no-such-dir/model}", "--train", "{f:valid}",
                                     "--val", "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["model not found: ./no-such-dir/model", "no such file or directory"]),
    ("score-missing-absolute-path", ["score", "--model", "{raw:/no/such/dir/model}", "--train", "{f:valid}",
                                     "--val", "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["model not found: /no/such/dir/model"]),
    ("score-missing-bin", ["score", "--model", "{raw:stories15M.bin}", "--train", "{f:valid}", "--val", "{f:valid}",
                           *_TRAIN, "--out", "{out}"],
     ["model not found: stories15M.bin"]),
    ("score-missing-hub-like-offline", ["score", "--model", "{raw:sb/m}", "--train", "{f:valid}", "--val",
                                        "{f:valid}", *_TRAIN, "--out", "{out}"],
     ["model not found: sb/m", "downloads are off"]),
    ("prune-config-6-layers", ["prune", "--model", "{m:six_layers}", "--sparsity", "0.5", "--allocation", "uniform",
                               "--calib", "{f:valid}", "--n-calib", "2", "--max-length", "16", "--out", "{out}"],
     ["missing", "model.layers.5.self_attn.v_proj.weight"]),
    ("prune-nan-v-proj", ["prune", "--model", "{m:nan_v_proj}", "--sparsity", "0.5", "--allocation", "uniform",
                          "--calib", "{f:valid}", "--n-calib", "2", "--max-length", "16", "--out", "{out}"],
     ["non-finite weights", "model.layers.2.self_attn.v_proj.weight"]),
    ("prune-truncated", ["prune", "--model", "{m:truncated}", "--sparsity", "0.5", "--allocation", "uniform",
                         "--calib", "{f:valid}", "--n-calib", "2", "--max-length", "16", "--out", "{out}"],
     ["truncated"]),
    ("eval-nan-v-proj", ["eval", "--model", "{m:nan_v_proj}", "--tasks", "perplexity:{f:valid}", "--limit", "2",
                         "--device", "cpu", "--out", "{out}"],
     ["non-finite weights", "model.layers.2.self_attn.v_proj.weight"]),
    ("eval-config-6-layers", ["eval", "--model", "{m:six_layers}", "--tasks", "perplexity:{f:valid}", "--limit", "2",
                              "--device", "cpu", "--out", "{out}"],
     ["missing", "layer 5"]),
    ("drop-inf-embedding", ["drop", "--model", "{m:inf_embed}", "--n-layers", "1", "--by", "last", "--quiet",
                            "--out", "{out}"],
     ["non-finite weights", "model.embed_tokens.weight", "1 inf"]),
    ("drop-config-6-layers", ["drop", "--model", "{m:six_layers}", "--n-layers", "1", "--by", "last", "--quiet",
                              "--out", "{out}"],
     ["missing", "layer 5"]),
    ("moe-truncated", ["moe", "--model", "{m:truncated}", "--layout", "uniform", "--budget", "10", "--quiet",
                       "--out", "{out}"],
     ["truncated"]),
    ("moe-garbage", ["moe", "--model", "{m:garbage}", "--layout", "uniform", "--budget", "10", "--quiet",
                     "--out", "{out}"],
     ["not a safetensors file"]),
    ("vllm-check-truncated", ["vllm-check", "{m:truncated}"], ["model.safetensors is truncated"]),
    ("vllm-check-config-6-layers", ["vllm-check", "{m:six_layers}"], ["missing", "model.layers.5.mlp.up_proj.weight"]),
    ("vllm-check-nan-v-proj", ["vllm-check", "{m:nan_v_proj}"], ["model.layers.2.self_attn.v_proj.weight", "NaN"]),
    # ---- data
    ("score-ids-over-vocab", ["score", "--model", "{m:good}", "--train", "{f:ids_over_vocab}", "--val", "{f:valid}",
                              *_TRAIN, "--out", "{out}"],
     ["ids_over_vocab.jsonl:2", "token id 512", "vocabulary (ids 0 … 511)"]),
    ("score-ids-negative", ["score", "--model", "{m:good}", "--train", "{f:ids_negative}", "--val", "{f:valid}",
                            *_TRAIN, "--out", "{out}"],
     ["ids_negative.jsonl:1", "negative token id -3"]),
    ("score-ids-booleans", ["score", "--model", "{m:good}", "--train", "{f:ids_booleans}", "--val", "{f:valid}",
                            *_TRAIN, "--out", "{out}"],
     ["ids_booleans.jsonl:1", "a boolean"]),
    ("score-over-length", ["score", "--model", "{m:good}", "--train", "{f:over_length}", "--val", "{f:valid}",
                           "--n-train", "1", "--n-val", "2", "--max-length", "1000", "--quiet", "--out", "{out}"],
     ["over_length.jsonl:1", "800 tokens", "512 positions", "--max-length 512"]),
    ("prune-over-length", ["prune", "--model", "{m:good}", "--sparsity", "0.5", "--allocation", "uniform",
                           "--calib", "{f:over_length}", "--n-calib", "1", "--max-length", "1000", "--out", "{out}"],
     ["over_length.jsonl:1", "800 tokens", "512 positions"]),
    ("score-invalid-utf8", ["score", "--model", "{m:good}", "--train", "{f:bad_utf8}", "--val", "{f:valid}",
                            *_TRAIN, "--out", "{out}"],
     ["bad_utf8.txt:4", "not UTF-8", "0xff"]),
    ("score-invalid-utf8-jsonl", ["score", "--model", "{m:good}", "--train", "{f:valid}", "--val",
                                  "{f:bad_utf8_jsonl}", *_TRAIN, "--out", "{out}"],
     ["bad_utf8.jsonl:2", "not UTF-8"]),
    ("score-binary-file", ["score", "--model", "{m:good}", "--train", "{f:binary}", "--val", "{f:valid}",
                           *_TRAIN, "--out", "{out}"],
     ["binary.txt:1", "binary file"]),
    ("score-empty-file", ["score", "--model", "{m:good}", "--train", "{f:empty}", "--val", "{f:valid}",
                          *_TRAIN, "--out", "{out}"],
     ["empty.txt holds no examples"]),
    ("eval-invalid-utf8", ["eval", "--model", "{m:good}", "--tasks", "perplexity:{f:bad_utf8}", "--limit", "2",
                           "--device", "cpu", "--out", "{out}"],
     ["bad_utf8.txt:4", "not UTF-8"]),
    ("eval-max-length-over-positions", ["eval", "--model", "{m:good}", "--tasks", "perplexity:{f:valid}",
                                        "--max-length", "100000", "--device", "cpu", "--out", "{out}"],
     ["max_length 100000", "512 positions", "--max-length 512 or less"]),
    ("heal-binary-file", ["heal", "--model", "{m:good}", "--data", "{f:binary}", "--steps", "1", "--quiet",
                          "--out", "{out}"],
     ["binary.txt:1", "binary file"]),
    # ---- scores and options
    ("prune-negative-scores", ["prune", "--model", "{m:good}", "--sparsity", "0.5", "--allocation", "layerif",
                               "--scores", "{f:scores_negative}", "--calib", "{f:valid}", "--n-calib", "2",
                               "--max-length", "16", "--out", "{out}"],
     ["negative 'layerif' scores at layers [0, 1, 2, 3, 4]", "invert"]),
    ("moe-negative-scores", ["moe", "--model", "{m:good}", "--scores", "{f:scores_negative}", "--budget", "10",
                             "--quiet", "--out", "{out}"],
     ["scores_negative.json", "negative"]),
    ("drop-negative-scores", ["drop", "--model", "{m:good}", "--n-layers", "1", "--by", "layerif", "--scores",
                              "{f:scores_negative}", "--quiet", "--out", "{out}"],
     ["scores_negative.json", "negative"]),
    ("moe-string-score", ["moe", "--model", "{m:good}", "--scores", "{f:scores_string}", "--budget", "10",
                          "--quiet", "--out", "{out}"],
     ["scores_string.json", "layer 1 is \"high\"", "not a number"]),
    ("prune-null-score", ["prune", "--model", "{m:good}", "--sparsity", "0.5", "--allocation", "layerif",
                          "--scores", "{f:scores_null}", "--calib", "{f:valid}", "--out", "{out}"],
     ["scores_null.json", "layer 2 is null", "not a number"]),
    ("drop-bool-score", ["drop", "--model", "{m:good}", "--n-layers", "1", "--by", "layerif", "--scores",
                         "{f:scores_bool}", "--quiet", "--out", "{out}"],
     ["layer 0 is true", "not a number"]),
    ("score-damping-nan", ["score", "--model", "{m:good}", "--train", "{f:valid}", "--val", "{f:valid}",
                           *_TRAIN, "--damping", "nan", "--out", "{out}"],
     ["--damping", "nan"]),  # refused by the option's parser, or else by InfluenceConfig (see below)
]


def _argv(template: list[str], broken: dict[str, Path], files: dict[str, Path], out: Path) -> list[str]:
    def fill(arg: str) -> str:
        for key, table in (("m", broken), ("f", files)):
            while f"{{{key}:" in arg:
                start = arg.index(f"{{{key}:")
                end = arg.index("}", start)
                arg = arg[:start] + str(table[arg[start + 3:end]]) + arg[end + 1:]
        if arg.startswith("{raw:"):
            return arg[5:-1]
        return arg.replace("{out}", str(out))

    return [fill(a) for a in template]


@pytest.mark.parametrize(("argv", "words"), [pytest.param(a, w, id=i) for i, a, w in CASES])
def test_bad_input_is_one_clear_error(argv, words, broken, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out" / "result.json" if argv[0] in ("score", "eval") else tmp_path / "out" / "result"
    out.parent.mkdir()
    scratch = tmp_path / "tmp"  # every temp dir the command makes goes here, so leftovers are seen
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(tmp_path)  # relative paths of the cases resolve here (and do not exist)
    args = _argv(argv, broken, files, out)
    inputs = [p for p in [*broken.values(), *files.values()] if p.exists()]
    before = _snapshot(*inputs)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("layerif ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert line.startswith(f"layerif {args[0]}: error: "), line
    for word in words:
        assert word in line, f"{word!r} not in: {line}"
    assert _snapshot(*inputs) == before
    assert list(out.parent.iterdir()) == [], "the command left output behind"
    assert list(scratch.iterdir()) == [], "the command left temp dirs behind"


def test_controls_pass_on_the_intact_model(broken, files, tmp_path, capsys):
    """The same checks let the intact model through, as a score and a vllm-check run show."""
    assert main(["vllm-check", str(broken["good"])]) == 0
    assert "OK for vLLM" in capsys.readouterr().out
    out = tmp_path / "s.json"
    assert main(["score", "--model", str(broken["good"]), "--train", str(files["valid"]), "--val",
                 str(files["valid"]), *_TRAIN, "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["scores"]) == 5


def test_model_checks_in_the_library(broken, tmp_path):
    """The same refusals from the library calls: loading, model_dir_for, check_model_dir, adapters."""
    from layerif_plugins.errors import ModelError
    from layerif_plugins.evaluation.checks import check_model_dir
    from layerif_plugins.models import check_adapter_files, load_model_and_tokenizer, model_dir_for
    from layerif_plugins.models.integrity import read_safetensors_header

    with pytest.raises(ModelError, match=r"model\.layers\.5\.self_attn\.k_proj\.weight"):
        load_model_and_tokenizer(broken["six_layers"])
    from layerif_plugins.engine import InfluenceConfig
    from layerif_plugins.errors import ConfigError

    with pytest.raises(ConfigError, match=r"damping must be a finite number > 0.*got nan \(option --damping\)"):
        InfluenceConfig(damping=float("nan"))
    with pytest.raises(ModelError, match="model not found: ./nowhere"):
        model_dir_for("./nowhere", "/tmp")
    with pytest.raises(ModelError, match=r"1 inf of 32,768 values"):
        check_model_dir(broken["inf_embed"])
    header = read_safetensors_header(broken["good"] / "model.safetensors")
    assert len(header) == 47 and header["model.norm.weight"].shape == (64,)
    # an adapter's safetensors are checked the same way (truncated → one ModelError)
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"a.lora_A.weight": torch.ones(4, 8)}, str(adapter / "adapter_model.safetensors"))
    assert set(check_adapter_files(adapter)) == {"a.lora_A.weight"}
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelError, match="adapter_model.safetensors is truncated"):
        check_adapter_files(adapter)
