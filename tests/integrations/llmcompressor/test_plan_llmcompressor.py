"""The planner on the real llm-compressor: sensitivity = the stock modifier pruning one layer, plans reproduce weights.

stories260K (5 decoder layers), TinyStories calibration; every pruned model is compared
weight for weight, or loss for loss, with what llm-compressor's *stock* Wanda / SparseGPT
modifier makes with the same per-layer list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from layerif_plugins.data import load_examples
from layerif_plugins.errors import AllocationError, ConfigError
from layerif_plugins.integrations.llmcompressor import LayerIFWandaPruningModifier, prune_model
from layerif_plugins.integrations.llmcompressor.planning import measure_sensitivity, summary_rows
from layerif_plugins.integrations.llmcompressor.prune import calibration_batches, plan_pruning
from layerif_plugins.integrations.llmcompressor.search import prune_in_session
from layerif_plugins.models import load_model_and_tokenizer
from layerif_plugins.plan import AllocationPlan
from layerif_plugins.plan.artifact import cpu_identity
from layerif_plugins.plan.decide import token_mean

pytestmark = pytest.mark.integration
N_CALIB, MAX_LEN = 8, 32


def weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _sensitivity_setup(stories_dir, tinystories_train, tinystories_valid, algorithm):
    """stories260K, its calibration batches, 4 held-out examples, the algorithm's modifier and its targets."""
    from layerif_plugins.integrations.llmcompressor import LayerIFSparseGPTModifier

    cls = LayerIFWandaPruningModifier if algorithm == "wanda" else LayerIFSparseGPTModifier
    model, tok = load_model_and_tokenizer(stories_dir)
    batches = calibration_batches(load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB), 1)
    held = load_examples(tinystories_valid, tok, MAX_LEN, n=4)
    mod = cls(sparsity=0.5, allocation="uniform")
    modules, params = mod.resolve_targets(model)
    return model, batches, held, mod, modules, params


@pytest.mark.parametrize("algorithm", ["wanda", "sparsegpt"])
def test_sensitivity_entry_is_the_stock_modifier_pruning_that_layer_alone(stories_dir, tinystories_train,
                                                                          tinystories_valid, algorithm,
                                                                          monkeypatch):
    from layerif_plugins.evaluation.perplexity import example_token_losses

    model, batches, held, mod, modules, params = _sensitivity_setup(stories_dir, tinystories_train,
                                                                    tinystories_valid, algorithm)
    table = measure_sensitivity(model, modules, params, 0.5, algorithm, mod.algorithm_fields(), batches, held,
                                step=0.2, half_width=1)
    assert table.grid == pytest.approx([0.3, 0.5, 0.7]) and table.layer_prunes == 15
    # the table runs each pruned layer on from the dense inputs (LayerResume); full forwards give the same table
    from layerif_plugins.integrations.llmcompressor import planning

    monkeypatch.setattr(planning, "RESUME_CACHE_BYTES", 0)
    full = measure_sensitivity(model, modules, params, 0.5, algorithm, mod.algorithm_fields(), batches, held,
                               step=0.2, half_width=1)
    assert full.base_loss == pytest.approx(table.base_loss, abs=1e-6)
    for got, want in zip(table.costs, full.costs, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the table left the model dense
    for layer, k in [(2, 2), (0, 0)]:
        fresh, _ = load_model_and_tokenizer(stories_dir)
        alone = [0.0] * 5
        alone[layer] = table.grid[k]
        prune_in_session(fresh, mod.stock_modifier(alone), batches)
        loss = token_mean(*example_token_losses(fresh, held, pad_id=0))
        assert loss - table.base_loss == pytest.approx(table.costs[layer][k], abs=1e-5)


class _Stop(Exception):
    """Stands in for a kill in the middle of a table."""


def _stop_after(monkeypatch, calls: int) -> None:
    """Make the table's own prune of one module raise after ``calls`` of them (an interruption mid-table)."""
    from layerif_plugins.integrations.llmcompressor import planning

    real, count = planning._sparsify, [0]

    def sparsify(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise _Stop
        return real(*args, **kwargs)

    monkeypatch.setattr(planning, "_sparsify", sparsify)


@pytest.mark.parametrize("around", ["dense", "uniform"])
def test_an_interrupted_sensitivity_table_resumes_at_the_next_layer(stories_dir, tinystories_train,
                                                                    tinystories_valid, around, tmp_path,
                                                                    monkeypatch):
    """Finished rows are journaled; a rerun reads them back and prunes only the rest: the same table, exactly."""
    from layerif_plugins.plan.planner import TableJournal

    model, batches, held, mod, modules, params = _sensitivity_setup(stories_dir, tinystories_train,
                                                                    tinystories_valid, "wanda")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = (model, modules, params, 0.5, "wanda", mod.algorithm_fields(), batches, held)
    full = measure_sensitivity(*args, step=0.2, half_width=1, around=around)
    per_layer = 3 if around == "dense" else 2  # around uniform the operating point itself needs no prune
    path = tmp_path / "plan.json.journal.jsonl"
    with monkeypatch.context() as m:
        first = len(modules) if around == "uniform" else 0  # the uniform prune the table is measured around
        _stop_after(m, first + (2 * per_layer + 1) * len(modules) // len(params))  # layers 0, 1 finish; 2 is cut
        with pytest.raises(_Stop):
            measure_sensitivity(*args, step=0.2, half_width=1, around=around, journal=TableJournal(path, "ctx"))
    assert all(torch.equal(dense[n], p) for n, p in model.named_parameters())  # the interruption left it dense
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as fh:
        fh.write('{"context": "sensitivity-table|ctx", "layer": 2, "ba')  # a line cut by the kill
    again = measure_sensitivity(*args, step=0.2, half_width=1, around=around, journal=TableJournal(path, "ctx"))
    assert again.costs == full.costs and again.base_loss == full.base_loss
    assert (again.resumed_layers, again.layer_prunes) == (2, 3 * per_layer)
    # what the interrupted run spent on the rows read back stays counted: their prunes and their journaled time
    saved = [json.loads(line) for line in path.read_text().splitlines()[:2]]
    assert again.resumed_layer_prunes == 2 * per_layer and all(r["seconds"] > 0 for r in saved)
    assert again.resumed_seconds == pytest.approx(sum(r["seconds"] for r in saved))
    # every row is now journaled: a third run prunes nothing; another context or base loss reuses nothing
    third = measure_sensitivity(*args, step=0.2, half_width=1, around=around, journal=TableJournal(path, "ctx"))
    assert third.costs == full.costs and (third.resumed_layers, third.layer_prunes) == (5, 0)
    assert third.resumed_layer_prunes == full.layer_prunes == 5 * per_layer
    assert TableJournal(path, "another table").get(0, full.base_loss) is None
    assert TableJournal(path, "ctx").get(0, full.base_loss + 1e-3) is None
    assert TableJournal(path, "ctx").get(0, full.base_loss) == full.costs[0]


@pytest.mark.parametrize("algorithm", ["wanda", "sparsegpt"])
def test_sensitivity_around_uniform_is_measured_at_the_stock_uniform_prune(stories_dir, tinystories_train,
                                                                           tinystories_valid, algorithm, monkeypatch):
    """``around="uniform"``: the sequential prune equals the stock uniform prune; the last layer's entries equal a
    stock prune of the list (target everywhere, that layer at the level); the model comes back dense."""
    from layerif_plugins.evaluation.perplexity import example_token_losses
    from layerif_plugins.integrations.llmcompressor import planning
    from layerif_plugins.integrations.llmcompressor.planning import sequential_prune

    model, batches, held, mod, modules, params = _sensitivity_setup(stories_dir, tinystories_train,
                                                                    tinystories_valid, algorithm)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}

    ours, _ = load_model_and_tokenizer(stories_dir)
    sequential_prune(ours, mod.resolve_targets(ours)[0], batches, algorithm, [0.5] * 5, mod.algorithm_fields())
    stock, _ = load_model_and_tokenizer(stories_dir)
    prune_in_session(stock, mod.stock_modifier([0.5] * 5), batches)
    for (name, a), b in zip(ours.named_parameters(), stock.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name  # the same masks; SparseGPT's updates agree to float rounding
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max())), name

    table = measure_sensitivity(model, modules, params, 0.5, algorithm, mod.algorithm_fields(), batches, held,
                                step=0.2, half_width=1, around="uniform")
    assert all(torch.equal(dense[n], p) for n, p in model.named_parameters())  # left dense
    assert [row[1] for row in table.costs] == [0.0] * 5 and table.layer_prunes == 10
    assert table.base_loss == pytest.approx(token_mean(*example_token_losses(stock, held, pad_id=0)), abs=1e-5)
    for k in (0, 2):
        fresh, _ = load_model_and_tokenizer(stories_dir)
        prune_in_session(fresh, mod.stock_modifier([0.5, 0.5, 0.5, 0.5, table.grid[k]]), batches)
        loss = token_mean(*example_token_losses(fresh, held, pad_id=0))
        assert loss - table.base_loss == pytest.approx(table.costs[4][k], abs=1e-5)
    monkeypatch.setattr(planning, "RESUME_CACHE_BYTES", 0)  # full forwards give the same table
    full = measure_sensitivity(model, modules, params, 0.5, algorithm, mod.algorithm_fields(), batches, held,
                               step=0.2, half_width=1, around="uniform")
    for got, want in zip(table.costs, full.costs, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    with pytest.raises(ConfigError, match="sensitivity_around must be one of"):
        measure_sensitivity(model, modules, params, 0.5, algorithm, {}, batches, held, 0.2, 1, around="sparse")


@pytest.mark.slow
def test_planned_prune_reruns_to_identical_weights_from_plan_and_recipe(stories_dir, tinystories_train, tmp_path):
    from llmcompressor import oneshot

    from layerif_plugins.integrations.llmcompressor.prune import _calibration_dataset

    common = dict(calib=tinystories_train, n_calib=N_CALIB, max_length=MAX_LEN, show_progress=False)
    report = prune_model(stories_dir, tmp_path / "atp", sparsity=0.6, allocation="atp", n_holdout=4, **common)
    plan = AllocationPlan.load(tmp_path / "atp" / "plan.json")
    assert plan.allocation == "atp" and plan.chosen["provider"] in ("uniform", "atp")
    assert [c["provider"] for c in plan.candidates] == ["uniform"] + ["atp"] * 6
    assert all(c["loss"] is not None and len(c["example_losses"]) == 4 for c in plan.candidates)
    assert [r["target"] for r in report["layers"]] == pytest.approx(plan.layer_sparsity, abs=1e-12)
    assert plan.cost["prunes"] == 7 and report["chosen"]["provider"] == plan.chosen["provider"]
    # the plan file, and the saved recipe (which records the per-layer list), rerun to the same weights
    again = prune_model(stories_dir, tmp_path / "again", sparsity=0.6, allocation="uniform",
                        plan=tmp_path / "atp" / "plan.json", **common)
    assert again["chosen"] == plan.chosen
    first, second = weights(tmp_path / "atp"), weights(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    _, tok = load_model_and_tokenizer(stories_dir)
    ds = _calibration_dataset(load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB))
    rerun = oneshot(model=str(stories_dir), recipe=str(tmp_path / "atp" / "recipe.yaml"), dataset=ds,
                    num_calibration_samples=N_CALIB, max_seq_length=MAX_LEN, shuffle_calibration_samples=False)
    state = rerun.state_dict()
    assert all(torch.equal(state[k], first[k]) for k in first if k in state)


@pytest.mark.slow
def test_the_model_the_search_judged_is_the_model_prune_model_saves(stories_dir, tinystories_train, tmp_path):
    """The chosen candidate's held-out loss, as the search measured it, is the saved model's held-out loss.

    SparseGPT, 32 equal-length calibration examples in batches of 4: ``oneshot``'s length-aware
    sampler (an unstable ``argsort``) does not keep the file's order from 17 examples on, and
    SparseGPT's result moves with the order its Hessian is summed in. The search must prune with
    the batches ``oneshot`` will use, in its order.
    """
    from layerif_plugins.evaluation.perplexity import example_token_losses

    n_calib, n_holdout = 32, 4
    report = prune_model(stories_dir, tmp_path / "out", algorithm="sparsegpt", sparsity=0.6, allocation="atp",
                         calib=tinystories_train, n_calib=n_calib, n_holdout=n_holdout, max_length=16, batch_size=4,
                         show_progress=False)
    plan = AllocationPlan.load(tmp_path / "out" / "plan.json")
    chosen = plan.candidates[plan.chosen["index"]]
    assert report["chosen"]["provider"] == chosen["provider"] and plan.cost["prunes"] == 7
    saved, tok = load_model_and_tokenizer(tmp_path / "out")
    held = load_examples(tinystories_train, tok, 16, n=n_calib + n_holdout).subset(range(n_calib, n_calib + n_holdout))
    sums, counts = example_token_losses(saved, held, pad_id=0)
    assert [s / c for s, c in zip(sums, counts, strict=True)] == pytest.approx(chosen["example_losses"], abs=1e-6)
    check = report["search_check"]  # the same comparison, made by prune_model itself on every search
    assert check["same_model"] is True and check["max_example_difference"] <= 1e-6
    assert check["saved_perplexity"] == pytest.approx(chosen["perplexity"], rel=1e-6)


def test_a_sparsegpt_plan_from_another_thread_count_warns_when_applied(stories_dir, tinystories_train, tmp_path,
                                                                          caplog):
    """The plan records the search's torch threads; applying it at another count logs why the model differs."""
    common = dict(algorithm="sparsegpt", sparsity=0.6, calib=tinystories_train, n_calib=N_CALIB, max_length=MAX_LEN,
                  show_progress=False)
    prune_model(stories_dir, tmp_path / "searched", allocation="atp", n_holdout=4, **common)
    plan_file = tmp_path / "searched" / "plan.json"
    data = json.loads(plan_file.read_text())
    assert data["numerics"] == {"torch_threads": torch.get_num_threads(), "cpu": cpu_identity()}
    with caplog.at_level("WARNING", logger="layerif_plugins"):
        prune_model(stories_dir, tmp_path / "same", plan=plan_file, **common)
    assert "torch thread(s)" not in caplog.text
    data["numerics"]["torch_threads"] += 1
    (tmp_path / "other.json").write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level("WARNING", logger="layerif_plugins"):
        prune_model(stories_dir, tmp_path / "other", plan=tmp_path / "other.json", **common)
    assert f"searched with {data['numerics']['torch_threads']} torch thread(s)" in caplog.text


@pytest.mark.slow
def test_a_search_that_judged_another_model_is_reported(stories_dir, tinystories_train, tmp_path, monkeypatch, caplog):
    """A search whose batches are not oneshot's judges models oneshot does not make: prune_model says so.

    (Before 2026-12-04 the search batched in file order; here it simply misses oneshot's last batch,
    a difference SparseGPT always shows.)
    """
    names = prune_model.__globals__  # the module prune_model runs in (whatever imported it before)
    real = names["calibration_batches"]

    def missing_last_batch(examples, batch_size, max_length=None, tokenizer=None):
        return real(examples, batch_size, max_length, tokenizer)[:-1]

    monkeypatch.setitem(names, "calibration_batches", missing_last_batch)
    with caplog.at_level("WARNING", logger="layerif_plugins"):
        report = prune_model(stories_dir, tmp_path / "out", algorithm="sparsegpt", sparsity=0.6, allocation="atp",
                             calib=tinystories_train, n_calib=32, n_holdout=4, max_length=16, batch_size=4,
                             show_progress=False)
    check = report["search_check"]
    assert check["checked"] and check["same_model"] is False and check["max_example_difference"] > 1e-3
    assert "the saved model is not the candidate the search judged" in caplog.text


@pytest.mark.slow
def test_recipe_written_before_the_planner_prunes_like_the_stock_modifier(stories_dir, tinystories_train, tmp_path):
    """A pre-planner recipe (allocation + fixed ε) gives exactly the stock Wanda weights for the §2b list."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    from layerif_plugins.allocate.sparsity import layerwise_sparsity
    from layerif_plugins.integrations.llmcompressor.modifiers import params_per_layer, prunable_modules
    from layerif_plugins.integrations.llmcompressor.prune import _calibration_dataset

    recipe = tmp_path / "old.yaml"
    recipe.write_text("pruning_stage:\n  sparsity_modifiers:\n    LayerIFWandaPruningModifier:\n"
                      "      sparsity: 0.5\n      allocation: depth_ramp\n      epsilon: 0.1\n")
    model, tok = load_model_and_tokenizer(stories_dir)
    ds = _calibration_dataset(load_examples(tinystories_train, tok, MAX_LEN, n=N_CALIB))
    params = params_per_layer(prunable_modules(model, ["LlamaDecoderLayer"], ["re:.*lm_head"]), 5)
    expected = layerwise_sparsity([0, 1, 2, 3, 4], params, 0.5, epsilon=0.1)
    ours = oneshot(model=str(stories_dir), recipe=str(recipe), dataset=ds, num_calibration_samples=N_CALIB,
                   max_seq_length=MAX_LEN, shuffle_calibration_samples=False).state_dict()
    stock = oneshot(model=str(stories_dir), recipe=[WandaPruningModifier(
        sparsity=expected, targets=["LlamaDecoderLayer"], ignore=["re:.*lm_head"])], dataset=ds,
        num_calibration_samples=N_CALIB, max_seq_length=MAX_LEN, shuffle_calibration_samples=False).state_dict()
    assert all(torch.equal(ours[k], stock[k]) for k in stock)


def test_plan_of_another_model_or_target_is_refused_naming_the_field(stories_dir, tinystories_train, tmp_path):
    common = dict(calib=tinystories_train, n_calib=N_CALIB, max_length=MAX_LEN, show_progress=False)
    plan = plan_pruning(stories_dir, tmp_path / "plan.json", sparsity=0.5, allocation="depth_ramp", **common)
    assert plan.cost["prunes"] == 0 and plan.decision["rule"] == "fixed (no search)"
    data = json.loads((tmp_path / "plan.json").read_text())
    data["model"]["config_hash"] = "0123456789abcdef"
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(AllocationError, match="another model: config_hash"):
        prune_model(stories_dir, tmp_path / "x", sparsity=0.5, allocation="uniform", plan=tmp_path / "other.json",
                    **common)
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["model"]["weights"].startswith("w1:")
    data["model"]["weights"] = data["model"]["weights"][:-4] + "0000"
    (tmp_path / "retrained.json").write_text(json.dumps(data))
    with pytest.raises(AllocationError, match="made for other weights"):
        prune_model(stories_dir, tmp_path / "w", sparsity=0.5, allocation="uniform",
                    plan=tmp_path / "retrained.json", **common)
    with pytest.raises(AllocationError, match="target sparsity 0.5, not 0.6"):
        prune_model(stories_dir, tmp_path / "y", sparsity=0.6, allocation="uniform", plan=tmp_path / "plan.json",
                    **common)
    with pytest.raises(AllocationError, match="algorithm 'wanda', not 'sparsegpt'"):
        prune_model(stories_dir, tmp_path / "z", algorithm="sparsegpt", sparsity=0.5, allocation="uniform",
                    plan=tmp_path / "plan.json", **common)
    assert not any((tmp_path / n).exists() for n in "xyzw")


def test_table_examples_follow_the_held_out_ones_or_fall_back_to_calibration(stories_dir, tinystories_train,
                                                                              tmp_path):
    from layerif_plugins.integrations.llmcompressor.planning import table_examples_for
    from layerif_plugins.integrations.llmcompressor.prune import _load_data
    from layerif_plugins.plan import AllocationOptions

    _, tok = load_model_and_tokenizer(stories_dir)
    every = load_examples(tinystories_train, tok, MAX_LEN, n=20)
    got = _load_data(tinystories_train, None, tok, 8, 4, MAX_LEN, True, n_table=6)
    assert got.calibration.input_ids == every.input_ids[:8] and got.held.input_ids == every.input_ids[8:12]
    assert got.table.input_ids == every.input_ids[12:18] and got.held_from["table_examples"] == [12, 18]
    options = AllocationOptions(allocation="sensitivity", sensitivity_examples=4)
    assert table_examples_for(options, got.table, []).input_ids == every.input_ids[12:16]
    # a file with nothing after the held-out examples: the table falls back to calibration examples
    short = tmp_path / "short.txt"
    short.write_text("\n".join(tinystories_train.read_text(encoding="utf-8").splitlines()[:400]), encoding="utf-8")
    n_short = len(load_examples(short, tok, MAX_LEN))
    got = _load_data(short, None, tok, n_short - 2, 2, MAX_LEN, True, n_table=6)
    assert got.table is None and got.held_from["table_examples"].startswith("calibration examples")
    batches = calibration_batches(got.calibration, 1, MAX_LEN, tok)  # oneshot's order: longest first
    assert sorted(b["input_ids"].shape[1] for b in batches) == sorted(len(x) for x in got.calibration.input_ids)
    first = [tuple(b["input_ids"][0].tolist()) for b in batches[:4]]
    assert table_examples_for(options, None, batches).input_ids == tuple(first)
    assert all(x in got.calibration.input_ids for x in first)


def test_a_plan_interrupted_in_its_sensitivity_table_resumes_to_the_same_plan(stories_dir, tinystories_train,
                                                                              tmp_path, monkeypatch):
    """`plan_pruning` killed mid-table keeps the finished rows; the same call again prunes only the rest."""
    common = dict(sparsity=0.5, allocation="sensitivity", max_moves=1, sensitivity_levels=1, calib=tinystories_train,
                  n_calib=N_CALIB, n_holdout=4, max_length=MAX_LEN, show_progress=False)
    fresh = plan_pruning(stories_dir, tmp_path / "fresh.json", **common)
    out, journal = tmp_path / "plan.json", tmp_path / "plan.json.journal.jsonl"
    model, _ = load_model_and_tokenizer(stories_dir)
    modules, params = LayerIFWandaPruningModifier(sparsity=0.5).resolve_targets(model)
    with monkeypatch.context() as m:
        _stop_after(m, 3 * 3 * len(modules) // len(params))  # three whole layers of the table, then a kill
        with pytest.raises(_Stop):
            plan_pruning(stories_dir, out, **common)
    rows = [json.loads(line) for line in journal.read_text().splitlines()]
    assert not out.exists() and sum(r["context"].startswith("sensitivity-table|") for r in rows) == 3
    again = plan_pruning(stories_dir, out, **common)
    assert again.extras["sensitivity"]["costs"] == fresh.extras["sensitivity"]["costs"]
    assert (again.cost["resumed_layers"], again.cost["layer_prunes"]) == (3, 2 * 3)
    assert fresh.cost["resumed_layers"] == 0 and fresh.cost["layer_prunes"] == 5 * 3
    # the plan's cost keeps the killed run's share: prunes add up to the uninterrupted search's, and its time
    table_rows = [r for r in rows if r["context"].startswith("sensitivity-table|")]
    assert again.cost["resumed_layer_prunes"] + again.cost["layer_prunes"] == fresh.cost["layer_prunes"]
    assert again.cost["resumed_seconds"] >= sum(r["seconds"] for r in table_rows) > 0
    assert fresh.cost["resumed_seconds"] == 0 and fresh.cost["resumed_layer_prunes"] == 0
    assert again.layer_sparsity == fresh.layer_sparsity
    assert [c["loss"] for c in again.candidates] == [c["loss"] for c in fresh.candidates]
    assert not journal.exists()


def test_budget_too_small_is_refused_before_any_work(stories_dir, tinystories_train, tmp_path):
    with pytest.raises(AllocationError, match="budget of 1 pruning pass"):
        plan_pruning(stories_dir, tmp_path / "p.json", sparsity=0.5, allocation="auto", budget_prunes=1,
                     calib=tinystories_train, n_calib=N_CALIB, max_length=MAX_LEN, show_progress=False)
    assert not (tmp_path / "p.json").exists()


def test_confirmation_examples_are_the_last_held_out_ones_and_judge_only_the_decision(stories_dir, tinystories_train,
                                                                                      tmp_path):
    """``confirm_examples``: the same prunes, the last k held-out examples moved from the search to the decision."""
    common = dict(sparsity=0.5, allocation="auto", budget_prunes=3, calib=tinystories_train, n_calib=N_CALIB,
                  n_holdout=6, max_length=MAX_LEN, show_progress=False)
    with pytest.raises(ConfigError, match="leaves 1 of the 6 held-out examples"):
        plan_pruning(stories_dir, tmp_path / "bad.json", confirm_examples=5, **common)
    assert not (tmp_path / "bad.json").exists()
    whole = plan_pruning(stories_dir, tmp_path / "whole.json", **common)
    split = plan_pruning(stories_dir, tmp_path / "split.json", confirm_examples=2, **common)
    assert [c["layer_sparsity"] for c in split.candidates] == [c["layer_sparsity"] for c in whole.candidates]
    for a, b in zip(whole.candidates, split.candidates, strict=True):
        if b["status"] != "evaluated":
            continue
        assert len(b["example_losses"]) == 4 and len(b["confirm_example_losses"]) == 2
        assert b["example_losses"] + b["confirm_example_losses"] == pytest.approx(a["example_losses"], rel=1e-12)
        assert a["confirm_loss"] is None
    assert split.options["confirm_examples"] == 2
    assert "2 confirmation examples" in split.decision["why"][0]
    assert "did not see" in split.decision["rule"] and "did not see" not in whole.decision["rule"]


def test_a_recheck_at_another_calibration_order_is_the_stock_modifier_on_rotated_batches(stories_dir,
                                                                                        tinystories_train,
                                                                                        tinystories_valid):
    """``evaluate(list, order)`` = the stock SparseGPT modifier on the batches with the first ``order`` moved last."""
    from layerif_plugins.evaluation.perplexity import example_token_losses
    from layerif_plugins.integrations.llmcompressor.planning import calibration_order, make_evaluator

    model, batches, held, mod, modules, params = _sensitivity_setup(stories_dir, tinystories_train,
                                                                    tinystories_valid, "sparsegpt")
    evaluate = make_evaluator(model, modules, mod.stock_modifier, batches, held)
    levels = [0.3, 0.4, 0.5, 0.6, 0.7]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    at = {order: evaluate(levels, order) for order in (0, 2)}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # each prune was undone
    assert calibration_order(batches, 2) == batches[2:] + batches[:2]
    for order, ev in at.items():
        fresh, _ = load_model_and_tokenizer(stories_dir)
        prune_in_session(fresh, mod.stock_modifier(levels), batches[order:] + batches[:order])
        sums, counts = example_token_losses(fresh, held, pad_id=0)
        assert ev.counts == counts and ev.sums == pytest.approx(sums, rel=1e-6)
    # the same data in another order: the same model up to rounding
    assert token_mean(at[2].sums, at[2].counts) == pytest.approx(token_mean(at[0].sums, at[0].counts), rel=1e-3)
    with pytest.raises(ConfigError, match="calibration order 8 needs more than 8 calibration batches"):
        evaluate(levels, 8)


def test_auto_with_judge_orders_rechecks_each_finalist(stories_dir, tinystories_train, tmp_path):
    """``judge_orders: 2``: the finalists pruned once more at the second order, averaged, within the budget."""
    common = dict(algorithm="sparsegpt", sparsity=0.5, allocation="auto", calib=tinystories_train, n_calib=N_CALIB,
                  n_holdout=4, max_length=MAX_LEN, show_progress=False)
    with pytest.raises(ConfigError, match="judge_orders=9 needs at least as many calibration batches .* got 8"):
        plan_pruning(stories_dir, tmp_path / "bad.json", judge_orders=9, budget_prunes=99, **common)
    assert not (tmp_path / "bad.json").exists()
    plan = plan_pruning(stories_dir, tmp_path / "plan.json", judge_orders=2, budget_prunes=9, **common)
    finalists = [c for c in plan.candidates if c["order_losses"] is not None]
    assert {c["provider"] for c in finalists} == {c["provider"] for c in plan.candidates if c["loss"] is not None}
    assert plan.cost["prunes"] <= 9 and plan.options["judge_orders"] == 2
    for c in finalists:
        assert len(c["order_losses"]) == 2 and c["order_losses"][0] == c["loss"]
        assert len(c["order_example_losses"][1]) == len(c["example_losses"]) == 4
    assert "averaged over 2 calibration orders" in plan.decision["rule"]
    assert plan.chosen["index"] in {plan.candidates.index(c) for c in finalists}
    rows = {r[0].removesuffix(" ←"): r[3] for r, c in zip(summary_rows(plan), plan.candidates, strict=True)
            if c["order_losses"] is not None}
    assert rows["uniform"].endswith("(per calibration order)") and rows["uniform"].count(" / ") == 1


@pytest.mark.slow
def test_cli_plan_then_prune_with_the_plan(stories_dir, tinystories_train, tmp_path, capsys):
    from layerif_plugins.cli import main

    args = ["--model", str(stories_dir), "--sparsity", "0.5", "--calib", str(tinystories_train), "--n-calib", "8",
            "--max-length", "32", "--quiet"]
    assert main(["plan", *args, "--allocation", "sensitivity", "--n-holdout", "4", "--sensitivity-step", "0.1",
                 "--max-moves", "2", "--out", str(tmp_path / "plan.json")]) == 0
    printed = capsys.readouterr().out
    assert "sensitivity" in printed and "plan: chose" in printed
    plan = AllocationPlan.load(tmp_path / "plan.json")
    table = plan.extras["sensitivity"]
    assert len(table["costs"]) == 5 and len(table["grid"]) == 7
    # the table was measured on the 16 examples after the held-out ones, never on the judge's
    assert plan.data["holdout_file"]["table_examples"] == [12, 28] and table["examples"]["n"] == 16
    assert table["examples"]["sha256"] != plan.data["holdout"]["sha256"]
    assert sum(c["knobs"].get("source") == "move" for c in plan.candidates) <= 2
    assert main(["prune", *args, "--allocation", "uniform", "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "pruned")]) == 0
    report = json.loads((tmp_path / "pruned" / "sparsity_report.json").read_text())
    assert [r["target"] for r in report["layers"]] == pytest.approx(plan.layer_sparsity, abs=1e-12)
    assert json.loads((tmp_path / "pruned" / "sparsity_report.json").read_text())["search_check"] is None  # no search
    capsys.readouterr()
    assert main(["prune", *args, "--allocation", "atp", "--n-holdout", "4", "--out", str(tmp_path / "atp")]) == 0
    assert "saved model = chosen candidate: yes" in capsys.readouterr().out


@pytest.mark.slow
def test_auto_recipe_plans_inside_oneshot_within_its_budget(stories_dir, tinystories_train, tmp_path):
    """allocation: auto from a YAML recipe: the modifier plans on held-out calibration batches, then prunes once."""
    import yaml
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from layerif_plugins.integrations.llmcompressor.prune import _calibration_dataset

    recipe = tmp_path / "auto.yaml"
    recipe.write_text("pruning_stage:\n  sparsity_modifiers:\n    LayerIFWandaPruningModifier:\n"
                      "      sparsity: 0.6\n      allocation: auto\n      budget_prunes: 8\n      holdout: 4\n"
                      "      sensitivity_step: 0.1\n      sensitivity_levels: 1\n")
    _, tok = load_model_and_tokenizer(stories_dir)
    ds = _calibration_dataset(load_examples(tinystories_train, tok, MAX_LEN, n=16))
    out = tmp_path / "out"
    model = oneshot(model=str(stories_dir), recipe=str(recipe), dataset=ds, num_calibration_samples=16,
                    max_seq_length=MAX_LEN, shuffle_calibration_samples=False, output_dir=str(out))
    (ran,) = [m for m in active_session().lifecycle.recipe.modifiers if isinstance(m, LayerIFWandaPruningModifier)]
    plan = ran.allocation_plan
    assert plan.cost["prunes"] == 8 and plan.cost["budget_exhausted"]
    assert plan.decision["rule"].startswith("keep the simpler candidate")
    assert [c["provider"] for c in plan.candidates[:2]] == ["uniform", "atp"]
    assert plan.data["holdout_from"] == "calibration batches" and len(plan.data["positions"]) == 4
    assert ran.layer_sparsity == plan.layer_sparsity
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    args = next(iter(next(iter(saved.values())).values()))["LayerIFWandaPruningModifier"]
    assert args["layer_sparsity"] == pytest.approx(plan.layer_sparsity) and args["allocation"] == "auto"
    for layer, block in enumerate(model.model.layers):
        zeros = sum(int((m.weight == 0).sum()) for m in block.modules() if isinstance(m, torch.nn.Linear))
        total = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
        assert zeros / total == pytest.approx(plan.layer_sparsity[layer], abs=0.02)
    active_session().reset()


def test_modifier_fields_are_the_allocation_options():
    """One options dataclass: every AllocationOptions field is a modifier field with the same default and checks."""
    import dataclasses

    from pydantic import ValidationError

    from layerif_plugins.integrations.llmcompressor import LayerIFSparseGPTModifier
    from layerif_plugins.plan import AllocationOptions

    for cls in (LayerIFWandaPruningModifier, LayerIFSparseGPTModifier):
        for f in dataclasses.fields(AllocationOptions):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert cls.model_fields[f.name].default == default, (cls.__name__, f.name)
    for bad, match in [({"allocation": "auto", "epsilon": 0.1}, "spread of a score mapping"),
                       ({"allocation": "atp", "budget_prunes": 0}, "budget_prunes"),
                       ({"allocation": "sensitivity", "sensitivity_levels": 0}, "sensitivity_levels")]:
        with pytest.raises(ValidationError, match=match):
            LayerIFWandaPruningModifier(sparsity=0.5, **bad)
        with pytest.raises(ConfigError, match=match):
            AllocationOptions(**bad)


@pytest.mark.slow
def test_interrupted_plan_resumes_from_its_last_finished_candidate(stories_dir, tinystories_train, tmp_path):
    """Ctrl-C during `layerif plan` keeps the journal; the same command again re-evaluates nothing that finished."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from layerif_plugins.cli import main

    out = tmp_path / "plan.json"
    journal = tmp_path / "plan.json.journal.jsonl"
    args = ["plan", "--model", str(stories_dir), "--sparsity", "0.6", "--allocation", "atp", "--calib",
            str(tinystories_train), "--n-calib", "32", "--max-length", "32", "--n-holdout", "4", "--quiet",
            "--out", str(out)]  # 32 examples: enough work left after two candidates for the signal to land
    # a Ctrl-C of its own: the child starts with SIGINT at its default even where the test process
    # ignores it (a disposition of SIG_IGN is inherited through exec, and Python then keeps ignoring it)
    proc = subprocess.Popen([sys.executable, "-m", "layerif_plugins.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    done = len(journal.read_text().splitlines())
    assert done >= 2 and not out.exists()
    assert main(args) == 0
    plan = AllocationPlan.load(out)
    assert plan.cost["resumed"] == done and plan.cost["prunes"] == 7 - done
    resumed = [c for c in plan.candidates if c["status"] == "resumed"]
    assert len(resumed) == done and plan.cost["resumed_seconds"] == pytest.approx(sum(c["seconds"] for c in resumed))
    assert not journal.exists()


def test_api_type_errors_name_the_argument(stories_dir, tinystories_train, tmp_path):
    model, _ = load_model_and_tokenizer(stories_dir)
    with pytest.raises(TypeError, match="model_path must be a path .* got LlamaForCausalLM; .* oneshot"):
        prune_model(model, tmp_path / "x", sparsity=0.5, allocation="uniform", calib=tinystories_train)
    with pytest.raises(TypeError, match="scores must be a path"):
        plan_pruning(stories_dir, tmp_path / "p.json", sparsity=0.5, allocation="layerif", scores=3,
                     calib=tinystories_train)
    from layerif_plugins.models.loading import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(1.5)
