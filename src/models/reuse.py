"""Feature reuse and relationship reuse between consecutive DVT stages.

Both resample a token grid g_up x g_up to g x g the way the reference does (nearest x2, then adaptive
average pooling), but as one constant matrix: the map is linear and separable, K = M kron M. The reference
spends much of its time in those copies; the matrix does it in one pass, a matmul or (CPU inference) a kernel
that reads only its few non-zeros.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from . import cpu_kernels
from .layers import Mlp, gelu, layer_norm, torch_default_uniform


def resample_1d(src: int, dst: int) -> np.ndarray:
    """(dst x src) matrix of nearest upsampling src -> 2*src followed by adaptive average pooling to dst.

    Nearest x2 repeats each source cell twice (torch legacy 'nearest': src = floor(i * src / 2src)).
    Adaptive pooling averages the window [floor(i * n / dst), ceil((i + 1) * n / dst)) with n = 2*src.
    """
    upsampled = 2 * src
    matrix = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        start = (i * upsampled) // dst
        end = -((-(i + 1) * upsampled) // dst)
        for j in range(start, end):
            matrix[i, j // 2] += 1.0 / (end - start)
    return matrix


def resample_2d(src: int, dst: int) -> np.ndarray:
    """(dst^2 x src^2) matrix acting on row-major flattened grids."""
    m = resample_1d(src, dst)
    return np.kron(m, m)


def token_resample_matrix(src: int, dst: int, keep_cls: bool) -> np.ndarray:
    """(dst^2+1 x src^2+1) matrix on token sequences with the cls token first.

    keep_cls=True carries the cls token over unchanged (relationship reuse); keep_cls=False gives the
    cls row zeros (feature reuse: the reference pads a zero row for cls).
    """
    out = np.zeros((dst * dst + 1, src * src + 1), dtype=np.float64)
    out[1:, 1:] = resample_2d(src, dst)
    out[0, 0] = 1.0 if keep_cls else 0.0
    return out.astype(np.float32)


def sparse_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's non-zero columns and values, padded with weight 0 to the longest row: `index`, `weight` (Nd, K)."""
    per_row = max(1, int((matrix != 0).sum(1).max()))
    index = np.zeros((matrix.shape[0], per_row), np.int32)
    weight = np.zeros((matrix.shape[0], per_row), np.float32)
    for i, row in enumerate(matrix):
        columns = np.flatnonzero(row)
        index[i, :len(columns)], weight[i, :len(columns)] = columns, row[columns]
    return index, weight


class TokenResample(nn.Cell):
    """A token resample matrix applied to one token axis (B, Ns, W) -> (B, Nd, W), or with `pairs` to both of
    (..., Ns, Ns) maps: R x R^T. fp32 CPU inference runs a kernel that reads only the matrix's non-zeros (at most
    four per row; the dense matmul does about 25x the work for 10x10 -> 14x14); otherwise a matmul."""

    def __init__(self, matrix: np.ndarray, pairs: bool = False):
        super().__init__()
        self.pairs = pairs
        self.matrix = Tensor(matrix)
        self.matrix_t = Tensor(np.ascontiguousarray(matrix.T))
        index, weight = sparse_rows(matrix)
        self.index, self.weight = Tensor(index), Tensor(weight)
        dst = matrix.shape[0]
        if pairs:
            self.fast_kernel = cpu_kernels.custom_op("ResampleTokenPairs",
                                                     out_shape=lambda x, *_: [*x[:-2], dst, dst])
        else:
            self.fast_kernel = cpu_kernels.custom_op("ResampleTokens", out_shape=lambda x, *_: [*x[:-2], dst, x[-1]])

    def with_channel_bias(self, x, bias):
        """The kernel's resample of the maps x (B, C, Ns, Ns) plus `bias` (C, 1) on each channel's map: the same as
        resampling x + bias, for every row of the matrix sums to one (fp32 CPU inference, `pairs` only)."""
        return self.fast_kernel(x, self.index, self.weight, bias)

    def construct(self, x):
        if self.fast_kernel is not None and not self.training and x.dtype == ms.float32:
            return self.fast_kernel(x, self.index, self.weight)
        out = ops.matmul(self.matrix.astype(x.dtype), x)
        if not self.pairs:
            return out
        # Queries first, on the small side; then all key rows at once as one 2-D GEMM (1.7x faster
        # on CPU than two broadcast matmuls for 10x10 -> 14x14).
        dst, src = self.matrix.shape
        out = ops.matmul(out.reshape(-1, src), self.matrix_t.astype(x.dtype))
        return out.reshape(x.shape[:-2] + (dst, dst))


class FeatureReuse(nn.Cell):
    """f_l: LN -> MLP (D -> hidden -> reuse_dim) on the upstream final tokens, resampled to this grid.

    Output (B, N, reuse_dim) with a zero row for cls, to be concatenated after a block's D channels.
    """

    def __init__(self, dim: int, hidden: int, reuse_dim: int, src_grid: int, dst_grid: int,
                 norm_eps: float, drop: float = 0.0):
        super().__init__()
        self.norm = layer_norm(dim, norm_eps)
        self.mlp = Mlp(dim, hidden, reuse_dim, drop)
        self.resample = TokenResample(token_resample_matrix(src_grid, dst_grid, keep_cls=False))

    def construct(self, upstream_tokens):
        return self.resample(self.mlp(self.norm(upstream_tokens)))

    def cls_row(self, cls_token):
        """The output's cls row, (B, 1, reuse_dim) for cls_token (B, 1, D): zeros, as the resample's cls row is."""
        return ops.zeros(cls_token.shape[:-1] + (self.mlp.out_features,), cls_token.dtype)


class PointwiseMlp(nn.Cell):
    """A 1x1 conv layer on (B, C, H, W) computed as a channel matmul; weight (out, in) as a Dense.

    In inference the bias goes in with BiasAdd: MindSpore's CPU Add broadcasts a (out, 1) bias through
    per-element index tables of 16 bytes per output element, kept with the compiled graph (about 0.14 GB of
    T2T-ViT-12's peak at micro-batch 4; README, "Speed"). Exported files add it as (out, 1), as before
    (`broadcast_bias`, set by `export_forms`): MindSpore's ONNX exporter writes BiasAdd of a 3-D input as an Add
    on the last axis, which is wrong here. Training keeps the Add too: with BiasAdd, gradient accumulation no
    longer equalled the large batch to 1e-6 (tests/test_train.py).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = Parameter(torch_default_uniform((out_channels, in_channels), in_channels), name="weight")
        self.bias = Parameter(torch_default_uniform((out_channels, 1), in_channels), name="bias")
        self.broadcast_bias = False

    def matmul(self, x):
        """The layer without its bias."""
        return ops.matmul(self.weight, x.astype(self.weight.dtype))

    def construct(self, x):
        out = self.matmul(x)
        if self.broadcast_bias or self.training:
            return out + self.bias
        return ops.bias_add(out, self.bias.reshape(-1).astype(out.dtype))


class RelationReuse(nn.Cell):
    """r_l: a shared per-entry MLP over the stacked upstream attention logits, resampled to this grid.

    Input (B, L*NH, N_up, N_up), layer-major channels; output (B, L*NH, N, N) whose channel block
    [l*NH, (l+1)*NH) is the logit bias of block l. The cls row and column are resampled along the
    other axis only and the cls-cls entry is kept (the paper's Fig. 5).
    """

    def __init__(self, channels: int, src_grid: int, dst_grid: int):
        super().__init__()
        self.src_tokens = src_grid * src_grid + 1
        self.channels = channels
        self.fc1 = PointwiseMlp(channels, 3 * channels)
        self.act = gelu()
        self.fc2 = PointwiseMlp(3 * channels, channels)
        self.resample = TokenResample(token_resample_matrix(src_grid, dst_grid, keep_cls=True), pairs=True)
        # fp32 CPU inference adds fc1's bias inside the GELU kernel and fc2's in the resample kernel (two BiasAdds,
        # about 1% of T2T-ViT-12's cascade): the fast path needs both kernels
        self.fast_kernel = cpu_kernels.custom_op("BiasErfGelu")

    def construct(self, relations):
        x = relations.reshape(-1, self.channels, self.src_tokens * self.src_tokens)
        if (self.fast_kernel is not None and self.resample.fast_kernel is not None and not self.training
                and x.dtype == ms.float32):
            hidden = self.fc1.matmul(x)
            if hidden.dtype == ms.float32:
                maps = self.fc2.matmul(self.fast_kernel(hidden, self.fc1.bias))
                return self.resample.with_channel_bias(
                    maps.reshape(-1, self.channels, self.src_tokens, self.src_tokens), self.fc2.bias)
        x = self.fc2(self.act(self.fc1(x)))
        return self.resample(x.reshape(-1, self.channels, self.src_tokens, self.src_tokens))
