"""Our cascade against the independent NumPy forward (tests/numpy_dvt.py), and the stage API.

Each model is compiled once per module (graph mode); the oracle runs in float64.
"""

import mindspore as ms
import numpy as np
import pytest
from conftest import images, load_official_state
from numpy_dvt import dvt_forward, official_state_dict

from src.models import create_model

TOLERANCE = 1e-5
CASES = {
    "t2t_performer": ("dvt_tiny_t2t", {}),
    "t2t_transformer": ("dvt_tiny_t2t", {"t2t_attention": "transformer"}),
    "deit": ("dvt_tiny_deit", {}),
    "t2t_feature_only": ("dvt_tiny_t2t", {"relation_reuse": False}),
    "deit_relation_only": ("dvt_tiny_deit", {"feature_reuse": False}),
}


@pytest.fixture(scope="module", params=list(CASES))
def loaded(request):
    name, overrides = CASES[request.param]
    net = create_model(name, **overrides)
    net.set_train(False)
    state = official_state_dict(net.spec, np.random.default_rng(1))
    load_official_state(net, state)
    x = images(net.spec)
    return net, state, x, dvt_forward(net.spec, state, x.astype(np.float64))


def test_every_exit_matches_numpy_oracle(loaded):
    net, _, x, expected = loaded
    outputs = net(ms.Tensor(x))
    assert len(outputs) == len(expected) == 3
    for exit_index, (ours, ref) in enumerate(zip(outputs, expected, strict=True)):
        assert np.abs(ref).max() > 0.5, "weights too weak for the comparison to mean anything"
        diff = np.abs(ours.asnumpy() - ref).max()
        assert diff <= TOLERANCE, f"exit {exit_index + 1}: max abs diff {diff:.2e}"


def test_stage_api_gives_the_cascade_logits(loaded):
    net, _, x, expected = loaded
    image = ms.Tensor(x)
    upstream = ()
    for stage, ref in zip(net.stages, expected, strict=True):
        outputs = stage(image, *upstream)
        assert len(outputs) == 1 + len(stage.reusable_names)
        assert np.abs(outputs[0].asnumpy() - ref).max() <= TOLERANCE
        upstream = outputs[1:]
    assert upstream == ()


def test_reusable_outputs_are_the_upstream_tokens_and_logits():
    """Stage 1 hands over its last block output before the norm and every layer's logits, layer-major."""
    from numpy_dvt import stage_forward

    net = create_model("dvt_tiny_deit")
    net.set_train(False)
    state = official_state_dict(net.spec, np.random.default_rng(2))
    load_official_state(net, state)
    x = images(net.spec, seed=3)
    _, tokens, relations = stage_forward(net.spec, state, 0, x.astype(np.float64))
    logits, ours_tokens, ours_relations = net.stages[0](ms.Tensor(x))
    assert net.stages[0].reusable_names == ("tokens", "relations")
    assert ours_relations.shape == (2, net.spec.depth * net.spec.num_heads, 5, 5)
    assert np.abs(ours_tokens.asnumpy() - tokens).max() <= TOLERANCE
    assert np.abs(ours_relations.asnumpy() - relations).max() <= TOLERANCE


def test_pynative_mode_gives_the_graph_logits():
    net = create_model("dvt_tiny_t2t")
    net.set_train(False)
    state = official_state_dict(net.spec, np.random.default_rng(1))
    load_official_state(net, state)
    x = images(net.spec)
    expected = dvt_forward(net.spec, state, x.astype(np.float64))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        outputs = net(ms.Tensor(x))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for ours, ref in zip(outputs, expected, strict=True):
        assert np.abs(ours.asnumpy() - ref).max() <= TOLERANCE
