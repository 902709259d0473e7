"""Data-parallel scaling of `layerif score` on CPU: 1 process vs 2 processes (torchrun, gloo).

Each row runs the real CLI end to end (model load included) on the same work and reports wall
seconds and the speed-up; the scores files of the runs are compared (max relative difference).
On this 2-core machine one process uses 2 intra-op threads and two processes use 1 each.

Usage: ``python benchmarks/engine_scale.py [--quick]``; writes bench_out/engine_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402


def build_deep_model(out: Path) -> Path:
    """A 32-layer, hidden-256 Llama (random weights: timing only) with the stories260K tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerif_plugins.models import load_model_and_tokenizer, save_model_dir

    _, tok = load_model_and_tokenizer(stories260k_checkpoint())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=608, num_hidden_layers=32,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    save_model_dir(LlamaForCausalLM(cfg), tok, out)
    return out


def run(model: str, nproc: int, n: int, m: int, length: int, out: Path) -> float:
    args = ["score", "--model", model, "--train", str(shared_data("tinystories", "train.txt")),
            "--val", str(shared_data("tinystories", "valid.txt")), "--n-train", str(n), "--n-val", str(m),
            "--max-length", str(length), "--batch-size", "16", "--quiet", "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))}
    if nproc == 1:
        cmd = [sys.executable, "-m", "layerif_plugins.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "layerif_plugins.cli", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench_out" / "engine_scale.md"))
    a = p.parse_args()
    work = REPO / "bench_out"
    work.mkdir(exist_ok=True)
    models = {"stories260K": str(stories260k_checkpoint())}
    if not a.quick:
        models["llama32x256"] = str(build_deep_model(work / "llama32x256"))
    n, m, length = (32, 16, 64) if a.quick else (128, 32, 128)
    rows = []
    for name, path in models.items():
        times, scores = {}, {}
        for nproc in (1, 2):
            out = work / f"scale_{name}_{nproc}.json"
            times[nproc] = run(path, nproc, n, m, length, out)
            scores[nproc] = json.loads(out.read_text())["scores"]
            print(f"{name} nproc={nproc}: {times[nproc]:.1f}s", flush=True)
        diff = max(abs(x - y) / abs(x) for x, y in zip(scores[1], scores[2], strict=True))
        rows.append([name, n, m, length, times[1], times[2], times[1] / times[2], diff])
    header = ["model", "n", "m", "T", "1 proc s", "2 procs s", "speed-up", "max rel. score diff"]
    text = ("# Data-parallel scaling on CPU (gloo)\n\nWall time of the whole `layerif score` command "
            "(model load and process start included), 2 cores.\n\n" + markdown_table(header, rows) + "\n")
    print(text)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
