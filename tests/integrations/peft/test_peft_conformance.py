"""PEFT's generic tuner behaviours, held against the LoRA-MoE tuner with the real PEFT and transformers.

Modelled on the checks PEFT runs for every built-in method (``PeftCommonTester`` in PEFT's
``tests/testing_common.py``, driven by ``test_decoder_models.py`` / ``test_config.py``): config
round trips, save/load, transformers' own loading paths, multiple adapters, deletion, disabling,
trainable parameters, model card, training, unload — and the clear refusals (merging, mixed models,
per-sample adapter batches). Every check runs over several configs (top-1, top-2, one-expert layers,
``layers_to_transform``, ``modules_to_save``, a sequence-classification head) on a tiny Llama built
from a ``LlamaConfig`` here, so each case takes a fraction of a second.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hostlibs import require

peft = require("peft", "moe")  # a skip on a partial install, a failure under CI=true

import yaml  # noqa: E402
from peft import (  # noqa: E402
    AutoPeftModelForCausalLM,
    AutoPeftModelForSequenceClassification,
    PeftConfig,
    PeftModel,
    PeftType,
    get_base_model_state_dict,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from layerif_plugins.integrations.peft_moe import (  # noqa: E402
    LORA_MOE_PEFT_TYPE,
    LoraMoeConfig,
    LoraMoeLayer,
    LoraMoeMergeError,
)
from layerif_plugins.integrations.peft_moe.model import RouterRuntime  # noqa: E402

LAYERS = 3
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUX_COEF = 0.01


@dataclass(frozen=True)
class Case:
    """One LoraMoeConfig under test: its own fields, the task, and the modules it must adapt."""

    name: str
    fields: dict[str, Any]
    task: str = "CAUSAL_LM"
    layers: tuple[int, ...] = tuple(range(LAYERS))
    targets: tuple[str, ...] = PROJECTIONS
    one_expert: frozenset[str] = field(default_factory=frozenset)  # module keys with a single expert

    @property
    def saved_module(self) -> str | None:
        """The module PEFT trains fully and saves with the adapter (``modules_to_save``), if any."""
        if self.task == "SEQ_CLS":
            return "score"
        return (self.fields.get("modules_to_save") or [None])[0]

    def config(self, base_dir: Path, **overrides: Any) -> LoraMoeConfig:
        kwargs = {"r": 2, "lora_alpha": 4, "init_weights": False, "router_aux_loss_coef": AUX_COEF,
                  **self.fields, **overrides}
        return LoraMoeConfig(base_model_name_or_path=str(base_dir), task_type=self.task, **kwargs)

    def targeted(self) -> list[str]:
        """Module keys (in the transformers model) that must get a LoRA-MoE layer."""
        return [f"model.layers.{i}.{'self_attn' if t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
                for i in self.layers for t in self.targets]


_ONE = {"model.layers.0": 1, "layers.2.mlp.down_proj": 1}
CASES = [
    Case("top1", {"num_experts": 3, "top_k": 1}),
    Case("top2", {"num_experts": 4, "top_k": 2}),
    Case("one-expert-layers", {"num_experts": 3, "top_k": 2, "num_experts_pattern": _ONE, "top_k_pattern": _ONE},
         one_expert=frozenset([*(f"model.layers.0.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for p in PROJECTIONS),
                               "model.layers.2.mlp.down_proj"])),
    Case("layers-to-transform", {"num_experts": 2, "top_k": 1, "target_modules": ["q_proj", "v_proj", "down_proj"],
                                 "layers_to_transform": [0, 2], "layers_pattern": "layers"},
         layers=(0, 2), targets=("q_proj", "v_proj", "down_proj")),
    Case("modules-to-save", {"num_experts": 3, "top_k": 2, "modules_to_save": ["lm_head"]}),
    Case("seq-cls", {"num_experts": 3, "top_k": 2}, task="SEQ_CLS"),
]
IDS = [c.name for c in CASES]
# transformers' own load_adapter does not load `modules_to_save` weights, for LoRA alike (transformers 5.17:
# "lm_head.modules_to_save.default.weight | MISSING"), so those paths are checked on the other configs
NO_SAVED_MODULES = [c for c in CASES if c.saved_module is None]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as an HF directory (config + weights), the base of every adapter here."""
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("conformance") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0  # one padded row: padding is left out of the routing statistics
    return {"input_ids": ids, "attention_mask": mask}


def _labels(case: Case) -> torch.Tensor:
    if case.task == "SEQ_CLS":
        return torch.tensor([0, 2])
    ids = _inputs()["input_ids"].clone()
    ids[1, -2:] = -100
    return ids


_LOADED: dict[tuple[str, str], Any] = {}


def _base(case: Case, base_dir: Path) -> Any:
    """A fresh copy of the base model as ``from_pretrained(base_dir)`` gives it (loaded once per task type;
    a copy costs milliseconds, a load a tenth of a second). The random SEQ_CLS head is the same in every copy."""
    key = (case.task, str(base_dir))
    if key not in _LOADED:
        torch.manual_seed(0)
        if case.task == "SEQ_CLS":
            _LOADED[key] = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        else:
            _LOADED[key] = AutoModelForCausalLM.from_pretrained(base_dir)
    return copy.deepcopy(_LOADED[key]).eval()


def _perturb_saved_module(model: Any, adapter_name: str) -> None:
    """``modules_to_save`` start as a copy of the original (a no-op); change them as training would."""
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            with torch.no_grad():
                for p in module.modules_to_save[adapter_name].parameters():
                    p.add_(0.5 * torch.randn_like(p))


def _peft(case: Case, base_dir: Path, base: Any = None, adapter_name: str = "default", seed: int = 1) -> Any:
    base = _base(case, base_dir) if base is None else base
    torch.manual_seed(seed)
    pm = get_peft_model(base, case.config(base_dir), adapter_name=adapter_name)
    _perturb_saved_module(pm, adapter_name)
    return pm.eval()


def _out(model: Any, **extra: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs(), **extra).logits


def _expected_trainable(case: Case, adapter_name: str = "default") -> set[str]:
    names = set()
    for key in case.targeted():
        names |= {f"base_model.model.{key}.lora_moe_A.{adapter_name}.weight",
                  f"base_model.model.{key}.lora_moe_B.{adapter_name}.weight"}
        if key not in case.one_expert:
            names.add(f"base_model.model.{key}.lora_moe_router.{adapter_name}.weight")
    if case.saved_module:
        names.add(f"base_model.model.{case.saved_module}.modules_to_save.{adapter_name}.weight")
    return names


def _trainable(model: Any) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _moe_layers(model: Any) -> list[LoraMoeLayer]:
    return [m for m in model.modules() if isinstance(m, LoraMoeLayer)]


def _adapter_state(layer: LoraMoeLayer) -> dict[str, Any]:
    return {attr: getattr(layer, attr) for attr in layer.adapter_layer_names + layer.other_param_names}


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_round_trips_with_the_same_types(case, base_dir, tmp_path):
    """save_pretrained → from_pretrained / PeftConfig.from_pretrained / from_json_file give the same config."""
    config = case.config(base_dir)
    assert isinstance(config.peft_type, PeftType) and config.peft_type.value == LORA_MOE_PEFT_TYPE
    assert config.peft_type is PeftType.LAYERIF_LORA_MOE is PeftType(LORA_MOE_PEFT_TYPE)
    assert isinstance(config.target_modules, set)
    config.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == LORA_MOE_PEFT_TYPE and raw["task_type"] == case.task
    assert config.to_dict() == LoraMoeConfig.from_json_file(str(tmp_path / "adapter_config.json")) == raw
    for loaded in (LoraMoeConfig.from_pretrained(str(tmp_path)), PeftConfig.from_pretrained(str(tmp_path))):
        assert type(loaded) is LoraMoeConfig
        assert loaded.to_dict() == config.to_dict()
        assert loaded.peft_type is PeftType.LAYERIF_LORA_MOE
        assert isinstance(loaded.target_modules, set) and loaded.target_modules == config.target_modules
        assert loaded.num_experts_pattern == config.num_experts_pattern
        assert loaded.modules_to_save == config.modules_to_save
        assert loaded.layers_to_transform == config.layers_to_transform


def test_config_refusals_are_value_errors():
    """PEFT's own config checks raise ValueError; so do LoraMoeConfig's (LoraConfig's layer rules included)."""
    with pytest.raises(ValueError, match="layers_pattern='layers' needs layers_to_transform"):
        LoraMoeConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules is a regex"):
        LoraMoeConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="Invalid task type"):
        LoraMoeConfig(task_type="NOT_A_TASK")
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        LoraMoeConfig(top_k=0)


# ----------------------------------------------------------------------------- wrapping


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_adapts_exactly_the_targets_and_trains_only_the_adapter(case, base_dir):
    """The adapted modules, the trainable parameter set, routers only where a layer has > 1 expert."""
    pm = _peft(case, base_dir)
    assert sorted(pm.base_model.targeted_module_names) == sorted(case.targeted())
    layers = {k.removeprefix("base_model.model."): m for k, m in pm.named_modules() if isinstance(m, LoraMoeLayer)}
    assert sorted(layers) == sorted(case.targeted())
    for key, layer in layers.items():
        n, k = pm.peft_config["default"].experts_and_top_k(key)
        assert layer.num_experts["default"] == n and layer.top_k["default"] == k
        assert ("default" in layer.lora_moe_router) == (key not in case.one_expert) == (n > 1)
    assert _trainable(pm) == _expected_trainable(case)
    # a custom adapter name is used in every adapter parameter, as PEFT's own tuners do
    named = _peft(case, base_dir, adapter_name="test-adapter")
    assert _trainable(named) == _expected_trainable(case, "test-adapter")
    for attr in ("save_pretrained", "from_pretrained", "push_to_hub"):
        assert hasattr(named, attr)
    # inputs_embeds instead of input_ids (an unpadded row: a SEQ_CLS head cannot find padding in embeddings)
    ids = _inputs()["input_ids"][:1]
    with torch.no_grad():
        torch.testing.assert_close(pm(inputs_embeds=pm.get_input_embeddings()(ids)).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_training_step_changes_only_adapter_parameters(case, base_dir):
    """Gradients reach exactly the trainable parameters (every router included); a step moves nothing else."""
    pm = _peft(case, base_dir).train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    out = pm(**_inputs(), labels=_labels(case))
    assert pm.base_model.router_aux_loss is not None or all(k in case.one_expert for k in case.targeted())
    out.loss.backward()
    trainable = _trainable(pm)
    for name, param in pm.named_parameters():
        if name in trainable:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name
    routers = [p for n, p in pm.named_parameters() if "lora_moe_router" in n]
    assert routers and all(float(p.grad.abs().sum()) > 0 for p in routers)
    torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable
    # a deep copy taken after a training forward (graph tensors in the last aux loss) works on its own
    clone = copy.deepcopy(pm).eval()
    runtime = clone.get_base_model().__dict__[RouterRuntime.ATTRIBUTE]
    assert runtime is not pm.get_base_model().__dict__[RouterRuntime.ATTRIBUTE]
    assert all(layer.token_mask is runtime.token_mask for layer in _moe_layers(clone))
    assert torch.equal(_out(clone), _out(pm.eval()))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_and_from_pretrained_give_identical_outputs(case, base_dir, tmp_path):
    """PeftModel.from_pretrained (inference and trainable), low_cpu_mem_usage, the files and the model card."""
    pm = _peft(case, base_dir)
    reference = _out(pm)
    pm.save_pretrained(str(tmp_path))
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    assert not {"model.safetensors", "config.json"} & files
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) == len(_expected_trainable(case))  # adapter + modules_to_save, nothing of the base
    if case.saved_module:
        assert f"base_model.model.{case.saved_module}.weight" in saved
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(re.search(r"---\n(.*?)\n---", card, re.DOTALL).group(1))
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == pm.config.to_dict()["_name_or_path"] == str(base_dir)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(_base(case, base_dir), str(tmp_path))
    assert not any("Found missing adapter keys" in str(w.message) for w in caught)
    assert torch.equal(_out(loaded), reference)
    assert not _trainable(loaded) and loaded.peft_config["default"].inference_mode
    sd, sd_loaded = pm.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys() and all(torch.equal(sd[k], sd_loaded[k]) for k in sd)

    trainable = PeftModel.from_pretrained(_base(case, base_dir), str(tmp_path), is_trainable=True)
    assert _trainable(trainable) == _expected_trainable(case)
    lazy = PeftModel.from_pretrained(_base(case, base_dir), str(tmp_path), low_cpu_mem_usage=True)
    assert {p.device.type for p in lazy.parameters()} == {"cpu"}
    assert torch.equal(_out(lazy.eval()), reference)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_auto_peft_model_loads_the_adapter_directory(case, base_dir, tmp_path):
    """AutoPeftModelFor… reads base_model_name_or_path and task_type from adapter_config.json."""
    pm = _peft(case, base_dir)
    reference = _out(pm)
    pm.save_pretrained(str(tmp_path))
    if case.task == "SEQ_CLS":
        auto = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=3)
    else:
        auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(auto).__name__ == type(pm).__name__
    assert torch.equal(_out(auto.eval()), reference)


@pytest.mark.parametrize("case", NO_SAVED_MODULES, ids=[c.name for c in NO_SAVED_MODULES])
def test_transformers_load_adapter_set_and_delete(case, base_dir, tmp_path):
    """transformers' own adapter API: load_adapter, from_pretrained(adapter_dir), set_adapter, delete_adapter."""
    pm = _peft(case, base_dir)
    reference = _out(pm)
    pm.save_pretrained(str(tmp_path))

    model = _base(case, base_dir)
    model.load_adapter(str(tmp_path))
    assert model.peft_config["default"].peft_type is PeftType.LAYERIF_LORA_MOE
    assert torch.equal(_out(model.eval()), reference)
    model.load_adapter(str(tmp_path), adapter_name="other")
    model.set_adapter("other")
    assert model.active_adapters() == ["other"] and torch.equal(_out(model), reference)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    for layer in _moe_layers(model):
        assert all("other" not in state for state in _adapter_state(layer).values())

    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # base_model_name_or_path is a local dir
    assert torch.equal(_out(direct.eval()), reference)
    direct.delete_adapter("default")
    assert not hasattr(direct, "peft_config") and all(not layer.lora_moe_A for layer in _moe_layers(direct))


@pytest.mark.parametrize("case", NO_SAVED_MODULES, ids=[c.name for c in NO_SAVED_MODULES])
def test_aux_loss_added_once_whatever_the_number_of_injections(case, base_dir, tmp_path):
    """Each load_adapter builds a tuner; they share one mask and one hook pair, so the loss is added once."""
    _peft(case, base_dir).save_pretrained(str(tmp_path))
    model = _base(case, base_dir)
    model.load_adapter(str(tmp_path), is_trainable=True)
    model.load_adapter(str(tmp_path), adapter_name="other", is_trainable=True)
    assert len(model._forward_hooks) == 1 and len(model._forward_pre_hooks) == 1
    labels = _labels(case)
    with torch.no_grad():
        plain = model.eval()(**_inputs(), labels=labels).loss
        trained = model.train()(**_inputs(), labels=labels).loss
    aux = model.__dict__[RouterRuntime.ATTRIBUTE].router_aux_loss
    assert aux is not None and float(aux) >= 1.0 - 1e-6  # ≥ 1 per routed module
    assert float(trained) == pytest.approx(float(plain) + AUX_COEF * float(aux), rel=1e-6)


# ----------------------------------------------------------------------------- several adapters


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_multiple_adapters_set_adapter_and_save_load(case, base_dir, tmp_path):
    pm = _peft(case, base_dir)
    out_default = _out(pm)
    torch.manual_seed(2)
    pm.add_adapter("other", case.config(base_dir))
    _perturb_saved_module(pm, "other")
    assert pm.active_adapters == ["default"] and torch.equal(_out(pm), out_default)  # added, not activated
    pm.set_adapter("other")
    out_other = _out(pm)
    assert not torch.allclose(out_default, out_other)
    assert _trainable(pm) == _expected_trainable(case, "other")
    pm.set_adapter("default")
    assert torch.equal(_out(pm), out_default) and _trainable(pm) == _expected_trainable(case)

    pm.save_pretrained(str(tmp_path))
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(_base(case, base_dir), str(tmp_path))
    result = loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert result.missing_keys == []
    assert torch.equal(_out(loaded), out_default)
    loaded.set_adapter("other")
    assert torch.equal(_out(loaded), out_other)
    only = PeftModel.from_pretrained(_base(case, base_dir), str(tmp_path / "other"))
    assert torch.equal(_out(only), out_other)
    # selected_adapters, with another adapter whose name contains "default": exactly default's weights
    pm.add_adapter("default2", case.config(base_dir))
    pm.save_pretrained(str(tmp_path / "selected"), selected_adapters=["default"])
    assert not (tmp_path / "selected" / "other").exists() and not (tmp_path / "selected" / "default2").exists()
    saved = load_file(str(tmp_path / "selected" / "adapter_model.safetensors"))
    assert len(saved) == len(_expected_trainable(case))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_delete_active_inactive_and_last_adapter(case, base_dir):
    base_out = _out(_base(case, base_dir))
    pm = _peft(case, base_dir)
    out_default = _out(pm)
    for name, activate in (("delete_me", True), ("inactive", False)):
        pm.add_adapter(name, case.config(base_dir))
        if activate:
            pm.set_adapter(name)
        pm.delete_adapter(name)
        assert name not in pm.peft_config and pm.active_adapters == ["default"]
        for layer in _moe_layers(pm):  # PEFT's deletion clears every per-adapter container, router_jitter too
            assert all(name not in state for state in _adapter_state(layer).values())
        for module in pm.modules():
            if isinstance(module, ModulesToSaveWrapper):
                assert name not in module.modules_to_save and module.active_adapters == ["default"]
        assert torch.equal(_out(pm), out_default)
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        pm.delete_adapter("unknown-adapter")
    pm.delete_adapter("default")
    assert "default" not in pm.peft_config and pm.active_adapters == []
    assert all(not layer.lora_moe_A and not layer.router_jitter for layer in _moe_layers(pm))
    with torch.no_grad():
        assert torch.equal(pm.base_model(**_inputs()).logits, base_out)  # no adapter left: the base model


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_disable_adapter_gives_the_base_model(case, base_dir):
    base = _base(case, base_dir)
    base_out = _out(base)
    pm = _peft(case, base_dir, base=base)
    peft_out = _out(pm)
    assert not torch.allclose(peft_out, base_out)
    with pm.disable_adapter():
        torch.testing.assert_close(_out(pm), base_out, rtol=1e-6, atol=1e-6)
        assert not _trainable(pm)
    torch.testing.assert_close(_out(pm), peft_out, rtol=0, atol=0)
    assert _trainable(pm) == _expected_trainable(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unload_restores_the_base_model_and_removes_the_hooks(case, base_dir):
    """unload(): no tuner layer, config or hook left; a `modules_to_save` module keeps its trained copy (PEFT's
    rule, the same for LoRA)."""
    base = _base(case, base_dir)
    base_keys = set(base.state_dict())
    pm = _peft(case, base_dir, base=base)
    assert set(get_base_model_state_dict(pm)) == base_keys
    expected = _base(case, base_dir)
    if case.saved_module:
        trained = getattr(pm.base_model.model, case.saved_module).modules_to_save["default"]
        getattr(expected, case.saved_module).load_state_dict(trained.state_dict())
    plain = pm.unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert not hasattr(plain, "peft_config") and RouterRuntime.ATTRIBUTE not in plain.__dict__
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert set(plain.state_dict()) == base_keys
    assert torch.equal(_out(plain), _out(expected))


# ----------------------------------------------------------------------------- refused, clearly


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merging_mixed_models_and_per_sample_adapters_are_refused_clearly(case, base_dir):
    """Merging: routed experts have no weight delta, each token's update depends on its gates. PeftMixedModel:
    PEFT's own refusal for a type outside its compatible list. ``adapter_names`` batches: refused, not ignored."""
    pm = _peft(case, base_dir)
    before = _out(pm)
    for call in (pm.merge_and_unload, pm.merge_adapter, pm.base_model.merge_and_unload):
        with pytest.raises(LoraMoeMergeError, match="input-dependent gates") as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, NotImplementedError)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        _moe_layers(pm)[0].get_delta_weight("default")
    assert len(_moe_layers(pm)) == len(case.targeted()) and not any(m.merged for m in _moe_layers(pm))
    assert torch.equal(_out(pm), before)
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        _out(pm, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="'LAYERIF_LORA_MOE' is not compatible with the `PeftMixedModel`"):
        get_peft_model(_base(case, base_dir), case.config(base_dir), mixed=True)
