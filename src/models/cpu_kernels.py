"""CPU kernels: LayerNorm and erf GELU, the two ops MindSpore 2.10 runs slowest on CPU; reproducible dropout masks.

MindSpore's CPU LayerNorm and erf GELU take about 22x and 23-45x torch's time (measured beside torch 2.13 on
the same machine); they are about 10% and 20% of a DVT forward here. `cpu_kernels.cc` implements both as AOT
custom ops (vectorised, split over the usable cores), and the keyed dropout masks of `dropout.py`. It is built
once per machine with g++ into a cache folder (`DVT_KERNEL_DIR`, default `~/.cache/dvt_mindspore`), keyed by
source, flags, compiler and CPU, and written atomically, so concurrent workers and clusters with a shared home
are safe. LayerNorm and GELU serve fp32 inference on CPU only: training, other devices, other dtypes and exported
MindIR use MindSpore's own ops. `DVT_CPU_KERNELS=0` turns them all off; without a compiler, or if the build
fails, MindSpore's ops run and a warning says why.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import mindspore as ms
from mindspore import ops

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")
SWITCH = "DVT_CPU_KERNELS"
CACHE_DIR = "DVT_KERNEL_DIR"
FALLBACK = "MindSpore's slower LayerNorm and GELU and its non-reproducible dropout are used"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    with open(SOURCE, "rb") as handle:
        source = handle.read()
    text = "\n".join([" ".join(FLAGS), version, _cpu_flags()]).encode() + source
    return hashlib.sha256(text).hexdigest()[:16]


@functools.cache
def library_path() -> str | None:
    """The built kernel library, building it on first use; None where the kernels are off or cannot build."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        warnings.warn(f"no C++ compiler (g++ or $CXX) found: {FALLBACK} (set {SWITCH}=0 to silence this)",
                      stacklevel=2)
        return None
    folder = os.environ.get(CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "dvt_mindspore")
    target = os.path.join(folder, f"libdvt_cpu_kernels_{_build_key(compiler)}.so")
    if os.path.isfile(target):
        return target
    try:
        os.makedirs(folder, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=".build_", suffix=".so")
        os.close(handle)
    except OSError as err:
        warnings.warn(f"cannot write the CPU kernels to {folder} ({err}): {FALLBACK}", stacklevel=2)
        return None
    try:
        subprocess.run([compiler, *FLAGS, SOURCE, "-o", partial], capture_output=True, text=True, check=True,
                       timeout=300)
        os.replace(partial, target)
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"building the CPU kernels failed: {FALLBACK}: {detail.strip()}", stacklevel=2)
        return None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def same_as_first(*args):
    """The first input's shape or dtype: the output of an element-wise op."""
    return args[0]


def custom_op(function: str, out_shape=same_as_first, bprop=None) -> ops.Custom | None:
    """The AOT op `function` of the library, for the current device; None off CPU or without the library.

    `out_shape` maps the input shapes to the output's (default: the first input's); the output has the first
    input's dtype. `bprop` is the op's backward, for ops used in training graphs.
    """
    if ms.get_context("device_target") != "CPU":
        return None
    path = library_path()
    if path is None:
        return None
    return ops.Custom(f"{path}:{function}", out_shape=out_shape, out_dtype=same_as_first, func_type="aot",
                      bprop=bprop)
