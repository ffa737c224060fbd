"""Test set-up: graph mode (the default path), the repo on sys.path, shared helpers."""

import os
import sys

import mindspore as ms
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
ms.set_context(mode=ms.GRAPH_MODE)
ms.set_seed(0)


def load_official_state(net, state: dict) -> None:
    """Load an official-named NumPy state dict into our net through the converter's mapping."""
    from src.convert import official_to_mindspore
    from src.models.weights import parameter_shapes

    params = official_to_mindspore(state, parameter_shapes(net))
    not_loaded, _ = ms.load_param_into_net(
        net, {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in params.items()}, strict_load=True)
    assert not not_loaded


def images(spec, batch: int = 2, seed: int = 0) -> np.ndarray:
    shape = (batch, spec.in_chans, spec.img_size, spec.img_size)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def policies(net, images: np.ndarray) -> list[list[float]]:
    """Thresholds that send about half the images on at each exit (midway between two confidences, so that
    rounding cannot flip a decision), none, and all."""
    from src.engine.evaluate import softmax

    splits = []
    for logits in net(ms.Tensor(images))[:2]:
        confidences = np.sort(softmax(logits.asnumpy()).max(1))
        middle = (len(confidences) - 1) // 2
        upper = confidences[middle + 1] if len(confidences) > 1 else confidences[0] + 0.02
        splits.append(float(confidences[middle] + upper) / 2)
    return [splits + [0.0], [1e8, 1e8, 0.0], [0.0, 0.0, 0.0]]


def assert_runner_equals_adaptive(runner, net, images: np.ndarray) -> set:
    """The exported runner and AdaptiveCascade on the same images under each of `policies`: same exits and
    predictions, confidences to 1e-5. Returns the distinct exit patterns seen (to show the policies differ)."""
    from src.engine.adaptive import AdaptiveCascade

    adaptive = AdaptiveCascade(net)
    seen = set()
    for thresholds in policies(net, images):
        adaptive.set_thresholds(thresholds)
        expected = adaptive(ms.Tensor(images))
        got = runner.run(images, thresholds)
        np.testing.assert_array_equal(got.exits, expected.exits)
        np.testing.assert_array_equal(got.predictions, expected.predictions)
        np.testing.assert_allclose(got.confidences, expected.confidences, rtol=0, atol=1e-5)
        seen.add(tuple(got.exits))
    return seen
