"""Real early exit equals the offline simulation on the same data with the same thresholds."""

import mindspore as ms
import numpy as np
import pytest
from conftest import policies

from src.budget import NEVER, confidences, simulate
from src.engine.adaptive import AdaptiveCascade, micro_batches
from src.engine.evaluate import softmax
from src.engine.stagewise import StagewiseCascade
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
    other = AdaptiveCascade(adaptive.net, micro_batch=micro_batch)  # the fixture's network, shared
    conf = probs.max(-1)
    thresholds = [float(np.quantile(conf[0], 0.55)), float(np.quantile(conf[1], 0.6)), 0.0]
    other.set_thresholds(thresholds)
    result = other(ms.Tensor(images))
    exit_at, predictions = offline(probs, thresholds)
    np.testing.assert_array_equal(result.exits, exit_at)
    np.testing.assert_array_equal(result.predictions, predictions)
    np.testing.assert_allclose(result.confidences, probs.max(-1)[exit_at, np.arange(len(exit_at))], rtol=1e-5)


def test_dynamic_batch_leaves_the_callers_network_as_it_was(cascade):
    """micro_batch=0 sets dynamic inputs and stock ops on a twin with the same weights, not on the caller's net:
    its stages keep static inputs and the fast kernels, and it still gives its own logits."""
    adaptive, images, probs = cascade
    net = adaptive.net
    kernels = [cell.fast_kernel for _, cell in net.cells_and_names() if hasattr(cell, "fast_kernel")]
    dynamic = AdaptiveCascade(net, micro_batch=0)
    assert dynamic.net is not net and all(s.get_inputs() is None for s in net.stages)
    assert all(s.get_inputs() is not None for s in dynamic.net.stages)
    assert [cell.fast_kernel for _, cell in net.cells_and_names() if hasattr(cell, "fast_kernel")] == kernels
    assert all(cell.fast_kernel is None for _, cell in dynamic.net.cells_and_names() if hasattr(cell, "fast_kernel"))
    for ours, twins in zip(net.get_parameters(), dynamic.net.get_parameters(), strict=True):
        assert ours.name == twins.name
        np.testing.assert_array_equal(ours.asnumpy(), twins.asnumpy())
    np.testing.assert_allclose(softmax(net(ms.Tensor(images))[-1].asnumpy()), probs[-1], rtol=1e-6, atol=1e-7)


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
    assert sum(len(stage.compile_cache) for stage in adaptive.stages) == graphs


def test_a_negative_micro_batch_is_refused(cascade):
    with pytest.raises(ValueError, match="micro_batch"):
        AdaptiveCascade(cascade[0].net, micro_batch=-1)


def test_stage_by_stage_in_micro_batches_gives_the_whole_cascades_exits(cascade):
    """Offline evaluation's bounded-memory path: 45 images as 16 + 16 + 8 + 4 + 1, every stage of each in turn."""
    adaptive, images, probs = cascade
    logits = StagewiseCascade(adaptive.net, micro_batch=16).set_train(False)(ms.Tensor(images[:45]))
    assert len(logits) == 3
    for k, exit_logits in enumerate(logits):
        np.testing.assert_allclose(softmax(exit_logits.asnumpy()), probs[k, :45], rtol=0, atol=1e-6, err_msg=k)
    with pytest.raises(ValueError, match="positive number of samples"):
        StagewiseCascade(adaptive.net, micro_batch=0)
