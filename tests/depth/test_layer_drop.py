"""Layer drop, LoRA healing and layer selection on the real stories260K (5 layers) and on tiny
models of families with per-layer config (Gemma3 ``layer_types``, Qwen2-MoE ``mlp_only_layers``).

The reference for a dropped model is the original model with the dropped blocks turned
into the identity (a forward hook returning the block's input): the logits must agree
exactly. Generation with the KV cache must give the same greedy tokens as without it,
before and after a save → ``AutoModelForCausalLM.from_pretrained`` round trip.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerif_plugins.allocate.layers import layers_to_adapt, layers_to_drop, lora_config_kwargs
from layerif_plugins.cli import main
from layerif_plugins.data import load_examples, pad_id_of
from layerif_plugins.depth.drop import check_drop, drop_layers, save_dropped
from layerif_plugins.errors import AllocationError, ModelError
from layerif_plugins.models import fingerprint
from layerif_plugins.paths import shared_data
from layerif_plugins.scorers import ScoringData, score_layers
from layerif_plugins.scores import LayerScores

PROMPT = "Once upon a time there was a little girl"


def _skip_blocks_logits(model, ids, skip):
    """Logits of ``model`` with blocks ``skip`` replaced by the identity (the reference for a drop)."""
    def identity(_m, args, kwargs, _out):
        return args[0] if args else kwargs["hidden_states"]

    handles = [model.model.layers[i].register_forward_hook(identity, with_kwargs=True) for i in skip]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


def _greedy(model, ids, cache: bool, n: int = 24):
    return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.slow
def test_drop_equals_skipping_blocks_and_reloads(stories, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = stories
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    ref = _skip_blocks_logits(model, ids, [1, 3])
    with torch.no_grad():
        full = model(ids).logits
    info = drop_layers(model, [3, 1])
    assert info.dropped == [1, 3] and info.kept == [0, 2, 4] and info.original_num_layers == 5
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    with torch.no_grad():
        dropped = model(ids).logits
    assert torch.equal(dropped, ref)
    assert not torch.allclose(dropped, full, atol=1e-2)
    cached = _greedy(model, ids, cache=True)
    assert torch.equal(cached, _greedy(model, ids, cache=False))

    out = save_dropped(model, tok, tmp_path / "s3", info)
    assert json.loads((out / "layer_drop.json").read_text())["dropped"] == [1, 3]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    # vLLM builds num_hidden_layers blocks and loads weights by name: indices must be 0..2
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        idx = {int(k.split(".")[2]) for k in fh.keys() if k.startswith("model.layers.")}
    assert idx == {0, 1, 2}
    re = AutoModelForCausalLM.from_pretrained(out).eval()
    assert len(re.model.layers) == 3
    with torch.no_grad():
        assert torch.allclose(re(ids).logits, dropped, atol=1e-6)
    assert torch.equal(_greedy(re, ids, cache=True), _greedy(re, ids, cache=False))
    assert torch.equal(_greedy(re, ids, cache=True), cached)


@pytest.mark.slow
def test_chosen_layers_match_the_scores(stories, tinystories_train):
    model, tok = stories
    calib = load_examples(tinystories_train, tok, max_length=64, n=16)
    data = ScoringData(calib=calib, pad_id=pad_id_of(tok))
    ang = score_layers(model, "angular", data, n=2)
    bi = score_layers(model, "block_influence", data)
    for k in (1, 2, 3):
        d = np.array(ang.extras["distances"][str(k)])
        start = int(np.flatnonzero(d == d.min())[-1])
        assert layers_to_drop(ang, k) == list(range(start, start + k))
        raw = np.array(bi.extras["block_influence"])
        assert layers_to_drop(bi, k) == sorted(np.argsort(raw, kind="stable")[:k].tolist())
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    chosen = layers_to_drop(ang, 2)
    ref = _skip_blocks_logits(model, ids, chosen)
    drop_layers(model, chosen)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.slow
@pytest.mark.integration
def test_healing_lowers_validation_loss(stories, tinystories_train, tinystories_valid, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from layerif_plugins.depth.heal import HealConfig, heal, mean_loss, save_healed

    model, tok = stories
    pad = pad_id_of(tok)
    train = load_examples(tinystories_train, tok, max_length=64, n=32)
    val = load_examples(tinystories_valid, tok, max_length=64, n=16)
    full = mean_loss(model, val, pad)
    info = drop_layers(model, [3, 4])
    base_dir = save_dropped(model, tok, tmp_path / "base", info)
    before = mean_loss(model, val, pad)
    assert before > full
    res = heal(model, train, pad, HealConfig(steps=15, lr=2e-3, batch_size=8), merge=False)
    after = mean_loss(res.model, val, pad)
    assert after < before - 0.1, (full, before, after)
    assert res.target_modules == [f"model.layers.{i}.mlp.{m}" for i in range(3)
                                  for m in ("gate_proj", "up_proj", "down_proj")]
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lora_logits = res.model(ids).logits
    # the unmerged adapter saves and reloads onto the saved shallower base (real PEFT)
    save_healed(res, tok, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, lora_logits, atol=1e-5)
    # merging gives a plain model computing the same function
    merged = res.model.merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, lora_logits, atol=1e-4)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_drop_heal_and_reload(stories_dir, tinystories_train, tinystories_valid, tmp_path):
    from transformers import AutoModelForCausalLM

    scores = tmp_path / "bi.json"
    out = tmp_path / "s4"
    rc = main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "1", "--by", "block_influence",
               "--calib", str(tinystories_train), "--n-calib", "8", "--max-length", "64", "--save-scores",
               str(scores), "--heal-steps", "3", "--heal-data", str(tinystories_valid), "--heal-n", "16",
               "--quiet", "--out", str(out)])
    assert rc == 0
    s = LayerScores.load(scores)
    record = json.loads((out / "layer_drop.json").read_text())
    assert record["dropped"] == layers_to_drop(s, 1)
    assert record["heal"]["config"]["steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 4 == len(model.model.layers)
    # the same scores file drives a second drop (no re-scoring), the last-layers baseline needs none
    assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "2", "--by", "block_influence",
                 "--scores", str(scores), "--out", str(tmp_path / "s3")]) == 0
    assert json.loads((tmp_path / "s3" / "layer_drop.json").read_text())["dropped"] == layers_to_drop(s, 2)
    assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "2", "--by", "last",
                 "--out", str(tmp_path / "last")]) == 0
    assert json.loads((tmp_path / "last" / "layer_drop.json").read_text())["dropped"] == [3, 4]


def test_drop_errors(stories, stories_dir, tmp_path, capsys):
    model, _ = stories
    for bad, msg in (([], "at least 1"), ([0, 1, 2, 3, 4], "at least one must remain"), ([5], "not layer indices"),
                     ([1, 1], "duplicates")):
        with pytest.raises(AllocationError, match=msg):
            drop_layers(model, bad)
    assert check_drop([4, 0], 5) == [0, 4]
    assert len(model.model.layers) == 5
    for k in ("0", "5"):
        assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", k, "--by", "last",
                     "--out", str(tmp_path / "x")]) == 2
        assert f"cannot drop {k} " in capsys.readouterr().err
    assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "1", "--by", "angular",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--calib" in capsys.readouterr().err


def test_scores_of_another_model_are_refused(stories, stories_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
    calib = load_examples(shared_data("tinystories", "valid.txt"), stories[1], max_length=32, n=4)
    s = score_layers(other, "block_influence", ScoringData(calib=calib))
    s.save(tmp_path / "other.json")
    assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "1", "--by", "block_influence",
                 "--scores", str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "computed for another model" in err and "hidden_size" in err
    assert main(["drop", "--model", str(stories_dir), "--device", "cpu", "--n-layers", "1", "--by", "angular",
                 "--scores", str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2
    assert "holds 'block_influence' scores" in capsys.readouterr().err


def test_families_whose_layers_cannot_be_rebuilt_are_refused():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=64,
                                      scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(gpt2, [0])
    ds = DeepseekV3ForCausalLM(DeepseekV3Config(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8))
    with pytest.raises(ModelError, match="depends on the layer position"):
        drop_layers(ds, [0])  # a MoE block cannot move into the dense slot 0
    assert len(ds.model.layers) == 3 and ds.config.num_hidden_layers == 3  # untouched
    assert drop_layers(ds, [2]).kept == [0, 1]  # dropping a MoE block keeps the layout valid


@pytest.mark.slow
def test_per_layer_config_lists_are_rebuilt(tmp_path):
    from transformers import (
        AutoModelForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
    )

    torch.manual_seed(0)
    ids = torch.randint(1, 100, (1, 10))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=100, sliding_window=4, pad_token_id=0)).eval()
    types = list(gemma.config.layer_types)
    info = drop_layers(gemma, [0, 2])
    assert "layer_types" in info.config_fields
    assert gemma.config.layer_types == [types[i] for i in (1, 3, 4, 5)]
    assert [b.self_attn.layer_idx for b in gemma.model.layers] == [0, 1, 2, 3]
    # the sliding window (4) is shorter than the generated text: the cache must follow layer_types
    assert torch.equal(_greedy(gemma, ids, True, 16), _greedy(gemma, ids, False, 16))
    save_dropped(gemma, None, tmp_path / "g", info)
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    with torch.no_grad():
        assert torch.allclose(re(ids).logits, gemma(ids).logits, atol=1e-5)

    qwen = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=100, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1, 3])).eval()
    info = drop_layers(qwen, [1])
    assert qwen.config.mlp_only_layers == [2]  # old layer 3 is new layer 2; old layer 1 is gone
    save_dropped(qwen, None, tmp_path / "q", info)
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        assert torch.allclose(re(ids).logits, qwen(ids).logits, atol=1e-5)


@pytest.mark.integration
def test_selected_layers_drive_a_real_lora_config(stories, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model, _ = stories
    s = LayerScores(scores=[0.5, 2.0, 0.1, 3.0, 1.0], method="layerif",
                    model=fingerprint(model))
    layers = layers_to_adapt(s, 2)
    assert layers == [1, 3]
    kwargs = lora_config_kwargs(layers, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    adapted = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in peft_model.named_parameters()
                      if "lora_A" in n})
    assert adapted == [1, 3]
    s.save(tmp_path / "s.json")
    assert main(["select-layers", "--scores", str(tmp_path / "s.json"), "--k", "2", "--out",
                 str(tmp_path / "lora.json")]) == 0
    snippet = json.loads((tmp_path / "lora.json").read_text())
    assert snippet["layers_to_transform"] == [1, 3] and snippet["rule"] == "highest"
    assert LoraConfig(**snippet["lora_config"]).layers_to_transform == [1, 3]
    assert main(["select-layers", "--scores", str(tmp_path / "s.json"), "--k", "5"]) == 2
    assert "cannot adapt 5 of 5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the one training loop


@pytest.mark.slow
@pytest.mark.integration
def test_one_training_loop_heal_and_moe_are_seeded(stories_dir, tinystories_train, tinystories_valid):
    """Healing (plain LoRA) and LoRA-MoE fine-tuning run through ``training.train_adapter``: same seed,
    same curve; the loss falls; the MoE run records its router load-balancing loss, a plain LoRA none."""
    from layerif_plugins.allocate.experts import expert_layout
    from layerif_plugins.depth.heal import HealConfig, heal
    from layerif_plugins.integrations.peft_moe.build import get_moe_model
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.training import TrainConfig, heldout_loss, train_adapter

    def fresh():
        return load_model_and_tokenizer(stories_dir, device="cpu")

    model, tok = fresh()
    pad = pad_id_of(tok)
    train = load_examples(tinystories_train, tok, max_length=48, n=24)
    val = load_examples(tinystories_valid, tok, max_length=48, n=8)
    cfg = HealConfig(steps=4, lr=2e-3, batch_size=4, seed=3)
    drop_layers(model, [4])
    a = heal(model, train, pad, cfg, merge=True)
    other, _ = fresh()
    drop_layers(other, [4])
    b = heal(other, train, pad, cfg, merge=True)
    assert len(a.losses) == 4 and a.losses == b.losses
    assert cfg.train_config().lr_scheduler == "constant" and cfg.train_config().max_steps == 4

    curves = []
    for _ in range(2):
        base, _ = fresh()
        torch.manual_seed(0)
        pm = get_moe_model(base, expert_layout("uniform", 5, 10), r=2, lora_alpha=4)
        before = heldout_loss(pm, val, pad)["loss"]
        metrics = train_adapter(pm, train, pad, TrainConfig(max_steps=6, batch_size=4, lr=3e-3, seed=1),
                                show_progress=False)
        curves.append(metrics["losses"])
        assert metrics["global_step"] == 6 and len(metrics["router_aux_losses"]) == 6
        assert all(x > 0 for x in metrics["router_aux_losses"])
        assert heldout_loss(pm, val, pad)["loss"] < before
    assert curves[0] == curves[1]
