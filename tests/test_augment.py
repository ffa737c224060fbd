"""RandAugment and Mixup/CutMix against hand-worked numbers and NumPy formulas written independently here."""

import pickle
import random

import numpy as np
import pytest

from src.data import randaugment
from src.data.mixup import MixupCutmix, smooth_one_hot
from src.data.randaugment import RandAugment, apply_op, rand_augment_from_string

FILL = (124, 116, 104)
REVERSED = [3, 2, 1, 0]  # partner of sample i in a batch of 4: sample 3 - i


def batch(seed: int = 0, size: int = 4, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(size, 3, side, side)).astype(np.float32)


def smoothed(label: int, num_classes: int, smoothing: float) -> np.ndarray:
    """One smoothed target row, built element by element."""
    off = smoothing / num_classes
    return np.array([1 - smoothing + off if c == label else off for c in range(num_classes)])


def recovered_lam(targets: np.ndarray, labels: np.ndarray, num_classes: int, smoothing: float) -> float:
    """lam from sample 0's own-class target: t = lam * on + (1 - lam) * off (labels[0] != labels[-1])."""
    off = smoothing / num_classes
    return float((targets[0, labels[0]] - off) / (1 - smoothing))


# ---- label smoothing and Mixup / CutMix ----

def test_smooth_one_hot_hand_worked():
    got = smooth_one_hot(np.array([2, 0]), num_classes=4, smoothing=0.2)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]], atol=1e-7)
    np.testing.assert_array_equal(smooth_one_hot(np.array([1]), 3, 0.0), [[0, 1, 0]])
    # The DVT recipe: 1000 classes, smoothing 0.1.
    row = smooth_one_hot(np.array([7]), 1000, 0.1)[0]
    assert row[7] == pytest.approx(0.9001) and row[0] == pytest.approx(1e-4)
    assert row.sum() == pytest.approx(1.0, abs=1e-5)


def test_smooth_one_hot_rejects_bad_labels():
    with pytest.raises(ValueError, match="range"):
        smooth_one_hot(np.array([0, 4]), 4, 0.1)
    with pytest.raises(ValueError, match="integer"):
        smooth_one_hot(np.array([0.0, 1.0]), 4, 0.1)


def test_mixup_equals_formula():
    x, labels = batch(), np.array([1, 4, 4, 0])
    images, targets = MixupCutmix(5, label_smoothing=0.1).mix(x, labels, lam=0.3)
    np.testing.assert_allclose(images, 0.3 * x + 0.7 * x[REVERSED], rtol=1e-6, atol=1e-6)
    want = [0.3 * smoothed(labels[i], 5, 0.1) + 0.7 * smoothed(labels[REVERSED[i]], 5, 0.1) for i in range(4)]
    np.testing.assert_allclose(targets, want, atol=1e-6)
    assert images.dtype == targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("use_cutmix", [False, True])
@pytest.mark.parametrize("lam", [0.3, 0.77, 1.0])
def test_in_place_mixing_gives_the_same_bits(lam, use_cutmix):
    """The loader mixes its own batch in place: bit for bit the whole-batch float32 expressions of NumPy."""
    x, labels = batch(size=6), np.array([0, 1, 2, 3, 0, 1])
    mixer = MixupCutmix(4)
    want, want_targets = mixer.mix(x.copy(), labels, lam, use_cutmix, np.random.default_rng(5))
    buffer = x.copy()
    got, targets = mixer.mix(buffer, labels, lam, use_cutmix, np.random.default_rng(5), in_place=True)
    assert got is buffer
    np.testing.assert_array_equal(targets, want_targets)
    np.testing.assert_array_equal(got, want)
    if not use_cutmix:
        rev = x[::-1]
        np.testing.assert_array_equal(got, np.add(np.multiply(x, np.float32(lam)),
                                                  np.multiply(rev, np.float32(1 - lam))))


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_box_pasted_from_reversed_batch(seed):
    x, labels, height = batch(seed), np.array([0, 1, 2, 3]), 32
    images, targets = MixupCutmix(4, label_smoothing=0.1).mix(x, labels, lam=0.6, use_cutmix=True,
                                                             rng=np.random.default_rng(seed))

    changed = images != x
    mask = changed[0, 0]
    assert (changed == mask).all(), "the same box in every sample and channel"
    ys, xs = np.nonzero(mask)
    assert mask.sum() > 0
    assert mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    assert mask.sum() == (ys.max() + 1 - ys.min()) * (xs.max() + 1 - xs.min()), "a rectangle"
    np.testing.assert_array_equal(images[:, :, mask], x[REVERSED][:, :, mask])
    np.testing.assert_array_equal(images[:, :, ~mask], x[:, :, ~mask])

    # The box: half-side int(32 * sqrt(0.4)) // 2 = 10 around a centre drawn uniformly, clipped to the image.
    rng = np.random.default_rng(seed)
    cy, cx = rng.integers(height), rng.integers(height)
    assert (ys.min(), ys.max() + 1) == (max(cy - 10, 0), min(cy + 10, height))
    assert (xs.min(), xs.max() + 1) == (max(cx - 10, 0), min(cx + 10, height))

    lam = 1 - mask.sum() / height**2
    want = [lam * smoothed(labels[i], 4, 0.1) + (1 - lam) * smoothed(labels[REVERSED[i]], 4, 0.1) for i in range(4)]
    np.testing.assert_allclose(targets, want, atol=1e-6)
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)


def test_call_picks_mixup_or_cutmix_and_targets_follow():
    x, labels = batch(side=16), np.array([0, 1, 2, 3])
    mixer = MixupCutmix(4)
    modes = set()
    for seed in range(30):
        images, targets = mixer(x, labels, np.random.default_rng(seed))
        lam = recovered_lam(targets, labels, 4, 0.1)
        from_self = images == x
        if (from_self | (images == x[REVERSED])).all():  # CutMix: every pixel is its own or its partner's
            modes.add("cutmix")
            assert lam == pytest.approx(from_self[0, 0].mean(), abs=1e-6)
        else:
            modes.add("mixup")
            np.testing.assert_allclose(images, lam * x + (1 - lam) * x[REVERSED], atol=1e-5)
        np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    assert modes == {"mixup", "cutmix"}


def test_prob_and_alphas_select_the_mode():
    x, labels = batch(side=16), np.array([0, 1, 2, 3])
    images, targets = MixupCutmix(4, prob=0.0)(x, labels, np.random.default_rng(0))
    assert images is x, "no mixing returns the input array itself"
    np.testing.assert_array_equal(images, x)
    np.testing.assert_allclose(targets, [smoothed(c, 4, 0.1) for c in labels], atol=1e-7)
    for seed in range(5):
        images, _ = MixupCutmix(4, mixup_alpha=0.0)(x, labels, np.random.default_rng(seed))
        assert ((images == x) | (images == x[REVERSED])).all()
        images, targets = MixupCutmix(4, cutmix_alpha=0.0)(x, labels, np.random.default_rng(seed))
        lam = recovered_lam(targets, labels, 4, 0.1)
        np.testing.assert_allclose(images, lam * x + (1 - lam) * x[REVERSED], atol=1e-5)


def test_mixup_is_seeded_and_leaves_input_alone():
    x, labels = batch(), np.array([0, 1, 2, 3])
    kept = x.copy()
    mixer = MixupCutmix(4)
    clone = pickle.loads(pickle.dumps(mixer))
    runs = [m(x, labels, np.random.default_rng(seed)) for m, seed in ((mixer, 5), (mixer, 5), (clone, 5), (mixer, 6))]
    for run in runs[1:3]:
        np.testing.assert_array_equal(runs[0][0], run[0])
        np.testing.assert_array_equal(runs[0][1], run[1])
    assert not np.array_equal(runs[0][0], runs[3][0])
    assert not np.array_equal(runs[0][1], runs[3][1])
    np.testing.assert_array_equal(x, kept)


def test_odd_batch_is_an_error():
    with pytest.raises(ValueError, match="even batch size"):
        MixupCutmix(4)(batch(size=3), np.array([0, 1, 2]), np.random.default_rng(0))


# ---- RandAugment ----

def image(height: int = 20, width: int = 20) -> np.ndarray:
    """A fixed image holding every byte value."""
    values = np.random.default_rng(1).permutation(np.arange(height * width * 3) % 256)
    return values.reshape(height, width, 3).astype(np.uint8)


def forced(name: str, magnitude: float, num_ops: int = 1) -> RandAugment:
    return RandAugment(num_ops=num_ops, magnitude=magnitude, magnitude_std=0.0, prob=1.0, ops=[name])


def test_default_policy_keeps_shape_and_dtype():
    img = image(24, 40)
    kept = img.copy()
    aug, rng = RandAugment(), np.random.default_rng(0)
    for _ in range(30):
        out = aug(img, rng)
        assert out.shape == (24, 40, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(img, kept)
    assert aug.fill == FILL == tuple(round(255 * m) for m in (0.485, 0.456, 0.406))


@pytest.mark.parametrize("name", ["ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing", "SolarizeIncreasing", "SolarizeAdd", "Rotate", "ShearX",
                                  "ShearY", "TranslateXRel", "TranslateYRel"])
def test_magnitude_zero_is_identity(name):
    img = image()
    for seed in range(4):  # both signs and both resampling filters
        assert np.abs(forced(name, 0.0)(img, np.random.default_rng(seed)).astype(int) - img).max() <= 1


def test_invert_solarize_posterize_match_numpy():
    img = image()
    x = img.astype(int)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(forced("Invert", 5.0)(img, rng), 255 - x)
    # SolarizeIncreasing: threshold 256 - int(256 * m / 10); pixels at or above it are inverted.
    for magnitude, threshold in ((5.0, 128), (2.5, 192), (7.3, 70), (10.0, 0)):
        np.testing.assert_array_equal(apply_op(img, "SolarizeIncreasing", magnitude, rng),
                                      np.where(x >= threshold, 255 - x, x))
    # PosterizeIncreasing: keep 4 - int(4 * m / 10) high bits.
    for magnitude, mask in ((0.0, 0xF0), (5.0, 0xC0), (9.0, 0x80), (10.0, 0x00)):
        np.testing.assert_array_equal(apply_op(img, "PosterizeIncreasing", magnitude, rng), x & mask)
    # SolarizeAdd: add int(110 * m / 10) below 128, saturating.
    for magnitude, add in ((10.0, 110), (5.0, 55), (0.7, 7)):
        np.testing.assert_array_equal(apply_op(img, "SolarizeAdd", magnitude, rng),
                                      np.where(x < 128, np.minimum(x + add, 255), x))


def test_brightness_factor_range():
    img, x = image(), image().astype(float)
    outcomes = set()
    for seed in range(8):
        out = apply_op(img, "BrightnessIncreasing", 10.0, np.random.default_rng(seed)).astype(float)
        if np.abs(out - np.clip(x * 1.9, 0, 255)).max() <= 1:
            outcomes.add(1.9)
        else:
            np.testing.assert_allclose(out, x * 0.1, atol=1)
            outcomes.add(0.1)
    assert outcomes == {0.1, 1.9}


@pytest.mark.parametrize("name,axis", [("TranslateXRel", 1), ("TranslateYRel", 0)])
def test_translate_shifts_by_045_of_the_side_with_mean_fill(name, axis):
    img = image()  # 20 pixels: magnitude 10 shifts by 9
    shifts = set()
    for seed in range(8):
        out = apply_op(img, name, 10.0, np.random.default_rng(seed))
        for shift in (9, -9):
            want = np.broadcast_to(np.array(FILL, np.uint8), img.shape).copy()
            src = [slice(None)] * 2
            dst = [slice(None)] * 2
            src[axis], dst[axis] = (slice(shift, None), slice(None, -shift)) if shift > 0 else \
                (slice(None, shift), slice(-shift, None))
            want[tuple(dst)] = img[tuple(src)]
            if np.array_equal(out, want):
                shifts.add(shift)
    assert shifts == {9, -9}


def test_rotate_at_full_magnitude_fills_the_corners():
    out = apply_op(image(), "Rotate", 10.0, np.random.default_rng(0))
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        np.testing.assert_array_equal(corner, FILL)


def test_ops_are_drawn_with_replacement_and_applied_with_prob():
    img, rng = image(), np.random.default_rng(0)
    for num_ops, want in ((1, 255 - img.astype(int)), (2, img), (3, 255 - img.astype(int))):
        np.testing.assert_array_equal(forced("Invert", 0.0, num_ops)(img, rng), want)
    np.testing.assert_array_equal(RandAugment(prob=0.0)(img, rng), img)


def test_op_choice_magnitude_and_prob_statistics(monkeypatch):
    calls: list[tuple[str, float]] = []
    for name in randaugment.OPS:
        monkeypatch.setitem(randaugment.OPS, name,
                            lambda img, magnitude, fill, rng, name=name: calls.append((name, magnitude)) or img)
    rng = np.random.default_rng(0)
    aug, img, draws = RandAugment(prob=1.0), image(4, 4), 3000
    for _ in range(draws):
        aug(img, rng)
    names = [name for name, _ in calls]
    assert len(names) == 2 * draws
    counts = np.array([names.count(name) for name in randaugment.INCREASING_OPS])
    assert np.abs(counts / (2 * draws) - 1 / 15).max() < 0.015
    repeats = sum(a == b for a, b in zip(names[::2], names[1::2], strict=True))
    assert abs(repeats / draws - 1 / 15) < 0.02, "with replacement: the same op twice in 1 of 15 calls"
    magnitudes = np.array([m for _, m in calls])
    assert abs(magnitudes.mean() - 9.0) < 0.03 and abs(magnitudes.std() - 0.5) < 0.03

    calls.clear()
    for _ in range(draws):
        RandAugment(prob=0.5)(img, rng)
    assert abs(len(calls) / (2 * draws) - 0.5) < 0.03
    calls.clear()
    for _ in range(draws):
        RandAugment(magnitude=9.5, magnitude_std=3.0, prob=1.0)(img, rng)
    magnitudes = np.array([m for _, m in calls])
    assert magnitudes.min() >= 0 and magnitudes.max() == 10.0 and (magnitudes == 10.0).mean() > 0.3


def test_randaugment_is_seeded_and_picklable():
    img = image(32, 32)
    kept = img.copy()
    aug = RandAugment(num_ops=3, prob=1.0)
    clone = pickle.loads(pickle.dumps(aug))
    outs = [a(img, np.random.default_rng(seed)) for a, seed in ((aug, 11), (aug, 11), (clone, 11), (aug, 12))]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], outs[3])
    assert not np.array_equal(outs[0], img)
    np.testing.assert_array_equal(img, kept)


def test_augmentations_leave_the_global_rngs_alone():
    random.seed(3)
    np.random.seed(3)
    py_state, np_state = random.getstate(), np.random.get_state()
    rng = np.random.default_rng(0)
    img, x, labels = image(), batch(side=16), np.array([0, 1, 2, 3])
    for name in randaugment.INCREASING_OPS:
        apply_op(img, name, 9.0, rng)
    for _ in range(20):
        RandAugment(num_ops=3, prob=1.0)(img, rng)
        MixupCutmix(4)(x, labels, rng)
    MixupCutmix(4).mix(x, labels, lam=0.5, use_cutmix=True, rng=rng)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and after[2:] == np_state[2:]
    np.testing.assert_array_equal(after[1], np_state[1])


def test_randaugment_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        RandAugment()(image().astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8 RGB"):
        RandAugment()(image()[..., 0], np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown"):
        RandAugment(ops=["Cutout"])


def test_policy_string_parsing():
    aug = rand_augment_from_string("rand-m9-mstd0.5-inc1")
    assert (aug.num_ops, aug.magnitude, aug.magnitude_std, aug.prob, aug.fill) == (2, 9.0, 0.5, 0.5, FILL)
    assert aug.ops == ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
    aug = rand_augment_from_string("rand-m7-n3-mstd0-inc1")
    assert (aug.num_ops, aug.magnitude, aug.magnitude_std) == (3, 7.0, 0.0)


@pytest.mark.parametrize("policy,match", [
    ("rand-m9-mstd0.5", "inc1"),
    ("rand-m9-mstd0.5-inc0", "inc1"),
    ("augmix-m5-inc1", "'augmix'"),
    ("rand-x9-inc1", "'x9'"),
    ("rand-m-inc1", "'m'"),
    ("rand-n2.5-inc1", "'n2.5'"),
    ("rand-mstd-1-inc1", "'mstd'"),
    ("rand-m9-m8-inc1", "twice"),
    ("rand-m9-inc2", "'inc2'"),
    ("rand-m9--inc1", "''"),
])
def test_policy_string_rejects(policy, match):
    with pytest.raises(ValueError, match=match):
        rand_augment_from_string(policy)
