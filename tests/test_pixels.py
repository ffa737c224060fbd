"""Pixel memory for the C code: Pillow's own storage where Pillow shares it, a packed copy where it does not."""

import ctypes
import gc

import numpy as np
import pytest
from PIL import Image

from src.data import pixels


def read(source: pixels.Pixels, height: int, width: int) -> np.ndarray:
    """The (h, w, 3) image as the C code sees it: rows `stride` apart, pixels `step` apart, channels first."""
    flat = np.ctypeslib.as_array(ctypes.cast(source.address, ctypes.POINTER(ctypes.c_uint8)),
                                 shape=(height * source.stride,))
    rows = flat.reshape(height, source.stride)[:, :width * source.step]
    return rows.reshape(height, width, source.step)[..., :3]


def test_pillow_shares_its_rgb_storage_without_a_copy():
    array = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    source = pixels.rgb_pixels(image)
    assert (source.step, source.stride) == (4, 4 * 53)
    np.testing.assert_array_equal(read(source, 37, 53), array)
    np.testing.assert_array_equal(source.view(), array)
    image.putpixel((5, 7), (1, 2, 3))  # the same memory: a change to the image shows through
    assert tuple(read(source, 37, 53)[7, 5]) == (1, 2, 3)


def test_decoded_jpeg_is_shared(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    with Image.open(path) as image:
        image.load()
        source = pixels.rgb_pixels(image)
        assert source.step == 4
        np.testing.assert_array_equal(read(source, 30, 40), np.asarray(image))


def test_a_view_keeps_the_storage_alive():
    array = np.random.default_rng(4).integers(0, 256, (21, 17, 3), dtype=np.uint8)
    view = pixels.rgb_pixels(Image.fromarray(array)).view()  # neither the image nor Pixels is kept
    gc.collect()
    _ = [Image.new("RGB", (17, 21), (255, 0, 0)) for _ in range(50)]  # would reuse freed storage
    np.testing.assert_array_equal(view, array)
    assert not view.flags.writeable


def test_a_pillow_that_does_not_share_is_copied(monkeypatch):
    array = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    image = Image.fromarray(array)

    def refuse(*args):
        raise ValueError("image is in several blocks")

    monkeypatch.setattr(Image.Image, "__arrow_c_array__", refuse)
    source = pixels.rgb_pixels(image)
    assert (source.step, source.stride) == (3, 33)
    np.testing.assert_array_equal(read(source, 9, 11), array)
    np.testing.assert_array_equal(source.view(), array)


def test_arrays_are_packed_and_bad_input_is_named():
    array = np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    source = pixels.rgb_pixels(array[:, ::2])  # a strided view is made contiguous
    np.testing.assert_array_equal(read(source, 6, 4), array[:, ::2])
    with pytest.raises(ValueError, match="mode L"):
        pixels.rgb_pixels(Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="float32"):
        pixels.rgb_pixels(np.zeros((4, 4, 3), np.float32))
