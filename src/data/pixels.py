"""The pixel memory of a decoded RGB image, for our C code to read without a copy.

`np.asarray(pil_image)` copies the whole image through Pillow's raw encoder: about 0.3 ms for a 500x375 JPEG, as
much as a sixth of what the training transform does with it. Pillow (11.2 and later) shares its own storage
through the Arrow C data interface instead: RGB as 4 bytes per pixel (R, G, B and a spare byte), rows contiguous.
`rgb_pixels` uses that where Pillow offers it and falls back to the copy where it does not (older Pillow, images
stored in several blocks).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from PIL import Image


class _ArrowSchema(ctypes.Structure):
    pass


_ArrowSchema._fields_ = [("format", ctypes.c_char_p), ("name", ctypes.c_char_p), ("metadata", ctypes.c_char_p),
                         ("flags", ctypes.c_int64), ("n_children", ctypes.c_int64),
                         ("children", ctypes.POINTER(ctypes.POINTER(_ArrowSchema))),
                         ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                         ("private_data", ctypes.c_void_p)]


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [("length", ctypes.c_int64), ("null_count", ctypes.c_int64), ("offset", ctypes.c_int64),
                        ("n_buffers", ctypes.c_int64), ("n_children", ctypes.c_int64),
                        ("buffers", ctypes.POINTER(ctypes.c_void_p)),
                        ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
                        ("dictionary", ctypes.c_void_p), ("release", ctypes.c_void_p),
                        ("private_data", ctypes.c_void_p)]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass(frozen=True)
class Pixels:
    """Where an RGB image's pixels are: `address` of row 0, `stride` bytes per row, `step` bytes per pixel (3 or
    4, the channels first), `height` x `width` of them. `owner` keeps the memory alive: hold this object while C
    code reads it."""

    owner: object
    address: int
    stride: int
    step: int
    height: int
    width: int

    def view(self) -> np.ndarray:
        """The (height, width, 3) uint8 image as a read-only NumPy view of this memory (no copy); the view keeps
        the memory alive."""
        memory = (ctypes.c_uint8 * (self.height * self.stride)).from_address(self.address)
        memory.owner = self.owner  # the view's base is `memory`: while the view lives, so does the storage
        rows = np.frombuffer(memory, np.uint8).reshape(self.height, self.stride)
        rows.flags.writeable = False
        return rows[:, :self.width * self.step].reshape(self.height, self.width, self.step)[..., :3]


def _shared(image: Image.Image) -> Pixels | None:
    """Pillow's own storage of `image` through the Arrow C data interface; None where Pillow does not share it."""
    try:
        schema_capsule, array_capsule = image.__arrow_c_array__()
    except (AttributeError, NotImplementedError, ValueError, OSError):
        return None
    schema = ctypes.cast(_capsule_pointer(schema_capsule, b"arrow_schema"), ctypes.POINTER(_ArrowSchema)).contents
    array = ctypes.cast(_capsule_pointer(array_capsule, b"arrow_array"), ctypes.POINTER(_ArrowArray)).contents
    width, height = image.size
    if (schema.format != b"+w:4" or schema.n_children != 1 or schema.children[0].contents.format != b"C"
            or array.length != width * height or array.offset != 0 or array.n_children != 1):
        return None
    pixels = array.children[0].contents
    if pixels.length != 4 * width * height or pixels.offset != 0 or pixels.n_buffers != 2 or not pixels.buffers[1]:
        return None
    return Pixels((schema_capsule, array_capsule), pixels.buffers[1], 4 * width, 4, height, width)


def rgb_pixels(image: Image.Image | np.ndarray) -> Pixels:
    """The pixels of an RGB PIL image (shared by Pillow where it can, else copied) or of an (h, w, 3) uint8 array
    (made contiguous)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        shared = _shared(image)
        if shared is not None:
            return shared
        image = np.asarray(image)
    array = np.ascontiguousarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB array, got shape {array.shape} and dtype {array.dtype}")
    return Pixels(array, array.ctypes.data, array.strides[0], 3, *array.shape[:2])
