"""Token-grid geometry and the reuse resampling, against the reference's figures and hand-worked rows."""

import numpy as np
import pytest
from numpy_dvt import nearest_then_pool

from src.models.reuse import resample_1d, token_resample_matrix
from src.models.spec import DVTSpec, Tokenizer, default_patch_tokenizer, default_t2t_tokenizer, t2t_grid

# Rows of the 1-D resampling matrix, worked by hand from the official code's reuse (nearest x2 upsampling, then
# adaptive average pooling; blackfeather-wang/Dynamic-Vision-Transformer): source index: weight.
SPEC_ROWS = {
    (7, 10): [{0: 1}, {0: 1 / 2, 1: 1 / 2}, {1: 2 / 3, 2: 1 / 3}, {2: 1}, {2: 1 / 2, 3: 1 / 2}, {3: 1 / 2, 4: 1 / 2},
              {4: 1}, {4: 1 / 3, 5: 2 / 3}, {5: 1 / 2, 6: 1 / 2}, {6: 1}],
    (10, 14): [{0: 1}, {0: 1 / 2, 1: 1 / 2}, {1: 2 / 3, 2: 1 / 3}, {2: 1}, {2: 1 / 3, 3: 2 / 3}, {3: 1 / 2, 4: 1 / 2},
               {4: 1}, {5: 1}, {5: 1 / 2, 6: 1 / 2}, {6: 2 / 3, 7: 1 / 3}, {7: 1}, {7: 1 / 3, 8: 2 / 3},
               {8: 1 / 2, 9: 1 / 2}, {9: 1}],
}


@pytest.mark.parametrize("src,dst", list(SPEC_ROWS))
def test_resample_rows_match_the_spec(src, dst):
    expected = np.zeros((dst, src))
    for i, row in enumerate(SPEC_ROWS[(src, dst)]):
        for j, weight in row.items():
            expected[i, j] = weight
    np.testing.assert_allclose(resample_1d(src, dst), expected, atol=1e-12)


@pytest.mark.parametrize("src,dst", [(7, 10), (10, 14), (7, 14), (4, 7), (2, 3), (5, 4)])
def test_resample_matrix_equals_nearest_then_adaptive_pool(src, dst):
    grid = np.random.default_rng(0).normal(size=(3, src, src))
    expected = nearest_then_pool(grid, dst).reshape(3, -1)
    tokens = np.concatenate([np.full((3, 1), 7.0), grid.reshape(3, -1)], 1)
    keep = token_resample_matrix(src, dst, keep_cls=True).astype(np.float64) @ tokens.T
    drop = token_resample_matrix(src, dst, keep_cls=False).astype(np.float64) @ tokens.T
    np.testing.assert_allclose(keep[1:].T, expected, atol=1e-6)
    assert np.allclose(keep[0], 7.0) and np.allclose(drop[0], 0.0)


def test_official_tokenizers_at_224():
    assert [default_t2t_tokenizer(224, g) for g in (7, 10, 14)] == [Tokenizer(14, 8, 3), Tokenizer(11, 6, 5),
                                                                     Tokenizer(7, 4, 2)]
    assert [default_patch_tokenizer(224, g) for g in (7, 10, 14)] == [Tokenizer(32, 32, 0), Tokenizer(23, 23, 3),
                                                                       Tokenizer(16, 16, 0)]
    # T2T maps 224 -> 28/38/56 -> 14/19/28 -> 7/10/14.
    assert [t2t_grid(224, default_t2t_tokenizer(224, g)) for g in (7, 10, 14)] == [7, 10, 14]


@pytest.mark.parametrize("grid", [2, 3, 4, 5, 6, 8, 12])
@pytest.mark.parametrize("img_size", [32, 64, 224])
def test_any_grid_gets_a_tokenizer_that_produces_it(grid, img_size):
    if 4 * grid > img_size:
        pytest.skip("grid finer than the image allows")
    assert t2t_grid(img_size, default_t2t_tokenizer(img_size, grid)) == grid
    tok = default_patch_tokenizer(img_size, grid)
    assert (img_size + 2 * tok.padding - tok.kernel) // tok.stride + 1 == grid


def test_spec_rejects_inconsistent_geometry():
    base = dict(family="t2t", embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, img_size=64, token_dim=8)
    with pytest.raises(ValueError, match="gives a"):
        DVTSpec(**base, grids=(5,), tokenizers=((7, 4, 2),))
    with pytest.raises(ValueError, match="divisible"):
        DVTSpec(**dict(base, num_heads=3), grids=(4,))
    with pytest.raises(ValueError, match="family"):
        DVTSpec(**dict(base, family="resnet"), grids=(4,))
    with pytest.raises(ValueError, match="at least"):
        DVTSpec(**base, grids=(40,))
