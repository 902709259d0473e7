"""``layerif select-layers``: which layers to fine-tune → ``layers_to_transform`` for a PEFT ``LoraConfig``.

    layerif select-layers --scores scores.json --k 2 [--out lora.json]
    layerif select-layers --model M --by variability --data labelled.jsonl --k 2 --save-scores nu.json

Rule (``--rule auto``): the end the scores' direction names — the lowest ν for
``variability`` scores, the highest for LayerIF (the least well-trained layers). Prints the layers and a JSON
snippet of ``LoraConfig`` keyword arguments; ``--out`` writes it.
"""

from __future__ import annotations

import argparse
import json

from layerif_plugins.allocate.layers import adapt_rule, layers_to_adapt, lora_config_kwargs
from layerif_plugins.cli.common import declare_paths, load_scoring_data, positive_int
from layerif_plugins.errors import ConfigError
from layerif_plugins.io import atomic_write_json
from layerif_plugins.models.families import LLAMA_PROJECTIONS, peft_targets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("select-layers", help="choose layers to adapt (LoRA layers_to_transform) from scores")
    p.add_argument("--scores", default=None, help="a LayerScores file")
    p.add_argument("--model", default=None, help="score this model instead (with --by and --data)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--by", default="variability", help="scoring method when --model is given (default variability)")
    p.add_argument("--data", default=None, help="labelled JSONL (variability) or calibration text")
    p.add_argument("--n", type=positive_int, default=None, help="examples to use (first N; default: all)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--save-scores", default=None, help="write the computed scores here")
    p.add_argument("--k", type=positive_int, required=True, help="number of layers to adapt")
    p.add_argument("--rule", default="auto", choices=["auto", "highest", "lowest"])
    p.add_argument("--target-modules", default=None,
                   help="comma-separated LoRA targets (default: the model family's projections, or Llama names)")
    p.add_argument("--r", type=positive_int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--out", default=None, help="write the LoraConfig JSON snippet here (see --overwrite)")
    declare_paths(p, files={"out": "json", "save_scores": "json"}, inputs=("scores", "model", "tokenizer", "data"))
    p.set_defaults(func=run)


def _score(args: argparse.Namespace):
    from layerif_plugins.models import load_model_and_tokenizer
    from layerif_plugins.scorers import resolve_scores

    if not args.data:
        raise ConfigError("--model needs --data FILE (labelled JSONL for --by variability)")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, device="cpu")
    data = load_scoring_data(args, tok, args.by, calib=args.data, n_calib=args.n)
    scores = resolve_scores(model, args.by, None, data)
    if args.save_scores:
        scores.save(args.save_scores)
        print(f"wrote {args.save_scores}")
    return scores, model


def run(args: argparse.Namespace) -> int:
    if (args.scores is None) == (args.model is None):
        raise ConfigError("pass exactly one of --scores FILE or --model PATH (with --by and --data)")
    model = None
    if args.scores:
        from layerif_plugins.scorers import resolve_scores

        scores = resolve_scores(None, None, args.scores)  # no model loaded: the file is used as is
    else:
        scores, model = _score(args)
    layers = layers_to_adapt(scores, args.k, args.rule)
    if args.target_modules:
        targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
        pattern = "layers"
    elif model is not None:
        from layerif_plugins.models import blocks_prefix

        targets = peft_targets(model)
        pattern = blocks_prefix(model).rsplit(".", 1)[-1]
    else:
        targets, pattern = list(LLAMA_PROJECTIONS), "layers"
    rule = adapt_rule(scores.direction) if args.rule == "auto" else args.rule
    snippet = lora_config_kwargs(layers, targets, layers_pattern=pattern, r=args.r, lora_alpha=args.lora_alpha)
    print(scores.table())
    print(f"{scores.method}: adapt the {args.k} layers with the {rule} scores: {layers}")
    print(json.dumps(snippet, indent=2))
    if args.out:
        atomic_write_json(args.out, {"method": scores.method, "rule": rule, "layers_to_transform": layers,
                                     "lora_config": snippet})
        print(f"wrote {args.out}")
    return 0
