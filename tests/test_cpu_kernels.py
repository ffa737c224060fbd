"""The AOT CPU kernels (LayerNorm, erf GELU with and without a bias, the residual add, the q/k/v split, softmax and
head merge, unfold, token resampling): NumPy's numbers, used only where they may be, a safe fallback."""

import concurrent.futures
import ctypes
import os
import signal
import time

import mindspore as ms
import numpy as np
import pytest
from helpers import copy_weights
from numpy_dvt import unfold
from scipy.special import erf

from src import native
from src.models import cpu_kernels
from src.models.layers import GELU, Attention, Block, HeadPermute, LayerNorm, Mlp, ScaledSoftmax, use_stock_ops
from src.models.reuse import RelationReuse, TokenResample, sparse_rows, token_resample_matrix
from src.models.spec import DEIT, DVTSpec
from src.models.tokenizers import PatchEmbed, SoftSplit, TokenPerformer


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library_path() forgets its cached answer and builds into an empty folder; restored afterwards."""
    monkeypatch.setenv(native.CACHE_DIR, str(tmp_path))
    cpu_kernels.library_path.cache_clear()
    yield tmp_path
    cpu_kernels.library_path.cache_clear()


def eval_cell(cell):
    cell.set_train(False)
    return cell


def test_gelu_kernel_equals_the_erf_formula():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4991) * 3, [-30, -8, -4, -1e-3, 0, 1e-3, 4, 8, 30]]).astype(np.float32)
    x = x.reshape(5, 100, 10)
    fast = eval_cell(GELU())
    assert fast.fast_kernel is not None  # the build works on this machine: the comparison is of the kernel
    stock = eval_cell(GELU())
    use_stock_ops(stock)
    want = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
    np.testing.assert_allclose(fast(ms.Tensor(x)).asnumpy(), want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(stock(ms.Tensor(x)).asnumpy(), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shape,eps", [((2, 50, 48), 1e-6), ((3, 7, 5, 384), 1e-5), ((1, 1, 1), 1e-5)])
def test_layer_norm_kernel_equals_numpy(shape, eps):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=shape) * 5 + 100).astype(np.float32)  # far from zero: a one-pass variance would drift
    fast = eval_cell(LayerNorm(shape[-1], eps))
    assert fast.fast_kernel is not None
    fast.gamma.set_data(ms.Tensor(rng.normal(size=shape[-1]).astype(np.float32)))
    fast.beta.set_data(ms.Tensor(rng.normal(size=shape[-1]).astype(np.float32)))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    want = (x64 - mean) / np.sqrt(var + eps) * fast.gamma.asnumpy() + fast.beta.asnumpy()
    np.testing.assert_allclose(fast(ms.Tensor(x)).asnumpy(), want, rtol=1e-5, atol=2e-5)


def test_head_merge_kernel_equals_numpy_transpose():
    perm = (0, 2, 1, 3)
    x = np.random.default_rng(3).normal(size=(3, 4, 7, 16)).astype(np.float32)
    fast, stock = eval_cell(HeadPermute(perm)), eval_cell(HeadPermute(perm))
    assert fast.fast_kernel is not None
    use_stock_ops(stock)
    np.testing.assert_array_equal(fast(ms.Tensor(x)).asnumpy(), np.transpose(x, perm))  # a copy: bit for bit
    np.testing.assert_array_equal(stock(ms.Tensor(x)).asnumpy(), np.transpose(x, perm))


def twin_cells(make):
    """The same cell twice with the same random weights: one on the kernels, one on MindSpore's ops."""
    fast, stock = eval_cell(make()), eval_cell(make())
    assert fast.fast_kernel is not None
    rng = np.random.default_rng(6)
    for p in fast.get_parameters():
        p.set_data(ms.Tensor(rng.normal(scale=0.5, size=p.shape).astype(np.float32)))
    copy_weights(fast, stock)
    use_stock_ops(stock)
    return fast, stock


def dense64(x, layer):
    return x @ layer.weight.asnumpy().astype(np.float64).T + layer.bias.asnumpy()


@pytest.mark.parametrize("shape", [(2, 7, 12), (4, 1100, 12)])  # the second splits over threads (> 2 x 2^21)
def test_mlp_kernel_adds_fc1_bias_inside_gelu_as_numpy_does(shape):
    fast, stock = twin_cells(lambda: Mlp(12, 1000, 5))
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    hidden = dense64(x.astype(np.float64), fast.fc1)
    want = dense64(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), fast.fc2)
    np.testing.assert_allclose(fast(ms.Tensor(x)).asnumpy(), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stock(ms.Tensor(x)).asnumpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_kernel_splits_qkv_with_its_bias_as_numpy_does(qkv_bias):
    batch, tokens, heads, head_dim = 3, 5, 2, 4
    fast, stock = twin_cells(lambda: Attention(heads * head_dim, heads, tokens, qkv_bias))
    x = np.random.default_rng(8).normal(size=(batch, tokens, heads * head_dim)).astype(np.float32)
    x64 = x.astype(np.float64)
    qkv = x64 @ fast.qkv.weight.asnumpy().astype(np.float64).T + (fast.qkv.bias.asnumpy() if qkv_bias else 0)
    want_q, want_k, want_v = qkv.reshape(batch, tokens, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    q, k, v = fast.split_heads(ms.Tensor(x))
    for got, want in ((q, want_q), (k, want_k), (v, want_v)):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)
    logits = want_q @ want_k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    merged = (attn @ want_v).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
    for cell in (fast, stock):
        out, got_logits = cell(ms.Tensor(x))
        np.testing.assert_allclose(got_logits.asnumpy(), logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.asnumpy(), dense64(merged, fast.proj), rtol=1e-5, atol=1e-5)


def layer_norm64(x, norm):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + norm.epsilon) * norm.gamma.asnumpy() \
        + norm.beta.asnumpy()


@pytest.mark.parametrize("batch", [2, 40])  # 40 x 5 rows of 8 split over threads
def test_block_adds_each_layer_bias_and_residual_as_numpy_does(batch):
    tokens, heads, dim = 5, 2, 8
    fast, stock = twin_cells(lambda: Block(dim, heads, tokens, 24, 1e-5, qkv_bias=True))
    x = np.random.default_rng(9).normal(size=(batch, tokens, dim)).astype(np.float32)
    x64 = x.astype(np.float64)
    qkv = dense64(layer_norm64(x64, fast.norm1), fast.attn.qkv).reshape(batch, tokens, 3, heads, dim // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dim // heads)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    x64 = x64 + dense64((attn @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim), fast.attn.proj)
    hidden = dense64(layer_norm64(x64, fast.norm2), fast.mlp.fc1)
    want = x64 + dense64(0.5 * hidden * (1 + erf(hidden / np.sqrt(2))), fast.mlp.fc2)
    for cell in (fast, stock):
        out, got_logits = cell(ms.Tensor(x))
        np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got_logits.asnumpy(), logits, rtol=1e-5, atol=1e-5)


def test_sparse_rows_hold_every_non_zero_of_the_resample_matrix():
    matrix = token_resample_matrix(10, 14, keep_cls=True)
    index, weight = sparse_rows(matrix)
    rebuilt = np.zeros_like(matrix)
    for row in range(matrix.shape[0]):
        np.add.at(rebuilt[row], index[row], weight[row])
    np.testing.assert_array_equal(rebuilt, matrix)
    assert index.shape == (197, 4)  # nearest x2 then pooling 20 -> 14 touches at most 2 x 2 source cells


@pytest.mark.parametrize("src,dst,keep_cls,pairs", [(7, 10, True, True), (10, 14, True, True), (7, 14, True, True),
                                                    (10, 14, False, False), (2, 3, False, False)])
def test_token_resample_kernel_equals_the_dense_matrix_in_float64(src, dst, keep_cls, pairs):
    matrix = token_resample_matrix(src, dst, keep_cls)
    rng = np.random.default_rng(4)
    shape = (2, 3, src * src + 1, src * src + 1) if pairs else (2, src * src + 1, 5)
    x = rng.normal(size=shape).astype(np.float32)
    m = matrix.astype(np.float64)
    want = m @ x @ m.T if pairs else m @ x
    fast, stock = eval_cell(TokenResample(matrix, pairs)), eval_cell(TokenResample(matrix, pairs))
    assert fast.fast_kernel is not None
    use_stock_ops(stock)
    np.testing.assert_allclose(fast(ms.Tensor(x)).asnumpy(), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stock(ms.Tensor(x)).asnumpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [2, 16])  # 16 x 6 maps of 10 x 10 split over threads
def test_relation_reuse_kernels_add_both_biases_as_numpy_does(batch):
    channels, src, dst = 6, 2, 3
    fast, stock = twin_cells(lambda: RelationReuse(channels, src, dst))
    tokens = src * src + 1
    x = np.random.default_rng(10).normal(size=(batch, channels, tokens, tokens)).astype(np.float32)
    flat = x.astype(np.float64).reshape(batch, channels, -1)
    hidden = fast.fc1.weight.asnumpy().astype(np.float64) @ flat + fast.fc1.bias.asnumpy()
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    maps = (fast.fc2.weight.asnumpy() @ hidden + fast.fc2.bias.asnumpy()).reshape(x.shape)
    m = token_resample_matrix(src, dst, keep_cls=True).astype(np.float64)
    want = m @ maps @ m.T  # the reference order: both biases before the resample
    half_fast = eval_cell(RelationReuse(channels, src, dst))  # the GELU kernel on, the resample's off
    copy_weights(fast, half_fast)
    half_fast.resample.fast_kernel = None
    for cell in (fast, stock, half_fast):
        np.testing.assert_allclose(cell(ms.Tensor(x)).asnumpy(), want, rtol=1e-5, atol=1e-5)


def patch_embed_of_grid(grid: int) -> tuple[PatchEmbed, PatchEmbed]:
    spec = DVTSpec(family=DEIT, embed_dim=6, depth=1, num_heads=1, mlp_ratio=1.0, img_size=32, grids=(grid,))
    return twin_cells(lambda: PatchEmbed(spec, spec.tokenizers[0]))


def patch_conv64(cell: PatchEmbed, image: np.ndarray) -> np.ndarray:
    """The strided conv of `cell`'s weights over the zero-padded image, window by window in float64."""
    k, pad, grid = cell.patch, cell.padding, cell.grid
    padded = np.pad(image.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    weight, bias = cell.proj.weight.asnumpy().astype(np.float64), cell.proj.bias.asnumpy()
    want = np.empty((image.shape[0], grid * grid, weight.shape[0]))
    for gy in range(grid):
        for gx in range(grid):
            window = padded[:, :, gy * k:(gy + 1) * k, gx * k:(gx + 1) * k]
            want[:, gy * grid + gx] = np.einsum("bcyx,dcyx->bd", window, weight) + bias
    return want


@pytest.mark.parametrize("grid", [3, 4, 5])  # padding 1 and a cropped last pixel, none, padding 2 and a crop
def test_patch_cut_kernel_gives_the_patch_conv_of_numpy(grid):
    fast, stock = patch_embed_of_grid(grid)
    image = np.random.default_rng(9).normal(size=(2, 3, 32, 32)).astype(np.float32)
    want = patch_conv64(fast, image)
    np.testing.assert_allclose(fast(ms.Tensor(image)).asnumpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stock(ms.Tensor(image)).asnumpy(), want, rtol=1e-5, atol=1e-5)


def test_pynative_mode_gives_each_op_of_a_kernel_its_own_output_shape():
    """PyNative caches an op's output shape by name, attributes and input shapes: DeiT's stages cut the same image
    into different grids, and two attentions may split q/k/v rows of one shape into different token counts."""
    image = np.random.default_rng(9).normal(size=(2, 3, 32, 32)).astype(np.float32)
    embeds = [patch_embed_of_grid(grid)[0] for grid in (3, 4)]
    attentions = [eval_cell(Attention(8, 2, tokens)) for tokens in (5, 10)]
    tokens = [np.random.default_rng(tokens).normal(size=(20 // tokens, tokens, 8)).astype(np.float32)
              for tokens in (5, 10)]  # both are 20 rows of qkv
    graph_logits = [cell(ms.Tensor(x))[1].asnumpy() for cell, x in zip(attentions, tokens, strict=True)]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        for cell in embeds:
            want = patch_conv64(cell, image)
            np.testing.assert_allclose(cell(ms.Tensor(image)).asnumpy(), want, rtol=1e-5, atol=1e-5)
        for cell, x, want in zip(attentions, tokens, graph_logits, strict=True):
            np.testing.assert_allclose(cell(ms.Tensor(x))[1].asnumpy(), want, rtol=1e-6, atol=1e-6)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("from_tokens", [False, True])
@pytest.mark.parametrize("channels, side, kernel, stride, padding",
                         [(3, 32, 7, 4, 2), (5, 9, 3, 2, 1), (4, 12, 3, 2, 0)])
def test_soft_split_kernel_is_numpy_unfold_from_a_map_or_tokens(from_tokens, channels, side, kernel, stride, padding):
    """T2T's soft split: a copy, so bit for bit; tokens (B, side*side, C) are the map (B, C, side, side) re-folded."""
    image = np.random.default_rng(side).normal(size=(2, channels, side, side)).astype(np.float32)
    want = unfold(image, kernel, stride, padding).transpose(0, 2, 1).astype(np.float32)
    x = ms.Tensor(image.reshape(2, channels, side * side).transpose(0, 2, 1).copy() if from_tokens else image)
    fast, stock = (eval_cell(SoftSplit(channels, side, kernel, stride, padding, from_tokens)) for _ in range(2))
    assert fast.fast_kernel is not None
    use_stock_ops(stock)
    np.testing.assert_array_equal(fast(x).asnumpy(), want)
    np.testing.assert_array_equal(stock(x).asnumpy(), want)


def test_performer_kernels_equal_the_float64_formula():
    """The kqv bias and split, phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m) and y / (normaliser + 1e-8), fused in
    kernels, against NumPy."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 30, 12)).astype(np.float32)  # tokens of width 12
    z = rng.normal(size=(2, 30, 8)).astype(np.float32)  # keys / queries of width 8
    fast, stock = twin_cells(lambda: TokenPerformer(12, 8, 1e-5))  # random weights: the kqv bias is not zero
    assert fast.divide_rows is not None and fast.split_kqv_kernel is not None
    kqv = dense64(x.astype(np.float64), fast.kqv)
    for got, want in zip(fast.split_kqv(ms.Tensor(x)), np.split(kqv, 3, axis=-1), strict=True):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-5)
    k, w = z.astype(np.float64), fast.w.asnumpy().astype(np.float64)

    def phi(z):
        return np.exp(z @ w.T - (z * z).sum(-1, keepdims=True) / 2) / np.sqrt(w.shape[0])

    y = np.einsum("btm,bem->bte", phi(k), np.einsum("bte,btm->bem", k, phi(k)))
    normaliser = phi(k) @ phi(k).sum(1)[..., None]
    want_features, want_divided = phi(k), y / (normaliser + 1e-8)
    np.testing.assert_allclose(fast.random_features(ms.Tensor(z)).asnumpy(), want_features, rtol=1e-5, atol=1e-6)
    divided = fast.divide_rows(ms.Tensor(y.astype(np.float32)), ms.Tensor(normaliser.astype(np.float32)),
                               fast.epsilon_tensor)
    np.testing.assert_allclose(divided.asnumpy(), want_divided, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast(ms.Tensor(x)).asnumpy(), stock(ms.Tensor(x)).asnumpy(), rtol=1e-5, atol=1e-5)


def gelu_by_library(x: np.ndarray) -> np.ndarray:
    """The library's ErfGelu called directly through its AOT interface, outside MindSpore."""
    library = ctypes.CDLL(cpu_kernels.library_path())
    y = np.empty_like(x)
    shape = (ctypes.c_int64 * x.ndim)(*x.shape)
    params = (ctypes.c_void_p * 2)(x.ctypes.data, y.ctypes.data)
    ndims = (ctypes.c_int * 2)(x.ndim, x.ndim)
    shapes = (ctypes.POINTER(ctypes.c_int64) * 2)(shape, shape)
    assert library.ErfGelu(2, params, ndims, shapes, None, None, None) == 0
    return y


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 5), (4, 6, 101, 101)])  # the second splits over the helper threads
def test_softmax_kernel_gives_the_scaled_biased_logits_and_softmax_of_numpy(biased, shape):
    rng = np.random.default_rng(9)
    raw, bias = (rng.normal(scale=4.0, size=shape).astype(np.float32) for _ in range(2))
    scale = 0.125
    fast, stock = (eval_cell(ScaledSoftmax(scale, biased)) for _ in range(2))
    assert fast.fast_kernel is not None
    use_stock_ops(stock)
    logits = raw.astype(np.float64) * scale + (bias if biased else 0.0)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    inputs = (ms.Tensor(raw), ms.Tensor(bias)) if biased else (ms.Tensor(raw),)
    for cell in (fast, stock):
        got_logits, got_attn = cell(*inputs)
        np.testing.assert_allclose(got_logits.asnumpy(), logits, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_attn.asnumpy(), attn, rtol=1e-5, atol=1e-7)


BIG = np.random.default_rng(10).normal(size=(8, 1 << 16)).astype(np.float32)  # split over the helper threads


def big_gelu_is_right() -> bool:
    want = 0.5 * BIG.astype(np.float64) * (1 + erf(BIG.astype(np.float64) / np.sqrt(2)))
    return np.allclose(gelu_by_library(BIG), want, rtol=2e-6, atol=1e-6)


def test_kernels_called_from_two_threads_at_once_both_finish_right():
    """MindSpore may launch two kernels at once; the helper threads serve one, the other runs on its caller."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # ctypes releases the GIL during the calls
        assert all(pool.map(lambda _: big_gelu_is_right(), range(16)))


def test_a_forked_child_runs_the_kernels_without_the_parents_helpers():
    """Helper threads do not survive a fork: a child must not wait for them (it runs the kernel alone)."""
    assert big_gelu_is_right()  # the parent's helpers exist
    child = os.fork()
    if child == 0:
        os._exit(0 if big_gelu_is_right() else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child hung in a kernel")


def test_training_uses_mindspore_ops_so_gradients_exist():
    cell = LayerNorm(8, 1e-5)
    cell.set_train(True)
    x = ms.Tensor(np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32))
    grads = ms.grad(cell, grad_position=None, weights=cell.trainable_params())(x)
    assert np.abs(grads[0].asnumpy()).sum() > 0  # d(sum)/d(gamma) = sum of the normalised inputs: nonzero
    np.testing.assert_allclose(grads[1].asnumpy(), np.full(8, 4.0), rtol=1e-6)  # d(sum)/d(beta) = rows


def test_switched_off_by_the_environment(monkeypatch, fresh_build):
    monkeypatch.setenv(native.SWITCH, "0")
    assert cpu_kernels.library_path() is None and GELU().fast_kernel is None


def test_no_compiler_falls_back_with_a_warning(monkeypatch, fresh_build):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert cpu_kernels.library_path() is None
    layer = eval_cell(LayerNorm(4, 1e-5))
    assert layer.fast_kernel is None
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(layer(ms.Tensor(x)).asnumpy(), (x - x.mean(-1, keepdims=True))
                               / np.sqrt(x.var(-1, keepdims=True) + 1e-5), atol=1e-5)


def test_a_failed_build_warns_and_leaves_no_partial_file(monkeypatch, fresh_build, tmp_path_factory):
    broken = tmp_path_factory.mktemp("src") / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", str(broken))
    with pytest.warns(UserWarning, match="building the CPU kernels failed"):
        assert cpu_kernels.library_path() is None
    assert os.listdir(fresh_build) == []


def test_a_build_leaves_one_library_and_reuses_it(fresh_build):
    path = cpu_kernels.library_path()
    assert path is not None and os.listdir(fresh_build) == [os.path.basename(path)]
    built_at = os.path.getmtime(path)
    cpu_kernels.library_path.cache_clear()
    assert cpu_kernels.library_path() == path and os.path.getmtime(path) == built_at


def test_fp16_inputs_take_mindspore_ops():
    x = np.linspace(-3, 3, 12).astype(np.float16).reshape(3, 4)
    y = eval_cell(GELU())(ms.Tensor(x)).asnumpy()
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=2e-3)
