"""Image to tokens: the T2T soft-split tokenizer (performer or transformer) and the DeiT patch embedding.

The soft split is `ops.unfold`, which orders a patch as (channel, row, col) and zero-pads explicitly,
exactly as torch's `nn.Unfold` (MindSpore's `nn.Unfold` is TensorFlow-style and must not be used).
MindSpore's ONNX exporter has no Im2Col (nor PadV3), so `portable` cells, which ONNX export switches on,
compute the same split as one gather with precomputed indices (a plain copy: bit-identical) and pad by
concatenation. The gather is not used otherwise: it was 1.16x slower in eval (benchmarks/bench_soft_split.py).
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Orthogonal, initializer

from . import cpu_kernels
from .dropout import Dropout
from .layers import Mlp, dense, gelu, layer_norm, matmul_rows, split_qkv_kernel, torch_default_uniform
from .spec import T2T, DVTSpec, Tokenizer, conv_out

PERFORMER_DROPOUT = 0.1  # hard-coded in the reference T2T performer, independent of drop_rate


class TokenPerformer(nn.Cell):
    """One-head linear attention with positive random features (T2T's 'performer' token mixer).

    The random feature matrix `w` (m x emb) is a frozen parameter stored in checkpoints: it is random
    at init, so pretrained weights are only reproduced when `w` is loaded, never regenerated.
    """

    def __init__(self, dim: int, emb: int, norm_eps: float, kernel_ratio: float = 0.5):
        super().__init__()
        self.emb = emb
        self.num_features = int(emb * kernel_ratio)
        self.kqv = dense(dim, 3 * emb)
        self.dp = Dropout(PERFORMER_DROPOUT)
        self.proj = dense(emb, emb)
        self.norm1 = layer_norm(dim, norm_eps)
        self.norm2 = layer_norm(emb, norm_eps)
        self.mlp = nn.SequentialCell([dense(emb, emb), gelu(), dense(emb, emb), Dropout(PERFORMER_DROPOUT)])
        w = initializer(Orthogonal(gain=math.sqrt(self.num_features)), (self.num_features, emb))
        self.w = Parameter(w, name="w", requires_grad=False)
        self.feature_scale = 1.0 / math.sqrt(self.num_features)
        self.matmul_bt = ops.BatchMatMul(transpose_b=True)
        self.matmul_at = ops.BatchMatMul(transpose_a=True)
        # fp32 CPU inference: the per-token scalars (|x|^2 / 2, the normaliser) in kernels rather than broadcast
        # over (B, T, 1), whose CPU index tables held about 58 MB of T2T-ViT-12's peak (README, "Speed").
        # The kqv bias and the k / q / v split are one kernel too (slicing kqv took 30 ms per T2T-ViT-12 batch of 16).
        # `fast_kernel` switches all three kernels.
        self.fast_kernel = cpu_kernels.custom_op("PerformerFeatures")
        self.divide_rows = cpu_kernels.custom_op("DivideRows")
        self.split_kqv_kernel = split_qkv_kernel([1, 1, emb])  # one head, one token per row
        self.scale_tensor = Tensor([self.feature_scale], ms.float32)
        self.epsilon_tensor = Tensor([1e-8], ms.float32)

    def uses_kernels(self, x) -> bool:
        return self.fast_kernel is not None and not self.training and x.dtype == ms.float32

    def random_features(self, x):
        """phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m), in fp32 (it overflows in fp16)."""
        x = x.astype(self.w.dtype)
        if self.uses_kernels(x):
            return self.fast_kernel(ops.matmul(x, self.w.T), x, self.scale_tensor)
        half_sq_norm = (x * x).sum(-1, keepdims=True) / 2
        return ops.exp(ops.matmul(x, self.w.T) - half_sq_norm) * self.feature_scale

    def split_kqv(self, x):
        """k, q and v, each (B, T, emb), of the normed tokens x (B, T, dim)."""
        if self.uses_kernels(x):
            rows = matmul_rows(self.kqv, x)
            if rows.dtype == ms.float32:  # as in Attention.split_heads: amp's "auto" runs MatMul in fp16
                shape = x.shape[:-1] + (self.emb,)
                k, q, v = self.split_kqv_kernel(rows, self.kqv.bias)
                return k.reshape(shape), q.reshape(shape), v.reshape(shape)
        kqv = self.kqv(x)
        return kqv[:, :, :self.emb], kqv[:, :, self.emb:2 * self.emb], kqv[:, :, 2 * self.emb:]

    def construct(self, x):
        k, q, v = self.split_kqv(self.norm1(x))
        kp, qp = self.random_features(k), self.random_features(q)
        normaliser = ops.matmul(qp, kp.sum(1).expand_dims(-1))  # (B, T, 1)
        kptv = self.matmul_at(v.astype(kp.dtype), kp)  # (B, emb, m)
        y = self.matmul_bt(qp, kptv)  # (B, T, emb)
        if self.uses_kernels(y):
            y = self.divide_rows(y, normaliser, self.epsilon_tensor)
        else:
            y = y / (normaliser + 1e-8)
        y = v + self.dp(self.proj(y))  # the skip uses v: the input has another width
        return y + self.mlp(self.norm2(y))


class TokenAttention(nn.Cell):
    """One-head softmax attention from `dim` to `emb` channels; the skip connection is v."""

    def __init__(self, dim: int, emb: int):
        super().__init__()
        self.emb = emb
        self.scale = dim ** -0.5  # the reference scales by the input width, not emb
        self.qkv = dense(dim, 3 * emb, has_bias=False)
        self.proj = dense(emb, emb)
        self.qk_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, x):
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, :self.emb], qkv[:, :, self.emb:2 * self.emb], qkv[:, :, 2 * self.emb:]
        attn = ops.softmax(self.qk_matmul(q, k) * self.scale, -1)
        return v + self.proj(ops.matmul(attn, v))


class TokenTransformer(nn.Cell):
    """T2T's 'transformer' token mixer: TokenAttention then an emb -> emb -> emb MLP."""

    def __init__(self, dim: int, emb: int, norm_eps: float):
        super().__init__()
        self.norm1 = layer_norm(dim, norm_eps)
        self.attn = TokenAttention(dim, emb)
        self.norm2 = layer_norm(emb, norm_eps)
        self.mlp = Mlp(emb, emb, emb)

    def construct(self, x):
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def soft_split_indices(side: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """Indices that turn a (B, C, side*side + 1) map (row-major, one zero appended) into torch's unfold.

    Gathered along the last axis they give (B, C, kernel*kernel*L) in (ki, kj, token) order, which reshapes to
    unfold's (B, C*kernel*kernel, L); window cells in the zero padding point at the appended zero.
    """
    out = conv_out(side, kernel, stride, padding)
    cells = np.arange(out)[None, :] * stride - padding + np.arange(kernel)[:, None]  # (ki, oi): row or col
    rows, cols = cells[:, None, :, None], cells[None, :, None, :]  # (ki, kj, oi, oj) by broadcasting
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    return np.where(inside, rows * side + cols, side * side).reshape(-1).astype(np.int32)


def unfold_kernel(kernel: int, stride: int, grid: int, padding: int, out_shape) -> tuple[Tensor, ops.Custom | None]:
    """The Unfold kernel's geometry operand and op (src/models/cpu_kernels.cc); the op is None where the kernels
    are off. `out_shape` maps the input's shape to the output's."""
    geometry = [kernel, stride, grid, padding]
    op = cpu_kernels.custom_op("Unfold", out_shape=lambda x, _: out_shape(x), shape_attrs={"geometry": geometry})
    return Tensor(np.array(geometry, np.int32)), op


class SoftSplit(nn.Cell):
    """torch's `nn.Unfold` of a (B, C, side, side) map, then (B, L, C*k*k): `ops.unfold`, or with `portable`
    one gather; fp32 CPU inference runs the Unfold kernel. `from_tokens`: the map comes as T2T's tokens
    (B, side*side, C), which the kernel reads where they lie (MindSpore's ops re-fold them with a transpose)."""

    def __init__(self, channels: int, side: int, kernel: int, stride: int, padding: int, from_tokens: bool = False):
        super().__init__()
        self.channels, self.side = channels, side
        self.kernel, self.stride, self.padding = kernel, stride, padding
        self.from_tokens = from_tokens
        self.patch = channels * kernel * kernel
        grid = conv_out(side, kernel, stride, padding)
        self.tokens = grid ** 2
        self.indices = Tensor(soft_split_indices(side, kernel, stride, padding))
        self.geometry, self.fast_kernel = unfold_kernel(kernel, stride, grid, padding,
                                                        lambda x: [x[0], self.tokens, self.patch])
        self.portable = False

    def construct(self, x):
        if self.fast_kernel is not None and not self.training and x.dtype == ms.float32:
            return self.fast_kernel(x, self.geometry)  # MindSpore's Im2Col and the transposes around it took longer
        if self.from_tokens:
            x = x.transpose(0, 2, 1).reshape(-1, self.channels, self.side, self.side)
        if not self.portable:
            return ops.unfold(x, self.kernel, 1, self.padding, self.stride).transpose(0, 2, 1)
        flat = x.reshape(-1, self.channels, self.side * self.side)
        flat = ops.cat((flat, ops.zeros_like(flat[:, :, :1])), 2)
        patches = ops.gather(flat, self.indices, 2).reshape(-1, self.patch, self.tokens)
        return patches.transpose(0, 2, 1)


class T2TTokenizer(nn.Cell):
    """Tokens-to-token: soft split, mix, re-fold to a map, twice; a third split projected to D."""

    def __init__(self, spec: DVTSpec, tok: Tokenizer):
        super().__init__()
        self.side1 = conv_out(spec.img_size, tok.kernel, tok.stride, tok.padding)
        self.side2 = conv_out(self.side1, 3, 2, 1)
        dim1 = spec.in_chans * tok.kernel ** 2
        dim2 = spec.token_dim * 9
        if spec.t2t_attention == "performer":
            self.attention1 = TokenPerformer(dim1, spec.token_dim, spec.norm_eps)
            self.attention2 = TokenPerformer(dim2, spec.token_dim, spec.norm_eps)
        else:
            self.attention1 = TokenTransformer(dim1, spec.token_dim, spec.norm_eps)
            self.attention2 = TokenTransformer(dim2, spec.token_dim, spec.norm_eps)
        self.project = dense(dim2, spec.embed_dim)
        self.split1 = SoftSplit(spec.in_chans, spec.img_size, tok.kernel, tok.stride, tok.padding)
        self.split2 = SoftSplit(spec.token_dim, self.side1, 3, 2, 1, from_tokens=True)
        self.split3 = SoftSplit(spec.token_dim, self.side2, 3, 2, 1, from_tokens=True)

    def construct(self, image):
        x = self.attention1(self.split1(image))
        x = self.attention2(self.split2(x))
        return self.project(self.split3(x))


def concat_pad(x, padding: int):
    """Zero padding of the last two axes by concatenation, as `ops.pad` (MindSpore's ONNX exporter has no PadV3)."""
    rows = ops.zeros_like(x[:, :, :padding, :])
    x = ops.cat((rows, x, rows), 2)
    cols = ops.zeros_like(x[:, :, :, :padding])
    return ops.cat((cols, x, cols), 3)


class PatchEmbed(nn.Cell):
    """DeiT patch embedding: a strided conv with bias, flattened row-major to (B, g*g, D).

    The official patches do not overlap (stride = kernel), so the conv is computed as cut-into-patches
    then one matmul with the conv's own weight: MindSpore's CPU conv with 23x23 or 32x32 kernels took
    longer than the whole 14x14 stage (5.0 s per batch of 16 for the 7x7 DeiT-S stage, against 4.2 s).
    Overlapping geometries keep the conv.
    """

    def __init__(self, spec: DVTSpec, tok: Tokenizer):
        super().__init__()
        self.embed_dim = spec.embed_dim
        self.grid = conv_out(spec.img_size, tok.kernel, tok.stride, tok.padding)
        self.num_patches = self.grid ** 2
        fan_in = spec.in_chans * tok.kernel ** 2
        self.proj = nn.Conv2d(
            spec.in_chans, spec.embed_dim, tok.kernel, stride=tok.stride,
            pad_mode="pad" if tok.padding else "valid", padding=tok.padding, has_bias=True,
            weight_init=torch_default_uniform((spec.embed_dim, spec.in_chans, tok.kernel, tok.kernel), fan_in),
            bias_init=torch_default_uniform((spec.embed_dim,), fan_in))
        self.as_matmul = tok.kernel == tok.stride
        self.padding = tok.padding
        self.patch = tok.kernel
        self.in_chans = spec.in_chans
        # pixels beyond the last whole patch are dropped, as the conv does; no slice when there are none
        # (MindSpore Lite 2.0 hangs on the full-range ONNX Slice)
        self.span = self.grid * self.patch
        self.crop = self.span < spec.img_size + 2 * tok.padding
        self.matmul_bt = ops.MatMul(transpose_b=True)
        self.portable = False
        self.geometry, self.fast_kernel = unfold_kernel(
            self.patch, self.patch, self.grid, self.padding,
            lambda image: [image[0] * self.num_patches, image[1] * self.patch ** 2])
        if not self.as_matmul:
            self.fast_kernel = None  # overlapping patches keep the conv

    def cut_patches(self, image):
        """(B * g * g, C * k * k): the patches of the (padded) image, row-major, each as (channel, y, x)."""
        if self.fast_kernel is not None and not self.training and image.dtype == ms.float32:
            return self.fast_kernel(image, self.geometry)  # MindSpore's CPU pad alone took longer
        if self.padding and self.portable:
            image = concat_pad(image, self.padding)
        elif self.padding:
            image = ops.pad(image, (self.padding, self.padding, self.padding, self.padding))
        if self.crop:
            image = image[:, :, :self.span, :self.span]
        g, k = self.grid, self.patch
        patches = image.reshape(-1, self.in_chans, g, k, g, k).transpose(0, 2, 4, 1, 3, 5)
        return patches.reshape(-1, self.in_chans * k * k)

    def construct(self, image):
        if not self.as_matmul:
            x = self.proj(image).reshape(-1, self.embed_dim, self.num_patches)
            return x.transpose(0, 2, 1)
        patches = self.cut_patches(image)
        tokens = self.matmul_bt(patches, self.proj.weight.reshape(self.embed_dim, -1)) + self.proj.bias
        return tokens.reshape(-1, self.num_patches, self.embed_dim)


def build_tokenizer(spec: DVTSpec, stage: int) -> nn.Cell:
    tok = spec.tokenizers[stage]
    return T2TTokenizer(spec, tok) if spec.family == T2T else PatchEmbed(spec, tok)
