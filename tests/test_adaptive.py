"""Real early exit equals the offline simulation on the same data with the same thresholds."""

import json

import mindspore as ms
import numpy as np
import pytest
from conftest import policies

from src.budget import NEVER, confidences, simulate
from src.engine.adaptive import AdaptiveCascade, load_threshold_table, micro_batches, thresholds_for
from src.engine.evaluate import softmax
from src.models import create_model


@pytest.fixture(scope="module", params=["dvt_tiny_t2t", "dvt_tiny_deit"])
def cascade(request):
    ms.set_seed(0)
    net = create_model(request.param, drop_path_rate=0.0)
    net.set_train(False)
    images = np.random.default_rng(1).normal(size=(48, 3, 32, 32)).astype(np.float32)
    probs = np.stack([softmax(o.asnumpy()) for o in net(ms.Tensor(images))])
    return AdaptiveCascade(net), images, probs


def offline(probs: np.ndarray, thresholds: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Exit index and prediction of every sample, from the full cascade's probabilities."""
    labels = probs[-1].argmax(1)  # any labels: only the exit decisions and predictions are compared
    conf, correct = confidences(probs, labels)
    exit_at = np.full(probs.shape[1], probs.shape[0] - 1)
    left = np.ones(probs.shape[1], bool)
    for k in range(probs.shape[0] - 1):
        leaving = left & (conf[k] >= thresholds[k])
        exit_at[leaving] = k
        left &= ~leaving
    fractions = simulate(thresholds, conf, correct, [1.0, 2.0, 3.0]).exit_fractions
    assert np.allclose(np.bincount(exit_at, minlength=3) / len(exit_at), fractions)
    return exit_at, probs[exit_at, np.arange(probs.shape[1])].argmax(1)


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.2, 0.6), (0.9, 0.0), (0.0, 0.7)])
def test_adaptive_equals_offline_simulation(cascade, shares):
    adaptive, images, probs = cascade
    conf = probs.max(-1)
    thresholds = [float(np.quantile(conf[0], 1 - shares[0])) if shares[0] else NEVER,
                  float(np.quantile(conf[1], 1 - shares[1])) if shares[1] else NEVER, 0.0]
    adaptive.set_thresholds(thresholds)  # switched between batches: nothing is rebuilt
    result = adaptive(ms.Tensor(images))
    exit_at, predictions = offline(probs, thresholds)
    np.testing.assert_array_equal(result.exits, exit_at)
    np.testing.assert_array_equal(result.predictions, predictions)
    np.testing.assert_allclose(result.confidences, probs.max(-1)[exit_at, np.arange(len(exit_at))], rtol=1e-5)
    assert len(set(result.exits)) > 1 or shares == (0.9, 0.0)


def test_everything_to_the_last_exit_equals_the_last_exit(cascade):
    adaptive, images, probs = cascade
    adaptive.set_thresholds([NEVER, NEVER, 0.0])
    result = adaptive(ms.Tensor(images))
    assert (result.exits == 2).all()
    np.testing.assert_array_equal(result.predictions, probs[-1].argmax(1))


def test_thresholds_by_budget():
    table = [(1.0, [0.9, 0.8, 0.0]), (2.0, [0.8, 0.7, 0.0]), (3.0, [0.7, 0.6, 0.0])]
    assert thresholds_for(table, 2.5) == [0.8, 0.7, 0.0]
    assert thresholds_for(table, 3.0) == [0.7, 0.6, 0.0]
    with pytest.raises(ValueError, match="smallest solved is 1"):
        thresholds_for(table, 0.5)


def test_the_runner_picks_the_thresholds_adaptive_picks(tmp_path):
    """The runner's threshold lookup is a deliberate copy (runner.py stays one self-contained file) of adaptive's:
    from the same rows (unsorted, with an int budget, as a thresholds file may hold them), read as eval.py's
    thresholds.json and as export's manifest, both give identical thresholds for every budget: each solved one,
    a hair either side of it (within and beyond the 1e-12 slack), between rows and above the largest; below the
    smallest both refuse."""
    from src.deploy.runner import thresholds_for_budget

    rows = [{"budget_gflops": 2.5, "thresholds": [0.7, 0.6, 0.0]}, {"budget_gflops": 1, "thresholds": [0.95, 0.9, 0]},
            {"budget_gflops": 1.75, "thresholds": [0.8, 0.75, 0.0]}]
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"model": "m", "budgets": rows}))
    table = load_threshold_table(str(path), 3)
    manifest = {"thresholds": [{"budget_gflops": b, "thresholds": t} for b, t in table]}  # as export.py writes it
    solved = [1.0, 1.75, 2.5]
    budgets = [b + d for b in solved for d in (0.0, 5e-13, -5e-13, 1e-9, -1e-9)] + [1.3, 2.0, 3.0, 1e6, 0.5, 1e-6]

    def pick(lookup, budget: float):
        try:
            return lookup(budget)
        except ValueError as err:
            assert "no thresholds" in str(err)
            return "refused"

    for budget in budgets:
        expected = pick(lambda b: thresholds_for(table, b), budget)
        assert pick(lambda b: thresholds_for_budget(manifest, b), budget) == expected, budget
        assert pick(lambda b: thresholds_for_budget({"thresholds": rows}, b), budget) == expected, budget
    assert [b for b in budgets if pick(lambda b: thresholds_for(table, b), b) == "refused"] == [1.0 - 1e-9, 0.5, 1e-6]
    assert thresholds_for(table, 1.75 - 5e-13) == [0.8, 0.75, 0.0] and thresholds_for(table, 1.3) == [0.95, 0.9, 0.0]
    assert thresholds_for(table, 2.5 - 1e-9) == [0.8, 0.75, 0.0] and thresholds_for(table, 1e6) == [0.7, 0.6, 0.0]


def test_threshold_table_is_checked_where_it_is_read(tmp_path):
    path = str(tmp_path / "thresholds.json")

    def table(rows) -> str:
        with open(path, "w") as handle:
            json.dump({"model": "m", "budgets": rows}, handle)
        return path

    good = [{"budget_gflops": 2.0, "thresholds": [0.8, 0.7, 0.0]}, {"budget_gflops": 1.0, "thresholds": [0.9, 0.8, 0]}]
    assert load_threshold_table(table(good), 3) == [(1.0, [0.9, 0.8, 0.0]), (2.0, [0.8, 0.7, 0.0])]
    for values in ([0.5], [0.5, 0.4, 0.3, 0.2, 0.0]):
        with pytest.raises(ValueError, match=rf"^{path}: row 2 \(1 GFLOPs\) holds {len(values)} threshold\(s\) "
                                             "for 3 exits: give one per exit"):
            load_threshold_table(table([good[0], {"budget_gflops": 1.0, "thresholds": values}]), 3)
    cases = {"budget": [{"budget_gflops": "cheap", "thresholds": [0.9, 0.8, 0.0]}],
             "nan": [{"budget_gflops": 1.0, "thresholds": [float("nan"), 0.8, 0.0]}],
             "keys": [{"thresholds": [0.9, 0.8, 0.0]}], "rows": {"budget_gflops": 1.0},
             "huge": [{"budget_gflops": 10**400, "thresholds": [0.9, 0.8, 0.0]}],
             "huge threshold": [{"budget_gflops": 1.0, "thresholds": [10**400, 0.8, 0.0]}]}
    messages = {"budget": "row 1: budget_gflops must be a positive finite number, not 'cheap'",
                "nan": r"row 1 \(1 GFLOPs\): thresholds must be a list of finite numbers",
                "keys": "row 1 must hold 'budget_gflops' and 'thresholds'", "rows": "must be a list of rows, not dict",
                "huge": "row 1: budget_gflops must be a positive finite number, not 1000",
                "huge threshold": r"row 1 \(1 GFLOPs\): thresholds must be a list of finite numbers"}
    for case, rows in cases.items():
        with pytest.raises(ValueError, match=messages[case]):
            load_threshold_table(table(rows), 3)
    with pytest.raises(ValueError, match="holds no thresholds"):
        load_threshold_table(table([]), 3)
    with open(path, "w") as handle:
        handle.write('{"budgets": [')
    with pytest.raises(ValueError, match=f"^cannot read thresholds file {path}: "):
        load_threshold_table(path, 3)
    with open(path, "w") as handle:
        json.dump([1, 2], handle)
    with pytest.raises(ValueError, match="is not a thresholds file: it lacks 'budgets'"):
        load_threshold_table(path, 3)
    with pytest.raises(FileNotFoundError, match="thresholds file not found"):
        load_threshold_table(str(tmp_path / "none.json"), 3)


def test_a_thresholds_list_of_another_length_is_refused(cascade):
    for thresholds in ([0.5], [0.5, 0.4, 0.3, 0.2, 0.0]):
        with pytest.raises(ValueError, match=f"^{len(thresholds)} thresholds for 3 exits$"):
            AdaptiveCascade(cascade[0].net, thresholds)


def test_micro_batches_cover_the_count_without_padding():
    assert micro_batches(48, 8) == [8] * 6
    assert micro_batches(29, 8) == [8, 8, 8, 4, 1]
    assert micro_batches(7, 8) == [4, 2, 1]
    assert micro_batches(13, 5) == [5, 5, 2, 1]
    assert micro_batches(0, 8) == []
    for count in range(1, 70):
        for size in (1, 3, 8, 16):
            sizes = micro_batches(count, size)
            assert sum(sizes) == count and max(sizes) <= size
            assert len(set(s for s in sizes if s != size)) == len([s for s in sizes if s != size])


@pytest.mark.parametrize("micro_batch", [0, 5])
def test_other_sub_batch_modes_equal_the_simulation(cascade, micro_batch):
    """Dynamic-batch stages (0) and micro-batches whose remainders run in 4-, 2- and 1-sample graphs."""
    adaptive, images, probs = cascade
    source = adaptive.net  # a fresh net with the same weights: set_inputs (dynamic mode) changes its stages
    fresh = create_model("dvt_tiny_t2t" if source.spec.family == "t2t" else "dvt_tiny_deit", drop_path_rate=0.0)
    ms.load_param_into_net(fresh, {p.name: p for p in source.get_parameters()})
    other = AdaptiveCascade(fresh, micro_batch=micro_batch)
    conf = probs.max(-1)
    thresholds = [float(np.quantile(conf[0], 0.55)), float(np.quantile(conf[1], 0.6)), 0.0]
    other.set_thresholds(thresholds)
    result = other(ms.Tensor(images))
    exit_at, predictions = offline(probs, thresholds)
    np.testing.assert_array_equal(result.exits, exit_at)
    np.testing.assert_array_equal(result.predictions, predictions)
    np.testing.assert_allclose(result.confidences, probs.max(-1)[exit_at, np.arange(len(exit_at))], rtol=1e-5)


@pytest.mark.parametrize("micro_batch", [0, 3])
def test_warm_up_compiles_every_graph_the_stages_meet(micro_batch):
    """After warm_up, batches of any size under any policy compile nothing more (3: its remainders 1 and 2 are
    not the binary digits of one remainder)."""
    ms.set_seed(0)
    net = create_model("dvt_tiny_deit", drop_path_rate=0.0)
    net.set_train(False)
    images = np.random.default_rng(2).normal(size=(2 * max(micro_batch, 4) + 1, 3, 32, 32)).astype(np.float32)
    chosen = policies(net, images)
    adaptive = AdaptiveCascade(net, chosen[0], micro_batch=micro_batch)
    graphs = adaptive.warm_up()
    assert graphs == (3 * len({3, 2, 1}) if micro_batch else 3) and adaptive.thresholds == chosen[0]
    for thresholds in chosen:
        adaptive.set_thresholds(thresholds)
        for count in range(1, len(images) + 1):
            adaptive(ms.Tensor(images[:count]))
    assert sum(len(stage.compile_cache) for stage in net.stages) == graphs


def test_a_negative_micro_batch_is_refused(cascade):
    with pytest.raises(ValueError, match="micro_batch"):
        AdaptiveCascade(cascade[0].net, micro_batch=-1)
