"""Per-layer LoRA ranks as a stock ``peft.LoraConfig`` (integrations/peft_lora, ``layerif lora-layout``).

Everything runs on the real stories260K with the real PEFT: ``get_peft_model`` trains exactly
the uniform config's parameter count, the adapter trains, saves and reloads, and the saved
config trains and reloads in a subprocess that never imports ``layerif_plugins``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from layerif_plugins.cli import main
from layerif_plugins.data import Examples, pad_id_of
from layerif_plugins.errors import AllocationError, ConfigError, ScoresError
from layerif_plugins.integrations.peft_lora import (
    check_pattern_keys,
    lora_layout_config,
    lora_trainable_params,
    save_lora_config,
    targeted_linears,
)
from layerif_plugins.models import fingerprint
from layerif_plugins.scores import LayerScores
from layerif_plugins.training import TrainConfig, train_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
# stories260K: q 64→64, v 64→32, down 172→64 → c_l = 128 + 96 + 236 = 460 per layer, 5 layers
COST = 460


def ramp(model, values=(0.0, 1.0, 2.0, 3.0, 4.0), **kw) -> LayerScores:
    return LayerScores(scores=list(values), method="depth_ramp", model=fingerprint(model), **kw)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_ranks(peft_model) -> dict[str, tuple[int, float]]:
    """Module name (base model's) → (rank of lora_A, scaling) as PEFT built them."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (module.lora_A["default"].weight.shape[0], module.scaling["default"])
    return out


def test_ranks_alphas_and_budget_on_the_real_model(stories):
    model, _ = stories
    layout = lora_layout_config(model, ramp(model), r=4, lora_alpha=8, target_modules=TARGETS)
    assert layout.ranks.ranks == [2, 3, 4, 5, 6]  # ε = 0.5 on an even ramp: exactly 4 · [.5, .75, 1, 1.25, 1.5]
    assert layout.ranks.costs == [COST] * 5
    assert layout.trainable == layout.uniform_trainable == 4 * COST * 5
    assert layout.config.rank_pattern == {rf"model\.layers\.{i}\..*": r for i, r in enumerate([2, 3, 4, 5, 6])}
    assert layout.config.alpha_pattern == {rf"model\.layers\.{i}\..*": 2 * r for i, r in enumerate([2, 3, 4, 5, 6])}
    assert sorted(layout.modules) == sorted(f"model.layers.{i}.{m}" for i in range(5)
                                            for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert type(layout.config).__module__.startswith("peft.")


@pytest.mark.integration
@pytest.mark.slow
def test_peft_trains_equal_parameters_and_round_trips(stories, stories_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model, tok = stories
    layout = lora_layout_config(model, ramp(model, (5.0, 1.0, 4.0, 2.0, 3.0)), r=4, lora_alpha=8,
                                target_modules=TARGETS, spread=1.0)
    uniform = get_peft_model(AutoModelForCausalLM.from_pretrained(stories_dir),
                             LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="none"))
    torch.manual_seed(0)
    pm = get_peft_model(model, layout.config)
    assert trainable(pm) == trainable(uniform) == layout.trainable == 4 * COST * 5
    built = lora_ranks(pm)
    for name, (rank, scaling) in built.items():
        layer = int(name.split(".")[2])
        assert rank == layout.ranks.ranks[layer]
        assert scaling == pytest.approx(8 / 4)  # alpha follows the rank: α_l / r_l = α / r everywhere
    assert sorted(r for r, _ in built.values()) != [4] * 15  # not uniform

    pad = pad_id_of(tok)
    text = "Once upon a time there was a little girl who liked to play in the park with her dog."
    ids = tuple(tok(text)["input_ids"])
    examples = Examples((ids,) * 8, "test")
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    metrics = train_adapter(pm, examples, pad, TrainConfig(max_steps=2, batch_size=4, lr=1e-2, seed=0))
    assert len(metrics["losses"]) == 2 and all(torch.isfinite(torch.tensor(metrics["losses"])))
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)

    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == layout.config.rank_pattern
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_dir), tmp_path / "adapter")
    assert lora_ranks(reloaded) == built
    x = torch.tensor([ids])
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(pm(x).logits, reloaded(x).logits, atol=1e-6)


_STOCK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model_dir, config_path, out_dir, expected = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    config = LoraConfig.from_peft_type(**LoraConfig.from_json_file(config_path))
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in model.base_model.model.named_modules()
             if isinstance(m, LoraLayer)}
    assert ranks == expected["ranks"], ranks
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == expected["trainable"], n_trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.save_pretrained(out_dir)
    model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out_dir)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reloaded(x).logits, atol=1e-6)
    assert "layerif_plugins" not in sys.modules, "layerif_plugins was imported"
    print(json.dumps({"losses": losses, "trainable": n_trainable}))
    """
)


@pytest.mark.integration
@pytest.mark.slow
def test_saved_config_trains_and_reloads_with_stock_peft_only(stories, stories_dir, tmp_path):
    model, _ = stories
    layout = lora_layout_config(model, ramp(model, (3.0, 0.0, 1.0, 4.0, 2.0)), r=4, target_modules=TARGETS)
    path = save_lora_config(layout.config, tmp_path / "lora_config.json")
    expected = {"ranks": {n: layout.ranks.ranks[int(n.split(".")[2])] for n in layout.modules},
                "trainable": layout.trainable}
    script = tmp_path / "stock.py"
    script.write_text(_STOCK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # -I: isolated mode (no user site, no PYTHONPATH, the script's folder — not the repo — on sys.path)
    proc = subprocess.run([sys.executable, "-I", str(script), str(stories_dir), str(path), str(tmp_path / "out"),
                           json.dumps(expected)], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["trainable"] == 4 * COST * 5
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == layout.config.rank_pattern


def test_saved_file_is_peft_adapter_config(stories, tmp_path):
    from peft import LoraConfig

    model, _ = stories
    layout = lora_layout_config(model, ramp(model), r=8, target_modules=TARGETS, alpha="fixed")
    path = save_lora_config(layout.config, tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["peft_type"] == "LORA" and data["target_modules"] == sorted(TARGETS)
    assert data["alpha_pattern"] == {} and data["lora_alpha"] == 16
    loaded = LoraConfig.from_peft_type(**LoraConfig.from_json_file(path))
    assert loaded.rank_pattern == layout.config.rank_pattern and loaded.r == 8
    assert lora_trainable_params(loaded, layout.modules) == layout.uniform_trainable
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "adapter_config.json").write_text(path.read_text())
    assert LoraConfig.from_pretrained(tmp_path / "d").rank_pattern == layout.config.rank_pattern


def test_direction_invert_and_lm_head_outside_the_layers(stories):
    model, _ = stories
    protect = ramp(model, direction="higher_protects")
    assert lora_layout_config(model, protect, r=4, target_modules=TARGETS).ranks.ranks == [6, 5, 4, 3, 2]
    assert lora_layout_config(model, ramp(model), r=4, target_modules=TARGETS, invert=True).ranks.ranks == \
        [6, 5, 4, 3, 2]
    # a target outside the decoder layers (lm_head 64→512) keeps rank r: budgets still equal
    layout = lora_layout_config(model, ramp(model), r=4, target_modules=[*TARGETS, "lm_head"])
    assert layout.trainable == layout.uniform_trainable == 4 * (COST * 5 + 64 + 512)


# ----------------------------------------------------------------------------- refusals


def _llama(num_hidden_layers: int):
    """A config-built Llama shaped like stories260K but with another depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172,
                                        num_hidden_layers=num_hidden_layers, num_attention_heads=8,
                                        num_key_value_heads=4))


def test_refuses_scores_of_another_model(stories):
    model, _ = stories
    scores = LayerScores(scores=[1.0, 2.0, 3.0], method="layerif", model=fingerprint(_llama(3)))
    with pytest.raises(ScoresError, match="scores file was computed for another model: num_layers is 3"):
        lora_layout_config(model, scores, r=4, target_modules=TARGETS)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_modules": ["nothing_here"]}, ConfigError,
         r"target_modules \['nothing_here'\] matches no module of the model; its linear layers are named"),
        ({"target_modules": ["model.layers.0.self_attn.q_proj"]}, ConfigError,
         r"matches nothing in decoder layers \[1, 2, 3, 4\]"),
        ({"target_modules": ["embed_tokens"]}, ConfigError, "model.embed_tokens .Embedding., which is not a linear"),
        ({"target_modules": "all-linear"}, ConfigError, "'all-linear' is not supported"),
        ({"budget": 5 * COST - 1}, AllocationError,
         f"cannot give every one of the 5 layers rank >= 1: rank 1 everywhere already costs {5 * COST}"),
        ({"alpha": "sqrt"}, ConfigError, r"alpha must be one of \('scale', 'fixed'\)"),
        ({"rank_pattern": {"x": 1}}, ConfigError, r"\['rank_pattern'\] cannot be combined"),
        ({"exclude_modules": ["q_proj"], "use_dora": True}, ConfigError,
         r"\['exclude_modules', 'use_dora'\] cannot be combined with a per-layer rank layout"),
        ({"init_lora_weights": "eva"}, ConfigError, "init_lora_weights='eva' redistributes the ranks itself"),
        ({"spread": 2.0}, AllocationError, r"spread must be a number in \[0, 1\]"),
        ({"r": 0}, AllocationError, "r must be a whole number >= 1"),
    ],
)
def test_bad_input(stories, kwargs, error, message):
    model, _ = stories
    args = {"r": 4, "target_modules": TARGETS, **kwargs}
    with pytest.raises(error, match=message):
        lora_layout_config(model, ramp(model), **args)


def test_refuses_a_peft_model(stories):
    from peft import LoraConfig, get_peft_model

    model, _ = stories
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ConfigError, match="already has PEFT adapter layers; pass the base model"):
        targeted_linears(pm.base_model.model, TARGETS)


def test_pattern_key_checks(stories):
    model, _ = stories
    names = list(targeted_linears(model, TARGETS))
    layer = {i: {n for n in names if n.startswith(f"model.layers.{i}.")} for i in range(5)}
    good = {rf"model\.layers\.{i}\..*": layer[i] for i in range(5)}
    check_pattern_keys(dict.fromkeys(good, 4), names, good)  # the keys the layout writes pass
    none = re.escape(r"rank_pattern key 'layers\.7\..*' matches none of the 15 targeted")
    with pytest.raises(ConfigError, match=none):
        check_pattern_keys({r"layers\.7\..*": 4}, names)
    with pytest.raises(ConfigError, match="rank_pattern key 'q_proj' matches none"):  # module names end in .q_proj
        check_pattern_keys({"q_proj": 4}, ["model.layers.0.self_attn.q_projx"])
    wide = {r"model\.layers\.[01]\..*": layer[0]}
    with pytest.raises(ConfigError, match=r"also matches \['model\.layers\.1\.mlp\.down_proj'.*of another layer"):
        check_pattern_keys(dict.fromkeys(wide, 4), names, wide)
    # an unanchored key "1" would only match modules named ...1 — none: refused as matching nothing
    with pytest.raises(ConfigError, match="key '1' matches none"):
        check_pattern_keys({"1": 4}, names)
    # PEFT takes the first matching key: a broad key listed first takes layer 0's q_proj from the layer's key
    q_all = {f"model.layers.{i}.self_attn.q_proj" for i in range(5)}
    stolen = re.escape("alpha_pattern: module 'model.layers.0.self_attn.q_proj' resolves to key '.*q_proj', not "
                       r"to its layer's key 'model\.layers\.0\..*'")
    with pytest.raises(ConfigError, match=stolen):
        check_pattern_keys({r".*q_proj": 4, r"model\.layers\.0\..*": 8}, names,
                           {r".*q_proj": q_all, r"model\.layers\.0\..*": layer[0]}, "alpha_pattern")


# ----------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_writes_config_and_prints_table(stories_dir, tmp_path, capsys):
    from peft import LoraConfig

    model_scores = tmp_path / "ramp.json"
    from layerif_plugins.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(stories_dir, device="cpu")
    ramp(model).save(model_scores)
    out = tmp_path / "lora_config.json"
    assert main(["lora-layout", "--model", str(stories_dir), "--scores", str(model_scores), "--r", "4",
                 "--target-modules", ",".join(TARGETS), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 4 | 4 | 6.000 | 6 | 24 | 2760 |" in printed
    assert f"{4 * COST * 5:,} trainable parameters (uniform r=4: {4 * COST * 5:,})" in printed
    loaded = LoraConfig.from_peft_type(**LoraConfig.from_json_file(out))
    assert list(loaded.rank_pattern.values()) == [2, 3, 4, 5, 6]
    # refusals: one line, exit 2
    assert main(["lora-layout", "--model", str(stories_dir), "--scores", str(model_scores), "--r", "4",
                 "--target-modules", "nothing", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerif lora-layout: error: target_modules ['nothing'] matches no module")
    assert "\n" not in err and not (tmp_path / "x.json").exists()
    foreign = tmp_path / "foreign.json"
    LayerScores(scores=[1.0, 2.0, 3.0, 4.0], method="layerif", model=fingerprint(
        _llama(num_hidden_layers=4))).save(foreign)
    assert main(["lora-layout", "--model", str(stories_dir), "--scores", str(foreign), "--r", "4",
                 "--out", str(tmp_path / "z.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerif lora-layout: error: scores file was computed for another model: num_layers is 4")
    assert "\n" not in err and not (tmp_path / "z.json").exists()
    assert main(["lora-layout", "--model", str(stories_dir), "--r", "4", "--out", str(tmp_path / "y.json")]) == 2
    assert "give exactly one of --scores FILE or --method NAME" in capsys.readouterr().err
    assert main(["lora-layout", "--model", str(stories_dir), "--scores", str(model_scores), "--out", str(out)]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
