"""Registry, configuration-driven exits, reuse switches, frozen tensors and graph-mode forwards."""

import mindspore as ms
import numpy as np
import pytest
from conftest import images
from helpers import copy_weights

from src.models import create_model, list_models, model_spec
from src.models.layers import use_stock_ops

# Registered architectures shrunk for speed: same code paths, small widths and images.
SHRINK = dict(embed_dim=24, depth=2, num_heads=2, token_dim=8, img_size=64, grids=(3, 4, 6), num_classes=7)


def names_and_shapes(net):
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def test_registry_lists_the_required_models():
    assert {"dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small", "t2t_vit_12", "t2t_vit_14", "deit_small",
            "dvt_tiny_t2t", "dvt_tiny_deit"} <= set(list_models())


def test_unknown_name_and_argument_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'dvt_t2t_vit12'.*did you mean 'dvt_t2t_vit_12'.*registered"):
        create_model("dvt_t2t_vit12")
    with pytest.raises(TypeError, match=r"'drop_pth_rate'.*did you mean 'drop_path_rate'"):
        create_model("dvt_tiny_t2t", drop_pth_rate=0.2)


@pytest.mark.parametrize("name", ["dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small"])
def test_registered_dvts_compile_and_run_in_graph_mode(name):
    net = create_model(name, **SHRINK)
    net.set_train(False)
    outputs = net(ms.Tensor(images(net.spec)))
    assert [o.shape for o in outputs] == [(2, 7)] * 3
    assert all(np.isfinite(o.asnumpy()).all() for o in outputs)


def test_full_size_t2t_vit_12_dvt_forward():
    net = create_model("dvt_t2t_vit_12")
    net.set_train(False)
    outputs = net(ms.Tensor(images(net.spec, batch=1)))
    assert [o.shape for o in outputs] == [(1, 1000)] * 3
    assert all(np.isfinite(o.asnumpy()).all() for o in outputs)


def test_exits_and_grids_are_configuration():
    two_exit = create_model("dvt_t2t_vit_12", grids=(7, 14), embed_dim=32, depth=1, num_heads=2, token_dim=8,
                            img_size=64, num_classes=7)
    two_exit.set_train(False)
    outputs = two_exit(ms.Tensor(images(two_exit.spec)))
    assert two_exit.num_exits == 2 and [o.shape for o in outputs] == [(2, 7)] * 2
    assert all(np.isfinite(o.asnumpy()).all() for o in outputs)
    four_exit = create_model("dvt_tiny_deit", grids=(2, 3, 4, 6))
    four_exit.set_train(False)
    outputs = four_exit(ms.Tensor(images(four_exit.spec)))
    assert len(outputs) == 4 and outputs[-1].shape == (2, 10)
    backbone = create_model("t2t_vit_12", grid=7)
    assert backbone.num_exits == 1 and backbone.spec.grids == (7,)


def test_reuse_switches_change_exactly_their_parameters():
    full = names_and_shapes(create_model("dvt_tiny_t2t"))
    features = names_and_shapes(create_model("dvt_tiny_t2t", relation_reuse=False))
    relations = names_and_shapes(create_model("dvt_tiny_t2t", feature_reuse=False))
    plain = names_and_shapes(create_model("dvt_tiny_t2t", feature_reuse=False, relation_reuse=False))
    spec = model_spec("dvt_tiny_t2t")
    d, extra = spec.embed_dim, spec.reuse_dim

    assert set(full) - set(features) == {n for n in full if ".relation_reuse." in n}
    assert {n.split(".relation_reuse.")[0] for n in set(full) - set(features)} == {"stages.1", "stages.2"}
    assert set(full) - set(relations) == {n for n in full if ".feature_reuse." in n}
    assert {n.split(".blocks.")[0] for n in set(full) - set(relations)} == {"stages.1", "stages.2"}
    assert set(plain) == set(full) - {n for n in full if "_reuse." in n}
    # Feature reuse widens norm2 and fc1 of the reusing stages, and nothing else.
    widened = {n for n in plain if full[n] != plain[n]}
    assert widened == {n for n in plain if n.startswith(("stages.1.", "stages.2."))
                       and (".norm2." in n or ".mlp.fc1.weight" in n) and ".blocks." in n}
    for name in widened:
        assert full[name][-1] == plain[name][-1] + extra == d + extra
    assert all(relations[n] == plain[n] for n in plain)
    # The first stage is the same network whatever the switches.
    assert {n: s for n, s in full.items() if n.startswith("stages.0.")} == \
           {n: s for n, s in plain.items() if n.startswith("stages.0.")}


def test_frozen_and_trainable_tensors():
    t2t = {p.name: p.requires_grad for p in create_model("dvt_tiny_t2t").get_parameters()}
    frozen = sorted(n for n, trainable in t2t.items() if not trainable)
    assert frozen == sorted([f"stages.{k}.pos_embed" for k in range(3)]
                            + [f"stages.{k}.tokenizer.attention{a}.w" for k in range(3) for a in (1, 2)])
    deit = {p.name: p.requires_grad for p in create_model("dvt_tiny_deit").get_parameters()}
    assert all(deit.values())


def test_performer_features_are_orthogonal_rows_scaled_by_sqrt_m():
    w = create_model("dvt_tiny_t2t").stages[0].tokenizer.attention1.w.asnumpy()
    m = w.shape[0]
    np.testing.assert_allclose(w @ w.T, m * np.eye(m), atol=1e-4)


def test_training_mode_runs_with_stochastic_depth():
    net = create_model("dvt_tiny_t2t", drop_path_rate=0.5)
    net.set_train(True)
    x = ms.Tensor(images(net.spec, batch=4))
    outputs = net(x)
    assert all(np.isfinite(o.asnumpy()).all() for o in outputs)


@pytest.mark.parametrize("index", [1, 2])  # 2: the last stage, whose last block computes the cls token alone
def test_stage_compiles_once_for_a_dynamic_batch(index):
    net = create_model("dvt_tiny_deit")
    net.set_train(False)
    use_stock_ops(net)  # the AOT CPU kernels take static shapes only
    spec = net.spec
    x = ms.Tensor(images(spec, batch=3))
    upstream = ()
    for stage in net.stages[:index]:
        upstream = stage(x, *upstream)[1:]
    stage = net.stages[index]
    stage.set_inputs(ms.Tensor(shape=[None, 3, spec.img_size, spec.img_size], dtype=ms.float32),
                     *(ms.Tensor(shape=[None, *u.shape[1:]], dtype=ms.float32) for u in upstream))
    full = stage(x, *upstream)[0].asnumpy()
    part = stage(x[:2], *(u[:2] for u in upstream))[0].asnumpy()
    np.testing.assert_allclose(part, full[:2], atol=1e-6)


@pytest.mark.parametrize("kernels", [True, False])
def test_a_last_block_feeding_only_the_head_computes_the_full_blocks_cls_token(kernels):
    """Inference runs the cls token's query, projection and MLP alone in the last stage's last block, with feature
    reuse and a relation bias: the full block's cls row and logits row. Training computes every token."""
    cls_net, full_net = (create_model("dvt_tiny_deit", drop_path_rate=0.0) for _ in range(2))  # training as inference
    depth = cls_net.spec.depth
    assert [[block.cls_only for block in stage.blocks] for stage in cls_net.stages] == \
           [[False] * depth, [False] * depth, [False] * (depth - 1) + [True]]
    rng = np.random.default_rng(4)
    for p in cls_net.get_parameters():  # weights far from the init, so that the block is far from the identity
        p.set_data(ms.Tensor(rng.normal(scale=0.5, size=p.shape).astype(np.float32)))
    copy_weights(cls_net, full_net)
    cls_block, full_block = cls_net.stages[-1].blocks[-1], full_net.stages[-1].blocks[-1]
    full_block.cls_only = False
    for block in (cls_block, full_block):
        block.set_train(False)
        if not kernels:
            use_stock_ops(block)
    spec = cls_net.spec
    tokens, upstream_tokens = spec.num_tokens(2), spec.num_tokens(1)
    x, upstream, bias = (ms.Tensor(rng.normal(size=shape).astype(np.float32)) for shape in
                         [(2, tokens, spec.embed_dim), (2, upstream_tokens, spec.embed_dim),
                          (2, spec.num_heads, tokens, tokens)])
    out, logits = cls_block(x, upstream, bias)
    want, want_logits = (t.asnumpy() for t in full_block(x, upstream, bias))
    assert out.shape == (2, 1, spec.embed_dim) and logits.shape == (2, spec.num_heads, 1, tokens)
    np.testing.assert_allclose(out.asnumpy(), want[:, :1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits.asnumpy(), want_logits[:, :, :1], rtol=1e-5, atol=1e-5)
    cls_block.set_train(True)
    out, _ = cls_block(x, upstream, bias)
    assert out.shape == (2, tokens, spec.embed_dim)
    np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-4, atol=1e-4)


def shrunk(name: str) -> dict:
    """Overrides that make a registered model small: the tiny ones as registered, the others at SHRINK (a
    plain backbone with one of its grids)."""
    if name.startswith("dvt_tiny_"):
        return {}
    return dict(SHRINK, grids=SHRINK["grids"] if name.startswith("dvt_") else SHRINK["grids"][-1:])


@pytest.mark.parametrize("name,extra", [(name, {}) for name in list_models()]
                         + [("dvt_tiny_t2t", {"t2t_attention": "transformer"})])
def test_every_trainable_parameter_gets_a_gradient(name, extra):
    """timm's backward check: in training mode the summed loss of every exit gives each trainable parameter a
    finite, non-zero gradient, so a disconnected or accidentally frozen parameter cannot slip in. Drop path is
    off: a path dropped for the whole batch rightly gets no gradient on that step.

    One set is exactly zero by the official architecture: the feature-reuse MLP of the last stage's last block.
    Its output is concatenated to the patch tokens only (the cls row is zeros, as in the official Block), and
    after the last block only the cls token reaches the head. The test pins that set, and nothing else."""
    from src.engine.train_step import DVTWithLoss

    net = create_model(name, drop_path_rate=0.0, **shrunk(name), **extra)
    net.set_train(True)
    spec = net.spec
    last = spec.num_stages - 1
    unread = f"stages.{last}.blocks.{spec.depth - 1}.feature_reuse." if spec.uses_feature_reuse(last) else None
    targets = np.eye(spec.num_classes, dtype=np.float32)[[0, 1, 2, 3]]
    params = net.trainable_params()
    _, grads = ms.value_and_grad(DVTWithLoss(net), None, params)(ms.Tensor(images(spec, batch=4)),
                                                                 ms.Tensor(targets))
    grads = {p.name: g.asnumpy() for p, g in zip(params, grads, strict=True)}
    assert len(grads) == len(params) > 0
    assert not [n for n, g in grads.items() if not np.isfinite(g).all()]
    zero = sorted(n for n, g in grads.items() if not np.abs(g).max() > 0)
    assert zero == sorted(n for n in grads if unread and n.startswith(unread))


def test_reuse_mlp_bias_add_equals_numpy_in_process_and_in_the_export_form():
    """The in-process BiasAdd and the exported plain Add give w @ x + b; export_forms switches and restores it."""
    from src.models.layers import export_forms
    from src.models.reuse import PointwiseMlp

    layer = PointwiseMlp(5, 7)
    x = np.random.default_rng(0).normal(size=(3, 5, 11)).astype(np.float32)
    expected = layer.weight.asnumpy() @ x + layer.bias.asnumpy()  # (7, 5) @ (3, 5, 11) + (7, 1)
    in_process = layer(ms.Tensor(x)).asnumpy()
    # A compiled graph does not see a later change of the switch: the export form runs in a twin never called yet.
    twin = PointwiseMlp(5, 7)
    for mine, theirs in zip(twin.get_parameters(), layer.get_parameters(), strict=True):
        mine.set_data(theirs.data.copy())
    with export_forms(twin):
        assert twin.broadcast_bias is True
        exported = twin(ms.Tensor(x)).asnumpy()
    assert twin.broadcast_bias is False
    np.testing.assert_allclose(in_process, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)
