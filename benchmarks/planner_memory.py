"""Peak memory of the allocation planner on CPU: its held-out forward with and without a graph, and its phases.

Why: a planner cell on SmolLM2-135M peaked at 8.0–9.4 GiB RSS (``/usr/bin/time -v``), sixteen times the
fp32 model. Two measurements, each in its own child process (in one process freed memory is reused by
the next measurement, which would understate it):

1. **Held-out forward, side by side.** One candidate's held-out losses (``example_token_losses``: the
   planner's held-out examples, batches of 16) on the model as llm-compressor loads it (its weights
   require gradients), with the autograd graph recorded (what the library did before 2026-12-07) and
   without (``torch.no_grad``, now): peak RSS above the loaded model, and the losses, which must be equal.
2. **The planner's phases.** One ``plan_pruning`` (``allocation: sensitivity``, a 3-level table, no
   moves), a sampler thread keeping the peak RSS of each phase: the candidates (a stock prune plus the
   held-out losses, weights restored), llm-compressor's calibration statistics, the table (its layer-input
   cache and single-layer prunes), and everything else (loading, scores, OWL's norms, saving).
3. **``prune_model`` in a loop.** Three calls in one process (a sweep, the retest of a planner cell): the
   RSS after each (garbage collected). Before 2026-12-07 every call left its model alive in torch.fx's
   wrap table (``integrations/llmcompressor/release.py``): the RSS grew by one model per call.

Usage: ``python benchmarks/planner_memory.py [--model smollm2-135m] [--algorithm sparsegpt] [--out DIR]``;
prints a markdown table and writes ``planner_memory_<model>.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
import bench_env  # noqa: E402,F401

# isort: split

import torch  # noqa: E402
from quality_peft import peak_memory_mib, reset_peak_memory  # noqa: E402

from layerif_plugins.io import atomic_write_text  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402

PHASES = {"make_evaluator": "candidates (stock prune + held-out losses)",
          "calibration_statistics": "calibration statistics (Hessians / row norms)",
          "measure_sensitivity": "sensitivity table (layer-input cache, single-layer prunes)"}
OTHER = "loading, scores, OWL norms, saving"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="stories260k", help="'stories260k', a catalogue name or an HF directory")
    p.add_argument("--algorithm", default="sparsegpt", choices=["wanda", "sparsegpt"])
    p.add_argument("--task", default="wikitext2", choices=["wikitext2", "tinystories"])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--max-length", type=int, default=16, help="calibration tokens per example (quality_pruning's)")
    p.add_argument("--n-holdout", type=int, default=32)
    p.add_argument("--holdout-length", type=int, default=128, help="tokens per held-out example (the planner cells')")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="directory for planner_memory_<model>.json / .md")
    p.add_argument("--probe", choices=["graph", "no-graph", "phases", "repeat"], default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calib", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status: this benchmark measures Linux process memory")


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The model directory and a calibration file (calibration, then held-out paragraphs) as a planner cell's."""
    import quality_pruning as qp

    from layerif_plugins.models import load_model_and_tokenizer, model_dir_for

    model_dir = model_dir_for(args.model, work)
    _, tok = load_model_and_tokenizer(model_dir)
    cell = qp.parse_args(["--model", args.model, "--quick"] if args.model == "stories260k" else ["--model", args.model])
    splits = qp.task_splits(args.task, tok, cell)
    calib = qp.calibration_file(work, args.task, splits["calib"], args.n_calib, 0, args.n_holdout)
    return model_dir, calib


def probe_forward(args: argparse.Namespace, model_dir: Path, calib: Path, graph: bool) -> dict[str, Any]:
    """Peak RSS of one candidate's held-out losses, with or without the autograd graph (child process)."""
    from layerif_plugins.data import load_examples
    from layerif_plugins.evaluation.perplexity import example_token_losses
    from layerif_plugins.integrations.llmcompressor.prune import _load_for_oneshot

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = _load_for_oneshot(model_dir, tmp)
    held = load_examples(calib, tok, max_length=args.holdout_length, n=args.n_calib + args.n_holdout)
    held = held.subset(range(args.n_calib, len(held)))
    requires_grad = all(p.requires_grad for p in model.parameters())
    fn = example_token_losses.__wrapped__ if graph else example_token_losses  # the body without torch.no_grad
    base = rss_mib()
    reset_peak_memory()
    t0 = time.perf_counter()
    with torch.enable_grad():
        sums, counts = fn(model, held, pad_id=0)
    seconds = time.perf_counter() - t0
    return {"graph": graph, "weights_require_grad": requires_grad, "base_mib": base,
            "peak_mib": peak_memory_mib(), "seconds": seconds, "sums": sums, "tokens": sum(counts)}


def probe_phases(args: argparse.Namespace, model_dir: Path, calib: Path, work: Path) -> dict[str, Any]:
    """One plan_pruning with the peak RSS of each phase, kept by a sampler thread (child process)."""
    from layerif_plugins.integrations.llmcompressor import planning
    from layerif_plugins.integrations.llmcompressor.prune import plan_pruning

    state: dict[str, Any] = {"phase": OTHER, "peaks": {}, "stop": False}

    def sample() -> None:
        while not state["stop"]:
            rss = rss_mib()
            state["peaks"][state["phase"]] = max(state["peaks"].get(state["phase"], 0.0), rss)
            time.sleep(0.05)

    def in_phase(label: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            before, state["phase"] = state["phase"], label
            try:
                return fn(*a, **k)
            finally:
                state["phase"] = before
        return run

    make_evaluator = planning.make_evaluator
    planning.make_evaluator = lambda *a, **k: in_phase(PHASES["make_evaluator"], make_evaluator(*a, **k))
    for name in ("calibration_statistics", "measure_sensitivity"):
        setattr(planning, name, in_phase(PHASES[name], getattr(planning, name)))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        plan = plan_pruning(model_dir, work / "plan.json", algorithm=args.algorithm, sparsity=0.5, calib=calib,
                            n_calib=args.n_calib, max_length=args.max_length, batch_size=16,
                            n_holdout=args.n_holdout, holdout_length=args.holdout_length, allocation="sensitivity",
                            sensitivity_levels=1, max_moves=0, overwrite=True, show_progress=False)
    finally:
        state["stop"] = True
        sampler.join()
    return {"peaks_mib": state["peaks"], "process_peak_mib": peak_memory_mib(), "seconds": time.perf_counter() - t0,
            "prunes": plan.cost["prunes"], "layer_prunes": plan.cost["layer_prunes"]}


def probe_repeat(args: argparse.Namespace, model_dir: Path, calib: Path, work: Path, calls: int = 3
                 ) -> dict[str, Any]:
    """RSS after each of ``calls`` stock-Wanda ``prune_model`` runs in one process (child process)."""
    import gc

    from layerif_plugins.integrations.llmcompressor import prune_model

    gc.collect()
    after = [rss_mib()]
    for _ in range(calls):
        prune_model(model_dir, work / "pruned", algorithm="wanda", sparsity=0.5, allocation="uniform", calib=calib,
                    n_calib=args.n_calib, max_length=args.max_length, batch_size=16, overwrite=True,
                    show_progress=False)
        gc.collect()
        after.append(rss_mib())
    return {"rss_after_mib": after}


def child(args: argparse.Namespace, probe: str, work: Path, model_dir: Path, calib: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--probe", probe, "--work", str(work), "--model-dir", str(model_dir),
           "--calib", str(calib), "--model", args.model,
           "--algorithm", args.algorithm, "--task", args.task, "--n-calib", str(args.n_calib),
           "--max-length", str(args.max_length), "--n-holdout", str(args.n_holdout),
           "--holdout-length", str(args.holdout_length), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {probe} probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args: argparse.Namespace, forward: list[dict[str, Any]], phases: dict[str, Any],
           repeat: dict[str, Any]) -> str:
    graph, plain = forward
    rows = [[("with the autograd graph (before 2026-12-07)" if r["graph"] else "without (torch.no_grad, now)"),
             f"{r['base_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['base_mib']:+.0f}",
             f"{r['seconds']:.1f}"] for r in forward]
    same = max(abs(a - b) for a, b in zip(graph["sums"], plain["sums"], strict=True))
    lines = [f"# Planner memory, {args.model} ({args.algorithm}, {args.task}, {args.threads} thread(s))", "",
             f"**One candidate's held-out losses** ({args.n_holdout} examples of ≤ {args.holdout_length} tokens, "
             f"{graph['tokens']} tokens, batches of 16; weights require grad: {graph['weights_require_grad']}; "
             "each in its own process; RSS in MiB):", "",
             markdown_table(["held-out forward", "model loaded", "peak", "peak − loaded", "seconds"], rows), "",
             f"Peak above the loaded model, with / without the graph: "
             f"{(graph['peak_mib'] - graph['base_mib']) / max(plain['peak_mib'] - plain['base_mib'], 1.0):.1f}×; "
             f"largest difference between the two runs' per-example losses: {same:.2e} nats.", "",
             f"**One `plan_pruning`** (allocation: sensitivity, 3 levels, no moves: {phases['prunes']} pruning passes "
             f"+ {phases['layer_prunes']} single-layer prunes, {phases['seconds'] / 60:.1f} min; process peak "
             f"{phases['process_peak_mib']:.0f} MiB):", "",
             markdown_table(["phase", "peak RSS (MiB)"],
                            [[k, f"{v:.0f}"] for k, v in sorted(phases["peaks_mib"].items(), key=lambda kv: -kv[1])]),
             "", "**`prune_model` three times in one process** (stock Wanda 50 %, uniform; RSS after each call, "
             "garbage collected, MiB): " + " → ".join(f"{v:.0f}" for v in repeat["rss_after_mib"]) + ".",
             "", f"Command: `python benchmarks/planner_memory.py --model {args.model} --algorithm {args.algorithm} "
             f"--task {args.task}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        work, model_dir, calib = Path(args.work), Path(args.model_dir), Path(args.calib)
        with contextlib.redirect_stdout(sys.stderr):  # host libraries' prints stay off the result line
            out = (probe_phases(args, model_dir, calib, work) if args.probe == "phases"
                   else probe_repeat(args, model_dir, calib, work) if args.probe == "repeat"
                   else probe_forward(args, model_dir, calib, graph=args.probe == "graph"))
        print(json.dumps(out))
        return 0
    with tempfile.TemporaryDirectory(prefix="planner-memory-") as tmp:
        model_dir, calib = prepare(args, Path(tmp))
        forward = [child(args, probe, Path(tmp), model_dir, calib) for probe in ("graph", "no-graph")]
        phases = child(args, "phases", Path(tmp), model_dir, calib)
        repeat = child(args, "repeat", Path(tmp), model_dir, calib)
    text = report(args, forward, phases, repeat)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = Path(args.model).name
        atomic_write_text(out / f"planner_memory_{tag}.md", text)
        atomic_write_text(out / f"planner_memory_{tag}.json",
                          json.dumps({"args": vars(args), "forward": forward, "phases": phases, "repeat": repeat},
                                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
