"""Our native libraries (the CPU kernels of `src/models`, the resampler of `src/data`): each is built once per
machine with the C++ compiler (`$CXX`, default g++) into a cache folder (`DVT_KERNEL_DIR`, default
`~/.cache/dvt_mindspore`), keyed by source, flags, compiler and CPU, and written atomically, so concurrent workers
and clusters with a shared home are safe. `DVT_CPU_KERNELS=0` turns them all off; without a compiler, or if a
build fails, the pure Python or MindSpore path runs and a warning says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable

SWITCH = "DVT_CPU_KERNELS"
CACHE_DIR = "DVT_KERNEL_DIR"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return ""


def _build_key(compiler: str, source: str, flags: tuple[str, ...]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    with open(source, "rb") as handle:
        text = handle.read()
    return hashlib.sha256("\n".join([" ".join(flags), version, _cpu_flags()]).encode() + text).hexdigest()[:16]


def build_library(source: str, flags: tuple[str, ...], stem: str, what: str, fallback: str) -> str | None:
    """The shared library built from `source` with `flags` (built now if not cached); None, with a warning that
    `fallback` runs instead, where native code is off, there is no compiler or the build fails. `what` names the
    library in the warnings."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        warnings.warn(f"no C++ compiler (g++ or $CXX) found for {what}: {fallback} (set {SWITCH}=0 to silence "
                      "this)", stacklevel=3)
        return None
    folder = os.environ.get(CACHE_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "dvt_mindspore")
    target = os.path.join(folder, f"{stem}_{_build_key(compiler, source, flags)}.so")
    if os.path.isfile(target):
        return target
    try:
        os.makedirs(folder, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=".build_", suffix=".so")
        os.close(handle)
    except OSError as err:
        warnings.warn(f"cannot write {what} to {folder} ({err}): {fallback}", stacklevel=3)
        return None
    try:
        subprocess.run([compiler, *flags, source, "-o", partial], capture_output=True, text=True, check=True,
                       timeout=300)
        os.replace(partial, target)
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"building {what} failed: {fallback}: {detail.strip()}", stacklevel=3)
        return None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def checked_function(source: str, flags: tuple[str, ...], stem: str, what: str, fallback: str, symbol: str,
                     argtypes: list, agrees: Callable[[ctypes._CFuncPtr], bool], reference: str):
    """The int-returning C function `symbol` of the library built from `source` (`build_library`), used only where
    `agrees(function)` holds on its probes; None, with a warning that names `reference`, where it does not."""
    path = build_library(source, flags, stem, what, fallback)
    if path is None:
        return None
    function = getattr(ctypes.CDLL(path), symbol)
    function.restype = ctypes.c_int
    function.argtypes = argtypes
    if not agrees(function):
        warnings.warn(f"{what} differs from {reference} on its probes: {fallback}", stacklevel=3)
        return None
    return function
