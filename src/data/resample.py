"""Pillow's bilinear and bicubic resize, bit for bit, computing only the part of the output that is kept.

RandomResizedCrop resizes a crop of each training image and the eval transform resizes a whole image only to cut
its centre out; Pillow resamples every pixel of the full output. `resample.c` computes the kept window alone with
Pillow's own arithmetic (tests/test_resample.py holds it to Pillow's output), about 3-4x faster per image, reading
a decoded image in Pillow's own storage (`pixels.py`) rather than a copy of it. Without the library (no compiler,
`DVT_CPU_KERNELS=0`) Pillow runs, with the same results.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
import PIL
from PIL import Image

from ..native import checked_function
from .pixels import rgb_pixels

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resample.c")
FLAGS = ("-x", "c", "-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")  # no FMA:
# the coefficients must round as Pillow's do
FILTERS = (Image.BILINEAR, Image.BICUBIC)
Box = tuple[int, int, int, int]  # left, top, width, height


FALLBACK = "Pillow resizes whole images (the same values, slower)"
PILLOW13_ORDER = int(PIL.__version__.split(".")[0]) >= 13  # Pillow 13 may run the vertical pass first
# (image width, height, crop, output size, window): horizontal first, vertical first (Pillow 13), one pass only
PROBES = ((40, 30, (3, 2, 31, 27), (53, 19), (5, 3, 40, 12)), (30, 60, (0, 0, 30, 60), (29, 17), (1, 2, 20, 9)),
          (25, 20, (2, 1, 20, 15), (20, 41), (0, 5, 20, 30)))


def _agrees_with_pillow(function) -> bool:
    """Whether the library gives the installed Pillow's values on probes that take every path of resample.c, from
    Pillow's own storage and from packed arrays."""
    rng = np.random.default_rng(0)
    for width, height, crop, out_size, window in PROBES:
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array)
        for interpolation in FILTERS:
            expected = _pillow(image, crop, out_size, window, interpolation)
            for source in (image, array):
                if not np.array_equal(_run(function, source, crop, out_size, window, interpolation), expected):
                    return False
    return True


@functools.cache
def _resize_window():
    return checked_function(SOURCE, FLAGS, "libdvt_resample", "the resampler", FALLBACK, "dvt_resize_window",
                            [ctypes.c_void_p] + [ctypes.c_int] * 14 + [ctypes.c_void_p], _agrees_with_pillow,
                            f"Pillow {PIL.__version__}")


def available() -> bool:
    """Whether the resampler's library is built (building it now if needed): call before starting workers."""
    return _resize_window() is not None


def _pillow(image: Image.Image | np.ndarray, crop: Box, out_size: tuple[int, int], window: Box,
            interpolation: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    x0, y0, width, height = crop
    wx, wy, ww, wh = window
    resized = image.crop((x0, y0, x0 + width, y0 + height)).resize(out_size, interpolation)
    return np.asarray(resized.crop((wx, wy, wx + ww, wy + wh)))


def _run(function, image: Image.Image | np.ndarray, crop: Box, out_size: tuple[int, int], window: Box,
         interpolation: int) -> np.ndarray:
    source = rgb_pixels(image)  # Pillow's own storage where it shares it: no copy of the whole image
    out = np.empty((window[3], window[2], 3), np.uint8)
    status = function(source.address, source.stride, source.step, *crop, *out_size, *window, int(interpolation),
                      int(PILLOW13_ORDER), out.ctypes.data)
    if status:
        raise ValueError(f"cannot resize the crop {crop} to {out_size} and cut {window}")
    return out


def resize_window(image: Image.Image | np.ndarray, crop: Box, out_size: tuple[int, int], window: Box,
                  interpolation: int) -> np.ndarray:
    """`image.crop(crop).resize(out_size, interpolation)`, cut to `window` of the resized image, as an (h, w, 3)
    uint8 array, bit for bit; `image` is an RGB PIL image or an (h, w, 3) uint8 array, `interpolation` PIL's
    BILINEAR or BICUBIC."""
    function = _resize_window()
    wx, wy, ww, wh = window
    inside = wx >= 0 and wy >= 0 and wx + ww <= out_size[0] and wy + wh <= out_size[1]  # else Pillow pads
    rgb = isinstance(image, np.ndarray) or image.mode == "RGB"
    if function is None or not rgb or interpolation not in FILTERS or not inside:
        return _pillow(image, crop, out_size, window, interpolation)
    return _run(function, image, crop, out_size, window, interpolation)
