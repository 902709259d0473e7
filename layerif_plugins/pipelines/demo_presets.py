"""The named demo configurations: ``layerif demo`` (stories260K) and ``layerif demo --model smollm2-135m``.

Another model or task set is another function here returning a :class:`DemoConfig`, not another
copy of the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerif_plugins.paths import shared_data, stories260k_checkpoint
from layerif_plugins.pipelines.demo_config import DemoConfig, DemoTask, MetricView


def stories260k_config(model: str | Path | None = None, **overrides: Any) -> DemoConfig:
    """The ``layerif demo`` run: stories260K scored on TinyStories and Shakespeare, Wanda 30/50/70 %.

    Any :class:`DemoConfig` field can be overridden (``tasks=``, ``sparsities=``, ``title=`` ...).
    """
    stories = DemoTask("tinystories", "TinyStories", shared_data("tinystories", "train.txt"),
                       shared_data("tinystories", "valid.txt"), heldout="held-out TinyStories validation stories",
                       mc=True)
    plays = DemoTask("shakespeare", "Shakespeare", shared_data("tinyshakespeare", "input.txt"),
                     heldout="Shakespeare paragraphs")
    metrics = (
        MetricView("tinystories", "word_perplexity", True, "Held-out TinyStories word perplexity (lower is better):",
                   "TinyStories word ppl", plot="eval_perplexity.png", key="word perplexity", alt="word perplexity",
                   title="Wanda: held-out TinyStories word perplexity", ylabel="word perplexity (log)", logy=True),
        MetricView("tinystories_mc", "acc", False,
                   "TinyStories next-sentence accuracy (4 choices, chance 0.25; higher is better):", "MC acc",
                   fmt=".3f", plot="eval_mc.png", key="multiple-choice accuracy", alt="accuracy",
                   title="Wanda: TinyStories next-sentence accuracy", ylabel="accuracy", reference=0.25,
                   reference_label="chance (4 choices)"),
        MetricView("shakespeare", "bits_per_byte", True,
                   "Shakespeare bits per byte (a task the model was not trained on; lower is better):",
                   "Shakespeare bits/byte"),
    )
    settings: dict[str, Any] = {
        "title": "stories260K", "model": Path(model) if model else stories260k_checkpoint(), "tasks": (stories, plays),
        "calib": shared_data("tinystories", "train.txt"), "calib_label": "TinyStories", "metrics": metrics}
    return DemoConfig(**{**settings, **overrides})


def smollm2_config(model: str | Path | None = None, **overrides: Any) -> DemoConfig:
    """``layerif demo --model smollm2-135m``: the same story on a real 30-layer Llama.

    SmolLM2-135M (the model catalogue fetches it from its PyPI wheel) scored on WikiText-2
    (first validation paragraphs → first test paragraphs; evaluated on later test paragraphs)
    and TinyStories; Wanda 50/60/70 % with uniform / OWL / LayerIF (WikiText-2 scores) ratios;
    4 of 30 layers dropped by angular distance / LayerIF / the last layers; W8A8 of the dense model
    and of Wanda 50 % (LayerIF ratios), and a W8A8 / dense mix at 20 bits per weight ordered by the
    WikiText-2 LayerIF scores (what vLLM-CPU serves); every model served with vLLM (bytes on disk,
    perplexity beside HF's, generation tokens/s). Sized for about 35 minutes on 2 CPU cores.
    """
    wikitext = DemoTask("wikitext2", "WikiText-2", shared_data("wikitext-2", "valid.txt"),
                        shared_data("wikitext-2", "test.txt"), heldout="held-out WikiText-2 test paragraphs")
    stories = DemoTask("tinystories", "TinyStories", shared_data("tinystories", "train.txt"),
                       shared_data("tinystories", "valid.txt"), heldout="held-out TinyStories validation stories",
                       mc=True)
    metrics = (
        MetricView("wikitext2", "word_perplexity", True, "Held-out WikiText-2 word perplexity (lower is better):",
                   "WikiText-2 word ppl", plot="eval_perplexity.png", key="word perplexity", alt="word perplexity",
                   title="Wanda: held-out WikiText-2 word perplexity", ylabel="word perplexity (log)", logy=True),
        MetricView("tinystories", "word_perplexity", True, "Held-out TinyStories word perplexity (lower is better):",
                   "TinyStories word ppl"),
        MetricView("tinystories_mc", "acc", False,
                   "TinyStories next-sentence accuracy (4 choices, chance 0.25; higher is better):", "MC acc",
                   fmt=".3f", plot="eval_mc.png", key="multiple-choice accuracy", alt="accuracy",
                   title="Wanda: TinyStories next-sentence accuracy", ylabel="accuracy", reference=0.25,
                   reference_label="chance (4 choices)"),
    )
    settings: dict[str, Any] = {
        "title": "SmolLM2-135M", "model": model or "smollm2-135m", "tasks": (wikitext, stories),
        "calib": shared_data("wikitext-2", "valid.txt"), "calib_label": "WikiText-2 validation",
        "metrics": metrics, "sparsities": (0.5, 0.6, 0.7), "n_train": 32, "n_val": 16, "batch_size": 8,
        "n_calib": 32, "n_eval_docs": 20, "n_mc": 40, "eval_batch_size": 8, "threads": 0,
        "depth_methods": ("angular", "layerif", "last"), "depth_k": 4, "vllm_serve": True,
        "quantize": ("W8A8", "W8A8@wanda50-layerif", "mixed-20")}
    return DemoConfig(**{**settings, **overrides})


#: demo configurations by model name (``layerif demo --model NAME``); other models use the stories260K story
CONFIGS: dict[str, Callable[..., DemoConfig]] = {"stories260k": stories260k_config, "smollm2-135m": smollm2_config}


def config_for(model: str | Path | None, **overrides: Any) -> DemoConfig:
    """The demo configuration of ``model``: its own (:data:`CONFIGS`), else the stories260K story on it."""
    name = str(model) if model is not None else "stories260k"
    if name in CONFIGS:
        return CONFIGS[name](None if name == "stories260k" else name, **overrides)
    return stories260k_config(model, **overrides)


__all__ = ["CONFIGS", "config_for", "smollm2_config", "stories260k_config"]
