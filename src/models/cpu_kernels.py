"""CPU kernels: LayerNorm and erf GELU, the two ops MindSpore 2.10 runs slowest on CPU; attention's q/k/v split,
scaled softmax and head merge, the unfold of T2T's soft split and DeiT's patch cut, the reuse paths' sparse
resampling and the performer's per-token scalars, where MindSpore's CPU ops take several passes, keep per-element
index tables or do dense work; a Dense layer's bias added inside the GELU or the q/k/v split that follows it;
reproducible dropout masks.

MindSpore's CPU LayerNorm and erf GELU take about 22x and 23-45x torch's time (measured beside torch 2.13 on
the same machine); they are about 10% and 20% of a DVT forward here. `cpu_kernels.cc` implements both as AOT
custom ops (vectorised, split over the usable cores), the other inference kernels, and the keyed dropout masks
of `dropout.py`. It is built once per machine and cached (`src/native.py`). The inference kernels serve fp32
inference on CPU only: training, other devices, other dtypes and exported MindIR use MindSpore's own ops.
`DVT_CPU_KERNELS=0` turns them all off; without a compiler, or if the build fails, MindSpore's ops run and a
warning says why.
"""

from __future__ import annotations

import functools
import os

import mindspore as ms
from mindspore import ops

from ..native import build_library

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")
FALLBACK = "MindSpore's slower LayerNorm and GELU and its non-reproducible dropout are used"


@functools.cache
def library_path() -> str | None:
    """The built kernel library, building it on first use; None where the kernels are off or cannot build."""
    return build_library(SOURCE, FLAGS, "libdvt_cpu_kernels", "the CPU kernels", FALLBACK)


def same_as_first(*args):
    """The first input's shape or dtype: the output of an element-wise op."""
    return args[0]


def custom_op(function: str, out_shape=same_as_first, bprop=None, outputs: int = 1,
              shape_attrs: dict | None = None) -> ops.Custom | None:
    """The AOT op `function` of the library, for the current device; None off CPU or without the library.

    `out_shape` maps the input shapes to the output's (default: the first input's), or to a list of `outputs`
    shapes; every output has the first input's dtype. `shape_attrs` names the values other than the input shapes
    that `out_shape` depends on: PyNative mode caches an op's output shape by its name, attributes and input
    shapes, so two ops of one kernel on inputs of the same shape would otherwise share one. `bprop` is the op's
    backward, for ops used in training graphs.
    """
    if ms.get_context("device_target") != "CPU":
        return None
    path = library_path()
    if path is None:
        return None
    out_dtype = same_as_first if outputs == 1 else lambda first, *_: [first] * outputs  # a list, as out_shape gives
    op = ops.Custom(f"{path}:{function}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)
    for name, value in (shape_attrs or {}).items():
        op.add_prim_attr(name, value)
    return op
