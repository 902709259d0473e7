"""End to end with the real libraries: LayerIF scores → LoRA-MoE layout → PEFT adapter → HF Trainer → lm-eval.

On the embedded stories260K by default, adapting it to Shakespeare (a task it was not trained
on), for the LayerIF layout and a uniform layout at the same expert budget::

    .venv/bin/python integration/moe_pipeline.py --out /tmp/moe_run [--steps 100] [--budget 20]

Prints (and writes to ``--out/report.md``) held-out loss before/after training and lm-eval's
rolling perplexity of the adapted in-memory ``PeftModel`` per layout; the trained adapters are
saved under ``--out/<layout>/`` and reload with ``PeftModel.from_pretrained`` after
``import layerif_plugins``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from layerif_plugins.data import load_examples, pad_id_of
from layerif_plugins.engine import InfluenceConfig
from layerif_plugins.integrations.lm_eval import TaskSpec, evaluate
from layerif_plugins.integrations.peft_moe.build import get_moe_model, moe_layout, save_moe_adapter
from layerif_plugins.io import atomic_write_text, replacing
from layerif_plugins.models import load_model_and_tokenizer
from layerif_plugins.paths import shared_data, stories260k_checkpoint
from layerif_plugins.report import markdown_table
from layerif_plugins.scorers import ScoringData, score_layers
from layerif_plugins.training import TrainConfig, heldout_loss, train_adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(stories260k_checkpoint()), help="HF dir or llama2.c .bin")
    p.add_argument("--data", default=str(shared_data("tinyshakespeare", "input.txt")), help="adaptation task text")
    p.add_argument("--layouts", default="layerif,uniform")
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="moe_out")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for layout_name in args.layouts.split(","):
        model, tok = load_model_and_tokenizer(args.model)
        pad = pad_id_of(tok)
        everything = load_examples(args.data, tok, args.max_length, n=args.n_train + 2 * args.n_test)
        train = everything.subset(range(args.n_train))
        val = everything.subset(range(args.n_train, args.n_train + args.n_test))
        test = everything.subset(range(args.n_train + args.n_test, len(everything)))
        scores = None
        if layout_name == "layerif":  # the task's own train → validation influence
            scores = score_layers(model, "layerif", ScoringData(train=train.subset(range(128)), val=val, pad_id=pad),
                                  config=InfluenceConfig(show_progress=False))
        layout = moe_layout(model, layout_name, args.budget, scores=scores)
        peft_model = get_moe_model(model, layout, r=4, lora_alpha=8)
        before = heldout_loss(peft_model, test, pad)["loss"]
        train_adapter(peft_model, train, pad, TrainConfig(max_steps=args.steps, batch_size=8, lr=2e-3),
                      show_progress=False)
        after = heldout_loss(peft_model, test, pad)["loss"]
        with replacing(out):  # reruns replace this script's own earlier adapters (ours: marker-checked)
            save_moe_adapter(peft_model, layout, out / layout_name)
        docs = [tok.decode(ids, skip_special_tokens=True) for ids in test.input_ids]
        test_txt = out / "test_docs.txt"
        atomic_write_text(test_txt, "\n<|endoftext|>\n".join(docs) + "\n")
        result = evaluate(peft_model, [TaskSpec("perplexity", test_txt, name="heldout")], tokenizer=tok,
                          device="cpu", task_dir=out / "lm_eval_tasks")
        rows.append([layout_name, "-".join(map(str, layout.experts)), "-".join(map(str, layout.top_k)),
                     before, after, result.metric("heldout", "word_perplexity")])
        print(f"{layout_name}: held-out loss {before:.4f} → {after:.4f}", flush=True)
    table = markdown_table(["layout", "experts", "top-k", "test loss before", "test loss after",
                            "lm-eval word perplexity after"], rows)
    text = (f"# LoRA-MoE pipeline ({Path(args.model).name} → {Path(args.data).name})\n\nbudget {args.budget} "
            f"experts, {args.steps} steps, {time.perf_counter() - t0:.0f} s\n\n{table}\n")
    atomic_write_text(out / "report.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
