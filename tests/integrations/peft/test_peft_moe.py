"""The LoRA-MoE PEFT tuner on the real stories260K with the real PEFT (no mocks)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hostlibs import require
from torch import nn

peft = require("peft", "moe")  # a skip on a partial install, a failure under CI=true

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from layerif_plugins.allocate.experts import ExpertLayout, expert_layout  # noqa: E402
from layerif_plugins.data import batches, load_examples, pad_id_of  # noqa: E402
from layerif_plugins.errors import AllocationError, ConfigError, ScoresError  # noqa: E402
from layerif_plugins.integrations.peft_moe import (  # noqa: E402
    LLAMA_PROJECTIONS,
    LORA_MOE_PEFT_TYPE,
    LoraMoeConfig,
    LoraMoeLayer,
    LoraMoeMergeError,
    load_balancing_loss,
    load_lora_moe,
)
from layerif_plugins.integrations.peft_moe.build import (  # noqa: E402
    built_layout,
    get_moe_model,
    layer_names,
    moe_layout,
    moe_layout_for_params,
    moe_trainable_params,
    save_moe_adapter,
)
from layerif_plugins.models import ModelFingerprint, fingerprint, load_model_and_tokenizer  # noqa: E402
from layerif_plugins.scores import LayerScores  # noqa: E402

SCORES = [0.2, 1.0, 0.4, 3.0, 2.0]  # higher = more experts
BUDGET = 16


def _layout() -> ExpertLayout:
    return expert_layout("layerif", 5, BUDGET, scores=SCORES, beta=2.5)


def _batch(tok, path, n=8, max_length=64):
    ex = load_examples(path, tok, max_length=max_length, n=n)
    b = next(batches(ex, n, pad_id_of(tok)))
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}


def _moe_modules(peft_model):
    return {k: m for k, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraMoeLayer)}


# ----------------------------------------------------------------------------- structure


def test_projection_names_come_from_the_family_table(stories):
    """One list of PEFT targets per family (models.families.FAMILIES); the tuner's mapping derives from it."""
    from layerif_plugins.integrations.peft_moe.model import LoraMoeModel
    from layerif_plugins.models.families import FAMILIES, peft_targets

    model, _ = stories
    assert peft_targets(model) == list(LLAMA_PROJECTIONS) == list(FAMILIES["llama"].peft_targets)
    assert sorted(LoraMoeConfig().target_modules) == sorted(LLAMA_PROJECTIONS)
    assert LoraMoeModel.target_module_mapping["llama"] == list(LLAMA_PROJECTIONS)
    assert LoraMoeModel.target_module_mapping["gpt2"] == ["c_attn", "c_proj", "c_fc"]
    # every listed name is a linear leaf of the stories260K (Llama) blocks
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(peft_targets(model)) <= leaves


def test_wrapped_model_has_exact_experts_and_top_k(stories):
    model, _ = stories
    layout = _layout()
    assert layout.experts == [1, 1, 1, 9, 4] and sum(layout.experts) == BUDGET  # hand: x=[0,.8,.2,2.8,1.8]
    pm = get_moe_model(model, layout, r=4)
    modules = _moe_modules(pm)
    assert len(modules) == 5 * len(LLAMA_PROJECTIONS)
    for key, module in modules.items():
        layer = int(key.split(".")[2])
        routers = [(name, child) for name, child in module.named_modules() if "router" in name and
                   isinstance(child, nn.Linear)]
        if layout.experts[layer] == 1:  # one expert = a plain LoRA: no router, no dead parameter
            assert routers == [] and "default" not in module.lora_moe_router
        else:
            assert len(routers) == 1
            name, router = routers[0]
            assert router.bias is None
            assert router.out_features == layout.experts[layer]
            assert router.in_features == module.get_base_layer().in_features
        assert module.top_k["default"] == layout.top_k[layer]
        assert module.lora_moe_A["default"].out_features == layout.experts[layer] * 4
        assert torch.count_nonzero(module.lora_moe_B["default"].weight) == 0  # B zero-initialised
    assert built_layout(pm) == (layout.experts, layout.top_k)


def test_only_adapter_and_router_parameters_train(stories):
    model, _ = stories
    layout = _layout()
    pm = get_moe_model(model, layout, r=4)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(any(s in n for s in ("lora_moe_A", "lora_moe_B", "lora_moe_router")) for n in trainable)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "base_layer" in n or "embed" in n)
    # count: per module n·r·in (A) + out·n·r (B) + in·n (router, only where n > 1)
    expected = 0
    for key, module in _moe_modules(pm).items():
        n = layout.experts[int(key.split(".")[2])]
        base = module.get_base_layer()
        expected += n * 4 * base.in_features + base.out_features * n * 4 + (base.in_features * n if n > 1 else 0)
    assert sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad) == expected


def _trainable(peft_model) -> int:
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], list(LLAMA_PROJECTIONS)])
def test_trainable_count_from_shapes_equals_the_built_model(stories, targets):
    model, _ = stories
    for layout in (expert_layout("uniform", 5, 5), expert_layout("uniform", 5, 12), _layout(),
                   expert_layout("mola-2468", 5, 20)):
        expected = _trainable(get_moe_model(copy.deepcopy(model), layout, r=4, target_modules=targets))
        assert moe_trainable_params(model, layout, 4, targets) == expected


def test_layout_for_params_is_the_largest_that_fits_a_lora(stories):
    """Equal parameters: the layout with the most experts whose built model trains no more than LoRA r 8."""
    model, _ = stories
    targets = ["q_proj", "v_proj", "down_proj"]
    lora = _trainable(get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=targets)))
    scores = LayerScores(scores=SCORES, method="layerif", model=fingerprint(model))
    for name in ("uniform", "layerif", "mola-2468"):
        got = moe_layout_for_params(model, name, lora, 4, targets, scores=scores if name == "layerif" else None)
        assert _trainable(get_moe_model(copy.deepcopy(model), got, r=4, target_modules=targets)) <= lora
        bigger = moe_layout(model, name, sum(got.experts) + 1, scores=scores if name == "layerif" else None)
        assert _trainable(get_moe_model(copy.deepcopy(model), bigger, r=4, target_modules=targets)) > lora
        assert got.method == name and got.budget == sum(got.experts)
    least = moe_trainable_params(model, expert_layout("uniform", 5, 5), 4, targets)
    assert least == 5 * 4 * ((64 + 64) + (64 + 32) + (172 + 64))  # one rank-4 expert per layer, no router: by hand
    assert moe_layout_for_params(model, "uniform", least, 4, targets).experts == [1] * 5
    with pytest.raises(ConfigError, match=f"less than one rank-4 expert per layer \\({least:,} parameters"):
        moe_layout_for_params(model, "uniform", least - 1, 4, targets)
    with pytest.raises(ConfigError, match="outside the decoder layers"):
        moe_layout_for_params(model, "uniform", lora, 4, ["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"matches nothing in decoder layers \[1, 2, 3, 4\]"):
        moe_layout_for_params(model, "uniform", lora, 4, ["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("top_k", [1, 2])
def test_forward_matches_explicit_expert_loop(stories, top_k):
    """The fused forward equals base(x) + α/r Σ_{e∈top-k} g_e B_e A_e x computed expert by expert.

    ``g`` = the top-k softmax probabilities renormalised to sum 1 at top-2 (Mixtral); at top-1 the
    chosen expert's own probability, not renormalised (Switch), so the gate is below 1.
    """
    model, _ = stories
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraMoeConfig(r=3, lora_alpha=6, num_experts=5, top_k=top_k, init_weights=False))
    module = pm.get_base_model().model.layers[2].mlp.down_proj
    x = torch.randn(2, 7, module.in_features)
    with torch.no_grad():
        got = module(x)
        base = module.get_base_layer()(x)
        probs = torch.softmax(x @ module.lora_moe_router["default"].weight.T, dim=-1)
        expected = base.clone()
        for b in range(2):
            for t in range(7):
                top = torch.topk(probs[b, t], top_k)
                gates = top.values / top.values.sum() if top_k > 1 else top.values
                for g, e in zip(gates, top.indices.tolist(), strict=True):
                    a_e, b_e = module.expert("default", e)
                    expected[b, t] += 2.0 * g * (b_e @ (a_e @ x[b, t]))
        assert float(probs.max()) < 0.999  # so a top-1 gate of 1 would not pass
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _router_grad(stories_dir, batch, top_k: int) -> float:
    model, _ = load_model_and_tokenizer(stories_dir)
    torch.manual_seed(0)
    cfg = LoraMoeConfig(r=4, num_experts=4, top_k=top_k, init_weights=False, router_aux_loss_coef=0.0)
    pm = get_peft_model(model, cfg).train()
    pm(**batch).loss.backward()  # the task loss alone: no load-balancing term
    router = pm.get_base_model().model.layers[3].self_attn.q_proj.lora_moe_router["default"]
    return float(router.weight.grad.abs().max())


def test_top1_router_learns_from_the_task_loss(stories_dir, shakespeare):
    """A renormalised single gate is exactly 1 (router gradient 4e-8 here); the probability gate is not."""
    _, tok = load_model_and_tokenizer(stories_dir)
    batch = _batch(tok, shakespeare, n=8)
    top1, top2 = _router_grad(stories_dir, batch, 1), _router_grad(stories_dir, batch, 2)
    assert top1 > 0.05 and top2 > 0.05  # measured 0.50 and 1.00 on this 4-expert q_proj
    assert top1 > 0.1 * top2


def test_load_balancing_loss_by_hand():
    # 4 tokens, 2 experts, top-1: routed to [0, 0, 0, 1] → f = [3/4, 1/4]; P = mean probs = [0.6, 0.4]
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    top = torch.tensor([[0], [0], [0], [1]])
    assert float(load_balancing_loss(probs, top)) == pytest.approx(2 * (0.75 * 0.6 + 0.25 * 0.4))
    # masking the last token: f = [1, 0], P = [0.7333, 0.2667] → 2 · 0.7333
    mask = torch.tensor([True, True, True, False])
    assert float(load_balancing_loss(probs, top, mask)) == pytest.approx(2 * (0.9 + 0.7 + 0.6) / 3)
    uniform = torch.full((6, 3), 1 / 3)
    assert float(load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]]))) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- training, aux loss, modes


def test_training_lowers_loss_and_aux_loss_is_in_the_loss(stories, shakespeare):
    model, tok = stories
    pm = get_moe_model(model, _layout(), r=4, router_aux_loss_coef=0.01)
    batch = _batch(tok, shakespeare)
    pm.eval()
    with torch.no_grad():
        lm_loss = float(pm(**batch).loss)  # eval mode: the plain LM loss
    pm.train()
    out = pm(**batch)
    assert pm.get_router_aux_loss() is not None
    aux = pm.get_router_aux_loss().detach()
    assert math.isfinite(float(aux)) and float(aux) > 0
    # 4 layers with > 1 expert… only layers 3 and 4 here: 2 × 7 routed modules, each ≥ 1 (=1 at perfect balance)
    assert float(aux) >= 14 * (1 - 1e-6)
    assert float(out.loss.detach()) == pytest.approx(lm_loss + 0.01 * float(aux), rel=1e-6)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = pm(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    router = pm.get_base_model().model.layers[3].self_attn.q_proj.lora_moe_router["default"].weight
    assert router.grad is not None and torch.isfinite(router.grad).all() and router.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.1
    pm.eval()
    with torch.no_grad():
        assert float(pm(**batch).loss) < lm_loss - 0.1


def test_gradient_checkpointing_and_eval(stories, shakespeare):
    model, tok = stories
    torch.manual_seed(0)
    pm = get_moe_model(model, _layout(), r=4, init_weights=False)
    batch = _batch(tok, shakespeare, n=4)
    pm.train()
    ref = pm(**batch)
    ref.loss.backward()
    ref_grad = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    pm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert pm.get_base_model().is_gradient_checkpointing
    out = pm(**batch)
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    assert set(ref_grad) == {n for n, p in pm.named_parameters() if p.grad is not None}
    for name, grad in ref_grad.items():  # routers included: the aux loss gradient survives recomputation
        torch.testing.assert_close(dict(pm.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)
    pm.eval()
    with torch.no_grad():
        a = pm(**batch)
        b = pm(**batch)
    torch.testing.assert_close(a.logits, b.logits)
    assert float(a.loss) < float(ref.loss.detach())  # eval mode adds no aux loss
    pm.get_base_model().gradient_checkpointing_disable()


# ----------------------------------------------------------------------------- save / load


@pytest.mark.integration
def test_save_moe_adapter_writes_the_layout_and_reloads(stories, stories_dir, tmp_path, shakespeare):
    """save_moe_adapter's own files (layout.json, the card's import line); the generic PEFT save / load /
    AutoPeftModel / disable_adapter behaviour is test_peft_conformance.py's, over every configuration."""
    model, tok = stories
    torch.manual_seed(1)
    layout = _layout()
    pm = get_moe_model(model, layout, r=4, init_weights=False)
    batch = _batch(tok, shakespeare, n=4)
    pm.eval()
    with torch.no_grad():
        before = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = save_moe_adapter(pm, layout, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == LORA_MOE_PEFT_TYPE and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(stories_dir)
    assert cfg["num_experts_pattern"] == dict(zip(layer_names(model), layout.experts, strict=True))
    record = json.loads((out / "layout.json").read_text())
    assert record["experts"] == layout.experts and record["top_k"] == layout.top_k
    assert record["scores"] == SCORES and record["model"]["num_layers"] == 5
    assert (out / "adapter_model.safetensors").is_file()
    assert "import layerif_plugins" in (out / "README.md").read_text()

    fresh, _ = load_model_and_tokenizer(stories_dir)
    loaded = PeftModel.from_pretrained(fresh, str(out))
    with torch.no_grad():
        after = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)
    assert built_layout(loaded) == (layout.experts, layout.top_k)
    # the adapter changes the output (B was random), so the equality above is not trivial
    with loaded.disable_adapter(), torch.no_grad():
        plain = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, after)


def test_loading_without_the_plugin_says_what_to_import(stories, tmp_path, monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    model, _ = stories
    pm = get_moe_model(model, _layout(), r=2)
    pm.save_pretrained(str(tmp_path / "ad"))
    fresh = pm.unload()
    # simulate a process where layerif_plugins was never imported
    monkeypatch.delitem(PEFT_TYPE_TO_CONFIG_MAPPING, LORA_MOE_PEFT_TYPE)
    monkeypatch.delitem(PEFT_TYPE_TO_TUNER_MAPPING, LORA_MOE_PEFT_TYPE)
    with pytest.raises(KeyError, match=LORA_MOE_PEFT_TYPE):
        PeftModel.from_pretrained(fresh, str(tmp_path / "ad"))
    with pytest.raises(ConfigError, match="import layerif_plugins"):
        load_lora_moe(fresh, tmp_path / "ad")
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        load_lora_moe(fresh, tmp_path)
    # register() (run on import) completes a half-done registration, and the adapter loads again
    from layerif_plugins.integrations.peft_moe import is_registered, register

    assert not is_registered()
    register()
    assert is_registered() and isinstance(load_lora_moe(fresh, tmp_path / "ad"), PeftModel)


# ----------------------------------------------------------------------------- merge / unload


def test_merge_refused_unload_restores_base(stories, shakespeare):
    model, tok = stories
    batch = _batch(tok, shakespeare, n=2)
    with torch.no_grad():
        base_logits = model(input_ids=batch["input_ids"]).logits
    torch.manual_seed(0)
    pm = get_moe_model(model, _layout(), r=2, init_weights=False)
    with pytest.raises(LoraMoeMergeError, match="cannot be merged"):
        pm.merge_and_unload()
    with pytest.raises(ValueError, match="input-dependent gates"):  # also a ValueError, as callers catch
        pm.merge_adapter()
    with pytest.raises(NotImplementedError):
        pm.get_base_model().model.layers[0].self_attn.q_proj.merge()
    assert len(_moe_modules(pm)) == 35  # the refused merge left the model as it was
    plain = pm.unload()
    assert not any(isinstance(m, LoraMoeLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch["input_ids"]).logits, base_logits)


# ----------------------------------------------------------------------------- bad input


def test_pattern_keys_that_match_no_layer(stories):
    model, _ = stories
    with pytest.raises(ConfigError, match=r"num_experts_pattern keys \['model.layers.7'\] match no adapted"):
        get_peft_model(model, LoraMoeConfig(num_experts_pattern={"model.layers.7": 3}))
    with pytest.raises(ConfigError, match="top_k_pattern keys"):
        get_peft_model(model, LoraMoeConfig(top_k_pattern={"layers.12": 1}))


def test_top_k_larger_than_experts(stories):
    model, _ = stories
    with pytest.raises(ConfigError, match=r"top_k=3 is larger than the 2 expert\(s\) of model.layers.1"):
        get_peft_model(model, LoraMoeConfig(num_experts=4, num_experts_pattern={"model.layers.1": 2}, top_k=3))
    with pytest.raises(ConfigError, match="top_k=2 is larger than the 1"):
        get_peft_model(model, LoraMoeConfig(num_experts=1))  # default top_k 2 needs a top_k_pattern/top_k=1
    assert not any(isinstance(m, LoraMoeLayer) for m in model.modules())  # refused before any change


def test_target_modules_absent(stories):
    model, _ = stories
    with pytest.raises(ConfigError, match=r"target_modules \['c_attn'\] are absent"):
        get_peft_model(model, LoraMoeConfig(target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ConfigError, match="matches no module"):
        get_peft_model(model, LoraMoeConfig(target_modules=r".*\.nothing_here"))
    with pytest.raises(ConfigError, match=r"matches no module of LlamaForCausalLM in layers_to_transform=\[7\]"):
        get_peft_model(model, LoraMoeConfig(layers_to_transform=[7]))  # stories260K has layers 0-4
    pm = get_peft_model(model, LoraMoeConfig(target_modules="all-linear", num_experts=2))  # PEFT's shorthand works
    assert len(_moe_modules(pm)) == 35 and "lm_head" not in pm.peft_config["default"].target_modules


def test_budget_below_layers_and_scores_of_another_model(stories):
    model, _ = stories
    with pytest.raises(AllocationError, match="smaller than the number of layers L=5"):
        moe_layout(model, "uniform", 4)
    fp = fingerprint(model)
    other = ModelFingerprint(**{**fp.to_dict(), "hidden_size": 4096, "config_hash": "0" * 16})
    scores = LayerScores(scores=SCORES, method="layerif", model=other)
    with pytest.raises(ScoresError, match="hidden_size is 4096 in the scores"):
        moe_layout(model, "layerif", BUDGET, scores=scores)
    with pytest.raises(ConfigError, match="needs layer scores"):
        moe_layout(model, "layerif", BUDGET)


def test_config_validation():
    with pytest.raises(ConfigError, match="num_experts must be an integer >= 1"):
        LoraMoeConfig(num_experts=0)
    # what host code and users catch: every refusal of __post_init__ is a ValueError
    for bad in ({"num_experts": 0}, {"top_k": -1}, {"r": 0}, {"lora_dropout": 1.5}, {"router_jitter": 2.0},
                {"router_aux_loss_coef": -1.0}, {"target_modules": []}, {"num_experts_pattern": {"x": 0}},
                {"top_k_pattern": {"layers.(": 1}}, {"num_experts_pattern": [1, 2]},
                {"layers_pattern": "layers"}, {"target_modules": "q_proj", "layers_to_transform": [0]},
                {"layers_to_transform": [-1]}, {"task_type": "NOT_A_TASK"}):
        with pytest.raises(ValueError):
            LoraMoeConfig(**bad)
    with pytest.raises(ConfigError, match=r"num_experts_pattern\['x'\] = 0"):
        LoraMoeConfig(num_experts_pattern={"x": 0})
    with pytest.raises(ConfigError, match="not a valid regex"):
        LoraMoeConfig(top_k_pattern={"layers.(": 1})
    cfg = LoraMoeConfig(num_experts=2, num_experts_pattern={"3": 6, "layers.1.mlp.down_proj": 5})
    assert cfg.experts_and_top_k("model.layers.3.self_attn.q_proj") == (6, 2)
    assert cfg.experts_and_top_k("model.layers.1.mlp.down_proj") == (5, 2)
    assert cfg.experts_and_top_k("model.layers.1.mlp.up_proj") == (2, 2)
    assert cfg.experts_and_top_k("model.layers.13.mlp.up_proj") == (2, 2)  # "3" must not match layer 13


# ----------------------------------------------------------------------------- CLI


def _scores_file(model, path, scores=SCORES, method="layerif"):
    return LayerScores(scores=scores, method=method, model=fingerprint(model)).save(path)


@pytest.mark.slow
@pytest.mark.integration
def test_cli_moe_then_finetune(stories, stories_dir, tmp_path, shakespeare, capsys):
    from layerif_plugins.cli import main

    model, _ = stories
    scores = _scores_file(model, tmp_path / "scores.json")
    out = tmp_path / "moe"
    rc = main(["moe", "--model", str(stories_dir), "--scores", str(scores), "--budget", str(BUDGET), "--r", "4",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    record = json.loads((out / "layout.json").read_text())
    assert record["experts"] == [1, 1, 1, 9, 4] and record["top_k"] == [1, 1, 1, 2, 2]
    assert record["scores"] == SCORES and record["scores_method"] == "layerif" and record["layout"] == "layerif"
    fresh, _ = load_model_and_tokenizer(stories_dir)
    loaded = PeftModel.from_pretrained(fresh, str(out))
    assert built_layout(loaded) == (record["experts"], record["top_k"])
    routers = {k: m for k, m in loaded.named_modules() if isinstance(m, nn.Linear) and "router" in k.split(".")[-2]}
    assert len(routers) == 14  # layers 3 and 4 (9 and 4 experts) × 7 projections; 1-expert layers have none
    assert all(m.out_features == record["experts"][int(k.split(".")[4])] for k, m in routers.items())

    ft = tmp_path / "ft"
    rc = main(["finetune", "--model", str(stories_dir), "--adapter", str(out), "--train", str(shakespeare),
               "--n-train", "32", "--val", str(shakespeare), "--n-val", "8", "--max-length", "64",
               "--max-steps", "6", "--batch-size", "8", "--lr", "3e-3", "--device", "cpu", "--quiet",
               "--out", str(ft)])
    assert rc == 0
    metrics = json.loads((ft / "train_metrics.json").read_text())
    assert metrics["trainer"]["global_step"] == 6
    assert metrics["heldout_after"]["loss"] < metrics["heldout_before"]["loss"] - 0.05
    assert json.loads((ft / "layout.json").read_text())["experts"] == record["experts"]
    trained = PeftModel.from_pretrained(load_model_and_tokenizer(stories_dir)[0], str(ft))
    b = trained.get_base_model().model.layers[3].mlp.down_proj.lora_moe_B["default"].weight
    assert torch.count_nonzero(b) > 0  # trained weights were saved and loaded


def test_cli_errors(stories, stories_dir, tmp_path, capsys):
    from layerif_plugins.cli import main

    model, _ = stories
    base = ["moe", "--model", str(stories_dir), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main([*base, "--layout", "uniform", "--budget", "3"]) == 2
    assert "smaller than the number of layers" in capsys.readouterr().err
    other = LayerScores(scores=[1.0] * 5, method="layerif",
                        model=ModelFingerprint(**{**fingerprint(model).to_dict(), "config_hash": "f" * 16}))
    other.save(tmp_path / "other.json")
    assert main([*base, "--scores", str(tmp_path / "other.json"), "--budget", "10"]) == 2
    assert "computed for another model: config_hash" in capsys.readouterr().err
    assert main([*base, "--budget", "10"]) == 2
    assert "needs --scores" in capsys.readouterr().err
    assert main([*base, "--layout", "uniform", "--budget", "10", "--target-modules", "c_attn"]) == 2
    assert "absent" in capsys.readouterr().err
    assert main([*base, "--layout", "uniform", "--max-params", "100"]) == 2
    assert "less than one rank-8 expert per layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one size only
        main([*base, "--layout", "uniform", "--budget", "10", "--match-lora-r", "8"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_match_lora_r_builds_the_largest_layout_at_lora_parameters(stories, stories_dir, tmp_path, capsys):
    from layerif_plugins.cli import main

    model, _ = stories
    targets = ["q_proj", "v_proj", "down_proj"]
    out = tmp_path / "moe"
    assert main(["moe", "--model", str(stories_dir), "--layout", "uniform", "--match-lora-r", "8", "--r", "4",
                 "--target-modules", ",".join(targets), "--device", "cpu", "--out", str(out)]) == 0
    lora = _trainable(get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=targets)))
    record = json.loads((out / "layout.json").read_text())
    assert record["experts"] == moe_layout_for_params(model, "uniform", lora, 4, targets).experts
    loaded = PeftModel.from_pretrained(load_model_and_tokenizer(stories_dir)[0], str(out), is_trainable=True)
    assert sum(record["experts"]) > 5 and _trainable(loaded) <= lora
    assert f"{_trainable(loaded):,} trainable parameters" in capsys.readouterr().out


@pytest.mark.integration
def test_alphalora_layout_uses_alpha_hill(stories, stories_dir, tmp_path):
    from layerif_plugins.cli import main
    from layerif_plugins.scorers import score_layers

    model, _ = stories
    alphas = score_layers(model, "alpha_hill")
    expected = expert_layout("alphalora", 5, 20, scores=alphas.scores)
    out = tmp_path / "alpha"
    assert main(["moe", "--model", str(stories_dir), "--layout", "alphalora", "--budget", "20", "--r", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads((out / "layout.json").read_text())
    assert record["experts"] == expected.experts and record["scores_method"] == "alpha_hill"


# ----------------------------------------------------------------------------- recipes, pruned base model


def test_recipes_load(stories, tmp_path):
    from layerif_plugins.paths import REPO_ROOT

    recipes = sorted((REPO_ROOT / "recipes" / "moe").glob("*.json"))
    assert len(recipes) >= 5
    for path in recipes:
        cfg = LoraMoeConfig.from_recipe(path)
        layers = {k.rsplit(".", 1)[-1] for k in cfg.num_experts_pattern}
        assert set(cfg.top_k_pattern) == set(cfg.num_experts_pattern)
        experts = [cfg.num_experts_pattern[f"model.layers.{i}"] for i in range(len(layers))]
        assert cfg.layout["experts"] == experts and sum(experts) == cfg.layout["budget"]
        if len(layers) == 32:
            assert sum(experts) == 160
        if "stories260k" in path.name:  # the measured layouts apply to the real model
            model, _ = stories
            pm = get_peft_model(model, cfg)
            assert built_layout(pm)[0] == experts
            pm.unload()
    (tmp_path / "bad.json").write_text(json.dumps({"_note": "x", "rank": 4}))
    with pytest.raises(ConfigError, match=r"unknown LoraMoeConfig fields \['rank'\]"):
        LoraMoeConfig.from_recipe(tmp_path / "bad.json")
    (tmp_path / "ok.yaml").write_text("_note: x\nr: 2\nnum_experts: 3\ntop_k: 1\n")
    assert LoraMoeConfig.from_recipe(tmp_path / "ok.yaml").num_experts == 3


@pytest.mark.slow
@pytest.mark.integration
def test_pruned_model_carries_the_adapter(stories_dir, tinystories_train, shakespeare, tmp_path):
    require("llmcompressor", "compress")
    from layerif_plugins.integrations.llmcompressor import prune_model

    pruned = tmp_path / "pruned"
    prune_model(stories_dir, pruned, algorithm="wanda", sparsity=0.5, allocation="uniform",
                calib=tinystories_train, n_calib=16, max_length=64, show_progress=False)
    model, tok = load_model_and_tokenizer(pruned)
    q = model.model.layers[2].self_attn.q_proj.weight
    zeros = q == 0
    assert 0.45 < float(zeros.float().mean()) < 0.55
    pm = get_moe_model(model, _layout(), r=4)
    batch = _batch(tok, shakespeare, n=8)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    pm.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = pm(**batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    base_q = pm.get_base_model().model.layers[2].self_attn.q_proj.get_base_layer().weight
    assert torch.equal(base_q == 0, zeros)  # the frozen sparse base keeps its mask
    save_moe_adapter(pm, _layout(), tmp_path / "ad")
    reloaded = PeftModel.from_pretrained(load_model_and_tokenizer(pruned)[0], str(tmp_path / "ad"))
    pm.eval()
    with torch.no_grad():
        expected = pm(input_ids=batch["input_ids"]).logits
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, expected)
