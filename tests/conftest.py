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
