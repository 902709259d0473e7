"""A model that went through llm-compressor's sequential pipeline can be freed: no model piles up per call."""

from __future__ import annotations

import gc
import types
import weakref

import pytest
from torch import nn

from layerif_plugins.data import load_examples
from layerif_plugins.integrations.llmcompressor import release_traced_forwards

N_CALIB, MAX_LEN = 8, 32


def _fx_namespaces_holding(model: nn.Module) -> int:
    """torch.fx's wrap records that reach one of the model's modules (directly, or through a function's globals)."""
    from torch.fx import _symbolic_trace

    mine = {id(m) for m in model.modules()}

    def reaches(ns: dict) -> bool:
        return id(ns.get("self")) in mine or any(isinstance(v, types.FunctionType) and id(v.__globals__.get("self"))
                                                 in mine for v in ns.values())
    return sum(isinstance(ns, dict) and reaches(ns) for ns in _symbolic_trace._wrapped_fns_to_patch.values())


def _live_parameter_bytes() -> int:
    """Bytes of every parameter Python can still reach: a model left alive shows here even when its wrapper is gone."""
    gc.collect()
    return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, nn.Parameter))


@pytest.mark.slow
def test_a_stock_oneshot_keeps_its_model_alive_until_released(stories_dir, tinystories_train):
    """The upstream behaviour this works around, on the real stock Wanda oneshot: torch.fx's wrap table holds the
    model after the session ends; release_traced_forwards drops exactly those records and the model is freed."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.core import active_session
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    ex = load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB)
    ds = Dataset.from_dict({"input_ids": [list(x) for x in ex.input_ids],
                            "attention_mask": [[1] * len(x) for x in ex.input_ids]})
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir))
    oneshot(model=model, recipe=[WandaPruningModifier(sparsity=0.5, targets=["re:.*layers.*(proj)$"])], dataset=ds,
            num_calibration_samples=N_CALIB, max_seq_length=MAX_LEN)
    active_session().reset()
    held = _fx_namespaces_holding(model)
    assert held >= 1  # the session is over, yet torch.fx still refers to the model
    ref = weakref.ref(model)
    assert release_traced_forwards(model) == held and _fx_namespaces_holding(model) == 0
    assert release_traced_forwards(model) == 0  # idempotent
    inner = weakref.ref(model.model)  # the decoder the subgraphs' wrapped functions refer to
    del model
    gc.collect()
    assert ref() is None and inner() is None


@pytest.mark.slow
def test_prune_model_in_a_loop_leaves_no_model_behind(stories_dir, tinystories_train, tmp_path):
    """prune_model three times in one process (a sweep, a retest): no CausalLM stays alive after a call."""
    from layerif_plugins.integrations.llmcompressor import prune_model

    before = _live_parameter_bytes()
    for algorithm in ("wanda", "sparsegpt", "wanda"):
        prune_model(stories_dir, tmp_path / "out", algorithm=algorithm, sparsity=0.5, allocation="uniform",
                    calib=tinystories_train, n_calib=N_CALIB, max_length=MAX_LEN, overwrite=True, show_progress=False)
        assert _live_parameter_bytes() == before, algorithm


def test_release_ignores_what_is_not_a_module():
    assert release_traced_forwards(None) == 0 and release_traced_forwards(nn.Linear(2, 2)) == 0
