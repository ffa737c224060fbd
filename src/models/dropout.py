"""Dropout and drop path with reproducible masks: a hash of (seed, layer, element, the element's value).

MindSpore's CPU dropout kernel draws from a stream that depends on its thread partition, which MindSpore tunes by
timing: two runs with the same seed draw other masks after a few steps, and a resumed run draws other masks than
the uninterrupted one would have. Here each mask is keyed instead, with splitmix64's mixer `mix`:

    draw(i) = mix(mix(salt + i * G) ^ bits(x[i])) >> 40          (24 bits; G = 0x9E3779B97F4A7C15)
    dropout:   element i is dropped when draw(i) < round(p * 2^24), the others are scaled by 1 / (1 - p)
    drop path: sample b draws mix(salt ^ sum_j mix(j << 32 | bits(x[b, j]))) >> 40 (sum wrapping, j over the sample)

`salt` is a hash of the seed set before the model was built and the layer's name in the model (`key_masks`);
`bits` is the float32's bit pattern. A mask depends only on what the layer receives, so there is no random
state to save or restore: runs with the same seed and data draw the same masks whatever the threads, a resumed
run draws the masks of the uninterrupted one, and ranks and micro-batches (other images) draw other masks.
The masks come from AOT CPU kernels (cpu_kernels.cc); on other devices, or without the kernel library,
MindSpore's own dropout runs (not reproducible). In eval mode both layers are the identity.
"""

from __future__ import annotations

import hashlib

import mindspore as ms
from mindspore import Tensor, nn, ops

from . import cpu_kernels

DRAW_BITS = 24


def _mask_has_no_gradient(x, key, scale, out, dout):
    return ops.zeros_like(x), ops.zeros_like(key), ops.zeros_like(scale)


def _one_per_sample(x_shape, key_shape, scale_shape):
    return [x_shape[0]] + [1] * (len(x_shape) - 1)


def salt_of(seed: int, name: str) -> int:
    """The mask salt of the layer called `name` under `seed`, as a signed 64-bit integer."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class KeyedMask(nn.Cell):
    """What Dropout and DropPath share: the drop rate, the kernel, its key and the stock fallback."""

    def __init__(self, rate: float, kernel: str, out_shape):
        super().__init__()
        self.rate = float(rate)
        self.kernel = None
        self.stock = None
        if self.rate > 0:
            self.kernel = cpu_kernels.custom_op(kernel, out_shape=out_shape, bprop=_mask_has_no_gradient)
            self.stock = nn.Dropout(p=self.rate)
        self.threshold = round(self.rate * 2 ** DRAW_BITS)
        self.key = Tensor([0, self.threshold], ms.int64)
        self.scale = Tensor([1.0 / (1.0 - self.rate)], ms.float32)

    def set_salt(self, salt: int) -> None:
        self.key = Tensor([salt, self.threshold], ms.int64)

    def keyed(self, x):
        """x times its mask, which gets no gradient (as dropout's)."""
        mask = self.kernel(x.astype(ms.float32), self.key, self.scale)
        return x * ops.stop_gradient(mask).astype(x.dtype)


class Dropout(KeyedMask):
    """Element-wise dropout of rate `p` (as nn.Dropout), with keyed masks."""

    def __init__(self, p: float):
        super().__init__(p, "KeyedDropoutMask", cpu_kernels.same_as_first)

    def construct(self, x):
        if self.rate == 0 or not self.training:
            return x
        if self.kernel is None:
            return self.stock(x)
        return self.keyed(x)


class DropPath(KeyedMask):
    """Stochastic depth: a whole sample's branch is dropped with probability `rate`, else scaled by 1/keep."""

    def __init__(self, rate: float):
        super().__init__(rate, "KeyedSampleMask", _one_per_sample)

    def construct(self, x):
        if self.rate == 0 or not self.training:
            return x
        if self.kernel is None:
            return x * self.stock(ops.ones_like(x[:, :1, :1]))
        return self.keyed(x)


def key_masks(net: nn.Cell, seed: int) -> None:
    """Give every Dropout and DropPath of `net` its salt from `seed` and its name in `net`."""
    for name, cell in net.cells_and_names():
        if isinstance(cell, KeyedMask):
            cell.set_salt(salt_of(seed, name))
