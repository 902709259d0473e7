"""The allocation planner's pure parts: knapsack vs brute force, ATP, the paired rule, the search, the plan file."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from layerif_plugins.allocate.sparsity import layerwise_sparsity, weighted_mean
from layerif_plugins.errors import AllocationError, ConfigError
from layerif_plugins.models.fingerprint import ModelFingerprint
from layerif_plugins.plan import (
    AllocationOptions,
    AllocationPlan,
    Budget,
    Evaluation,
    Journal,
    knapsack,
    plan_allocation,
)
from layerif_plugins.plan.artifact import cpu_identity
from layerif_plugins.plan.decide import choose_simplest, paired
from layerif_plugins.plan.planner import decide_saved
from layerif_plugins.plan.providers import (
    ATP,
    Proposal,
    Provider,
    Sensitivity,
    SensitivityTable,
    Uniform,
    atp_max_beta,
    atp_sparsity,
    knapsack_allocation,
)

# ----------------------------------------------------------------------------- knapsack


def brute_force(costs, params, center):
    """Every combination of levels; the cheapest one whose weighted offsets sum to exactly zero."""
    best = None
    rows = [[k for k, c in enumerate(row) if c is not None] for row in costs]
    for combo in itertools.product(*rows):
        if sum(p * (k - center) for p, k in zip(params, combo, strict=True)) != 0:
            continue
        cost = sum(costs[layer][k] for layer, k in enumerate(combo))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, combo)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_equals_brute_force(seed):
    rng = random.Random(seed)
    n, width = rng.choice([(3, 2), (4, 2), (5, 1)])
    params = [rng.choice([1, 2, 3]) for _ in range(n)] if seed % 2 else [7] * n
    costs = [[rng.uniform(0, 1) if rng.random() > 0.1 else None for _ in range(2 * width + 1)] for _ in range(n)]
    for row in costs:
        row[width] = rng.uniform(0, 1)  # the target level is always allowed: a solution exists
    got = knapsack.solve(costs, params, width)
    want = brute_force(costs, params, width)
    assert got.exact
    assert got.cost == pytest.approx(want[0], abs=1e-12)
    assert sum(p * (k - width) for p, k in zip(params, got.levels, strict=True)) == 0


def test_knapsack_ties_give_uniform_and_grid_meets_target_exactly():
    flat = [[0.5] * 7 for _ in range(6)]
    assert knapsack.solve(flat, [10] * 6, 3).levels == [3] * 6
    grid = knapsack.level_grid(0.6, 0.05, 3)
    assert grid[3] == pytest.approx(0.6) and grid[0] == pytest.approx(0.45) and grid[6] == pytest.approx(0.75)
    table = SensitivityTable(grid=grid, costs=[[abs(k - 3) * (1 + i) * 0.01 - (0.1 if (i, k) == (0, 5) else 0)
                                                for k in range(7)] for i in range(6)], center=3, base_loss=1.0)
    levels, info = knapsack_allocation(table, [100] * 6, 0.6)
    assert weighted_mean(levels, [100] * 6) == pytest.approx(0.6, abs=1e-12)
    assert levels[0] > 0.6 and info["exact_units"]


def test_knapsack_refuses_impossible_and_bad_grids():
    with pytest.raises(AllocationError, match="no combination"):
        knapsack.solve([[None, None, 1.0], [None, None, 1.0]], [1, 1], 1)
    with pytest.raises(AllocationError, match="half_width"):
        knapsack.level_grid(0.5, 0.05, 0)
    assert knapsack.feasible_levels(knapsack.level_grid(0.9, 0.05, 3)) == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- ATP


def test_atp_keeps_the_weighted_mean_and_rises_linearly():
    params = [3.0, 1.0, 2.0, 5.0, 4.0]
    top = atp_max_beta(params, 0.7)
    for frac in (0.1, 0.5, 1.0):
        s = atp_sparsity(params, 0.7, frac * top)
        assert weighted_mean(s, params) == pytest.approx(0.7, abs=1e-12)
        assert all(b - a == pytest.approx(frac * top) for a, b in zip(s, s[1:], strict=False))
        assert min(s) >= 0 and max(s) <= 0.99 + 1e-12
    with pytest.raises(AllocationError, match="smaller beta"):
        atp_sparsity(params, 0.7, 1.01 * top)


def test_depth_ramp_is_atp_at_one_beta():
    """§2b on score = layer index with ε equals ATP with β = 2 ε s / (L − 1) (equal block sizes)."""
    n, s, eps = 30, 0.6, 0.1
    ramp = layerwise_sparsity(list(range(n)), [1.0] * n, s, epsilon=eps)
    atp = atp_sparsity([1.0] * n, s, 2 * eps * s / (n - 1))
    assert ramp == pytest.approx(atp, abs=1e-12)


# ----------------------------------------------------------------------------- paired rule


def test_paired_statistics_match_the_formula():
    a, b = [1.0, 2.0, 4.0, 3.0], [1.5, 2.0, 3.0, 3.5]
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 4
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4)
    p = paired(a, b)
    assert p.mean == pytest.approx(mean) and p.se == pytest.approx(se) and p.n == 4


def test_simplest_kept_unless_beaten_beyond_two_standard_errors():
    base = [2.0, 2.5, 3.0, 2.2, 2.8, 2.4]
    noisy = [x + e for x, e in zip(base, [-0.3, 0.25, -0.2, 0.3, -0.25, 0.1], strict=True)]  # mean −0.0167
    clear = [x - 0.2 + e for x, e in zip(base, [0.01, -0.01, 0.02, 0.0, -0.02, 0.0], strict=True)]
    k, why = choose_simplest(["uniform", "atp", "owl"], [base, noisy, base])
    assert k == 0 and "keep uniform" in why[-1]
    k, why = choose_simplest(["uniform", "atp", "sensitivity", "owl"], [base, noisy, clear, base])
    assert k == 2 and "beats uniform" in why[-1]


def test_the_search_tier_must_beat_the_best_heuristic_not_only_atp():
    """Tiers uniform 0, ATP 1, heuristics 2, search 3: the search's list challenges whatever was kept before it."""
    base = [2.0, 2.5, 3.0, 2.2, 2.8, 2.4]
    atp = [x - 0.10 for x in base]
    heuristic = [x - 0.30 + e for x, e in zip(base, [0.01, -0.01, 0.02, 0.0, -0.02, 0.0], strict=True)]
    # beats ATP clearly, but the heuristic by only 0.02 ± 0.03 (noise of the same size)
    search = [x - 0.02 + e for x, e in zip(heuristic, [0.04, -0.04, 0.03, -0.03, 0.02, -0.02], strict=True)]
    names = ["uniform", "atp", "layerif", "sensitivity"]
    d = [s - h for s, h in zip(search, heuristic, strict=True)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    assert mean < 0 and -mean < 2 * se  # the premise: within two paired SE of the heuristic
    assert max(s - a for s, a in zip(search, atp, strict=True)) < 0  # and below ATP on every example
    k, why = choose_simplest(names, [base, atp, heuristic, search], tiers=[0, 1, 2, 3])
    assert k == 2 and why[-1].startswith("sensitivity vs layerif") and "keep layerif" in why[-1]
    # the default tiers (0, 1, 2, 2: the rest in one tier) pick the lowest mean of the rest instead
    k, why = choose_simplest(names, [base, atp, heuristic, search])
    assert k == 3 and "sensitivity beats atp" in why[-1]
    # a heuristic that does not beat ATP leaves ATP as the incumbent the search must beat
    k, why = choose_simplest(names, [base, atp, [x + 0.1 for x in base], search], tiers=[0, 1, 2, 3])
    assert k == 3 and "sensitivity beats atp" in why[-1]
    with pytest.raises(AllocationError, match="non-decreasing simplicity rank"):
        choose_simplest(names, [base, atp, heuristic, search], tiers=[0, 2, 1, 3])


# ----------------------------------------------------------------------------- the search loop


def quadratic_loss(layer_sparsity):
    """A deterministic 'held-out loss' of a list: deeper layers tolerate more sparsity (12 examples)."""
    n = len(layer_sparsity)
    base = sum((s - (0.4 + 0.3 * i / (n - 1))) ** 2 for i, s in enumerate(layer_sparsity))
    sums = [(1.0 + base) * (10 + j % 3) for j in range(12)]
    return Evaluation(sums, [10 + j % 3 for j in range(12)], 0.0)


def table_of(params, target):
    grid = knapsack.level_grid(target, 0.05, 3)
    n = len(params)
    costs = [[(g - (0.4 + 0.3 * i / (n - 1))) ** 2 for g in grid] for i in range(n)]
    return SensitivityTable(grid=grid, costs=costs, center=3, base_loss=1.0)


def test_planner_finds_the_minimum_and_respects_the_budget(tmp_path):
    params, target = [1.0] * 6, 0.55
    calls = []

    def evaluate(ls):
        calls.append(ls)
        return quadratic_loss(ls)

    providers = [Uniform(6, target), ATP(params, target), Sensitivity(lambda: table_of(params, target), params, target,
                                                                      max_moves=3)]
    result = plan_allocation(providers, evaluate, decision="lowest")
    assert result.winner.provider in ("atp", "sensitivity")
    assert result.winner.loss < result.candidates[0].loss
    assert weighted_mean(result.winner.layer_sparsity, params) == pytest.approx(target, abs=1e-9)
    assert len(calls) == result.cost["prunes"] == len({tuple(c) for c in calls})  # each list evaluated once

    few = plan_allocation(providers[:2], evaluate, budget=Budget(prunes=3))
    assert few.cost["prunes"] == 3 and few.cost["budget_exhausted"]
    assert [c.status for c in few.candidates].count("skipped (budget)") == 1
    with pytest.raises(AllocationError, match="budget of 1 pruning pass"):
        plan_allocation(providers, evaluate, budget=Budget(prunes=1), decision="auto")
    with pytest.raises(ConfigError, match="budget prunes"):
        Budget(prunes=0)


class Fixed(Provider):
    """A one-candidate heuristic (tier 2, like OWL / AlphaPruning / LayerIF at one knob)."""

    def __init__(self, name, layer_sparsity):
        self.name, self.layer_sparsity = name, layer_sparsity

    def propose(self, mine, everything):
        return [] if mine else [Proposal(self.name, {}, self.layer_sparsity)]


def test_auto_makes_the_sensitivity_list_beat_the_best_heuristic():
    """End to end: a knapsack list within the noise of a heuristic that beat ATP does not replace it.

    Made-up per-example losses by kind of list: uniform, ATP (linear), the heuristic's list, anything
    else (the knapsack's). The knapsack is lower than the heuristic on average, but within two paired SE.
    """
    params, target = [1.0] * 6, 0.55
    heuristic_list = [0.5, 0.55, 0.6, 0.6, 0.55, 0.5]
    u = [2.0, 2.5, 3.0, 2.2, 2.8, 2.4, 2.6, 2.1]
    by_kind = {"uniform": u, "atp": [x - 0.1 for x in u],
               "heuristic": [x - 0.3 + e for x, e in zip(u, [0.01, -0.01, 0.02, 0.0, -0.02, 0.0, 0.01, -0.01],
                                                          strict=True)]}
    by_kind["search"] = [x - 0.02 + e for x, e in zip(by_kind["heuristic"], [0.04, -0.04, 0.03, -0.03, 0.02, -0.02,
                                                                              0.05, -0.05], strict=True)]
    seen = []

    def evaluate(ls):
        steps = {round(b - a, 9) for a, b in itertools.pairwise(ls)}
        kind = ("uniform" if steps == {0.0} else "atp" if len(steps) == 1 else
                "heuristic" if list(ls) == heuristic_list else "search")
        seen.append(kind)
        return Evaluation([x * 10 for x in by_kind[kind]], [10] * len(u), 0.0)

    providers = [Uniform(6, target), ATP(params, target, beta=0.02), Fixed("layerif", heuristic_list),
                 Sensitivity(lambda: table_of(params, target), params, target, max_moves=0)]
    result = plan_allocation(providers, evaluate, decision="auto")
    assert seen == ["uniform", "atp", "heuristic", "search"]
    assert result.winner.provider == "layerif"
    assert result.decision["why"][-1].startswith("sensitivity(source=knapsack) vs layerif()")
    assert "then the per-layer search" in result.decision["rule"]
    # without the heuristic the same knapsack list beats ATP clearly and is kept
    result = plan_allocation([providers[0], providers[1], providers[3]], evaluate, decision="auto")
    assert result.winner.provider == "sensitivity" and "beats atp" in result.decision["why"][-1]
    # a saved plan's candidates decide the same way again
    full = plan_allocation(providers, evaluate, decision="auto")
    k, why, rule = decide_saved([c.to_dict() for c in full.candidates], {"sigmas": 2.0})
    assert full.candidates[k].provider == "layerif" and why == full.decision["why"] and rule == full.decision["rule"]


def test_the_tiered_rule_on_the_saved_plan_it_was_made_for():
    """TinyStories Wanda 60 %, calibration seed 1 (benchmarks/results): the plan chose a sensitivity move (one
    tier for all but ATP); under the tiers it keeps LayerIF*, whose lead over ATP and the move's over it are those
    the plan recorded (docs/quality.md §0)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks/results/plan_smollm2-135m_tinystories_wanda_0.6_1.json"
    plan = json.loads(path.read_text())
    assert plan["chosen"]["provider"] == "sensitivity"
    k, why, _ = decide_saved(plan["candidates"], plan["options"])
    layerif = [c for c in plan["candidates"] if c["provider"] == "layerif" and c["loss"] is not None]
    assert plan["candidates"][k] == min(layerif, key=lambda c: c["loss"])
    assert plan["candidates"][k]["knobs"] == {"epsilon": 0.3, "invert": True}
    move = plan["candidates"][plan["chosen"]["index"]]
    p = paired(move["example_losses"], plan["candidates"][k]["example_losses"])
    assert -p.mean < 2 * p.se and f"{p.mean:+.5f}" in why[-1]
    assert why[-1].endswith("keep layerif(epsilon=0.3, invert=True)")


def test_planner_resumes_from_its_journal(tmp_path):
    params, target = [1.0] * 5, 0.5
    providers = [Uniform(5, target), ATP(params, target)]
    path = tmp_path / "journal.jsonl"
    first = plan_allocation(providers, quadratic_loss, journal=Journal(path, "ctx"))
    lines = path.read_text().splitlines()
    assert len(lines) == first.cost["prunes"] == 7
    path.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # killed while writing the fifth
    again = plan_allocation(providers, quadratic_loss, journal=Journal(path, "ctx"))
    assert again.cost["resumed"] == 4 and again.cost["prunes"] == 3
    assert again.winner.layer_sparsity == first.winner.layer_sparsity
    other = plan_allocation(providers, quadratic_loss, journal=Journal(path, "another search"))
    assert other.cost["resumed"] == 0  # a journal of another search is never reused


def test_confirmation_slice_judges_only_the_final_choice():
    """The last ``confirm_examples`` held-out examples never enter the search; auto's rule is judged on them.

    A made-up host: 8 search examples where ATP is clearly best, 6 confirmation examples where it is no
    better than uniform (the search's margin was luck). Without the slice auto keeps ATP; with it, the
    search picks the same finalists (its losses are those of the first 8 examples alone) but keeps uniform.
    """
    params, target = [1.0] * 5, 0.5
    search_atp, confirm_atp = [5.0] * 8, [6.0, 6.2, 5.8, 6.1, 5.9, 6.0]
    search_uni, confirm_uni = [5.5, 5.6, 5.4, 5.5, 5.6, 5.4, 5.5, 5.5], [6.0, 6.1, 5.9, 6.0, 6.0, 6.0]

    def evaluate(ls):
        atp = max(ls) - min(ls) > 1e-9
        sums = (search_atp + confirm_atp) if atp else (search_uni + confirm_uni)
        return Evaluation([x * 10 for x in sums], [10] * len(sums), 0.0)

    providers = [Uniform(5, target), ATP(params, target)]
    plain = plan_allocation(providers, evaluate, decision="auto")
    assert plain.winner.provider == "atp" and len(plain.winner.example_losses) == 14
    held = plan_allocation(providers, evaluate, decision="auto", confirm_examples=6)
    uni = held.candidates[0]
    assert uni.example_losses == pytest.approx(search_uni) and uni.confirm_example_losses == pytest.approx(confirm_uni)
    assert uni.loss == pytest.approx(sum(search_uni) / 8) and uni.confirm_loss == pytest.approx(sum(confirm_uni) / 6)
    assert held.winner.provider == "uniform"
    assert "confirmation examples" in held.decision["why"][0] and "did not see" in held.decision["rule"]
    # ATP's β is still chosen on the search's examples only: every ATP candidate ties there and the first is kept
    assert [c.knobs for c in held.candidates if c.provider == "atp"] == [c.knobs for c in plain.candidates
                                                                        if c.provider == "atp"]
    with pytest.raises(AllocationError, match="leaves 1 of the 14 held-out examples"):
        plan_allocation(providers, evaluate, decision="auto", confirm_examples=13)
    with pytest.raises(ConfigError, match="confirm_examples must be an integer >= 0"):
        plan_allocation(providers, evaluate, decision="auto", confirm_examples=-1)
    with pytest.raises(ConfigError, match="final choice of allocation 'auto'"):
        AllocationOptions(allocation="sensitivity", confirm_examples=4)
    assert AllocationOptions(allocation="auto", confirm_examples=4).confirm_examples == 4


def test_judge_orders_average_the_finalists_over_calibration_orders(tmp_path):
    """``orders``: each finalist is pruned again at the other calibration orders and judged on the average.

    A made-up chaotic host: at order 0 every ATP list is 0.5 nats/example better than uniform, at order 1
    0.6 worse (uniform itself does not move). One order: ATP wins; two: the average says ATP is worse
    (−0.5 + 0.6 = +0.05 per example), so auto keeps uniform. Two finalists → two rechecks (one per extra
    order), reserved from the budget, journaled and resumed like any candidate.
    """
    params, target = [1.0] * 5, 0.5
    uni = [5.5, 5.6, 5.4, 5.5, 5.7, 5.3, 5.5, 5.6]
    jitter = [0.0, 0.01, -0.02, 0.03, 0.0, -0.01, 0.02, 0.0]
    calls: list[int] = []

    def evaluate_at(ls, order):
        calls.append(order)
        atp = max(ls) - min(ls) > 1e-9
        shift = (-0.5 if order == 0 else 0.6) if atp else 0.0
        per = [u + shift + (j if atp else 0.0) for u, j in zip(uni, jitter, strict=True)]
        return Evaluation([x * 10 for x in per], [10] * len(per), 0.0)

    def evaluate(ls):
        return evaluate_at(ls, 0)

    providers = [Uniform(5, target), ATP(params, target)]
    one = plan_allocation(providers, evaluate, decision="auto")
    assert one.winner.provider == "atp" and one.winner.order_losses is None
    path = tmp_path / "journal.jsonl"
    two = plan_allocation(providers, evaluate, decision="auto", orders=2, evaluate_at=evaluate_at,
                          journal=Journal(path, "ctx"))
    assert two.winner.provider == "uniform"
    assert two.cost["prunes"] == one.cost["prunes"] + 2 and calls.count(1) == 2
    finalists = [c for c in two.candidates if c.order_losses is not None]
    assert [c.provider for c in finalists] == ["uniform", "atp"]
    atp = finalists[1]
    assert atp.order_losses[0] == pytest.approx(atp.loss)
    assert atp.order_losses[1] == pytest.approx(sum(uni) / 8 + 0.6 + sum(jitter) / 8)
    assert atp.order_example_losses[1] == pytest.approx([u + 0.6 + j for u, j in zip(uni, jitter, strict=True)])
    assert "averaged over 2 calibration orders" in two.decision["rule"]
    assert "atp(beta=" in two.decision["why"][-1] and "worse" in two.decision["why"][-1]
    # with a confirmation slice, the slice's losses are averaged over the orders too
    held = plan_allocation(providers, evaluate, decision="auto", orders=2, evaluate_at=evaluate_at,
                           confirm_examples=3)
    atp_held = next(c for c in held.candidates if c.provider == "atp" and c.order_losses is not None)
    assert atp_held.order_confirm_example_losses[1] == pytest.approx(atp.order_example_losses[1][5:])
    assert held.winner.provider == "uniform" and "3 confirmation examples" in held.decision["why"][0]
    # the order-1 rows are in the journal: a rerun resumes them and prunes nothing
    calls.clear()
    again = plan_allocation(providers, evaluate, decision="auto", orders=2, evaluate_at=evaluate_at,
                            journal=Journal(path, "ctx"))
    assert calls == [] and again.cost["prunes"] == 0 and again.winner.provider == "uniform"
    # the rechecks are reserved: the search itself gets budget − 2 passes
    small = plan_allocation(providers, evaluate, decision="auto", orders=2, evaluate_at=evaluate_at,
                            budget=Budget(prunes=5))
    assert small.cost["prunes"] == 5 and small.cost["budget_exhausted"]
    with pytest.raises(AllocationError, match="plus 2 to recheck its finalists at 1 other calibration order"):
        plan_allocation(providers, evaluate, decision="auto", orders=2, evaluate_at=evaluate_at,
                        budget=Budget(prunes=3))
    with pytest.raises(ConfigError, match="decision 'lowest' has no finalists"):
        plan_allocation(providers, evaluate, orders=2, evaluate_at=evaluate_at)
    with pytest.raises(ConfigError, match="needs evaluate_at"):
        plan_allocation(providers, evaluate, decision="auto", orders=2)
    with pytest.raises(ConfigError, match="judge_orders must be an integer >= 1"):
        plan_allocation(providers, evaluate, decision="auto", orders=0)
    with pytest.raises(ConfigError, match="judge_orders rechecks the finalists of allocation 'auto'"):
        AllocationOptions(allocation="atp", judge_orders=2)
    assert AllocationOptions(allocation="auto", judge_orders=3).judge_orders == 3


def test_challenger_is_picked_on_the_search_lists():
    base = [2.0, 2.5, 3.0, 2.2]
    good, lucky = [x - 0.5 for x in base], [x - 0.1 for x in base]
    # judged lists: 'lucky' looks best; picked on the search lists: 'good' is the challenger
    k, why = choose_simplest(["uniform", "atp", "good", "lucky"], [base, base, [x - 0.3 for x in base],
                                                                   [x - 0.6 for x in base]],
                             pick=[base, base, good, lucky])
    assert k == 2 and "good beats uniform" in why[-1]


# ----------------------------------------------------------------------------- options and the plan file


def test_options_validate_once_with_clear_messages():
    assert AllocationOptions(allocation="atp").searched
    assert not AllocationOptions(allocation="atp", beta=0.01).searched
    assert AllocationOptions(allocation="layerif", epsilon="auto").searched
    for bad, match in [({"allocation": "best"}, "allocation must be one of"),
                       ({"allocation": "auto", "epsilon": 0.1}, "spread of a score mapping"),
                       ({"budget_prunes": 0}, "budget_prunes"), ({"sigmas": float("nan")}, "sigmas"),
                       ({"sensitivity_step": 0.0}, "sensitivity_step"), ({"beta": -0.1}, "beta")]:
        with pytest.raises(ConfigError, match=match):
            AllocationOptions(**bad)


def fp(num_layers=4):
    return ModelFingerprint("m", "LlamaForCausalLM", "llama", num_layers, 64, "abc")


def test_plan_file_round_trip_and_refusals(tmp_path):
    plan = AllocationPlan(layer_sparsity=[0.4, 0.5, 0.6, 0.5], target=0.5, algorithm="wanda", allocation="atp",
                          chosen={"provider": "atp", "knobs": {"beta": 0.1}, "index": 1}, model=fp(),
                          params_per_layer=[10, 10, 10, 10])
    path = plan.save(tmp_path / "plan.json")
    back = AllocationPlan.load(path)
    assert back.layer_sparsity == plan.layer_sparsity and back.chosen == plan.chosen
    with pytest.raises(AllocationError, match="target sparsity 0.5, not 0.6"):
        back.check(target=0.6)
    with pytest.raises(AllocationError, match="algorithm 'wanda', not 'sparsegpt'"):
        back.check(algorithm="sparsegpt")
    with pytest.raises(AllocationError, match="other prunable modules"):
        back.check(params_per_layer=[10, 10, 10, 12])
    data = json.loads(path.read_text())
    data["layer_sparsity"][0] = 0.9
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(AllocationError, match="edited or is corrupt"):
        AllocationPlan.load(tmp_path / "edited.json")
    data["layer_sparsity"] = [0.5] * 5
    (tmp_path / "five.json").write_text(json.dumps(data))
    with pytest.raises(AllocationError, match="5 per-layer sparsities for a model with 4"):
        AllocationPlan.load(tmp_path / "five.json")
    (tmp_path / "scores.json").write_text(json.dumps({"format_version": 1, "scores": [1, 2]}))
    with pytest.raises(AllocationError, match="not an allocation plan"):
        AllocationPlan.load(tmp_path / "scores.json")


def test_a_sparsegpt_plan_applied_at_another_thread_count_says_so(tmp_path):
    """The search's torch thread count is saved; SparseGPT plans warn where it differs (Wanda's never do)."""
    import torch

    here = torch.get_num_threads()
    plan = AllocationPlan(layer_sparsity=[0.4, 0.5, 0.6, 0.5], target=0.5, algorithm="sparsegpt", allocation="atp",
                          chosen={"provider": "atp", "knobs": {"beta": 0.1}, "index": 1}, model=fp(),
                          params_per_layer=[10, 10, 10, 10], candidates=[{"provider": "uniform"}, {"provider": "atp"}])
    assert plan.numerics == {"torch_threads": here, "cpu": cpu_identity()} and plan.numerics_warning() is None
    data = plan.to_dict()
    data["numerics"] = {"torch_threads": here + 1}  # as plans of 2026-12-05 were written: no CPU
    (tmp_path / "other.json").write_text(json.dumps(data))
    other = AllocationPlan.load(tmp_path / "other.json")
    note = other.numerics_warning()
    assert note is not None and f"searched with {here + 1} torch thread(s) and is applied with {here}" in note
    assert f"torch.set_num_threads({here + 1})" in note and str(tmp_path / "other.json") in note
    assert AllocationPlan.from_dict({**data, "algorithm": "wanda"}).numerics_warning() is None
    assert AllocationPlan.from_dict({**data, "candidates": []}).numerics_warning() is None  # no search judged it
    del data["numerics"]  # a plan written before the field: nothing to compare
    assert AllocationPlan.from_dict(data).numerics == {} and AllocationPlan.from_dict(data).numerics_warning() is None


def test_a_sparsegpt_plan_searched_on_another_cpu_says_so():
    """The search's CPU is saved; a SparseGPT plan applied on another one names what differs and the remedy."""
    import torch

    here, cpu = torch.get_num_threads(), cpu_identity()
    assert cpu["model"] and cpu["capability"] == str(torch.backends.cpu.get_cpu_capability())
    data = AllocationPlan(layer_sparsity=[0.4, 0.5, 0.6, 0.5], target=0.5, algorithm="sparsegpt", allocation="atp",
                          chosen={"provider": "atp", "knobs": {"beta": 0.1}, "index": 1}, model=fp(),
                          params_per_layer=[10, 10, 10, 10],
                          candidates=[{"provider": "uniform"}, {"provider": "atp"}]).to_dict()
    data["numerics"]["cpu"] = {**cpu, "capability": "ANOTHER"}
    note = AllocationPlan.from_dict(data).numerics_warning()
    assert note is not None and f"was searched on another CPU (capability 'ANOTHER' vs {cpu['capability']!r})" in note
    assert "search again on this machine, or ship the model the search saved" in note and "thread" not in note[:60]
    data["numerics"]["torch_threads"] = here + 1  # both differ: both reasons, both remedies
    note = AllocationPlan.from_dict(data).numerics_warning()
    assert (f"searched with {here + 1} torch thread(s) and is applied with {here} and was searched on another "
            "CPU") in note
    assert f"torch.set_num_threads({here + 1}) remakes it, or search again on this machine" in note
    data["numerics"] = {"torch_threads": here, "cpu": {"model": cpu["model"]}}  # only what was recorded is compared
    assert AllocationPlan.from_dict(data).numerics_warning() is None
    assert AllocationPlan.from_dict({**data, "algorithm": "wanda", "numerics": {"cpu": {"model": "x"}}}
                                    ).numerics_warning() is None
