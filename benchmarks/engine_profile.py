"""Where the engine's time goes next to a plain fwd+bwd: torch.profiler tables of both, after a warm-up.

``engine.py`` gives the ratio; this script says what fills the gap. On the H200 (2026-12-04, Qwen2-0.5B
shape, n 128, T 256, bf16 statistics) it showed a third of one-pass device time in dtype copies
(``aten::copy_``) and a seventh in einsum permutation clones (benchmarks/README.md), which is what the next
engine change targets. The same command on the device after such a change says whether it worked.

Usage (on the device, from the repo root)::

    python benchmarks/engine_profile.py --device cuda --dtype bfloat16 --model qwen05b --n 128 --length 256 \\
        --out bench_out/profile_qwen05b.md

On CPU (``--device cpu --dtype float32 --model stories260k``) it is a smoke run: the tables then hold CPU
time. The model and data are ``engine.py``'s (config-built random weights, synthetic ids: timing only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine as engine_bench  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from layerif_plugins.data import Examples  # noqa: E402
from layerif_plugins.engine import InfluenceConfig, compute_influence  # noqa: E402
from layerif_plugins.engine.passes import batch_size_for  # noqa: E402
from layerif_plugins.engine.stats import PRECISIONS  # noqa: E402

#: operators whose share of the profiled time the summary reports (the gap's suspects)
WATCHED = ("aten::copy_", "aten::clone", "aten::mm", "aten::bmm", "aten::mul")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen05b", help=f"from {engine_bench.MODEL_NAMES}")
    p.add_argument("--n", type=int, default=128, help="train examples (validation: n/4, at least 8)")
    p.add_argument("--length", type=int, default=256, help="tokens per example")
    p.add_argument("--mode", default="one-pass", choices=["one-pass", "four-pass"])
    p.add_argument("--batch-size", type=engine_bench.batch_size_arg, default="auto")
    p.add_argument("--stats-precision", default="bf16", choices=list(PRECISIONS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--rows", type=int, default=25, help="operators per table")
    p.add_argument("--out", default=str(REPO / "bench_out" / "engine_profile.md"))
    return p.parse_args(argv)


def profile_cell(a: argparse.Namespace) -> dict[str, Any]:
    """Warm both workloads, time each twice, then profile one run of each; times, shares and tables."""
    device = torch.device(a.device)
    model, tok, provenance = engine_bench.build_model(a.model, None, a.device, getattr(torch, a.dtype))
    model = model.to(device=device, dtype=getattr(torch, a.dtype))
    m = max(8, a.n // 4)
    train, val, data = engine_bench.load_task(tok, model.config.vocab_size, a.n, m, a.length, "synthetic")
    both = Examples(train.input_ids + val.input_ids)

    def config(batch_size: int, auto: bool = False) -> InfluenceConfig:
        return InfluenceConfig(params="attn", batch_size=batch_size, auto_batch_size=auto, mode=a.mode,
                               show_progress=False, stats_precision=a.stats_precision)

    batch_size = (batch_size_for(model, train, val, 0, config(8, auto=True)) if a.batch_size == "auto"
                  else int(a.batch_size))

    def fwdbwd() -> None:
        engine_bench.plain_fwd_bwd(model, both, batch_size, device)

    def influence() -> None:
        compute_influence(model, train, val, 0, config(batch_size))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    works = {"fwd+bwd": fwdbwd, a.mode: influence}
    seconds: dict[str, list[float]] = {}
    for name, work in works.items():
        work()
        sync()  # warm-up: cuBLAS handles, kernel selection, the allocator's pools
        seconds[name] = []
        for _ in range(2):
            t0 = time.perf_counter()
            work()
            sync()
            seconds[name].append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    self_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables: dict[str, str] = {}
    shares: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for name, work in works.items():
        with profile(activities=activities) as prof:
            work()
            sync()
        events = prof.key_averages()
        # the profiler's own total: on CUDA the kernels' rows (an operator's self device time is the time of
        # the kernels it launched, so summing operators and kernels would count it twice); on CPU every row
        counted = [e for e in events if device.type != "cuda" or e.device_type != DeviceType.CPU]
        total = sum(getattr(e, self_key) for e in counted)
        totals[name] = total / 1e3  # µs → ms
        shares[name] = {op: sum(getattr(e, self_key) for e in events if e.key == op) / max(total, 1e-9)
                        for op in WATCHED}
        tables[name] = events.table(sort_by=key, row_limit=a.rows, max_name_column_width=60)
    return {"provenance": provenance, "data": data, "batch_size": batch_size, "seconds": seconds,
            "profiled_ms": totals, "shares": shares, "tables": tables,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def report(a: argparse.Namespace, res: dict[str, Any]) -> str:
    """The markdown page: warm seconds, the watched operators' shares, then the profiler tables."""
    clock = "device" if a.device == "cuda" else "CPU"
    lines = [f"# Engine profile: {a.model}, n {a.n}, T {a.length}, {a.mode}",
             "",
             f"{res['device']} ({a.dtype}), {res['provenance']}, {res['data']}, batch {res['batch_size']}, "
             f"statistics {a.stats_precision}. Command: `python benchmarks/engine_profile.py "
             f"{' '.join(sys.argv[1:])}`",
             "",
             f"| workload | warm s (2 runs) | profiled self {clock} ms | "
             + " | ".join(f"{op} share" for op in WATCHED) + " |",
             "|---|---:|---:|" + "---:|" * len(WATCHED)]
    for name, secs in res["seconds"].items():
        share = " | ".join(f"{res['shares'][name][op]:.1%}" for op in WATCHED)
        lines.append(f"| {name} | {', '.join(f'{s:.3f}' for s in secs)} | {res['profiled_ms'][name]:.1f} | {share} |")
    for name, table in res["tables"].items():
        lines += ["", f"## {name} (sorted by total {clock} time)", "", "```", table.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    res = profile_cell(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = report(a, res)
    out.write_text(page, encoding="utf-8")
    print("\n".join(page.splitlines()[:8 + len(res["seconds"])]))
    print(f"wrote {out}")


if __name__ == "__main__":
    from layerif_plugins.engine.threads import reexec_with_wait_policy

    reexec_with_wait_policy()  # spinning OpenMP threads distort CPU timings under any other load
    main()
