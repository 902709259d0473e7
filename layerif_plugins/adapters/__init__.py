"""Adapters that plug layer scores into the tools people use (llm-compressor, PEFT, lm-eval, vLLM)."""
