"""The demo's settings take their allocation names from the one list (allocate.sparsity.ALLOCATIONS)."""

from __future__ import annotations

import pytest

from layerif_plugins.allocate.sparsity import ALLOCATIONS
from layerif_plugins.errors import ConfigError
from layerif_plugins.pipelines import demo
from layerif_plugins.pipelines.demo_config import DEFAULT_ALLOCATIONS
from layerif_plugins.pipelines.demo_presets import stories260k_config


def test_one_list_of_allocations():
    assert demo.ALLOCATIONS is ALLOCATIONS
    assert DEFAULT_ALLOCATIONS == ("uniform", "owl", "layerif") and set(DEFAULT_ALLOCATIONS) <= set(ALLOCATIONS)
    assert stories260k_config().allocations == DEFAULT_ALLOCATIONS
    every = stories260k_config(allocations=ALLOCATIONS)  # depth_ramp and alpha_hill included
    assert {f"prune wanda50-{a}" for a in ALLOCATIONS} <= set(demo.steps(every))


def test_an_unknown_allocation_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"allocations \['ramp'\]: choose from layerif, owl, alpha_hill, depth_ramp"):
        stories260k_config(allocations=("uniform", "ramp"))
