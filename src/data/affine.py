"""Pillow's affine transform and rotation of RGB images (bilinear or bicubic, with a fill colour), bit for bit.

RandAugment's rotate, shear and translate took about 2.4 ms per 224x224 image in Pillow's generic transform
engine; `affine.c` computes the same bytes with the per-pixel work shared by the three bands (README, "The input
pipeline"). A probe compares it with the installed Pillow when it loads; without the library (no compiler,
`DVT_CPU_KERNELS=0`) or where the probe finds a difference, Pillow runs, with the same results.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os

import numpy as np
import PIL
from PIL import Image

from ..native import checked_function
from .pixels import rgb_pixels

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "affine.c")
FLAGS = ("-x", "c", "-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")  # no FMA:
# the doubles must round as Pillow's do
FILTERS = (Image.BILINEAR, Image.BICUBIC)
FALLBACK = "Pillow transforms the images (the same values, slower)"
Matrix = tuple[float, float, float, float, float, float]
Fill = tuple[int, int, int]
# (width, height, matrix): a shear, a rotation of a non-square image, a translation far enough out to fill, a
# mirrored scale that reads across every edge
PROBES = ((37, 29, (1.0, 0.27, -3.5, 0.0, 1.0, 0.0)), (41, 23, None), (30, 30, (1.0, 0.0, -12.7, 0.0, 1.0, 9.3)),
          (19, 33, (-1.3, 0.2, 26.0, 0.15, 0.8, -2.0)))
PROBE_DEGREES = 23.4


def rotation_matrix(width: int, height: int, degrees: float) -> Matrix | None:
    """The matrix `Image.rotate(degrees)` hands to `Image.transform` (about the centre, no expand), computed with
    Pillow's operations; None where Pillow takes a shortcut instead (a multiple of 90 degrees)."""
    angle = degrees % 360.0
    if angle in (0.0, 90.0, 180.0, 270.0):
        return None
    centre_x, centre_y = width / 2, height / 2
    angle = -math.radians(angle)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))
    c = a * -centre_x + b * -centre_y + 0.0
    f = d * -centre_x + e * -centre_y + 0.0
    return (a, b, c + centre_x, d, e, f + centre_y)


def _pillow(image: Image.Image | np.ndarray, matrix: Matrix, interpolation: int, fill: Fill) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.transform(image.size, Image.Transform.AFFINE, matrix, resample=interpolation,
                                      fillcolor=fill))


def _run(function, image: Image.Image | np.ndarray, matrix: Matrix, interpolation: int, fill: Fill) -> np.ndarray:
    source = rgb_pixels(image)  # Pillow's own 4-byte storage where it shares it: no copy
    height, width = source.height, source.width
    if source.step == 3:  # affine.c reads each pixel as 4 bytes: one more byte after the last
        padded = np.empty(height * source.stride + 1, np.uint8)
        padded[:-1] = source.owner.reshape(-1)
        source = dataclasses.replace(source, owner=padded, address=padded.ctypes.data)
    out = np.empty((height, width, 3), np.uint8)
    coefficients = (ctypes.c_double * 6)(*matrix)
    colour = (ctypes.c_uint8 * 3)(*fill)
    if function(source.address, source.stride, source.step, width, height, coefficients, int(interpolation), colour,
                width, height, out.ctypes.data):
        raise ValueError(f"cannot transform a {width}x{height} image with filter {interpolation}")
    return out


def _agrees_with_pillow(function) -> bool:
    """Whether the library gives the installed Pillow's bytes on probes that take every path of affine.c."""
    rng = np.random.default_rng(0)
    for width, height, matrix in PROBES:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        if matrix is None:
            matrix = rotation_matrix(width, height, PROBE_DEGREES)
            rotated = {f: np.asarray(Image.fromarray(image).rotate(PROBE_DEGREES, resample=f, fillcolor=(9, 8, 7)))
                       for f in FILTERS}
        else:
            rotated = {f: _pillow(image, matrix, f, (9, 8, 7)) for f in FILTERS}
        for interpolation in FILTERS:
            for source in (image, Image.fromarray(image)):  # a packed array, Pillow's 4-byte storage
                if not np.array_equal(_run(function, source, matrix, interpolation, (9, 8, 7)), rotated[interpolation]):
                    return False
    return True


@functools.cache
def _affine():
    return checked_function(SOURCE, FLAGS, "libdvt_affine", "the affine transform", FALLBACK, "dvt_affine_rgb",
                            [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p],
                            _agrees_with_pillow, f"Pillow {PIL.__version__}")


def available() -> bool:
    """Whether the library is built (building it now if needed): call before starting workers."""
    return _affine() is not None


def transform(image: Image.Image | np.ndarray, matrix: Matrix, interpolation: int, fill: Fill) -> np.ndarray:
    """`Image.transform(size, AFFINE, matrix, interpolation, fillcolor=fill)` of an RGB PIL image or (h, w, 3) uint8
    array, as an array of the same size, bit for bit; `interpolation` is PIL's BILINEAR or BICUBIC."""
    function = _affine()
    rgb = isinstance(image, np.ndarray) or image.mode == "RGB"
    if function is None or not rgb or interpolation not in FILTERS:
        return _pillow(image, matrix, interpolation, fill)
    return _run(function, image, matrix, interpolation, fill)


def rotate(image: Image.Image | np.ndarray, degrees: float, interpolation: int, fill: Fill) -> np.ndarray:
    """`Image.rotate(degrees, interpolation, fillcolor=fill)` of an RGB PIL image or (h, w, 3) uint8 array, as an
    array, bit for bit."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    matrix = rotation_matrix(image.width, image.height, degrees)
    if matrix is None:
        return np.asarray(image.rotate(degrees, resample=interpolation, fillcolor=fill))
    return transform(image, matrix, interpolation, fill)
