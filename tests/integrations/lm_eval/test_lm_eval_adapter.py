"""lm-eval on local files: real ``lm_eval.simple_evaluate`` on the converted stories260K (offline).

The numbers are checked against independent computations: the project's own perplexity
evaluator (same documents, same tokenization) and a direct log-likelihood loop for the
multiple-choice accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerif_plugins.errors import ConfigError, DataError, ModelError
from layerif_plugins.evaluation.checks import check_model_dir
from layerif_plugins.evaluation.documents import read_mc_items
from layerif_plugins.evaluation.perplexity import perplexity
from layerif_plugins.evaluation.tasks import build_tinystories_mc, split_sentences
from layerif_plugins.integrations.lm_eval import (
    EvalResult,
    TaskSpec,
    evaluate,
    parse_task,
    write_tasks,
)
from layerif_plugins.models import block_linears, load_model_and_tokenizer, save_model_dir

N_DOCS = 8


def _magnitude_prune(model: torch.nn.Module, sparsity: float) -> float:
    """Zero the smallest-|w| fraction of every row of every decoder-block Linear; return the overall sparsity."""
    zeros = total = 0
    with torch.no_grad():
        for lin in block_linears(model, "all"):
            w = lin.module.weight
            k = int(w.shape[1] * sparsity)
            idx = w.abs().argsort(dim=1)[:, :k]
            w.scatter_(1, idx, 0.0)
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total


@pytest.fixture(scope="module")
def pruned_dir(stories_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = load_model_and_tokenizer(stories_dir)
    assert _magnitude_prune(model, 0.5) == pytest.approx(0.5, abs=0.01)
    return save_model_dir(model, tok, tmp_path_factory.mktemp("pruned") / "stories-mag50")


def _close(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.integration
@pytest.mark.slow
def test_cli_perplexity_agrees_with_own_evaluator(stories_dir: Path, tinystories_valid: Path, tmp_path: Path):
    from layerif_plugins.cli import main

    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(stories_dir), "--tasks", f"perplexity:{tinystories_valid}",
                 "--limit", str(N_DOCS), "--device", "cpu", "--out", str(out)])
    assert code == 0
    res = EvalResult.load(out)
    got = res.tasks["ppl_valid"]
    assert got.docs == N_DOCS and res.backend == "hf"
    model, tok = load_model_and_tokenizer(stories_dir)
    ref = perplexity(model, tok, tinystories_valid, max_docs=N_DOCS)
    assert _close(got.metrics["word_perplexity"], ref.word_perplexity)
    assert _close(got.metrics["byte_perplexity"], ref.byte_perplexity)
    assert _close(got.metrics["bits_per_byte"], ref.bits_per_byte)
    assert 1.0 < ref.word_perplexity < 1000  # a trained model, not a random one


@pytest.mark.integration
@pytest.mark.slow
def test_pruned_copy_dir_and_in_memory(pruned_dir: Path, stories_dir: Path, tinystories_valid: Path):
    model, tok = load_model_and_tokenizer(pruned_dir)
    docs = [TaskSpec("perplexity", tinystories_valid, max_docs=N_DOCS)]
    from_dir = evaluate(pruned_dir, docs, device="cpu")
    in_memory = evaluate(model, docs, tokenizer=tok)
    ref = perplexity(model, tok, tinystories_valid, max_docs=N_DOCS)
    dense = perplexity(*load_model_and_tokenizer(stories_dir), tinystories_valid, max_docs=N_DOCS)
    for res in (from_dir, in_memory):
        assert _close(res.metric("ppl_valid", "word_perplexity"), ref.word_perplexity)
    assert ref.word_perplexity > dense.word_perplexity  # pruning 50% by magnitude hurts


def _reference_mc(model, tok, items) -> tuple[float, float]:
    """acc / acc_norm by a direct loop: sum log P(" " + choice | question), as lm-eval encodes the pair."""
    hits = hits_norm = 0
    for it in items:
        ctx = tok(it["question"])["input_ids"]
        lls = []
        for choice in it["choices"]:
            full = tok(it["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                lp = F.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
            lls.append(sum(float(lp[k - 1, full[k]]) for k in range(len(ctx), len(full))))
        norm = [ll / len(c) for ll, c in zip(lls, it["choices"], strict=True)]
        hits += max(range(len(lls)), key=lambda k: (lls[k], -k)) == it["label"]
        hits_norm += max(range(len(norm)), key=lambda k: (norm[k], -k)) == it["label"]
    return hits / len(items), hits_norm / len(items)


@pytest.mark.integration
@pytest.mark.slow
def test_tinystories_mc_well_above_chance(stories_dir: Path, tmp_path: Path):
    n = 32
    res = evaluate(stories_dir, ["tinystories-mc"], max_docs=n, device="cpu", task_dir=tmp_path)
    acc = res.metric("tinystories_mc", "acc")
    acc_norm = res.metric("tinystories_mc", "acc_norm")
    items = [json.loads(line) for line in (tmp_path / "tinystories_mc.jsonl").read_text().splitlines()]
    assert len(items) == n and res.tasks["tinystories_mc"].docs == n
    ref_acc, ref_norm = _reference_mc(*load_model_and_tokenizer(stories_dir), items)
    assert acc == pytest.approx(ref_acc, abs=1.01 / n)  # at most one near-tie decided differently
    assert acc_norm == pytest.approx(ref_norm, abs=1.01 / n)
    assert acc >= 0.40 and acc_norm >= 0.40  # chance is 0.25 (4 choices)


def test_tinystories_mc_is_deterministic_and_true():
    a = build_tinystories_mc(n=20, seed=7)
    assert a == build_tinystories_mc(n=20, seed=7)
    assert a != build_tinystories_mc(n=20, seed=8)
    from layerif_plugins.data import read_records
    from layerif_plugins.paths import shared_data

    stories = read_records(shared_data("tinystories", "valid.txt"))
    for it in a:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        sents = split_sentences(stories[it["story"]])
        answer = it["choices"][it["label"]]
        # the context is the story up to the answer, which is its next sentence
        assert any(sents[p] == answer and it["question"].endswith(sents[p - 1]) for p in range(1, len(sents)))
        for k, c in enumerate(it["choices"]):
            if k != it["label"]:
                assert c != answer and abs(len(c.split()) - len(answer.split())) <= 5
    labels = [it["label"] for it in build_tinystories_mc(n=200)]
    assert all(labels.count(k) >= 30 for k in range(4))  # answer positions are balanced


def test_field_mapping_and_string_labels(tmp_path: Path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"ctx": "The sky is", "endings": ["blue", "a cat"], "gold": "blue"}) + "\n\n"
                 + json.dumps({"ctx": "Two plus two is", "endings": ["three", "four"], "gold": 1}) + "\n")
    items = read_mc_items(f, {"question": "ctx", "choices": "endings", "label": "gold"})
    digits = tmp_path / "digits.jsonl"
    digits.write_text(json.dumps({"question": "Pick", "choices": ["1", "2"], "label": "2"}) + "\n")
    assert read_mc_items(digits)[0]["label"] == 1  # a string label is the text of a choice, digits included
    assert items == [{"question": "The sky is", "choices": ["blue", "a cat"], "label": 0},
                     {"question": "Two plus two is", "choices": ["three", "four"], "label": 1}]
    built = write_tasks([parse_task(f"mc:{f}", fields={"question": "ctx", "choices": "endings", "label": "gold"})],
                        tmp_path / "tasks")
    yaml = built[0].yaml.read_text()
    assert "test_split: test" in yaml and str((tmp_path / "tasks" / "mc_qa.jsonl").resolve()) in yaml
    assert "cache_dir:" in yaml


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty"),
        ('{"question": "q", "choices": ["a", "b"], "label": 0}\n{"question": "q", "choices": ["a", "b"], "label": 0\n',
         ":2: not valid JSON"),
        ('["a", "b"]\n', ":1: expected a JSON object"),
        ('{"question": "q", "choices": ["a", "b"], "label": 2}\n', "label 2 does not index the 2 choices"),
        ('{"question": "q", "choices": ["a", "b"], "label": "c"}\n', "label 'c' is not the text of any of the 2"),
        ('{"question": "q", "choices": ["a", "b"], "label": "1"}\n', "label '1' is not the text of any of the 2"),
        ('{"question": "q", "choices": "ab", "label": 0}\n', "list of at least 2"),
        ('{"question": "q", "label": 0}\n', "missing field(s) ['choices']"),
    ],
)
def test_bad_mc_files(tmp_path: Path, content: str, message: str):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        read_mc_items(f)


def test_bad_inputs(tmp_path: Path, stories_dir: Path):
    with pytest.raises(DataError, match="not found"):
        write_tasks([parse_task(f"perplexity:{tmp_path / 'missing.txt'}")], tmp_path / "t")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        write_tasks([parse_task(f"ppl:{tmp_path / 'empty.txt'}")], tmp_path / "t")
    with pytest.raises(ConfigError, match="perplexity:FILE"):
        parse_task("hellaswag")
    with pytest.raises(ConfigError, match="two tasks are named"):
        write_tasks([parse_task("tinystories-ppl"), parse_task("tinystories-ppl")], tmp_path / "t")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(stories_dir, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="has no tokenizer"):
        check_model_dir(no_tok)
    with pytest.raises(ModelError, match="has no tokenizer"):
        evaluate(no_tok, ["tinystories-mc"])
    with pytest.raises(ModelError, match="no config.json"):
        evaluate(tmp_path, ["tinystories-mc"])
    with pytest.raises(ConfigError, match="tokenizer object"):
        evaluate(torch.nn.Linear(2, 2), ["tinystories-mc"])
    with pytest.raises(ConfigError, match="unknown backend"):
        evaluate(stories_dir, ["tinystories-mc"], backend="tgi")  # type: ignore[arg-type]
