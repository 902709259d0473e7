"""Step time and memory of the LoRA-MoE tuner against plain LoRA at equal expert parameters, side by side.

Every config adapts the same projections of the same model; the LoRA-MoE configs split plain
LoRA's rank ``r`` per layer into ``n`` experts of rank ``r / n`` (so the experts hold exactly the
LoRA's parameters; the routers add ``n · d_in`` per module with ``n > 1`` — the table lists the
trainable count). One optimizer step = forward + backward + AdamW on a fixed batch.

The machine this runs on may be shared, so the configs are measured **interleaved**: round
``k`` times ``--steps`` steps of every config in turn, and the table reports each config's
median over the rounds, in wall time and in process CPU time (``time.process_time``: what the
step cost this process, however busy the other cores were), with the ratio to plain LoRA of
the same round. Peak memory: CUDA ``max_memory_allocated`` (reset per config); on CPU each
config is built and stepped once more in its own child process, whose peak RSS (``VmHWM``: base
model + adapter + AdamW state + activations) is reported — in one process freed memory is
reused by the next config, which would understate it (``--no-memory`` skips the children).

Usage: ``python benchmarks/peft_cost.py [--model stories260k|smollm2-135m|DIR] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
import bench_env  # noqa: E402,F401

# isort: split

import torch  # noqa: E402
from quality_peft import peak_memory_mib, reset_peak_memory  # noqa: E402

from layerif_plugins.allocate.experts import ExpertLayout  # noqa: E402
from layerif_plugins.integrations.peft_moe.build import get_moe_model  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer, num_layers  # noqa: E402
from layerif_plugins.paths import stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="stories260k", help="'stories260k', a catalogue name or an HF directory")
    p.add_argument("--r", type=int, default=8, help="plain LoRA rank = Σ expert ranks per module")
    p.add_argument("--experts", default="2,4,8", help="expert counts n of the LoRA-MoE configs (n divides r)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--targets", default="q_proj,v_proj,down_proj")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per config per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the per-config child processes")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # child: peak memory of one config
    args = p.parse_args(argv)
    if args.model == "stories260k":
        args.model = str(stories260k_checkpoint())
    return args


def configs(base: Any, args: argparse.Namespace) -> dict[str, Any]:
    """name → a function building a fresh trainable model of that config."""
    from peft import LoraConfig, get_peft_model

    targets = [t for t in args.targets.split(",") if t]
    n_layers = num_layers(base)

    def lora() -> Any:
        torch.manual_seed(0)
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=2 * args.r,
                                                              target_modules=targets, bias="none"))

    def moe(n: int) -> Any:
        def make() -> Any:
            torch.manual_seed(0)
            layout = ExpertLayout([n] * n_layers, [min(args.top_k, n)] * n_layers, "uniform")
            return get_moe_model(copy.deepcopy(base), layout, r=args.r // n, lora_alpha=2 * (args.r // n),
                                 target_modules=targets, router_aux_loss_coef=0.001)
        return make

    out: dict[str, Any] = {f"lora r={args.r}": lora}
    for n in (int(x) for x in args.experts.split(",") if x):
        if args.r % n:
            raise SystemExit(f"--experts {n} does not divide --r {args.r}")
        out[f"moe {n}×r{args.r // n} top-{min(args.top_k, n)}"] = moe(n)
    return out


def timed_steps(model: Any, opt: torch.optim.Optimizer, batch: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds per step (wall, process CPU) over ``steps`` forward + backward + AdamW steps."""
    sync = torch.cuda.synchronize if batch.is_cuda else (lambda: None)
    sync()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


def child_peak_mib(argv: list[str] | None, name: str) -> float | None:
    """Peak RSS of a child process that builds config ``name`` and runs the warm-up steps (CPU)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv), "--probe", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_MIB ")]
    return float(lines[-1].split()[1]) if proc.returncode == 0 and lines else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, _ = load_model_and_tokenizer(args.model, device=device)
    vocab = base.config.vocab_size
    batch = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = batch.to(device)
    builders = configs(base, args)
    if args.probe is not None:
        model = builders[args.probe]().to(device)
        model.train()
        timed_steps(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4), batch, 2)
        print(f"PEAK_MIB {peak_memory_mib()}")
        return 0
    models, opts, peaks, trainable = {}, {}, {}, {}
    for name, make in builders.items():
        reset_peak_memory()
        model = make().to(device)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        timed_steps(model, opt, batch, 2)  # warm-up: allocator, AdamW state
        peaks[name] = peak_memory_mib() if device == "cuda" else None
        models[name], opts[name] = model, opt
        trainable[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    ref = next(iter(models))
    for _ in range(args.rounds):
        for name in models:
            times[name].append(timed_steps(models[name], opts[name], batch, args.steps))
    if device == "cpu" and not args.no_memory:
        peaks = {name: child_peak_mib(argv, name) for name in models}
    rows = []
    for name in models:
        wall = [w for w, _ in times[name]]
        cpu = [c for _, c in times[name]]
        ratio_w = [w / rw for w, (rw, _) in zip(wall, times[ref], strict=True)]
        ratio_c = [c / rc for c, (_, rc) in zip(cpu, times[ref], strict=True)]
        rows.append([name, f"{trainable[name]:,}", f"{1000 * statistics.median(wall):.1f}",
                     f"{1000 * statistics.median(cpu):.1f}", f"{statistics.median(ratio_w):.2f}",
                     f"{statistics.median(ratio_c):.2f}",
                     f"{peaks[name]:.0f}" if peaks[name] is not None else "-"])
    print(f"`{args.model}` on {device}, batch {args.batch_size} × {args.seq_len} tokens, targets {args.targets}, "
          f"{args.rounds} interleaved rounds × {args.steps} steps, {args.threads} threads; medians over rounds\n")
    print(markdown_table(["config", "trainable", "wall ms/step", "CPU ms/step", "wall / LoRA", "CPU / LoRA",
                          "peak MiB"], rows))
    print(f"\nCommand: `python benchmarks/peft_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
