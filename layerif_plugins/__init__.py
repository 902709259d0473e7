"""layerif-plugins: layer-wise influence (LayerIF) scores for LLMs, plugged into llm-compressor
pruning (per-layer sparsity) and PEFT LoRA-MoE (per-layer expert counts).

The public API::

    from layerif_plugins import load_model_and_tokenizer, load_examples, ScoringData, score_layers, LayerScores
    model, tok = load_model_and_tokenizer("path/or/stories260K.bin")
    data = ScoringData(train=load_examples(train_txt, tok), val=load_examples(val_txt, tok), pad_id=0)
    scores = score_layers(model, "layerif", data)          # or "owl", "alpha_hill", "angular", ...
    scores.save("scores.json")

Importing this package is cheap; the llm-compressor modifiers and the PEFT LoRA-MoE tuner
register themselves when those libraries are imported (the table in ``layerif_plugins.integrations``).
"""

from layerif_plugins import integrations
from layerif_plugins.data import Examples, load_examples
from layerif_plugins.engine import InfluenceConfig, InfluenceResult, compute_influence, reference_influence
from layerif_plugins.errors import LayerIFError
from layerif_plugins.models import fingerprint, load_model_and_tokenizer
from layerif_plugins.scorers import SCORERS, ScoringData, score_layers
from layerif_plugins.scores import LayerScores

__version__ = "0.1.0"

integrations.install()

__all__ = [
    "SCORERS",
    "Examples",
    "InfluenceConfig",
    "InfluenceResult",
    "LayerIFError",
    "LayerScores",
    "ScoringData",
    "compute_influence",
    "fingerprint",
    "load_examples",
    "load_model_and_tokenizer",
    "reference_influence",
    "score_layers",
]
