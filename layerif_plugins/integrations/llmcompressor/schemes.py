"""Our quantization scheme names and the llm-compressor / compressed-tensors presets they stand for.

One table shared by the recipe builder (:mod:`.quantize`) and the measured quantization
sensitivity (:mod:`.quant_sensitivity`), so neither imports the other for it.
"""

from __future__ import annotations

#: our scheme names → llm-compressor / compressed-tensors preset names
PRESETS: dict[str, str] = {"W8A8": "W8A8", "W8A16": "W8A16", "W4A16": "W4A16", "FP8": "FP8_DYNAMIC"}

__all__ = ["PRESETS"]
