"""Transformer building blocks: Mlp, Attention (returns its logits, takes a logit bias), Block.

Defaults that differ from PyTorch are set explicitly: LayerNorm epsilon is always passed, GELU is the
exact erf form, Dense weights start as trunc_normal(0.02) with zero biases (the reference init).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal, Uniform, initializer

from . import cpu_kernels
from .dropout import Dropout, DropPath


def dense(in_features: int, out_features: int, has_bias: bool = True) -> nn.Dense:
    """A Dense layer with the reference init: weight trunc_normal(std 0.02), bias zero."""
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(sigma=0.02), bias_init="zeros",
                    has_bias=has_bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis (same `gamma`/`beta`); fp32 inference on CPU runs the fast kernel.

    `portable` normalises with means, a square root and a division (ONNX export: MindSpore Lite 2.0 computes the
    graph MindSpore writes for its LayerNorm, with ReduceSumSquare, wrongly; README "Deploy with MindSpore Lite").
    """

    def __init__(self, width: int, eps: float):
        super().__init__((width,), epsilon=eps)
        self.fast_kernel = cpu_kernels.custom_op("LayerNormLastAxis")
        self.epsilon_tensor = Tensor([eps], ms.float32)
        self.portable = False

    def construct(self, x):
        if self.portable:
            centred = x - x.mean(-1, keep_dims=True)
            variance = (centred * centred).mean(-1, keep_dims=True)
            return centred / ops.sqrt(variance + self.epsilon) * self.gamma + self.beta
        if self.fast_kernel is None or self.training or x.dtype != ms.float32:
            return super().construct(x)
        return self.fast_kernel(x, self.gamma, self.beta, self.epsilon_tensor)


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (erf(4) rounds to 1 in fp32): the minimax rational approximation of
# Eigen's and XLA's fp32 erf, within a few ulp of the true erf. Odd by construction, so it needs no Sign.
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)


def rational_erf(x):
    """erf from multiply-adds and one division: MindSpore's ONNX exporter has no Erf."""
    x = ops.clamp(x, -4.0, 4.0)
    x2 = x * x
    p = x2 * ERF_NUMERATOR[0] + ERF_NUMERATOR[1]
    for c in ERF_NUMERATOR[2:]:
        p = p * x2 + c
    q = x2 * ERF_DENOMINATOR[0] + ERF_DENOMINATOR[1]
    for c in ERF_DENOMINATOR[2:]:
        q = q * x2 + c
    return x * p / q


class GELU(nn.GELU):
    """Exact (erf) GELU, as torch's default (MindSpore's default is tanh); fp32 CPU inference runs the kernel.

    `portable` computes erf as `rational_erf` (ONNX export: MindSpore's tanh GeLU is 4.7e-4 off, Erf unexported).
    """

    def __init__(self):
        super().__init__(approximate=False)
        self.fast_kernel = cpu_kernels.custom_op("ErfGelu")
        self.portable = False

    def construct(self, x):
        if self.portable:
            return x * (rational_erf(x * 0.7071067811865476) + 1.0) * 0.5
        if self.fast_kernel is None or self.training or x.dtype != ms.float32:
            return super().construct(x)
        return self.fast_kernel(x)


def use_stock_ops(net: nn.Cell) -> None:
    """Switch `net` to MindSpore's own ops where it has our kernels, e.g. before export (MindIR files must not
    need our .so) or for dynamic shapes (the kernels' output shapes are fixed at compile time)."""
    for _, cell in net.cells_and_names():
        if hasattr(cell, "fast_kernel"):
            cell.fast_kernel = None


@contextmanager
def export_forms(net: nn.Cell, portable: bool = False) -> Iterator[nn.Cell]:
    """Within the block, `net` runs MindSpore's own LayerNorm and GELU (an exported file must not need our kernel
    library), the reuse MLP's bias as a broadcast Add (`broadcast_bias`, src/models/reuse.py) and, with `portable`, the
    forms MindSpore's ONNX exporter can write (LayerNorm, GELU, the soft split, padding; the soft split's gather
    trains slower); on leaving it, every cell is as it was."""
    forms = {"fast_kernel": None, "portable": portable, "broadcast_bias": True}  # fast_kernel None: stock ops
    saved = [(cell, name, getattr(cell, name)) for _, cell in net.cells_and_names()
             for name in forms if hasattr(cell, name)]
    for cell, name, _ in saved:
        setattr(cell, name, forms[name])
    try:
        yield net
    finally:
        for cell, name, value in saved:
            setattr(cell, name, value)


def layer_norm(width: int, eps: float) -> LayerNorm:
    return LayerNorm(width, eps)


def gelu() -> GELU:
    return GELU()


def torch_default_uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
    """PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)) and its bias: U(-1/sqrt(fan_in), +)."""
    return initializer(Uniform(scale=1.0 / math.sqrt(fan_in)), shape)


def matmul_rows(layer: nn.Dense, x):
    """The MatMul of `layer` alone on x (..., in) as rows (-1, out), for a kernel that adds the bias. Its dtype says
    whether it ran in fp32: amp's "auto" level casts MatMul to fp16 inside the graph, after x's dtype is known."""
    return layer.matmul(x.reshape(-1, layer.in_channels), layer.weight)


class Mlp(nn.Cell):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; fp32 CPU inference adds fc1's bias inside the GELU kernel."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = dense(in_features, hidden_features)
        self.act = gelu()
        self.fc2 = dense(hidden_features, out_features)
        self.drop = Dropout(drop)
        self.out_features = out_features
        self.fast_kernel = cpu_kernels.custom_op("BiasErfGelu")

    def hidden(self, x):
        """fc1, GELU and dropout: (..., hidden), or with the kernel its rows (-1, hidden) (then of rank 2)."""
        if self.fast_kernel is not None and not self.training and x.dtype == ms.float32:
            rows = matmul_rows(self.fc1, x)
            if rows.dtype == ms.float32:
                return self.fast_kernel(rows, self.fc1.bias)
        return self.drop(self.act(self.fc1(x)))

    def construct(self, x):
        hidden = self.hidden(x)
        if hidden.ndim != x.ndim:  # the kernel's rows; the stock path keeps x's shape and needs no Reshape
            return self.fc2(hidden).reshape(x.shape[:-1] + (self.out_features,))
        return self.drop(self.fc2(hidden))


class HeadPermute(nn.Cell):
    """A constant transpose of attention's heads; fp32 CPU inference runs it as a row-copy kernel.

    MindSpore's CPU Transpose keeps a table of one 8-byte offset per output element for a constant perm: about
    0.16 GB of T2T-ViT-12's peak at micro-batch 4 over the q/k/v split and the head merge (README, "Speed").
    """

    KERNELS = {(0, 2, 1, 3): "MergeHeads"}

    def __init__(self, perm: tuple[int, ...]):
        super().__init__()
        self.perm = perm
        self.fast_kernel = cpu_kernels.custom_op(self.KERNELS[perm],
                                                 out_shape=lambda shape: [shape[axis] for axis in perm])

    def construct(self, x):
        if self.fast_kernel is None or self.training or x.dtype != ms.float32:
            return x.transpose(self.perm)
        return self.fast_kernel(x)


class ScaledSoftmax(nn.Cell):
    """Attention's logits, raw * scale (+ a logit bias when `biased`), and their softmax over the last axis; fp32 CPU
    inference computes both in one kernel, row by row (MindSpore's Mul, Add and Softmax are three passes)."""

    def __init__(self, scale: float, biased: bool):
        super().__init__()
        self.scale = scale
        self.scale_tensor = Tensor([scale], ms.float32)
        self.fast_kernel = cpu_kernels.custom_op("ScaledSoftmax", out_shape=lambda raw, *_: [raw, raw], outputs=2)
        self.biased = biased

    def construct(self, raw, logit_bias=None):
        if self.fast_kernel is not None and not self.training and raw.dtype == ms.float32:
            if not self.biased:
                return self.fast_kernel(raw, self.scale_tensor)
            if logit_bias.dtype == ms.float32:
                return self.fast_kernel(raw, logit_bias, self.scale_tensor)
        # Logits and softmax stay fp32 under mixed precision: the next stage reuses these logits.
        logits = raw.astype(ms.float32) * self.scale
        if self.biased:
            logits = logits + logit_bias.astype(ms.float32)
        return logits, ops.softmax(logits, -1)


def split_qkv_kernel(head_shape: list[int]) -> ops.Custom | None:
    """The SplitQkv kernel's op (src/models/cpu_kernels.cc): a Dense layer's rows (B * N, 3 * H * hd) and its bias
    to q, k and v, each (B, H, N, hd) for `head_shape` [H, N, hd]; None where the kernels are off."""
    return cpu_kernels.custom_op("SplitQkv", out_shape=lambda rows, _: [[rows[0] // head_shape[1], *head_shape]] * 3,
                                 outputs=3, shape_attrs={"head_shape": head_shape})


class Attention(nn.Cell):
    """Multi-head self-attention that returns its pre-softmax logits and accepts an additive logit bias.

    The returned logits are scaled and include the bias: exactly what the next DVT stage reuses. fp32 CPU inference
    adds the qkv bias and splits q, k and v into heads in one kernel (`fast_kernel`).
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_tokens = num_tokens
        self.dim = dim
        self.scale = self.head_dim ** -0.5
        self.qkv = dense(dim, 3 * dim, has_bias=qkv_bias)
        self.zero_qkv_bias = None if qkv_bias else Tensor(np.zeros(3 * dim, np.float32))  # the kernel adds a bias
        self.fast_kernel = split_qkv_kernel([num_heads, num_tokens, self.head_dim])
        self.attn_drop = Dropout(attn_drop)
        self.merge_heads = HeadPermute((0, 2, 1, 3))  # (B, H, N, hd) -> (B, N, H, hd)
        self.proj = dense(dim, dim)
        self.proj_drop = Dropout(proj_drop)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)
        self.softmax = ScaledSoftmax(self.scale, biased=False)
        self.biased_softmax = ScaledSoftmax(self.scale, biased=True)
        self.av_matmul = ops.BatchMatMul()
        self.q_index, self.k_index, self.v_index = (Tensor(index, ms.int32) for index in range(3))  # along qkv's axis 0

    def split_heads(self, x):
        """q, k and v, each (B, H, N, hd), of the tokens x (B, N, D)."""
        if self.fast_kernel is not None and not self.training and x.dtype == ms.float32:
            rows = matmul_rows(self.qkv, x)
            if rows.dtype == ms.float32:
                return self.fast_kernel(rows, self.qkv.bias if self.zero_qkv_bias is None else self.zero_qkv_bias)
        qkv = self.qkv(x).reshape(-1, self.num_tokens, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        # gather, not qkv[0] / qkv[1] / qkv[2]: MindSpore's CPU StridedSlice took 43% of a T2T-ViT-12 cascade's
        # op time here, gather a tenth of that, with the same values (README, "Speed"); ONNX export has no Unstack
        return ops.gather(qkv, self.q_index, 0), ops.gather(qkv, self.k_index, 0), ops.gather(qkv, self.v_index, 0)

    def attend(self, x, logit_bias=None, cls_query_only: bool = False):
        """The heads' outputs merged, (B, N, D) before the projection, and the logits; with `cls_query_only`, those
        of the cls token's query alone, (B, 1, D) and (B, H, 1, N)."""
        q, k, v = self.split_heads(x)
        queries = self.num_tokens
        if cls_query_only:
            q, queries = q[:, :, :1], 1
            if logit_bias is not None:
                logit_bias = logit_bias[:, :, :1]
        raw = self.qk_matmul(q, k)
        logits, attn = self.softmax(raw) if logit_bias is None else self.biased_softmax(raw, logit_bias)
        attn = self.attn_drop(attn.astype(v.dtype))
        return self.merge_heads(self.av_matmul(attn, v)).reshape(-1, queries, self.dim), logits

    def construct(self, x, logit_bias=None):
        out, logits = self.attend(x, logit_bias)
        return self.proj_drop(self.proj(out)), logits


class Block(nn.Cell):
    """Pre-norm transformer block; with `feature_reuse` its MLP also reads upstream features.

    `feature_reuse` is a Cell mapping the upstream stage's final tokens to a (B, N, reuse_dim) context
    that is concatenated after the D channels of the residual stream, in front of norm2 and fc1.
    With `cls_only` (a stage's last block when only its head reads it), inference returns the cls token alone,
    (B, 1, D): every token still serves as key and value, but only the cls token's query, projection and MLP run
    (about three quarters of the block's work is skipped; training computes every token).
    """

    def __init__(self, dim: int, num_heads: int, num_tokens: int, mlp_hidden: int, norm_eps: float,
                 qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 feature_reuse: nn.Cell | None = None, reuse_dim: int = 0, cls_only: bool = False):
        super().__init__()
        self.cls_only = cls_only
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, num_tokens, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        mlp_in = dim + (reuse_dim if feature_reuse is not None else 0)
        self.norm2 = layer_norm(mlp_in, norm_eps)
        self.mlp = Mlp(mlp_in, mlp_hidden, dim, drop)
        self.feature_reuse = feature_reuse
        self.fast_kernel = cpu_kernels.custom_op("ResidualBias")

    def add_residual(self, x: Tensor, hidden: Tensor, layer: nn.Dense, dropout: nn.Cell) -> Tensor:
        """x + drop_path(dropout(layer(hidden))); fp32 CPU inference adds the layer's bias and x in one kernel
        (a BiasAdd and an Add: about 2% of T2T-ViT-12's cascade)."""
        if self.fast_kernel is not None and not self.training and hidden.dtype == ms.float32:
            rows = matmul_rows(layer, hidden)
            if rows.dtype == ms.float32:
                return self.fast_kernel(x, rows, layer.bias)
        return x + self.drop_path(dropout(layer(hidden)))

    def construct(self, x, upstream_tokens=None, logit_bias=None):
        cls_only = self.cls_only and not self.training
        out, logits = self.attn.attend(self.norm1(x), logit_bias, cls_only)
        if cls_only:
            x = x[:, :1]
        x = self.add_residual(x, out, self.attn.proj, self.attn.proj_drop)
        mlp_in = x
        if self.feature_reuse is not None:
            reused = self.feature_reuse.cls_row(x) if cls_only else self.feature_reuse(upstream_tokens)
            mlp_in = ops.cat((x, reused), -1)
        return self.add_residual(x, self.mlp.hidden(self.norm2(mlp_in)), self.mlp.fc2, self.mlp.drop), logits


def sinusoid_table(num_positions: int, dim: int) -> np.ndarray:
    """The fixed position table of T2T-ViT: sin on even, cos on odd channels, built in float64."""
    position = np.arange(num_positions, dtype=np.float64)[:, None]
    exponent = 2 * (np.arange(dim) // 2) / dim
    angles = position / np.power(10000.0, exponent)[None, :]
    table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
    return table[None].astype(np.float32)


def frozen(name: str, value: np.ndarray) -> Parameter:
    """A Parameter that is saved and loaded with the checkpoint but never trained."""
    return Parameter(Tensor(value), name=name, requires_grad=False)
