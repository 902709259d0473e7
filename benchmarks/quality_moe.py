"""Quality of per-layer LoRA-expert layouts at an equal total expert budget.

The model (SmolLM2-135M by default; ``--model stories260k`` for the 5-layer toy) is adapted
to Shakespeare, a text it is weak at, with the LoRA-MoE PEFT tuner
(:mod:`layerif_plugins.integrations.peft_moe`). Every layout gets the same budget ``T`` of
experts over the layers, the same rank, projections, steps, learning rate, batch order and
seeds; only where the experts sit differs:

* ``uniform``   — ``T / L`` per layer;
* ``mola-2468`` — MoLA's increasing layout, scaled to ``T``;
* ``alphalora`` — AlphaLoRA: Hill-α of each layer's weights (the ``alpha_hill`` scorer), their rounding;
* ``layerif``   — LayerIF scores of the model on the adaptation task's own train → validation
  split (``score_layers(model, "layerif", ...)``), docs/method.md §2a; ``layerif:1`` gives β = 1
  (a layout name ``NAME:β`` overrides ``--beta`` for that layout).

The Shakespeare speeches are split once (seeded) into disjoint train / validation (used only
for LayerIF scoring) / test parts. Reported: held-out mean token loss and perplexity on the
test part (padding excluded), mean ± sample std over the seeds; and the base model without
adapter. Every finished (layout, seed) run is appended to ``bench_out/quality_moe_<model>.jsonl``
and skipped on a rerun with the same sizes (resumable). Usage: ``python benchmarks/quality_moe.py``
(full) or ``--quick``; writes ``bench_out/quality_moe_<model>.md``.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from pathlib import Path

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402

# isort: split

import torch  # noqa: E402
from quality_pruning import append_row, model_tag, read_rows  # noqa: E402
from tqdm import tqdm  # noqa: E402

from layerif_plugins.data import Examples, pad_id_of, read_records  # noqa: E402
from layerif_plugins.engine import InfluenceConfig  # noqa: E402
from layerif_plugins.integrations.peft_moe.build import built_layout, get_moe_model, moe_layout  # noqa: E402
from layerif_plugins.io import atomic_write_json, atomic_write_text  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer, num_layers  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402
from layerif_plugins.scorers import SCORERS, ScoringData, score_layers  # noqa: E402
from layerif_plugins.training import TrainConfig, heldout_loss, train_adapter  # noqa: E402

LAYOUTS = ("uniform", "mola-2468", "alphalora", "layerif:1", "layerif:2.5")
SIZE_KEYS = ("budget", "r", "lora_alpha", "targets", "steps", "batch_size", "lr", "max_length", "n_train", "n_test",
             "n_score_train", "n_score_val")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir, llama2.c .bin or 'stories260k'")
    p.add_argument("--data", default=str(shared_data("tinyshakespeare", "input.txt")), help="adaptation task text")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--budget", type=int, default=60, help="total experts T over all layers")
    p.add_argument("--beta", type=float, default=2.5, help="β of a layout given without ':β'")
    p.add_argument("--r", type=int, default=4, help="rank of each expert")
    p.add_argument("--lora-alpha", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj,down_proj", help="projections that get experts")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--n-train", type=int, default=256, help="training examples")
    p.add_argument("--n-test", type=int, default=64, help="held-out test examples")
    p.add_argument("--n-score-train", type=int, default=32, help="LayerIF: train examples scored")
    p.add_argument("--n-score-val", type=int, default=16, help="LayerIF: validation examples")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 2 seeds, small splits")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.n_train, args.n_test = 5, 2, 32, 16
        args.n_score_train, args.n_score_val = 8, 4
    if args.model == "stories260k":
        args.model = str(stories260k_checkpoint())
    return args


def sizes(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SIZE_KEYS}


def layout_beta(name: str, default: float) -> tuple[str, float]:
    """``"layerif:1"`` → ``("layerif", 1.0)``; a name without ``:β`` takes ``default``."""
    base, _, beta = name.partition(":")
    return base, float(beta) if beta else default


def split_task(path: str, tok, args: argparse.Namespace, windows: bool = False) -> dict[str, Examples]:
    """Disjoint test / val (LayerIF scoring only) / train (/ tune) examples from one text file (seed 1234).

    One example per record (truncated to ``args.max_length``), or with ``windows`` every consecutive
    ``args.max_length``-token window of a record (section headings ``= … =`` dropped) — for a text with
    fewer records than examples wanted. Records are shuffled once and dealt to test, then validation, then
    train, then (when ``args.n_tune``) a tune part for choosing a learning rate, so a record never spans two
    parts; an example shorter than 8 tokens is dropped.
    """
    records = [r for r in read_records(path) if isinstance(r, str)
               and not (windows and r.strip().startswith("="))]
    order = list(range(len(records)))
    random.Random(1234).shuffle(order)
    sizes = {"test": args.n_test, "val": args.n_score_val, "train": args.n_train}
    if getattr(args, "n_tune", 0):  # dealt last, so the other parts stay what they were without it
        sizes["tune"] = args.n_tune
    unit = f"{args.max_length}-token windows" if windows else "examples"
    out: dict[str, Examples] = {}
    start = 0
    for name, size in sizes.items():
        ids: list[tuple[int, ...]] = []
        while len(ids) < size and start < len(order):
            enc = tok(records[order[start]], add_special_tokens=True, truncation=not windows,
                      max_length=None if windows else args.max_length)["input_ids"]
            start += 1
            step = args.max_length if windows else len(enc) or 1
            ids += [tuple(enc[i:i + args.max_length]) for i in range(0, len(enc), step)
                    if len(enc[i:i + args.max_length]) >= 8]
        if len(ids) < size:
            raise SystemExit(f"{path}: not enough {unit} for the {name} split ({len(ids)} < {size})")
        out[name] = Examples(tuple(ids[:size]), f"{path}:{name}")
    return out


def train(model, examples: Examples, pad: int, args: argparse.Namespace, seed: int) -> list[float]:
    """The package's one training loop (AdamW, linear decay, seeded batch order); the per-step losses."""
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         lr_scheduler="linear")
    return train_adapter(model, examples, pad, config, show_progress=False)["losses"]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    targets = [t for t in args.targets.split(",") if t]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    jsonl = out / f"quality_moe_{tag}.jsonl"
    rows = [r for r in read_rows(jsonl) if r.get("sizes") == sizes(args)]
    base, tok = load_model_and_tokenizer(args.model)
    pad = pad_id_of(tok)
    n_layers = num_layers(base)
    splits = split_task(args.data, tok, args)
    base_loss = heldout_loss(base, splits["test"], pad)

    scores = {}
    t0 = time.perf_counter()
    kinds = {layout_beta(name, args.beta)[0] for name in layouts}
    if "layerif" in kinds:
        data = ScoringData(train=splits["train"].subset(range(args.n_score_train)), val=splits["val"], pad_id=pad)
        scores["layerif"] = score_layers(base, "layerif", data, config=InfluenceConfig(batch_size=8,
                                                                                     show_progress=False))
    if "alphalora" in kinds:
        if "alpha_hill" not in SCORERS:
            print("alpha_hill scorer not available: skipping the alphalora layout")
            layouts.remove("alphalora")
        else:
            scores["alphalora"] = score_layers(base, "alpha_hill")
    score_time = time.perf_counter() - t0

    plan = {}
    for name in layouts:
        kind, beta = layout_beta(name, args.beta)
        plan[name] = moe_layout(base, kind, args.budget, scores=scores.get(kind), beta=beta)
    for name in layouts:
        for seed in range(args.seeds):
            if any(r["layout"] == name and r["seed"] == seed for r in rows):
                continue
            model, _ = load_model_and_tokenizer(args.model)
            torch.manual_seed(seed)
            pm = get_moe_model(model, plan[name], r=args.r, lora_alpha=args.lora_alpha, target_modules=targets)
            assert built_layout(pm) == (plan[name].experts, plan[name].top_k)
            trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
            t = time.perf_counter()
            losses = train(pm, splits["train"], pad, args, seed)
            wall = time.perf_counter() - t
            held = heldout_loss(pm, splits["test"], pad)
            row = {"layout": name, "seed": seed, "experts": plan[name].experts, "top_k": plan[name].top_k,
                   "trainable": trainable, "train_loss_last10": statistics.mean(losses[-10:]),
                   "test_loss": held["loss"], "test_ppl": held["perplexity"], "train_s": wall, "sizes": sizes(args)}
            append_row(jsonl, row)
            rows.append(row)
            tqdm.write(f"{name:10s} seed {seed}: test loss {held['loss']:.4f} ppl {held['perplexity']:.2f} "
                       f"({wall:.1f}s)")

    uniform = {x["seed"]: x["test_loss"] for x in rows if x["layout"] == "uniform"}
    table_rows = []
    for name in layouts:
        r = [x for x in rows if x["layout"] == name]
        if not r:
            continue
        paired = [x["test_loss"] - uniform[x["seed"]] for x in r if x["seed"] in uniform]
        table_rows.append([
            name, "-".join(map(str, r[0]["experts"])), "-".join(map(str, r[0]["top_k"])), f"{r[0]['trainable']:,}",
            mean_std([x["test_loss"] for x in r]), mean_std([x["test_ppl"] for x in r]),
            mean_std(paired) if paired and name != "uniform" else "-",
            mean_std([x["train_loss_last10"] for x in r]), len(r),
        ])
    table = markdown_table(
        ["layout", "experts / layer", "top-k / layer", "trainable params", "test loss", "test ppl",
         "Δ test loss vs uniform (same seed)", "train loss (last 10 steps)", "seeds"], table_rows)
    score_lines = "\n".join(f"- {k} scores ({v.method}): " + ", ".join(f"{s:.4g}" for s in v.scores)
                            for k, v in scores.items())
    text = (
        f"# LoRA-MoE expert layouts at an equal budget (`{args.model}` → {Path(args.data).parent.name})\n\n"
        f"Budget T = {args.budget} experts over {n_layers} layers, rank {args.r}, α {args.lora_alpha}, projections "
        f"{', '.join(targets)}, {args.steps} AdamW steps (lr {args.lr}, linear decay), batch {args.batch_size} × ≤ "
        f"{args.max_length} tokens, {len(splits['train'])} training speeches, test on {len(splits['test'])} "
        f"held-out speeches ({base_loss['tokens']} tokens). Mean ± std over seeds 0..{args.seeds - 1} "
        "(seed = adapter init + batch order).\n\n"
        f"Base model without adapter: test loss {base_loss['loss']:.4f}, ppl {base_loss['perplexity']:.2f}.\n\n"
        f"{table}\n\n{score_lines}\n\nScoring time (LayerIF on {args.n_score_train} train / {args.n_score_val} "
        f"val + Hill α): {score_time:.1f} s. Command: `python benchmarks/quality_moe.py {' '.join(sys.argv[1:])}`.\n"
    )
    atomic_write_text(out / f"quality_moe_{tag}.md", text)
    atomic_write_json(out / f"quality_moe_{tag}.json", {"args": vars(args), "base": base_loss, "rows": rows,
                                                         "scores": {k: v.scores for k, v in scores.items()}})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
