"""``layerif demo``: the whole story on the embedded stories260K model, in a few minutes on 2 CPU cores.

``layerif demo --model smollm2-135m`` (``make demo-smollm2``) runs the same story on the real
30-layer SmolLM2-135M (WikiText-2 and TinyStories tasks, Wanda 50/60/70 %, depth drop, and a
W8A8 and mixed-precision checkpoints, and a vLLM section: bytes on disk, perplexity from vLLM
beside HF's, generation tokens/s of dense, pruned, dropped and quantized models).
Library INFO logs and lm-eval's / vLLM's own output go to ``--out/logs/``; the terminal shows
one line per stage, the library's progress bars and the final summary.


1. convert the llama2.c checkpoint to an HF directory;
2. score it with LayerIF on TinyStories (train → validation) and on Shakespeare (a task
   the model was not trained for);
3. prune it with llm-compressor's Wanda to 70% (parameter-weighted; by default also 30% and
   50%, where the 260K-parameter model still works) with uniform, OWL and LayerIF
   (TinyStories scores) per-layer ratios;
4. evaluate the dense model and the pruned ones with lm-eval on held-out data
   (TinyStories and Shakespeare perplexity, the TinyStories next-sentence multiple choice)
   and check that each pruned directory is loadable by vLLM;
5. write ``report.md`` with the tables and PNG plots under ``--out``.

This module is the command line only: the steps live in
:mod:`layerif_plugins.pipelines.demo` (configured by a ``DemoConfig``) and the report in
:mod:`layerif_plugins.pipelines.demo_report`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from layerif_plugins.cli.common import ConfigOptions
from layerif_plugins.pipelines.demo import (
    DemoConfig,
    StageClock,
    config_for,
    parse_sparsities,
    prepare_out,
    run_demo,
)

#: the demo's options, generated from DemoConfig's scalar fields (a new field is a new option);
#: the model, the output directory, the sparsity and depth lists and --quiet are declared below
DEMO_OPTIONS = ConfigOptions(DemoConfig, exclude=("title", "calib_label", "method", "show_progress", "log_dir"),
                             help={"vllm_check": "skip the CPU-side check that vLLM can load every saved directory"})


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="stories260K (or smollm2-135m): LayerIF scores → Wanda (uniform/OWL/LayerIF) → lm-eval → report"
    )
    p.add_argument("--model", default=None,
                   help="llama2.c .bin, HF dir, .gguf or catalogue name (default: ../shared stories260K; "
                        "smollm2-135m runs its own configuration)")
    p.add_argument("--out", default="demo_out",
                   help="output directory: new, empty, or an earlier demo's (the demo resumes into it)")
    p.add_argument("--sparsity", default=None,
                   help="global Wanda sparsities, comma-separated (default: 0.3,0.5,0.7; SmolLM2 0.5,0.6,0.7)")
    p.add_argument("--depth", default=None,
                   help="depth-pruning methods to compare too, comma-separated (e.g. angular,layerif,last)")
    p.add_argument("--quantize", default=None,
                   help="quantized models to build, evaluate and serve too, comma-separated SCHEME[@MODEL] or "
                        "mixed-BITS[@MODEL] (e.g. W8A8,W8A8@wanda50-uniform,mixed-20; SmolLM2's default: "
                        "W8A8,W8A8@wanda50-layerif,mixed-20; '' for none)")
    group = p.add_argument_group("demo settings (DemoConfig)",
                                 "defaults shown are stories260K's; smollm2-135m has its own "
                                 "(pipelines/demo_presets.py)")
    DEMO_OPTIONS.add_to(group)
    for action in group._group_actions:  # only options given on the command line override the model's config
        action.default = argparse.SUPPRESS
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The model's demo configuration (:func:`config_for`) with the command line's values."""
    overrides = DEMO_OPTIONS.values(args)
    if args.sparsity is not None:
        overrides["sparsities"] = parse_sparsities(args.sparsity)
    if args.depth is not None:
        overrides["depth_methods"] = tuple(m.strip() for m in args.depth.split(",") if m.strip())
    if args.quantize is not None:
        overrides["quantize"] = tuple(q.strip() for q in args.quantize.split(",") if q.strip())
    return config_for(args.model, show_progress=not args.quiet, log_dir=Path(args.out) / "logs", **overrides)


def _log_to_file(log_dir: Path) -> Path:
    """Library INFO logs → ``log_dir/demo.log``; the terminal keeps warnings and errors only."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "demo.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    for h in root.handlers:
        h.setLevel(max(h.level, logging.WARNING))
    root.addHandler(handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
    return path


def _say(elapsed: float, message: str) -> None:
    print(f"[demo {elapsed:6.1f}s] {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    from layerif_plugins.pipelines.demo_report import write_report

    config = config_from_args(args)  # fails before any work
    prepare_out(config, args.out)  # refuses a directory that is not a demo's own, before the log file goes in
    log = _log_to_file(config.log_dir or Path(args.out) / "logs")
    _say(0.0, f"{config.title}: {len(config.tasks)} tasks, sparsities {list(config.sparsities)}, "
              f"allocations {list(config.allocations)}; logs in {log.parent}")
    result = run_demo(config, args.out, progress=_say)
    report = write_report(result)
    clock: StageClock = result.clock
    _say(clock.total, f"wrote {report} (total {clock.total:.1f} s)")
    return 0
