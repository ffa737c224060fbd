"""Threshold solvers on synthetic probabilities with known optima."""

import numpy as np
import pytest

from src.budget import (
    NEVER,
    BudgetError,
    ThresholdGrid,
    confidences,
    geometric_thresholds,
    official_budgets,
    read_gflops,
    resolve_budgets,
    simulate,
    solve,
)
from tests.helpers import synthetic_probs


def synthetic(num: int, exits: int, seed: int = 0):
    return synthetic_probs(num, exits, seed=seed)


def brute_force_two_exits(conf, correct, flops, budget) -> float:
    """Every threshold on exit 1's distinct confidences (and 'nobody'), simulated sample by sample."""
    best = -1.0
    for t in list(np.unique(conf[0])) + [NEVER]:
        result = simulate([t, 0.0], conf, correct, flops)
        if result.expected_gflops <= budget + 1e-12:
            best = max(best, result.top1)
    return best


def test_simulate_hand_worked():
    conf = np.array([[0.9, 0.5, 0.7, 0.2], [0.1, 0.8, 0.6, 0.3]])
    correct = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)
    result = simulate([0.6, 0.0], conf, correct, [1.0, 3.0])
    # samples 0 and 2 leave at exit 1 (0.9, 0.7 >= 0.6): right, wrong; 1 and 3 at exit 2: right, wrong
    assert result.exit_fractions == [0.5, 0.5]
    assert result.top1 == pytest.approx(50.0)
    assert result.expected_gflops == pytest.approx(2.0)


def test_geometric_thresholds_hand_worked():
    conf = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4], [0.1] * 6])
    # q = 1: shares 1/2, 1/2 -> floor(6 / 2) = 3 samples leave at exit 1; T_1 is the 3rd highest, 0.7
    assert geometric_thresholds(conf, 1.0) == [pytest.approx(0.7), 0.0]
    # q small: floor(6 * q / (q + q^2)) -> 5 leave at exit 1 for q = 0.2
    assert geometric_thresholds(conf, 0.2) == [pytest.approx(0.5), 0.0]


def test_grid_scores_equal_exact_simulation():
    probs, labels = synthetic(4000, 3)
    conf, correct = confidences(probs, labels)
    flops = [1.0, 2.5, 4.5]
    grid = ThresholdGrid(conf, correct, flops, max_cells=200 ** 2)
    rng = np.random.default_rng(1)
    index = np.stack([rng.integers(0, len(v) + 1, 100) for v in grid.levels], 1)
    acc, gflops, fractions = grid.score(index)
    for i in range(100):
        exact = simulate(grid.thresholds(index[i]), conf, correct, flops)
        assert 100 * acc[i] == pytest.approx(exact.top1, abs=1e-9)
        assert gflops[i] == pytest.approx(exact.expected_gflops, abs=1e-9)
        np.testing.assert_allclose(fractions[i], exact.exit_fractions, atol=1e-12)


@pytest.mark.parametrize("method", ["exhaustive", "ga"])
def test_two_exits_reach_the_exact_optimum(method):
    probs, labels = synthetic(3000, 2, seed=2)
    conf, correct = confidences(probs, labels)
    flops = [1.0, 3.0]
    budgets = [1.2, 1.6, 2.0, 2.6]
    for budget, thresholds in zip(budgets, solve(method, probs, labels, flops, budgets), strict=True):
        result = simulate(thresholds, conf, correct, flops)
        assert result.expected_gflops <= budget + 1e-9
        assert result.top1 == pytest.approx(brute_force_two_exits(conf, correct, flops, budget), abs=1e-9)


@pytest.fixture(scope="module")
def three_exits():
    probs, labels = synthetic(20000, 3, seed=3)
    flops = [1.0, 2.5, 4.5]
    conf, correct = confidences(probs, labels)
    budgets = official_budgets(conf, correct, flops)[::5]
    solved = {m: [simulate(t, conf, correct, flops) for t in solve(m, probs, labels, flops, budgets)]
              for m in ("ga", "geometric", "exhaustive")}
    return budgets, solved


def test_three_exits_ga_near_exhaustive_and_above_geometric(three_exits):
    budgets, solved = three_exits
    for i, budget in enumerate(budgets):
        ga, geo, exact = solved["ga"][i], solved["geometric"][i], solved["exhaustive"][i]
        for policy in (ga, geo, exact):
            assert policy.expected_gflops <= budget + 1e-9
        assert ga.top1 >= geo.top1 - 1e-9
        assert ga.top1 >= exact.top1 - 0.1


def test_curves_are_monotone(three_exits):
    _, solved = three_exits
    for policies in solved.values():
        accuracy = [p.top1 for p in policies]
        assert accuracy == sorted(accuracy)


def test_ga_is_seeded_and_deterministic():
    probs, labels = synthetic(3000, 3, seed=4)
    first = solve("ga", probs, labels, [1.0, 2.0, 3.0], [1.8, 2.4], seed=7)
    again = solve("ga", probs, labels, [1.0, 2.0, 3.0], [1.8, 2.4], seed=7)
    assert first == again


def test_budget_limits_and_parsing():
    probs, labels = synthetic(500, 3, seed=5)
    flops = [1.0, 2.5, 4.5]
    with pytest.raises(BudgetError, match="below the first exit's cost"):
        solve("ga", probs, labels, flops, [0.5])
    with pytest.raises(BudgetError, match="unknown method"):
        solve("annealing", probs, labels, flops, [2.0])
    with pytest.raises(BudgetError, match="3 exit costs given for 2 exits"):
        solve("ga", probs[:2], labels, flops, [2.0])
    assert resolve_budgets("1.5, 3", flops) == [1.5, 3.0]
    assert resolve_budgets("0.5x", flops) == [pytest.approx(2.25)]
    with pytest.raises(BudgetError, match="cannot read budget"):
        resolve_budgets("cheap", flops)
    for bad in ("nan", "inf", "-inf", "-1", "0", "nanx", "-0.5x", "1.5,,3", "1e999"):
        with pytest.raises(BudgetError, match=r"^cannot read budget '[^']*': give positive GFLOPs"):
            resolve_budgets(bad, flops)
    with pytest.raises(BudgetError, match=r"^--budget must be a positive number of GFLOPs, not 'nan'$"):
        read_gflops("nan", "--budget")
    assert read_gflops("2.5", "--budget") == 2.5
    conf, correct = confidences(probs, labels)
    official = resolve_budgets("official", flops, conf, correct)
    assert len(official) == 59 and official == sorted(official)
    assert flops[0] <= official[0] and official[-1] <= flops[-1]
