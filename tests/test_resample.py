"""The resampler: Pillow's resize bit for bit on every path of resample.c, and Pillow itself where it cannot run."""

import numpy as np
import pytest
from PIL import Image

from src import native
from src.data import resample


def pillow(image: Image.Image, crop, out_size, window, interpolation) -> np.ndarray:
    """The independent computation: Pillow crops, resizes the whole crop, then cuts the window."""
    x0, y0, width, height = crop
    wx, wy, ww, wh = window
    resized = image.crop((x0, y0, x0 + width, y0 + height)).resize(out_size, interpolation)
    return np.asarray(resized.crop((wx, wy, wx + ww, wy + wh)))


def random_case(rng: np.random.Generator, case: int):
    height, width = (int(v) for v in rng.integers(2, 160, 2))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    cw, ch = int(rng.integers(1, width + 1)), int(rng.integers(1, height + 1))
    crop = (int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1)), cw, ch)
    ow, oh = (int(v) for v in rng.integers(1, 200, 2))
    ow = cw if case % 5 == 0 else ow  # one pass only, vertical or horizontal
    oh = ch if case % 7 == 0 else oh
    wx, wy = int(rng.integers(0, ow)), int(rng.integers(0, oh))
    window = (wx, wy, int(rng.integers(1, ow - wx + 1)), int(rng.integers(1, oh - wy + 1)))
    return image, crop, (ow, oh), window


def test_the_library_builds_and_agrees_with_pillow():
    assert resample.available()  # else the comparisons below would compare Pillow with itself


@pytest.mark.parametrize("seed", range(3))
def test_resize_window_is_pillows_resize_bit_for_bit(seed):
    """Random crops, output sizes (up and down, one pass or two, in either of Pillow 13's orders) and windows."""
    rng = np.random.default_rng(seed)
    orders = {True: 0, False: 0}
    for case in range(150):
        image, crop, out_size, window = random_case(rng, case)
        shrink_h, shrink_w = crop[3] - out_size[1], crop[2] - out_size[0]
        orders[shrink_h > 0 and shrink_h > 2 * shrink_w] += 1
        for interpolation in (Image.BILINEAR, Image.BICUBIC):
            expected = pillow(image, crop, out_size, window, interpolation)
            for source in (image, np.asarray(image)):  # Pillow's 4-byte storage, a packed 3-byte array
                np.testing.assert_array_equal(resample.resize_window(source, crop, out_size, window, interpolation),
                                              expected,
                                              err_msg=f"{image.size} {crop} {out_size} {window} {interpolation}")
    assert min(orders.values()) > 10, orders  # both pass orders were met


def test_imagenet_sized_eval_and_train_crops():
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    for crop, out_size, window in (((0, 0, 500, 375), (341, 256), (58, 16, 224, 224)),  # eval, crop_pct 0.875
                                   ((37, 12, 402, 301), (224, 224), (0, 0, 224, 224)),  # RandomResizedCrop
                                   ((100, 80, 150, 90), (224, 224), (0, 0, 224, 224))):  # upscaled crop
        for interpolation in (Image.BILINEAR, Image.BICUBIC):
            np.testing.assert_array_equal(resample.resize_window(image, crop, out_size, window, interpolation),
                                          pillow(image, crop, out_size, window, interpolation))


@pytest.fixture
def forget_the_library():
    resample._resize_window.cache_clear()
    yield
    resample._resize_window.cache_clear()


def test_a_library_that_disagrees_with_pillow_is_not_used(monkeypatch, forget_the_library):
    """Built with the other Pillow's pass order, the probes catch it: a warning, then Pillow's own values."""
    monkeypatch.setattr(resample, "PILLOW13_ORDER", not resample.PILLOW13_ORDER)
    with pytest.warns(UserWarning, match="differs from Pillow"):
        assert not resample.available()
    image, crop, out_size, window = random_case(np.random.default_rng(3), 1)
    np.testing.assert_array_equal(resample.resize_window(image, crop, out_size, window, Image.BICUBIC),
                                  pillow(image, crop, out_size, window, Image.BICUBIC))


def test_switched_off_pillow_resizes(monkeypatch, forget_the_library):
    monkeypatch.setenv(native.SWITCH, "0")
    assert not resample.available()
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    np.testing.assert_array_equal(resample.resize_window(image, (0, 0, 40, 30), (20, 15), (2, 1, 16, 12),
                                                         Image.BICUBIC),
                                  pillow(image, (0, 0, 40, 30), (20, 15), (2, 1, 16, 12), Image.BICUBIC))
