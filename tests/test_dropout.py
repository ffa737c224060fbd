"""Keyed dropout and drop path: the masks of the documented hash (NumPy), at the rate asked, reproducible."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.models import create_model
from src.models.dropout import DRAW_BITS, Dropout, DropPath, KeyedMask, salt_of

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 arrays (wrapping arithmetic)."""
    z = z + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unsigned(salt: int) -> np.uint64:
    return np.array([salt], np.int64).view(np.uint64)[0]


def numpy_dropout_mask(x: np.ndarray, salt: int, rate: float) -> np.ndarray:
    index = np.arange(x.size, dtype=np.uint64)
    bits = x.astype(np.float32).reshape(-1).view(np.uint32).astype(np.uint64)
    draw = mix(mix(unsigned(salt) + index * GOLDEN) ^ bits) >> np.uint64(64 - DRAW_BITS)
    keep = draw >= np.uint64(round(rate * 2 ** DRAW_BITS))
    return np.where(keep, np.float32(1.0) / np.float32(1.0 - rate), np.float32(0)).reshape(x.shape)


def numpy_sample_mask(x: np.ndarray, salt: int, rate: float) -> np.ndarray:
    rows = x.astype(np.float32).reshape(len(x), -1)
    position = np.arange(rows.shape[1], dtype=np.uint64) << np.uint64(32)
    words = mix(position[None, :] | rows.view(np.uint32).astype(np.uint64))
    sums = words.sum(1, dtype=np.uint64)  # wraps, as the kernel's
    draw = mix(unsigned(salt) ^ sums) >> np.uint64(64 - DRAW_BITS)
    keep = draw >= np.uint64(round(rate * 2 ** DRAW_BITS))
    mask = np.where(keep, np.float32(1.0) / np.float32(1.0 - rate), np.float32(0))
    return mask.reshape((len(x),) + (1,) * (x.ndim - 1))


def training(cell: KeyedMask, salt: int) -> KeyedMask:
    assert cell.kernel is not None  # the kernel library builds here: the comparisons are of the keyed masks
    cell.set_salt(salt)
    cell.set_train(True)
    return cell


@pytest.fixture(scope="module")
def activations() -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((8, 50, 64)).astype(np.float32)
    x[0, 0, :4] = [0.0, -0.0, np.inf, 1e-42]  # zeros, an infinity and a denormal have bit patterns too
    return x


def test_dropout_masks_are_the_documented_hash(activations):
    cell = training(Dropout(0.1), salt=-1234567890123)
    out = cell(ms.Tensor(activations)).asnumpy()
    mask = numpy_dropout_mask(activations, -1234567890123, 0.1)
    np.testing.assert_array_equal(out, activations * mask)


def test_dropout_drops_at_its_rate_and_scales_the_rest(activations):
    x = np.abs(np.nan_to_num(activations, posinf=3.0)) + 1  # no zeros: a zero output is a dropped element
    out = training(Dropout(0.25), salt=5)(ms.Tensor(x)).asnumpy()
    dropped = (out == 0).mean()
    sigma = np.sqrt(0.25 * 0.75 / x.size)
    assert abs(dropped - 0.25) < 5 * sigma
    np.testing.assert_allclose(out[out != 0], x[out != 0] / 0.75, rtol=1e-6)


class Summed(nn.Cell):
    def __init__(self, cell: nn.Cell):
        super().__init__()
        self.cell = cell

    def construct(self, x):
        return self.cell(x).sum()


def test_dropout_gradient_is_the_mask(activations):
    summed = Summed(training(Dropout(0.1), salt=9))
    summed.set_train(True)
    gradient = ms.grad(summed)(ms.Tensor(activations)).asnumpy()
    np.testing.assert_array_equal(gradient, numpy_dropout_mask(activations, 9, 0.1))


def test_drop_path_masks_whole_samples_by_the_documented_hash():
    x = np.random.default_rng(1).standard_normal((256, 5, 8)).astype(np.float32)
    out = training(DropPath(0.5), salt=42)(ms.Tensor(x)).asnumpy()
    mask = numpy_sample_mask(x, 42, 0.5)
    np.testing.assert_array_equal(out, x * mask)
    assert set(np.unique(mask)) == {0.0, 2.0}
    assert abs((mask == 0).mean() - 0.5) < 5 * np.sqrt(0.25 / 256)


def test_masks_change_with_the_salt_and_the_input(activations):
    a = numpy_dropout_mask(activations, 1, 0.5)
    assert (a != numpy_dropout_mask(activations, 2, 0.5)).mean() > 0.4  # another layer or seed
    nudged = np.nextafter(activations, np.float32(np.inf))  # one ulp: another batch, another mask
    assert (a != numpy_dropout_mask(nudged, 1, 0.5)).mean() > 0.4
    out = training(Dropout(0.5), salt=1)(ms.Tensor(nudged)).asnumpy()
    np.testing.assert_array_equal(out, nudged * numpy_dropout_mask(nudged, 1, 0.5))


def test_eval_mode_and_rate_zero_are_the_identity(activations):
    x = ms.Tensor(activations)
    for cell in (Dropout(0.3), DropPath(0.3)):
        cell.set_train(False)
        np.testing.assert_array_equal(cell(x).asnumpy(), activations)
    zero = Dropout(0.0)
    zero.set_train(True)
    assert zero.kernel is None
    np.testing.assert_array_equal(zero(x).asnumpy(), activations)


def test_every_layer_of_a_model_has_its_own_salt_from_the_seed():
    def salts(seed: int) -> dict[str, int]:
        ms.set_seed(seed)
        net = create_model("dvt_tiny_t2t", drop_path_rate=0.1)
        return {name: int(cell.key.asnumpy()[0]) for name, cell in net.cells_and_names()
                if isinstance(cell, KeyedMask) and cell.rate > 0}

    first, again, other = salts(3), salts(3), salts(4)
    assert first == again
    assert "stages.0.tokenizer.attention1.dp" in first and "stages.2.blocks.1.drop_path" in first
    assert len(set(first.values())) == len(first)  # one salt per layer
    assert first["stages.0.tokenizer.attention1.dp"] == salt_of(3, "stages.0.tokenizer.attention1.dp")
    assert not set(first.values()) & set(other.values())


def test_without_the_kernel_mindspore_dropout_runs(activations):
    cell = Dropout(0.5)
    cell.kernel = None
    cell.set_train(True)
    out = cell(ms.Tensor(activations + 10)).asnumpy()
    assert 0.4 < (out == 0).mean() < 0.6
