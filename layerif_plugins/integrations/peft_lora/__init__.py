"""Per-layer LoRA ranks from layer scores as a plain ``peft.LoraConfig`` (``rank_pattern`` / ``alpha_pattern``).

Unlike :mod:`~layerif_plugins.integrations.peft_moe` this registers nothing with PEFT: the
result is a stock ``LoraConfig`` whose JSON loads with PEFT alone (no import of this
package). :mod:`.layout` builds it at exactly the trainable-parameter budget of the uniform
config and checks every pattern key against the model's real module names
(``layerif lora-layout``, docs/lora_ranks.md).
"""

from layerif_plugins.integrations.peft_lora.layout import (
    ALPHA_MODES,
    LoraLayout,
    check_pattern_keys,
    layer_pattern_key,
    lora_layout_config,
    lora_trainable_params,
    save_lora_config,
    targeted_linears,
)

__all__ = [
    "ALPHA_MODES",
    "LoraLayout",
    "check_pattern_keys",
    "layer_pattern_key",
    "lora_layout_config",
    "lora_trainable_params",
    "save_lora_config",
    "targeted_linears",
]
