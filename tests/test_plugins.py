"""Importing layerif_plugins is cheap and registers the integrations in any import order."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
{first}
from llmcompressor.modifiers.factory import ModifierFactory
import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
{second}
registry = ModifierFactory._registered_registry
assert "LayerIFWandaPruningModifier" in registry and "LayerIFSparseGPTModifier" in registry, sorted(registry)
assert "LAYERIF_LORA_MOE" in PEFT_TYPE_TO_CONFIG_MAPPING
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [
    ("import layerif_plugins", ""),
    ("", "import layerif_plugins"),
])
def test_registration_in_any_import_order(first, second):
    code = CHECK.format(first=first, second=second)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_import_is_light():
    code = ("import sys, layerif_plugins; heavy = [m for m in ('llmcompressor', 'peft', 'lm_eval', 'vllm', "
            "'datasets') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
