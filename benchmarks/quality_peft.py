"""Per-layer PEFT layouts at equal trainable parameters: stock LoRA, EVA, AdaLoRA, rank patterns, LoRA-MoE.

The model (SmolLM2-135M by default; ``--quick`` runs stories260K for a few steps) is adapted
to two texts it is weak at, with the same targets, steps, learning rate, batch order and seeds
for every method; only where the capacity sits differs:

* ``lora``              — stock ``LoraConfig(r)``, the uniform reference;
* ``eva``               — PEFT's EVA init (``EvaConfig(rho=2)``): data-driven SVD init and rank
  redistribution over the modules (same *total rank* as ``lora``; the parameter count moves
  with the modules the ranks go to — reported). Its SVD state depends only on the base model and
  the data, so it is computed once per task (``--eva-batches`` training batches) and shared by
  the seeds; its time is the ``init_s`` of the first seed's row;
* ``adalora``           — PEFT's AdaLoRA, ``init_r = 1.5 r`` pruned to an average ``target_r = r``
  over the run (its final rank budget equals ``lora``'s; it allocates ``1.5×`` while training —
  reported), ``update_and_allocate`` after every optimizer step;
* ``lora-<scores>``     — stock ``LoraConfig`` with a per-layer ``rank_pattern`` / ``alpha_pattern``
  from :func:`layerif_plugins.integrations.peft_lora.lora_layout_config` at exactly ``lora``'s
  parameter count: ``layerif`` (scores of the model on the task's own train → validation
  split), ``layerif-inv`` (the same scores, ``invert=True``: more rank to the better-trained
  layers), ``alpha_hill`` (AlphaPruning / AlphaLoRA's Hill α), ``depth_ramp`` (score = layer index);
* ``moe-<layout>``      — the LoRA-MoE tuner (:mod:`layerif_plugins.integrations.peft_moe`) with
  as many experts of rank ``expert_r`` as fit in ``lora``'s trainable parameters, routers included
  (``moe_layout_for_params``: a router adds ``n · d_in`` per routed module, so a layout with many
  routed layers gets fewer experts; each row reports its count): ``uniform``, ``mola-2468``,
  ``alphalora``, ``layerif:1``, ``layerif:2.5`` (β after the colon);
* a method name ending in ``@other`` uses the LayerIF scores computed on the *other* task (control).

Tasks (``--tasks``): ``shakespeare`` (``../shared/data/tinyshakespeare/input.txt``, one speech per
example) and ``wikitext2`` (``../shared/data/wikitext-2/valid.txt``, Wikipedia paragraphs cut into
``--max-length`` token windows — its 794 paragraphs are fewer than one epoch of examples; the only split
of WikiText-2 besides ``test.txt`` that is shared here, so it is split like Shakespeare). Each text is
split once (seed 1234) into disjoint train / validation (LayerIF scoring only) / test parts; a
paragraph never spans two parts.

Reported per (task, method): held-out mean token loss and perplexity on the test part after the
run, mean ± sample std over the seeds; paired differences (same seed) against ``lora`` and ``eva``
with standard errors (std / √seeds); the held-out loss curve (every ``--eval-every`` steps);
trainable parameters; training step time (wall and CPU, the held-out evaluations excluded); peak
memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS ``VmHWM``, reset before each
cell through ``/proc/self/clear_refs``, base model included). Every finished (task, method, seed)
is appended to ``bench_out/quality_peft_<model>.jsonl`` and skipped on a rerun with the same
sizes (resumable). Training is :func:`layerif_plugins.training.train_adapter` (the package's one
loop); the curve and AdaLoRA's schedule hook into it as HF Trainer callbacks.

Usage: ``python benchmarks/quality_peft.py --model smollm2-135m`` (full: 300 steps × 3 seeds × 2
tasks × 13 methods = 78 cells), ``--quick`` (stories260K, a smoke run of every method, ≈ 2.5 min on
2 loaded cores); writes ``bench_out/quality_peft_<model>.md`` / ``.json`` (with ``--lr-from-tune``:
``bench_out/quality_peft_<model>_tuned.md``); ``--report`` writes the reports from the finished rows
alone. Learning rates:
``--tune-lr 1e-3,3e-3,1e-2`` trains every method at each rate and scores a *tune* part dealt after the
training part (the test part unread); then ``--lr-from-tune`` runs the test grid with each method at the
rate its search chose on each task (rank patterns and EVA take uniform LoRA's when they were not searched,
LoRA-MoE layouts ``moe-uniform``'s) — every method at its best, chosen without the test part.

Sizing (the defaults: batch 4 × ≤ 32 tokens, 300 steps, held-out loss every 50): one SmolLM2 step of
LoRA r 8 on q/v/down is 0.95–1.0 s with one thread (two such processes side by side on the 2 cores;
1.8 s at 64 tokens), so a cell (300 steps, 7 evaluations, building the adapter) is ≈ 5.5 minutes and
two processes of ``--threads 1`` with disjoint ``--methods`` run the 78-cell grid in ≈ 3.6 hours (the
66 cells without the ``@other`` controls in ≈ 3 hours; measured 2026-12-05). Two one-thread processes
train ≈ 1.3–1.5× more cells per hour than one of 2 threads (small GEMMs do not use 2 threads fully);
they append to the same JSONL (one ``write`` per finished cell), and a last run with every method (all
cells done) writes the joint report. Split the rest with ``--tasks`` / ``--methods`` / ``--seeds`` over
sessions: the JSONL resumes where any of them stopped; on a GPU (``--device auto`` picks CUDA) the whole
grid fits one run. Rows of another sizing stay in the JSONL, kept apart by their ``sizes``; the measured
rows are kept in ``benchmarks/results/`` (copy them into ``--out`` to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# offline, quiet hosts, this checkout importable: set before torch or a host library is imported
from bench_env import REPO  # noqa: E402

# isort: split

import torch  # noqa: E402
from quality_moe import layout_beta, split_task  # noqa: E402
from quality_pruning import append_row, model_tag, read_rows  # noqa: E402
from tqdm import tqdm  # noqa: E402

from layerif_plugins.data import Examples, collate, pad_id_of  # noqa: E402
from layerif_plugins.engine import InfluenceConfig  # noqa: E402
from layerif_plugins.integrations.peft_lora import lora_layout_config  # noqa: E402
from layerif_plugins.integrations.peft_lora.layout import lora_trainable_params, targeted_linears  # noqa: E402
from layerif_plugins.integrations.peft_moe.build import get_moe_model, moe_layout_for_params  # noqa: E402
from layerif_plugins.io import atomic_write_json, atomic_write_text  # noqa: E402
from layerif_plugins.models import load_model_and_tokenizer, num_layers  # noqa: E402
from layerif_plugins.paths import shared_data, stories260k_checkpoint  # noqa: E402
from layerif_plugins.report import markdown_table  # noqa: E402
from layerif_plugins.scorers import ScoringData, score_layers  # noqa: E402
from layerif_plugins.scores import LayerScores  # noqa: E402
from layerif_plugins.training import TrainConfig, heldout_loss, train_adapter  # noqa: E402

TASKS = {"shakespeare": ("tinyshakespeare", "input.txt"), "wikitext2": ("wikitext-2", "valid.txt")}
#: tasks whose examples are consecutive ``--max-length`` windows of whole paragraphs (WikiText-2's shared
#: split has 794 paragraphs, fewer than one epoch of 1,200; a speech fits one window, a paragraph does not)
WINDOWED = frozenset({"wikitext2"})
METHODS = ("lora", "eva", "adalora", "lora-layerif", "lora-layerif@other", "lora-alpha_hill", "lora-depth_ramp",
           "moe-uniform", "moe-mola-2468", "moe-alphalora", "moe-layerif:1", "moe-layerif:2.5",
           "moe-layerif:2.5@other")
SIZE_KEYS = ("r", "lora_alpha", "expert_r", "spread", "targets", "steps", "eval_every", "batch_size", "lr",
             "max_length", "n_train", "n_test", "n_score_train", "n_score_val", "eva_batches")
#: how the LoRA-MoE rows are sized: at most ``lora``'s trainable parameters, routers included (rows made
#: before 2026-12-03 had ``L · r / expert_r`` experts and routers on top, 11–17 % more parameters)
MOE_PARAMS = "lora"
#: the scores each scored method reads (LoRA rank patterns and MoE layouts)
SCORER_OF = {"layerif": "layerif", "layerif-inv": "layerif", "alpha_hill": "alpha_hill", "depth_ramp": "depth_ramp",
             "alphalora": "alpha_hill"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, HF dir, llama2.c .bin or 'stories260k'")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {sorted(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--r", type=int, default=8, help="rank of the uniform LoRA (the budget everyone gets)")
    p.add_argument("--lora-alpha", type=int, default=16, help="alpha of the uniform LoRA (alpha/r kept everywhere)")
    p.add_argument("--expert-r", type=int, default=4, help="LoRA-MoE expert rank; T = layers · r / expert_r")
    p.add_argument("--spread", type=float, default=0.5, help="ε of the rank_pattern layouts (allocate/ranks.py)")
    p.add_argument("--targets", default="q_proj,v_proj,down_proj", help="projections every method adapts")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (the curve)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--method-lr", default="", metavar="NAME=LR,…",
                   help="a method's own learning rate (e.g. adalora=0.01, chosen by --tune-lr); the rest use --lr")
    p.add_argument("--tune-lr", default="", metavar="LR,…",
                   help="choose learning rates instead: train every method at each LR and measure the loss on a "
                        "tune part (--n-tune examples dealt after train; the test part is not read); writes "
                        "quality_peft_<model>_lr.md with the best LR per method")
    p.add_argument("--n-tune", type=int, default=64, help="tune-part examples (--tune-lr)")
    p.add_argument("--lr-from-tune", action="store_true",
                   help="train each method at the rate a --tune-lr search chose for it on each task (read from the "
                        "JSONL's tune rows; a method without any takes its family's: lora-* and eva → lora, moe-* "
                        "→ moe-uniform; else --lr)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-length", type=int, default=32,
                   help="tokens per example (a WikiText-2 paragraph is cut into windows of this length)")
    p.add_argument("--n-train", type=int, default=1200, help="training examples (300 steps × 4 = one epoch)")
    p.add_argument("--n-test", type=int, default=64, help="held-out test examples")
    p.add_argument("--n-score-train", type=int, default=32, help="LayerIF: train examples scored")
    p.add_argument("--n-score-val", type=int, default=16, help="LayerIF: validation examples")
    p.add_argument("--eva-batches", type=int, default=32,
                   help="EVA: training batches its SVD cycles over until the components converge")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    p.add_argument("--quick", action="store_true", help="smoke run: stories260K, 6 steps, 2 seeds, small splits")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write the report from the JSONL's finished rows (a cell not run shows '-')")
    p.add_argument("--out", default=str(REPO / "bench_out"))
    args = p.parse_args(argv)
    if args.quick:
        args.model = "stories260k" if args.model == "smollm2-135m" else args.model
        args.steps, args.eval_every, args.seeds, args.n_train, args.n_test = 6, 3, 2, 32, 16
        args.n_score_train, args.n_score_val, args.eva_batches, args.n_tune = 8, 4, 8, 16
        args.r, args.lora_alpha, args.expert_r, args.max_length = 4, 8, 2, 48
    if args.model == "stories260k":
        args.model = str(stories260k_checkpoint())
    unknown = sorted(set(split(args.tasks)) - set(TASKS))
    if unknown:
        p.error(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    for name in split(args.methods):
        method_parts(name)  # refuses unknown names before any work
    if args.r % args.expert_r:
        p.error(f"--r {args.r} must be a multiple of --expert-r {args.expert_r} (equal expert parameters)")
    try:
        args.tune_lr = [float(x) for x in split(args.tune_lr)]
        args.method_lr = {k.strip(): float(v) for k, _, v in (x.partition("=") for x in split(args.method_lr))}
    except ValueError as exc:
        p.error(f"--tune-lr / --method-lr: {exc} (e.g. --tune-lr 1e-3,3e-3 or --method-lr adalora=0.01)")
    for name in args.method_lr:
        method_parts(name)
    if args.tune_lr and (args.method_lr or args.lr_from_tune):
        p.error("--method-lr / --lr-from-tune apply to the test run; --tune-lr searches the learning rate (use one)")
    if args.method_lr and args.lr_from_tune:
        p.error("--lr-from-tune sets every method's rate from the tune search; --method-lr sets them by hand (use one)")
    args.tuned = {}  # (task, method) → the tune search's rate (--lr-from-tune; filled once the rows are read)
    if any(lr <= 0 for lr in [*args.tune_lr, *args.method_lr.values()]):
        p.error("learning rates must be > 0")
    if not args.tune_lr:
        args.n_tune = 0  # no tune part is dealt: the other parts are the same either way
    return args


def split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def method_lr(args: argparse.Namespace, method: str, task: str | None = None) -> float:
    """The learning rate a method trains at: its ``--method-lr`` entry, the tune search's (``--lr-from-tune``), or
    ``--lr``."""
    if method in args.method_lr:
        return args.method_lr[method]
    return getattr(args, "tuned", {}).get((task, method), args.lr)


def sizes(args: argparse.Namespace, method: str, task: str | None = None) -> dict[str, Any]:
    """What a finished row must share with this run to be reused (LoRA-MoE rows: also how they were sized).

    A row of ``--tune-lr`` (loss on the tune part) also records ``heldout: tune``, so it never stands in
    for a test-part row.
    """
    moe = {"moe_params": MOE_PARAMS} if method_parts(method)[0] == "moe" else {}
    tune = {"heldout": "tune", "n_tune": args.n_tune} if args.tune_lr else {}
    return {**{k: getattr(args, k) for k in SIZE_KEYS}, "lr": method_lr(args, method, task), **moe, **tune}


def tune_sources(method: str) -> list[str]:
    """Whose tune search sets ``method``'s rate: its own, then its family's reference (``lora-layerif@other`` →
    ``lora-layerif``, ``lora``; ``eva`` → ``eva``, ``lora``; ``moe-mola-2468`` → itself, ``moe-uniform``)."""
    own = method.partition("@")[0]
    family = method_parts(method)[0]
    ref = {"lora": "lora", "eva": "lora", "adalora": "adalora", "moe": "moe-uniform"}[family]
    return [own] if own == ref else [own, ref]


def tuned_rates(all_rows: list[dict[str, Any]], args: argparse.Namespace, tasks: list[str], methods: list[str]
                ) -> dict[tuple[str, str], float]:
    """``(task, method) → rate`` with the lowest mean tune loss among the JSONL's ``--tune-lr`` rows of the same
    sizing (any rates, any seeds); a method with no such rows, nor its family, is left out (it trains at ``--lr``)."""
    ignore = ("lr", "heldout", "n_tune")
    chosen = {}
    for task in tasks:
        for method in methods:
            for source in tune_sources(method):
                want = {k: v for k, v in sizes(args, source).items() if k not in ignore}
                rows = [r for r in all_rows if r["task"] == task and r["method"] == source
                        and r.get("sizes", {}).get("heldout") == "tune"
                        and {k: v for k, v in r["sizes"].items() if k not in ignore} == want]
                best = best_lr(rows, sorted({r["sizes"]["lr"] for r in rows}))[1]
                if best is not None:
                    chosen[(task, method)] = best
                    break
    return chosen


def method_parts(name: str) -> tuple[str, str, bool]:
    """``"moe-layerif:2.5@other"`` → ``("moe", "layerif:2.5", True)``; ``"lora"`` → ``("lora", "uniform", False)``."""
    base, _, other = name.partition("@")
    if other not in ("", "other"):
        raise SystemExit(f"method {name!r}: the only suffix is '@other'")
    family, _, layout = base.partition("-")
    if family in ("lora", "eva", "adalora") and not layout:
        return family, "uniform", bool(other)
    kind = layout_beta(layout, 2.5)[0] if family == "moe" else layout
    known = {"lora": ("layerif", "layerif-inv", "alpha_hill", "depth_ramp"),
             "moe": ("uniform", "layerif", "alphalora", "mola-2468", "mola-8642", "mola-2882", "mola-8228")}
    if family not in known or kind not in known[family]:
        raise SystemExit(f"unknown method {name!r}; e.g. {', '.join(METHODS)}")
    if other and SCORER_OF.get(kind) != "layerif":
        raise SystemExit(f"method {name!r}: '@other' needs LayerIF scores (lora-layerif@other, moe-layerif:β@other)")
    return family, layout, bool(other)


# ----------------------------------------------------------------------------- measuring


def reset_peak_memory() -> None:
    """Start a cell's peak-memory window (CUDA allocator stats, or the process's VmHWM on Linux)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory_mib() -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def make_callbacks(test: Examples, pad: int, every: int, adalora: bool) -> tuple[Any, ...]:
    """The held-out curve (and AdaLoRA's ``update_and_allocate``) as Trainer callbacks; the curve's cost is kept."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[tuple[int, float]] = []
            self.wall = self.cpu = 0.0

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            if state.global_step % every == 0:
                t, c = time.perf_counter(), time.process_time()
                model.eval()
                self.points.append((state.global_step, heldout_loss(model, test, pad)["loss"]))
                model.train()
                self.wall += time.perf_counter() - t
                self.cpu += time.process_time() - c

    class AdaLoraSchedule(TrainerCallback):
        """PEFT's AdaLoRA recipe: ``update_and_allocate(step)`` after ``optimizer.step()``, before ``zero_grad``."""

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            model.base_model.update_and_allocate(state.global_step)

    curve = Curve()
    return (curve, AdaLoraSchedule()) if adalora else (curve,)


# ----------------------------------------------------------------------------- building the adapters


def eva_loader(examples: Examples, pad: int, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for start in range(0, min(len(examples), batch_size * n_batches), batch_size):
        b = collate(examples, range(start, min(start + batch_size, len(examples))), pad)
        out.append({"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels})
    return out


def adalora_schedule(steps: int) -> dict[str, int]:
    """``tinit`` / ``tfinal`` / ``deltaT`` of AdaLoRA for a run of ``steps`` (10 % warm-up, 20 % final, 30 updates)."""
    tinit, tfinal = max(1, steps // 10), max(1, steps // 5)
    if steps - tfinal <= tinit:
        raise SystemExit(f"AdaLoRA needs more steps than {steps} (tinit {tinit} + tfinal {tfinal})")
    return {"tinit": tinit, "tfinal": tfinal, "deltaT": max(1, (steps - tinit - tfinal) // 30), "total_step": steps}


#: EVA's SVD state per (task, sizes): it depends on the base model and the data only, not on the seed
_EVA_CACHE: dict[str, dict[str, torch.Tensor]] = {}


def build(name: str, base: Any, scores: dict[str, LayerScores], other: dict[str, LayerScores],
          train: Examples, pad: int, args: argparse.Namespace, seed: int) -> tuple[Any, dict[str, Any]]:
    """A fresh PEFT model for method ``name`` (on a copy of ``base``) and what describes its layout."""
    from peft import (
        AdaLoraConfig,
        EvaConfig,
        LoraConfig,
        get_eva_state_dict,
        get_peft_model,
        initialize_lora_eva_weights,
    )

    family, layout, use_other = method_parts(name)
    targets = split(args.targets)
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    info: dict[str, Any] = {"init_s": 0.0}
    if family == "lora" and layout == "uniform":
        pm = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                              bias="none", task_type="CAUSAL_LM"))
    elif family == "lora":
        source = (other if use_other else scores)[SCORER_OF[layout]]
        built = lora_layout_config(model, source, r=args.r, lora_alpha=args.lora_alpha, target_modules=targets,
                                   spread=args.spread, invert=layout.endswith("-inv"))
        pm = get_peft_model(model, built.config)
        info["pattern_ranks"] = built.ranks.ranks  # rank of every module of the layer
    elif family == "eva":
        config = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, target_modules=targets, bias="none",
                            task_type="CAUSAL_LM", init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
        pm = get_peft_model(model, config, low_cpu_mem_usage=True)
        key = f"{train.source}:{len(train)}"
        if key not in _EVA_CACHE:  # the SVDs are the slow part (minutes): once per task, shared by the seeds
            t = time.perf_counter()
            _EVA_CACHE[key] = get_eva_state_dict(pm, eva_loader(train, pad, args.batch_size, args.eva_batches),
                                                 show_progress_bar=False)
            info["init_s"] = time.perf_counter() - t
        initialize_lora_eva_weights(pm, eva_state_dict=dict(_EVA_CACHE[key]))  # PEFT pops the entries it loads
    elif family == "adalora":
        config = AdaLoraConfig(init_r=max(args.r + 1, round(1.5 * args.r)), target_r=args.r,
                               lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM",
                               **adalora_schedule(args.steps))
        pm = get_peft_model(model, config)
    else:
        kind, beta = layout_beta(layout, 2.5)
        source = (other if use_other else scores).get(SCORER_OF.get(kind, ""))
        lora = lora_trainable_params(LoraConfig(r=args.r), targeted_linears(base, targets))
        plan = moe_layout_for_params(base, kind, lora, args.expert_r, targets, scores=source, beta=beta)
        pm = get_moe_model(model, plan, r=args.expert_r, lora_alpha=args.lora_alpha * args.expert_r // args.r,
                           target_modules=targets)
        info["experts"] = plan.experts
    return pm, info


def layer_ranks(pm: Any, prefix: str, n_layers: int) -> list[int]:
    """Σ LoRA rank over each layer's adapted modules, as built (EVA: after its redistribution)."""
    from peft.tuners.lora import LoraLayer

    out = [0] * n_layers
    for name, module in pm.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name.startswith(prefix + "."):
            layer = int(name[len(prefix) + 1:].split(".")[0])
            out[layer] += int(module.r.get("default", 0))
    return out


def adalora_final_ranks(pm: Any, prefix: str, n_layers: int) -> list[int] | None:
    """Σ kept rank per layer after AdaLoRA's final masking (``peft_config.rank_pattern``: name → kept mask)."""
    pattern = pm.peft_config["default"].rank_pattern
    if not pattern:
        return None
    out = [0] * n_layers
    for name, mask in pattern.items():
        rest = name.split(prefix + ".", 1)
        if len(rest) == 2:
            out[int(rest[1].split(".")[0])] += int(sum(bool(m) for m in mask))
    return out


# ----------------------------------------------------------------------------- the run


def compute_scores(base: Any, splits: dict[str, Examples], pad: int, args: argparse.Namespace, task: str,
                   cache: Path) -> LayerScores:
    """LayerIF scores of the base model on one task's train → validation split (cached beside the JSONL)."""
    if cache.is_file():
        return LayerScores.load(cache)
    data = ScoringData(train=splits["train"].subset(range(args.n_score_train)), val=splits["val"], pad_id=pad)
    scores = score_layers(base, "layerif", data, config=InfluenceConfig(batch_size=8, show_progress=False))
    scores.save(cache)
    return scores


def run_cell(task: str, name: str, seed: int, base: Any, splits: dict[str, Examples], pad: int,
             scores: dict[str, LayerScores], other: dict[str, LayerScores], args: argparse.Namespace,
             prefix: str) -> dict[str, Any]:
    reset_peak_memory()
    pm, info = build(name, base, scores, other, splits["train"], pad, args, seed)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    n_layers = num_layers(base)
    if method_parts(name)[0] in ("lora", "eva", "adalora"):
        info["ranks"] = layer_ranks(pm, prefix, n_layers)
    callbacks = make_callbacks(splits["test"], pad, args.eval_every, method_parts(name)[0] == "adalora")
    config = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=method_lr(args, name, task), seed=seed,
                         lr_scheduler="linear", logging_steps=max(1, args.steps))
    t, c = time.perf_counter(), time.process_time()
    metrics = train_adapter(pm, splits["train"], pad, config, show_progress=False, callbacks=callbacks)
    wall, cpu = time.perf_counter() - t - callbacks[0].wall, time.process_time() - c - callbacks[0].cpu
    held = heldout_loss(pm, splits["test"], pad)
    if method_parts(name)[0] == "adalora":
        info["final_ranks"] = adalora_final_ranks(pm, prefix, n_layers)
    losses = metrics["losses"]
    return {"task": task, "method": name, "seed": seed, "trainable": trainable, **info,
            "curve": callbacks[0].points, "test_loss": held["loss"], "test_ppl": held["perplexity"],
            "train_loss_last10": statistics.mean(losses[-10:]), "step_s_wall": wall / args.steps,
            "step_s_cpu": cpu / args.steps, "peak_mib": peak_memory_mib(), "sizes": sizes(args, name, task)}


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_stats(rows: list[dict[str, Any]], ref: dict[int, float]) -> tuple[float, float | None] | None:
    """Mean paired difference of the test loss (same seed) and its standard error (None with one seed)."""
    d = [r["test_loss"] - ref[r["seed"]] for r in rows if r["seed"] in ref]
    if not d:
        return None
    return statistics.mean(d), (statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None)


def paired(rows: list[dict[str, Any]], ref: dict[int, float]) -> str:
    """``mean ± SE`` of the paired difference; ``*`` when |mean| > 2 SE."""
    stats = paired_stats(rows, ref)
    if stats is None:
        return "-"
    mean, se = stats
    if se is None:
        return f"{mean:+.4f}"
    return f"{mean:+.4f} ± {se:.4f}{' *' if abs(mean) > 2 * se else ''}"


def beats(rows: list[dict[str, Any]], ref: dict[int, float]) -> bool:
    """Lower test loss than ``ref`` by more than two standard errors of the paired difference."""
    stats = paired_stats(rows, ref)
    return stats is not None and stats[1] is not None and stats[0] < -2 * stats[1]


#: the methods whose layout comes from influence / layer scores (the question the benchmark answers)
def influence_based(name: str) -> bool:
    return "layerif" in name or "alpha" in name


def moe_layout(name: str) -> bool:
    """A LoRA-MoE layout other than the uniform one (paired against ``moe-uniform`` as well)."""
    return name.startswith("moe-") and name != "moe-uniform"


def task_report(task: str, rows: list[dict[str, Any]], methods: list[str], base_loss: float) -> str:
    ref = {name: {x["seed"]: x["test_loss"] for x in rows if x["method"] == name}
           for name in ("lora", "eva", "moe-uniform")}
    table, curves = [], []
    steps = sorted({s for x in rows for s, _ in x["curve"]})
    shown = steps if len(steps) <= 8 else [steps[round(i * (len(steps) - 1) / 7)] for i in range(8)]
    for name in methods:
        r = [x for x in rows if x["method"] == name]
        if not r:
            continue
        layout = r[0].get("experts") or r[0].get("final_ranks") or r[0].get("ranks") or []
        peak = [x["peak_mib"] for x in r if x.get("peak_mib") is not None]
        table.append([
            name, f"{r[0]['trainable']:,}", "-".join(map(str, layout)), mean_std([x["test_loss"] for x in r]),
            mean_std([x["test_ppl"] for x in r], 2), paired(r, ref["lora"]) if name != "lora" else "-",
            paired(r, ref["eva"]) if name != "eva" else "-",
            paired(r, ref["moe-uniform"]) if moe_layout(name) else "-",
            f"{1000 * statistics.mean(x['step_s_wall'] for x in r):.0f} / "
            f"{1000 * statistics.mean(x['step_s_cpu'] for x in r):.0f}",
            f"{max(peak):.0f}" if peak else "-", len(r),
        ])
        by_step = {s: [v for x in r for st, v in x["curve"] if st == s] for s in shown}
        curves.append([name, *(f"{statistics.mean(v):.4f}" if v else "-" for v in by_step.values())])
    winners = [name for name in methods if influence_based(name)
               and beats([x for x in rows if x["method"] == name], ref["lora"])
               and beats([x for x in rows if x["method"] == name], ref["eva"])]
    verdict = (f"Influence-based layouts with a lower test loss than both uniform LoRA and EVA beyond two standard "
               f"errors (paired): {', '.join(winners) if winners else 'none'}.")
    ramp = {x["seed"]: x["test_loss"] for x in rows if x["method"] == "lora-depth_ramp"}
    scored = [name for name in methods if name.startswith("lora-") and influence_based(name)
              and any(x["method"] == name for x in rows)]
    if ramp and scored:  # the free default a scored layout must beat: rank rising with depth, no data
        verdict += " Against the data-free depth ramp (`lora-depth_ramp`, paired): " + "; ".join(
            f"{name} {paired([x for x in rows if x['method'] == name], ramp)}" for name in scored) + "."
    moe_winners = [name for name in methods if moe_layout(name)
                   and beats([x for x in rows if x["method"] == name], ref["moe-uniform"])]
    if ref["moe-uniform"] and any(moe_layout(name) for name in methods):
        verdict += (" LoRA-MoE layouts with a lower test loss than the uniform LoRA-MoE layout beyond two standard "
                    f"errors: {', '.join(moe_winners) if moe_winners else 'none'}.")
    return (
        f"### {task}\n\nBase model without adapter: test loss {base_loss:.4f}.\n\n"
        + markdown_table(["method", "trainable", "layout / layer (experts, or Σ rank)", "test loss", "test ppl",
                          "Δ vs lora (paired ± SE)", "Δ vs eva (paired ± SE)", "Δ vs moe-uniform",
                          "step ms wall / CPU",
                          "peak MiB", "seeds"], table)
        + f"\n\n{verdict}\n\nHeld-out loss curve (mean over seeds) at optimizer step (0: every adapter starts as "
        "the identity, i.e. the base model):\n\n"
        + markdown_table(["method", "0", *map(str, shown)], [[c[0], f"{base_loss:.4f}", *c[1:]] for c in curves])
        + "\n"
    )


def lr_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per learning rate of ``--tune-lr`` (each is ``--lr`` for every method); else ``[args]``."""
    if not args.tune_lr:
        return [args]
    return [argparse.Namespace(**{**vars(args), "lr": lr}) for lr in args.tune_lr]


def args_json(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as JSON (the tune search's rates keyed ``"task/method"``)."""
    return {**vars(args), "tuned": {f"{t}/{m}": lr for (t, m), lr in args.tuned.items()}}


def lr_overrides(args: argparse.Namespace) -> str:
    """The rates that are not ``--lr``: ``--method-lr``'s, and per task those ``--lr-from-tune`` chose."""
    text = "".join(f"; {name}: {lr:g}" for name, lr in args.method_lr.items())
    tasks = sorted({t for t, _ in args.tuned})
    return text + "".join(f"; rates chosen on the tune part of {t}: " + ", ".join(
        f"{m} {lr:g}" for (task, m), lr in args.tuned.items() if task == t) for t in tasks)


def best_lr(rows: list[dict[str, Any]], lrs: list[float]) -> tuple[dict[float, list[float]], float | None]:
    """Tune-part losses per learning rate (seeds) and the rate with the lowest mean (None: nothing measured)."""
    by = {lr: [r["test_loss"] for r in rows if r["sizes"]["lr"] == lr] for lr in lrs}
    measured = {lr: statistics.mean(v) for lr, v in by.items() if v}
    return by, (min(measured, key=measured.__getitem__) if measured else None)


def lr_report(task: str, all_rows: list[dict[str, Any]], methods: list[str], args: argparse.Namespace,
              base_loss: float) -> str:
    """Per method: the mean loss on the tune part at each learning rate, and the best one."""
    table = []
    for name in methods:
        rows = [r for r in all_rows if r["task"] == task and r["method"] == name
                and any(r.get("sizes") == sizes(a, name) for a in lr_runs(args))]
        by, best = best_lr(rows, args.tune_lr)
        table.append([name, *(mean_std(v) if v else "-" for v in by.values()), f"{best:g}" if best else "-"])
    return (f"### {task}\n\nBase model without adapter: tune loss {base_loss:.4f}.\n\n"
            + markdown_table(["method", *(f"lr {lr:g}" for lr in args.tune_lr), "best lr"], table) + "\n")


def write_lr_report(stem: Path, args: argparse.Namespace, reports: list[str], base_losses: dict[str, float],
                    all_rows: list[dict[str, Any]], command: str) -> int:
    """The learning-rate search's markdown / JSON (``<stem>.md`` / ``.json``), printed too."""
    text = (f"# Learning rates chosen on a tune part (`{args.model}`)\n\nEvery method trained as in the test run "
            f"({args.steps} steps, batch {args.batch_size} × ≤ {args.max_length} tokens, seeds 0..{args.seeds - 1}) "
            f"at each learning rate; loss on {args.n_tune} tune examples per task, dealt after the training part "
            "(the test part is not read). Mean ± std over seeds.\n\n" + "\n".join(reports)
            + f"\nCommand: {command}. Run the test grid at these rates with `--lr-from-tune` (each method at its "
            "best rate per task; by hand: `--method-lr NAME=LR`).\n")
    tuned = [r for r in all_rows if r.get("sizes", {}).get("heldout") == "tune"]
    atomic_write_text(stem.parent / f"{stem.name}.md", text)  # not with_suffix: a model tag may hold a dot
    atomic_write_json(stem.parent / f"{stem.name}.json", {"args": args_json(args), "base": base_losses, "rows": tuned})
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    tasks, methods = split(args.tasks), split(args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = model_tag(args.model)
    jsonl = out / f"quality_peft_{tag}.jsonl"
    all_rows = read_rows(jsonl)
    if args.lr_from_tune:
        args.tuned = tuned_rates(all_rows, args, tasks, methods)
        if not args.tuned:
            raise SystemExit(f"--lr-from-tune: no --tune-lr rows of this sizing in {jsonl} for {methods} on {tasks}; "
                             "run the search first (--tune-lr LR,…), or leave --lr-from-tune out")
    rows = [r for r in all_rows if r.get("sizes") == sizes(args, r["method"], r["task"])]
    base, tok = load_model_and_tokenizer(args.model, device=args.device)
    base.requires_grad_(False)
    pad = pad_id_of(tok)
    from layerif_plugins.models import blocks_prefix

    prefix = blocks_prefix(base)
    need_other = any(method_parts(m)[2] for m in methods)
    score_tasks = sorted(set(tasks) | (set(TASKS) if need_other else set()))
    splits = {t: split_task(str(shared_data(*TASKS[t])), tok, args, windows=t in WINDOWED) for t in score_tasks}
    t0 = time.perf_counter()
    layerif = {}
    if any(method_parts(m)[1].startswith("layerif") for m in methods):
        for t in score_tasks:
            cache = out / f"quality_peft_{tag}_layerif_{t}_{args.n_score_train}_{args.n_score_val}.json"
            layerif[t] = compute_scores(base, splits[t], pad, args, t, cache)
    needed = {SCORER_OF.get(layout_beta(method_parts(m)[1], 2.5)[0]) for m in methods}
    fixed = {name: score_layers(base, name) for name in ("alpha_hill", "depth_ramp") if name in needed}
    score_time = time.perf_counter() - t0
    reports, base_losses = [], {}
    for task in tasks:
        own = {**fixed, **({"layerif": layerif[task]} if task in layerif else {})}
        other_task = next((t for t in TASKS if t != task), None)
        other = {"layerif": layerif[other_task]} if need_other else {}
        parts = {**splits[task], "test": splits[task]["tune"]} if args.tune_lr else splits[task]
        base_losses[task] = heldout_loss(base, parts["test"], pad)["loss"]
        for run_args in lr_runs(args):
            done = [r for r in all_rows if r["task"] == task and r.get("sizes") == sizes(run_args, r["method"], task)]
            for name in methods:
                for seed in range(args.seeds):
                    if args.report or any(r["method"] == name and r["seed"] == seed for r in done):
                        continue
                    row = run_cell(task, name, seed, base, parts, pad, own, other, run_args, prefix)
                    append_row(jsonl, row)
                    all_rows.append(row)
                    rows.append(row)
                    tqdm.write(f"{task:11s} {name:22s} seed {seed} lr {method_lr(run_args, name, task):g}: "
                               f"{'tune' if args.tune_lr else 'test'} loss {row['test_loss']:.4f} "
                               f"({row['trainable']:,} params, {1000 * row['step_s_wall']:.0f} ms/step)")
        if args.tune_lr:
            reports.append(lr_report(task, all_rows, methods, args, base_losses[task]))
        else:
            reports.append(task_report(task, [r for r in rows if r["task"] == task], methods, base_losses[task]))
    command = f"`python benchmarks/quality_peft.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    if args.tune_lr:
        return write_lr_report(out / f"quality_peft_{tag}_lr", args, reports, base_losses, all_rows, command)
    score_lines = "\n".join(f"- LayerIF on {t}: " + ", ".join(f"{s:.4g}" for s in v.scores)
                            for t, v in layerif.items())
    score_lines += "".join(f"\n- {k}: " + ", ".join(f"{s:.4g}" for s in v.scores) for k, v in fixed.items())
    text = (
        f"# PEFT layouts at equal trainable parameters (`{args.model}`)\n\n"
        f"LoRA r = {args.r} (α {args.lora_alpha}) on {args.targets}; rank patterns at spread {args.spread}; "
        f"LoRA-MoE: experts of rank {args.expert_r}, as many as fit in LoRA's parameters; {args.steps} AdamW "
        f"steps (lr {args.lr}{lr_overrides(args)}, linear decay), batch {args.batch_size} × ≤ {args.max_length} "
        "tokens, "
        f"{args.n_train} training / {args.n_test} test examples per task; seeds 0..{args.seeds - 1} (adapter init + "
        "batch order; a row run with more counts them in its last column). Paired differences: same seed, ± standard "
        "error; `*` = beyond two standard errors.\n\n"
        + "\n".join(reports)
        + f"\nScores:\n{score_lines}\n\nScoring time: {score_time:.1f} s. Command: {command}.\n"
    )
    stem = out / f"quality_peft_{tag}{'_tuned' if args.lr_from_tune else ''}"  # the two grids side by side
    atomic_write_text(stem.parent / f"{stem.name}.md", text)
    atomic_write_json(stem.parent / f"{stem.name}.json", {"args": args_json(args), "base": base_losses, "rows": rows,
                                                          "scores": {t: v.scores for t, v in layerif.items()}})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
