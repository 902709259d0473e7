"""Speed and memory of the LayerIF engine (four-pass and one-pass) vs a plain fwd+bwd and the published loop.

For every model, sequence length T and train-set size n (m = n / 4 validation examples unless
``--m``), one fresh subprocess loads the model and the data and times, *alternately in that
process* (best of ``--repeats``), so that the ratios are measured under the same conditions:

* ``fwd+bwd``: one plain batched forward+backward with every weight gradient over the same
  n + m examples (the unit of "how many training passes does scoring cost");
* the engine in each ``--modes`` mode (``four-pass``: 3 model passes over the train set;
  ``one-pass``: 1, holding the per-example factors in memory);

and reports seconds, the ratio to fwd+bwd, tokens/s (train + validation tokens / s), the peak
RSS of each phase (Linux ``VmHWM``, reset before each phase; CUDA: ``max_memory_allocated``).
``--batch-size auto`` lets the engine choose the batch from free memory (CUDA;
:mod:`layerif_plugins.engine.autobatch`) and runs fwd+bwd and every mode with that batch;
``--stats-precision`` selects ``InfluenceConfig.stats_precision``. A failed cell is reported and
the others still run (exit status 1 at the end).

``--load-rows`` adds rows under a synthetic competing load (``--load-procs`` busy-loop
processes started and stopped by this script): without the thread defaults (the user's
environment: OpenMP's default wait policy) and with them
(:func:`layerif_plugins.engine.threads.threads_env`: ``OMP_WAIT_POLICY=PASSIVE``), next to
the same cell on an idle machine.

``--reference`` times the published code's loop structure (one forward+backward per example
*per layer*, flattened gradients, per-pair maths in Python loops) on a subset
(``--ref-examples`` × ``--ref-layers``, ``--ref-pairs`` pairs) and scales it linearly.

Models: ``smollm2-135m`` (the catalogue's real SmolLM2-135M when fetched, else ``--model-path``,
else a config-built random-weight model of its shape), ``stories260k`` (shared), ``llama32x256``,
``qwen05b``, ``qwen15b`` and ``llama8b`` (config-built random weights: timing only; the shapes of
Qwen2-0.5B, Qwen2-1.5B and Llama-3-8B, built in ``--dtype`` directly on ``--device``). Data: TinyStories
from the shared assets tokenized by the model's tokenizer (the stories260K one for config-built
models), or, with ``--data synthetic`` / when the assets are absent, seeded random token ids.

Usage: ``python benchmarks/engine.py --models smollm2-135m --ns 64 --lengths 128`` (CPU);
``--quick`` (stories260K, n = 32, T = 128); on a GPU: ``--device cuda --dtype bfloat16``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from layerif_plugins.data import Examples, batches, load_examples  # noqa: E402
from layerif_plugins.engine import InfluenceConfig, compute_influence  # noqa: E402
from layerif_plugins.engine.loss import per_example_loss  # noqa: E402
from layerif_plugins.engine.passes import batch_size_for  # noqa: E402
from layerif_plugins.engine.reference import _influence_one_weight, reference_influence  # noqa: E402
from layerif_plugins.engine.stats import PRECISIONS  # noqa: E402
from layerif_plugins.engine.threads import available_cpus, threads_env  # noqa: E402
from layerif_plugins.models import block_linears, load_model_and_tokenizer  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402

# config-built shapes (random weights: timing only)
SHAPES: dict[str, dict[str, Any]] = {
    "llama32x256": dict(arch="llama", vocab_size=512, hidden_size=256, intermediate_size=608, num_hidden_layers=32,
                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "qwen05b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_theta=1000000.0),
    "qwen15b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_theta=1000000.0),
    "llama8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                    rope_theta=500000.0),
}
MODEL_NAMES = ("smollm2-135m", "stories260k", "llama32x256", "qwen05b", "qwen15b", "llama8b")


def _stories_tokenizer():
    return load_model_and_tokenizer(stories260k_checkpoint())[1] if stories260k_checkpoint().is_file() else None


def config_built(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A random-weight model of ``SHAPES[name]`` (seeded), built in ``dtype`` directly on ``device`` (an 8B
    shape in bf16 never exists in fp32 or on the host), and the stories260K tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    arch = shape.pop("arch")
    torch.manual_seed(0)
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    with torch.device(device):
        model = model_cls._from_config(cfg_cls(max_position_embeddings=4096, **shape), dtype=dtype)
    return model.eval(), _stories_tokenizer(), "config-built, random weights"


def build_model(name: str, model_path: str | None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None, provenance)``."""
    if name == "stories260k":
        model, tok = load_model_and_tokenizer(stories260k_checkpoint())
        return model, tok, "shared stories260K"
    if name == "smollm2-135m":
        path = model_path
        if path is None:
            try:
                from layerif_plugins.models.catalogue import get_entry, local_path

                found = local_path(get_entry("smollm2-135m"))
                path = str(found) if found is not None else None
            except ImportError:
                path = None
        if path is not None:
            model, tok = load_model_and_tokenizer(path)
            return model.eval(), tok, f"real weights ({path})"
    return config_built(name, device, dtype)


def load_task(tok, vocab: int, n: int, m: int, length: int, data: str) -> tuple[Examples, Examples, str]:
    """TinyStories (``data="tinystories"``, or ``"auto"`` when the assets and a tokenizer exist) or random ids."""
    have = tok is not None and shared_data("tinystories", "train.txt").is_file()
    if data == "tinystories" or (data == "auto" and have):
        train = load_examples(shared_data("tinystories", "train.txt"), tok, max_length=length, n=n)
        val = load_examples(shared_data("tinystories", "valid.txt"), tok, max_length=length, n=m)
        return train, val, "TinyStories"
    g = torch.Generator().manual_seed(0)
    hi = min(vocab, 32000)

    def rand(k: int) -> Examples:
        return Examples(tuple(tuple(torch.randint(1, hi, (length,), generator=g).tolist()) for _ in range(k)),
                        "synthetic")

    return rand(n), rand(m), "synthetic ids"


# ----------------------------------------------------------------------------- peak memory


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(work, device: torch.device) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of this process (robust to other processes on a shared machine), peak MB."""
    reset_peak(device)
    t0, c0 = time.perf_counter(), time.process_time()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, time.process_time() - c0, peak_mb(device)


# ----------------------------------------------------------------------------- one cell (own process)


def plain_fwd_bwd(model, examples: Examples, batch_size: int, device: torch.device) -> None:
    """The unit of every ratio: a plain training step's forward and backward (weight gradients formed, then
    dropped) over ``examples`` in batches of ``batch_size``."""
    for batch in batches(examples, batch_size, 0):
        batch = batch.to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        per_example_loss(logits, batch.labels).sum().backward()
    model.zero_grad(set_to_none=True)


def cell(a: argparse.Namespace) -> dict[str, Any]:
    """Time fwd+bwd and every engine mode alternately in this process; best of ``repeats``."""
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    model, tok, provenance = build_model(a.model, a.model_path, a.device, dtype)
    model = model.to(device=device, dtype=dtype)
    train, val, data = load_task(tok, model.config.vocab_size, a.n, a.m, a.length, a.data)
    both = Examples(train.input_ids + val.input_ids)
    modes = a.modes.split(",")

    def config(mode: str, batch_size: int, auto: bool = False) -> InfluenceConfig:
        return InfluenceConfig(params=a.params, batch_size=batch_size, auto_batch_size=auto, mode=mode,
                               show_progress=False, max_factor_memory=a.max_factor_memory,
                               stats_precision=a.stats_precision)

    # --batch-size auto: the engine's own choice (for the first mode) is used by fwd+bwd and every mode alike,
    # so that all of them run the same batches
    batch_size = (batch_size_for(model, train, val, 0, config(modes[0], 8, auto=True)) if a.batch_size == "auto"
                  else int(a.batch_size))

    def fwdbwd() -> None:
        plain_fwd_bwd(model, both, batch_size, device)

    extra: dict[str, dict[str, Any]] = {}

    def engine(mode: str):
        cfg = config(mode, batch_size)

        def work() -> None:
            res = compute_influence(model, train, val, 0, cfg)
            extra[mode] = {"model_batches": res.model_batches, "factor_gb": res.factor_bytes / 1e9}

        return work

    works = {"fwd+bwd": fwdbwd, **{mode: engine(mode) for mode in modes}}
    best: dict[str, list[float]] = {}
    for _ in range(max(1, a.repeats)):
        for name, work in works.items():
            sec, cpu, peak = timed(work, device)
            old = best.get(name)
            best[name] = [min(sec, old[0]), max(peak, old[1]), min(cpu, old[2])] if old else [sec, peak, cpu]
    out: dict[str, Any] = {"provenance": provenance, "data": data, "tokens": both.num_tokens,
                           "threads": torch.get_num_threads(), "batch_size": batch_size,
                           "stats_precision": a.stats_precision,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "n_params": sum(p.numel() for p in model.parameters()),
                           "results": {k: {"seconds": v[0], "peak_mb": v[1], "cpu_seconds": v[2], **extra.get(k, {})}
                                       for k, v in best.items()}}
    if a.reference:
        out["reference"] = reference_cell(model, train, val, a)
    return out


def reference_cell(model, train: Examples, val: Examples, a: argparse.Namespace) -> dict[str, Any]:
    """The published loop structure on a subset, scaled linearly to n, m and all layers."""
    n_layers = model.config.num_hidden_layers
    layers = list(range(min(a.ref_layers, n_layers)))
    sub_train = train.subset(range(min(a.ref_examples, len(train))))
    sub_val = val.subset(range(min(max(1, a.ref_examples // 2), len(val))))
    t0 = time.perf_counter()
    reference_influence(model, sub_train, sub_val, params=a.params, per_layer_passes=True, layers=layers)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    per_pass = (time.perf_counter() - t0) / ((len(sub_train) + len(sub_val)) * len(layers))
    numel = sum(t.module.weight.numel() for t in block_linears(model, a.params) if t.layer == 0)
    g, v = torch.randn(a.ref_pairs, numel), torch.randn(1, numel)
    t0 = time.perf_counter()
    _influence_one_weight(g, v, 0.1, python_loops=True)
    per_pair = (time.perf_counter() - t0) / a.ref_pairs
    seconds = per_pass * (len(train) + len(val)) * n_layers + per_pair * len(train) * len(val) * n_layers
    return {"seconds": seconds, "measured": f"{len(sub_train)}+{len(sub_val)} ex × {len(layers)} layers, "
                                            f"{a.ref_pairs} pairs"}


# ----------------------------------------------------------------------------- driver


def run_cell(model: str, n: int, m: int, length: int, a: argparse.Namespace, env: dict[str, str],
             reference: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_cell", "--model", model, "--n", str(n), "--m", str(m),
           "--lengths", str(length), "--repeats", str(a.repeats), "--batch-size", str(a.batch_size),
           "--params", a.params, "--modes", a.modes, "--device", a.device, "--dtype", a.dtype, "--data", a.data,
           "--stats-precision", a.stats_precision,
           "--ref-examples", str(a.ref_examples), "--ref-layers", str(a.ref_layers),
           "--ref-pairs", str(a.ref_pairs)]
    if a.model_path:
        cmd += ["--model-path", a.model_path]
    if a.max_factor_memory:
        cmd += ["--max-factor-memory", a.max_factor_memory]
    if reference:
        cmd.append("--reference")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise CellFailed(f"cell {model} n={n} T={length} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


class CellFailed(RuntimeError):
    """A cell's subprocess exited non-zero (its stderr tail is the message)."""


class BusyLoad:
    """``procs`` busy-loop Python processes competing for the CPUs, started and stopped by us."""

    def __init__(self, procs: int):
        self.procs = procs
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> BusyLoad:
        for _ in range(self.procs):
            self.children.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait(timeout=10)


def rows_of(res: dict[str, Any], label: str, n: int, length: int) -> list[list[Any]]:
    results = res["results"]
    fb, fb_cpu = results["fwd+bwd"]["seconds"], results["fwd+bwd"]["cpu_seconds"]
    rows = []
    for mode, r in results.items():
        rows.append([label, mode, n, length, res.get("batch_size", ""), r["seconds"], fb, r["seconds"] / fb,
                     r["cpu_seconds"] / fb_cpu,
                     res["tokens"] / r["seconds"], r["peak_mb"], r.get("model_batches", ""),
                     f"{r['factor_gb']:.2f}" if "factor_gb" in r else ""])
    return rows


HEADER = ["condition", "mode", "n", "T", "batch", "s", "fwd+bwd s", "ratio to fwd+bwd", "CPU-time ratio", "tokens/s",
          "peak MB",
          "model batches", "factors GB"]


def batch_size_arg(text: str) -> int | str:
    """``auto`` or a whole number >= 1 (``--batch-size``)."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size (a whole number >= 1, or auto)")
    return int(text)


def uptime() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="stories260k, n = 32, T = 128 (a smoke run)")
    p.add_argument("--models", default="smollm2-135m,stories260k,llama32x256", help=f"from {MODEL_NAMES}")
    p.add_argument("--model-path", default=None, help="HF directory for smollm2-135m (else catalogue / config)")
    p.add_argument("--ns", default="32,64,128")
    p.add_argument("--lengths", default="128,256")
    p.add_argument("--m", type=int, default=None, help="validation examples (default n/4, at least 8)")
    p.add_argument("--modes", default="four-pass,one-pass")
    p.add_argument("--max-factor-memory", default=None,
                   help="one-pass budget (default: the engine's, CPU: available memory less a reserve)")
    p.add_argument("--batch-size", type=batch_size_arg, default=8,
                   help="examples per batch, or auto (CUDA: the engine's choice from free memory, used by fwd+bwd "
                        "and every mode alike; CPU: 8)")
    p.add_argument("--stats-precision", default="fp32", choices=list(PRECISIONS),
                   help="InfluenceConfig.stats_precision (tf32: CUDA only)")
    p.add_argument("--params", default="attn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--data", default="auto", choices=["auto", "tinystories", "synthetic"])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: available CPUs)")
    p.add_argument("--repeats", type=int, default=1, help="best-of-R, timed alternately in one process")
    p.add_argument("--load-rows", action="store_true", help="add rows under a synthetic competing load")
    p.add_argument("--load-procs", type=int, default=None, help="busy-loop processes (default: available CPUs)")
    p.add_argument("--load-n", type=int, default=16, help="n of the load rows (first model, first T)")
    p.add_argument("--reference", action="store_true", help="time the published loop structure, scaled")
    p.add_argument("--ref-examples", type=int, default=4)
    p.add_argument("--ref-layers", type=int, default=2)
    p.add_argument("--ref-pairs", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "bench_out" / "engine.md"))
    p.add_argument("--_cell", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._cell:
        a.length = int(a.lengths)
        print(json.dumps(cell(a)))
        return
    models = ["stories260k"] if a.quick else [x.strip().lower() for x in a.models.split(",")]
    bad = [x for x in models if x not in MODEL_NAMES]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; choose from {MODEL_NAMES}")
    ns = [32] if a.quick else [int(x) for x in a.ns.split(",")]
    lengths = [128] if a.quick else [int(x) for x in a.lengths.split(",")]
    cpus = available_cpus()
    env_defaults = threads_env(a.threads or cpus, "PASSIVE")
    sections = [f"# LayerIF engine benchmark\n\n{time.strftime('%Y-%m-%d %H:%M')} UTC, device {a.device} "
                f"({a.dtype}), params={a.params}, batch size {a.batch_size}, statistics {a.stats_precision}, "
                f"m = n/4 validation examples (at least 8) unless --m, best of {a.repeats}; `ratio` = engine s / "
                "plain batched fwd+bwd s over the same n + m examples, timed alternately in one process; "
                "`CPU-time ratio` = the same with this process's CPU seconds (robust to other load on a shared "
                "machine). Thread defaults: "
                f"OMP_WAIT_POLICY=PASSIVE, {a.threads or cpus} intra-op threads.\n"]
    failed = 0
    for model in models:
        rows, notes, res = [], [], None
        for length in lengths:
            for n in ns:
                m = a.m or max(8, n // 4)
                before = uptime()
                try:
                    res = run_cell(model, n, m, length, a, env_defaults,
                                   reference=a.reference and n == ns[-1])
                except CellFailed as exc:  # the other cells still run; the exit status says that one failed
                    failed += 1
                    print(exc, file=sys.stderr, flush=True)
                    notes.append(f"n={n} T={length}: FAILED ({str(exc).strip().splitlines()[-1][:200]})")
                    continue
                rows += rows_of(res, "no added load", n, length)
                if "reference" in res:
                    ref = res["reference"]
                    rows.append(["no added load", "published loop (scaled)", n, length, "", ref["seconds"],
                                 res["results"]["fwd+bwd"]["seconds"],
                                 ref["seconds"] / res["results"]["fwd+bwd"]["seconds"], "",
                                 res["tokens"] / ref["seconds"], "", "", ""])
                    notes.append(f"published loop measured on {ref['measured']} (n={n}, T={length}), scaled")
                notes.append(f"n={n} T={length}: {before} before, {uptime()} after")
                print(markdown_table(HEADER, rows[-3:]), flush=True)
        info = (f"{res['provenance']}, {res['n_params'] / 1e6:.1f}M parameters, {res['data']}, "
                f"{res['threads']} threads, {res['device']}") if res else "every cell failed"
        sections.append(f"## {model} ({info})\n\n" + markdown_table(HEADER, rows) + "\n\n"
                        + "\n".join(f"- {x}" for x in notes) + "\n")
    if a.load_rows:
        sections.append(load_section(models[0], lengths[0], a, cpus, env_defaults))
    text = "\n".join(sections)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if failed:
        raise SystemExit(f"{failed} cell(s) failed (see above and {out})")


def load_section(model: str, length: int, a: argparse.Namespace, cpus: int, env_defaults: dict[str, str]) -> str:
    """Idle vs under a busy-loop load, without and with the thread defaults (same cell, same n)."""
    n, m = a.load_n, a.m or max(8, a.load_n // 4)
    procs = a.load_procs or cpus
    plain_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    rows: list[list[Any]] = []
    notes = []
    rows += rows_of(run_cell(model, n, m, length, a, env_defaults), "idle, defaults", n, length)
    notes.append(f"idle: {uptime()}")
    with BusyLoad(procs):
        rows += rows_of(run_cell(model, n, m, length, a, plain_env), "load, no defaults", n, length)
        notes.append(f"load, no defaults: {uptime()}")
        rows += rows_of(run_cell(model, n, m, length, a, env_defaults), "load, defaults", n, length)
        notes.append(f"load, defaults: {uptime()}")
    return (f"## Under a competing load: {model}, {procs} busy-loop processes on {cpus} CPUs\n\n"
            "`no defaults` = the user's environment (OpenMP's default wait policy, torch's default threads); "
            "`defaults` = `threads_env()`: OMP_WAIT_POLICY=PASSIVE.\n\n"
            + markdown_table(HEADER, rows) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n")


if __name__ == "__main__":
    main()
