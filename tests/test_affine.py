"""The affine transform: Pillow's transform and rotate bit for bit on every path of affine.c, Pillow itself where
the library cannot run, and RandAugment's draws unchanged by it."""

import numpy as np
import pytest
from PIL import Image

from src import native
from src.data import affine
from src.data.randaugment import RandAugment

FILTERS = (Image.BILINEAR, Image.BICUBIC)


def pillow_transform(image: np.ndarray, matrix, interpolation, fill) -> np.ndarray:
    """The independent computation: Pillow's own generic transform engine."""
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).transform((width, height), Image.Transform.AFFINE, matrix,
                                                       resample=interpolation, fillcolor=fill))


def random_case(rng: np.random.Generator):
    height, width = (int(v) for v in rng.integers(1, 90, 2))
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    return image, fill


def test_the_library_builds_and_agrees_with_pillow():
    assert affine.available()  # else the comparisons below would compare Pillow with itself


@pytest.mark.parametrize("seed", range(3))
def test_transform_is_pillows_bit_for_bit(seed):
    """Random images (1 to 89 pixels a side, so the taps run off every edge), matrices (shears, scales, mirrors,
    shifts far enough out that the fill shows) and fill colours, both filters."""
    rng = np.random.default_rng(seed)
    filled = 0
    for case in range(120):
        image, fill = random_case(rng)
        height, width = image.shape[:2]
        spread = np.array([0.4, 0.4, width / 2, 0.4, 0.4, height / 2])
        matrix = tuple(float(v) for v in rng.normal(0.0, 1.0, 6) * spread + (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
        if case % 3:  # RandAugment's forms: shear or shift along one axis, so the other axis' fraction is 0
            shear, shift = matrix[1], [matrix[2], float(round(matrix[2]))][case % 2]
            matrix = (1.0, shear, shift, 0.0, 1.0, 0.0) if case % 3 == 1 else (1.0, 0.0, 0.0, shear, 1.0, shift)
        for interpolation in FILTERS:
            expected = pillow_transform(image, matrix, interpolation, fill)
            for source in (image, Image.fromarray(image)):  # a packed array, Pillow's own 4-byte storage
                ours = affine.transform(source, matrix, interpolation, fill)
                np.testing.assert_array_equal(ours, expected, err_msg=f"{image.shape} {matrix} {interpolation}")
            filled += int(np.all(ours == fill, axis=-1).any())
    assert filled > 50  # the fill path was taken often


@pytest.mark.parametrize("seed", range(2))
def test_rotate_is_pillows_bit_for_bit(seed):
    """RandAugment's angles (up to 30 degrees either way), wider ones, and the multiples of 90 that Pillow treats
    apart (a copy or a transpose): square and non-square images."""
    rng = np.random.default_rng(10 + seed)
    angles = [*rng.uniform(-30.0, 30.0, 40), *rng.uniform(-200.0, 200.0, 20), 0.0, 90.0, -90.0, 180.0, 270.0, 360.0]
    for index, degrees in enumerate(angles):
        image, fill = random_case(rng)
        if index % 4 == 0:
            image = image[:, :image.shape[0]].copy()  # square, where Pillow turns 90 and 270 into transposes
        for interpolation in FILTERS:
            expected = np.asarray(Image.fromarray(image).rotate(float(degrees), resample=interpolation,
                                                                fillcolor=fill))
            np.testing.assert_array_equal(affine.rotate(image, float(degrees), interpolation, fill), expected,
                                          err_msg=f"{image.shape} {degrees} {interpolation}")


def test_rotation_matrix_is_a_rotation_about_the_centre():
    """Hand-worked: 90 degrees is left to Pillow; 30 degrees maps the centre to itself with cos/sin entries."""
    assert affine.rotation_matrix(40, 20, 90.0) is None
    a, b, c, d, e, f = affine.rotation_matrix(40, 20, 30.0)
    assert (a, b, d, e) == pytest.approx((np.cos(np.pi / 6), -np.sin(np.pi / 6), np.sin(np.pi / 6), np.cos(np.pi / 6)))
    assert (a * 20 + b * 10 + c, d * 20 + e * 10 + f) == pytest.approx((20.0, 10.0))


def test_imagenet_sized_image():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    for matrix in ((1.0, 0.3, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, -0.27, 1.0, 0.0), (1.0, 0.0, -100.8, 0.0, 1.0, 0.0)):
        for interpolation in FILTERS:
            np.testing.assert_array_equal(affine.transform(image, matrix, interpolation, (124, 116, 104)),
                                          pillow_transform(image, matrix, interpolation, (124, 116, 104)))


@pytest.fixture
def forget_the_library():
    affine._affine.cache_clear()
    yield
    affine._affine.cache_clear()


def test_randaugment_draws_the_same_images_with_and_without_the_library(monkeypatch, forget_the_library):
    """The whole policy, geometric ops only, on many keys: the library changes how, not what."""
    augment = RandAugment(num_ops=3, prob=1.0, ops=("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"))
    image = np.random.default_rng(6).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert affine.available()
    with_library = [augment(image, np.random.default_rng(key)) for key in range(40)]
    monkeypatch.setenv(native.SWITCH, "0")
    affine._affine.cache_clear()
    assert not affine.available()
    for key, expected in enumerate(with_library):
        np.testing.assert_array_equal(augment(image, np.random.default_rng(key)), expected)


def test_a_library_that_disagrees_with_pillow_is_not_used(monkeypatch, forget_the_library):
    """A library whose rounding differs (simulated: one byte off) fails the probe: a warning, then Pillow."""
    real_run = affine._run

    def one_off(function, image, matrix, interpolation, fill):
        out = real_run(function, image, matrix, interpolation, fill)
        out[0, 0, 0] ^= 1
        return out

    monkeypatch.setattr(affine, "_run", one_off)
    with pytest.warns(UserWarning, match="differs from Pillow"):
        assert not affine.available()
    image, fill = random_case(np.random.default_rng(8))
    matrix = (1.0, 0.2, 1.5, 0.1, 1.0, -0.5)
    np.testing.assert_array_equal(affine.transform(image, matrix, Image.BICUBIC, fill),
                                  pillow_transform(image, matrix, Image.BICUBIC, fill))


def test_switched_off_pillow_transforms(monkeypatch, forget_the_library):
    monkeypatch.setenv(native.SWITCH, "0")
    assert not affine.available()
    image, fill = random_case(np.random.default_rng(9))
    np.testing.assert_array_equal(affine.rotate(image, 17.0, Image.BILINEAR, fill),
                                  np.asarray(Image.fromarray(image).rotate(17.0, resample=Image.BILINEAR,
                                                                           fillcolor=fill)))
