"""Evaluation without outside tools: rolling-window perplexity, held-out loss, model-directory checks,
evaluation documents and the built-in tasks. The lm-eval and vLLM bridges (``integrations/``) reuse these."""
