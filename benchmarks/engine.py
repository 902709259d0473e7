"""Speed and memory of the LayerIF engine vs the published code's loop structure.

Prints (and writes to bench_out/engine.md) a table per model: for n train examples and m
validation examples,

* ``engine s``: the fast engine (4 batched passes, all layers at once);
* ``reference s``: the published code's cost structure - one forward+backward per example
  *per layer*, gradients flattened to CPU, per-pair maths in Python loops - measured on a
  subset (``--ref-examples`` examples × ``--ref-layers`` layers and ``--ref-pairs`` pairs)
  and scaled linearly to n, m and all layers (marked "scaled");
* ``fwd+bwd s``: one plain batched forward+backward (all parameter gradients) over the same
  n + m examples - the unit of "how many training passes does scoring cost";
* peak RSS of the process that ran the engine (each cell runs in its own subprocess).

Timings are the best of ``--repeats`` runs (1 run for the deep model above n = 64).
Usage: ``python benchmarks/engine.py`` (full), ``--quick`` (small n, for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerif_plugins.data import Examples, batches, load_examples  # noqa: E402
from layerif_plugins.engine import InfluenceConfig, compute_influence  # noqa: E402
from layerif_plugins.engine.loss import per_example_loss  # noqa: E402
from layerif_plugins.engine.reference import _influence_one_weight, reference_influence  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402


def build_model(name: str):
    if name == "stories260K":
        model, tok = load_model_and_tokenizer(stories260k_checkpoint())
        return model, tok
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = load_model_and_tokenizer(stories260k_checkpoint())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=608, num_hidden_layers=32,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tok


def load_task(tok, n: int, m: int, length: int) -> tuple[Examples, Examples]:
    train = load_examples(shared_data("tinystories", "train.txt"), tok, max_length=length, n=n)
    val = load_examples(shared_data("tinystories", "valid.txt"), tok, max_length=length, n=m)
    return train, val


def best_of(work, repeats: int) -> float:
    """Minimum wall time of ``repeats`` runs (the least disturbed by other processes)."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cell(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    torch.set_num_threads(args.threads)
    model, tok = build_model(args.model)
    train, val = load_task(tok, args.n, args.m, args.length)
    base = peak_rss_mb()
    out: dict = {"base_rss_mb": base}
    if args.what == "engine":
        cfg = InfluenceConfig(params=args.params, batch_size=args.batch_size, show_progress=False)

        def work() -> None:
            compute_influence(model, train, val, 0, cfg)

        out["seconds"] = best_of(work, args.repeats)
    elif args.what == "fwdbwd":
        both = Examples(train.input_ids + val.input_ids)

        def work() -> None:
            for batch in batches(both, args.batch_size, 0):
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                per_example_loss(logits, batch.labels).sum().backward()

        out["seconds"] = best_of(work, args.repeats)
    else:  # reference loop on a subset, scaled
        layers = list(range(min(args.ref_layers, model.config.num_hidden_layers)))
        sub_train = train.subset(range(min(args.ref_examples, len(train))))
        sub_val = val.subset(range(min(max(1, args.ref_examples // 2), len(val))))
        t0 = time.perf_counter()
        reference_influence(model, sub_train, sub_val, params=args.params, per_layer_passes=True, layers=layers)
        passes = time.perf_counter() - t0  # includes its (vectorised) maths; dominated by the passes
        per_pass = passes / ((len(sub_train) + len(sub_val)) * len(layers))
        # per-pair python-loop maths, timed on a few pairs of real-size gradient vectors for one layer
        numel = sum(m.weight.numel() for m in model.model.layers[0].self_attn.children()
                    if isinstance(m, torch.nn.Linear))
        k = args.ref_pairs
        g, v = torch.randn(k, numel), torch.randn(1, numel)
        t0 = time.perf_counter()
        _influence_one_weight(g, v, 0.1, python_loops=True)
        per_pair = (time.perf_counter() - t0) / k
        n_layers = model.config.num_hidden_layers
        out["seconds"] = per_pass * (args.n + args.m) * n_layers + per_pair * args.n * args.m * n_layers
        out["measured"] = f"{len(sub_train)}+{len(sub_val)} ex × {len(layers)} layers, {k} pairs"
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_cell(what: str, model: str, n: int, m: int, a: argparse.Namespace) -> dict:
    repeats = a.repeats if model == "stories260K" or n <= 64 else 1
    cmd = [sys.executable, __file__, "--_cell", what, "--model", model, "--n", str(n), "--m", str(m),
           "--repeats", str(repeats),
           "--length", str(a.length), "--batch-size", str(a.batch_size), "--params", a.params,
           "--threads", str(a.threads), "--ref-examples", str(a.ref_examples), "--ref-layers", str(a.ref_layers),
           "--ref-pairs", str(a.ref_pairs)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"cell {what} {model} n={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="n = 32 only, small reference subset")
    p.add_argument("--models", default="stories260K,llama32x256")
    p.add_argument("--ns", default="32,64,128,256")
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--params", default="attn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ref-examples", type=int, default=8)
    p.add_argument("--ref-layers", type=int, default=2)
    p.add_argument("--ref-pairs", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="best-of-R timing (deep model: R=1 above n=64)")
    p.add_argument("--out", default=str(REPO / "bench_out" / "engine.md"))
    p.add_argument("--_cell", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._cell:
        a.what = a._cell
        print(json.dumps(cell(a)))
        return
    ns = [32] if a.quick else [int(x) for x in a.ns.split(",")]
    if a.quick:
        a.ref_examples, a.ref_pairs = 4, 16
    sections = [f"# LayerIF engine benchmark\n\nCPU threads {a.threads}, params={a.params}, {a.length}-token "
                f"TinyStories examples, m={a.m} validation examples, batch size {a.batch_size}. Reference = the "
                "published code's loop structure, measured on a subset and scaled (see 'reference measured on').\n"]
    for model in a.models.split(","):
        rows = []
        for n in ns:
            eng = run_cell("engine", model, n, a.m, a)
            ref = run_cell("reference", model, n, a.m, a)
            fb = run_cell("fwdbwd", model, n, a.m, a)
            rows.append([n, a.m, eng["seconds"], ref["seconds"], ref["seconds"] / eng["seconds"], fb["seconds"],
                         eng["seconds"] / fb["seconds"], eng["peak_rss_mb"], fb["peak_rss_mb"], ref["measured"]])
            print(f"{model} n={n}: engine {eng['seconds']:.2f}s, reference (scaled) {ref['seconds']:.1f}s, "
                  f"fwd+bwd {fb['seconds']:.2f}s", flush=True)
        header = ["n", "m", "engine s", "reference s (scaled)", "speed-up", "fwd+bwd s", "engine / fwd+bwd",
                  "engine peak RSS MB", "fwd+bwd peak RSS MB", "reference measured on"]
        sections.append(f"## {model}\n\n" + markdown_table(header, rows) + "\n")
    text = "\n".join(sections)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
