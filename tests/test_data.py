"""Data pipelines on small generated datasets: folders, CIFAR binary, the demo digits, corrupt images."""

import os

import numpy as np
import pytest
from PIL import Image

from src.config import OPTIONS
from src.data.pipeline import create_eval_loader, create_train_loader
from src.data.sources import DataError, demo_digits, list_images, load_rgb
from src.data.transforms import ResizeCenterCrop
from tests.helpers import make_folder, truncate, write_cifar10

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def base_config(**overrides) -> dict:
    config = {key: option.default for key, option in OPTIONS.items()}
    config.update(num_parallel_workers=1, auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0, cooldown_epochs=0)
    config.update(overrides)
    return config


def test_folder_listing_and_labels(tmp_path):
    root = make_folder(tmp_path)
    items, classes = list_images(os.path.join(root, "train"))
    assert classes == ["cat", "dog", "owl"]
    assert [label for _, label in items] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(os.path.isfile(path) for path, _ in items)


def test_folder_errors_name_the_place(tmp_path):
    root = make_folder(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        list_images(os.path.join(root, "nowhere"))
    os.makedirs(os.path.join(root, "train", "empty"))
    with pytest.raises(DataError, match="class folder .*empty holds no images"):
        list_images(os.path.join(root, "train"))
    with pytest.raises(DataError, match="lacks class folder"):
        list_images(os.path.join(root, "val"), ["cat", "dog", "empty", "owl"])


def test_modes_become_rgb(tmp_path):
    root = make_folder(tmp_path)
    for path, _ in list_images(os.path.join(root, "train"))[0]:
        image = load_rgb(path)
        assert image.mode == "RGB"


def grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def mode_cases(rng) -> dict:
    """Image mode -> (file name, writer, the 8-bit RGB an independent NumPy conversion gives)."""
    h, w = 6, 7
    u16 = rng.integers(0, 65536, (h, w)).astype(np.uint16)
    u16[0, :3] = (0, 65535, 255 * 257)  # black, white, and an 8-bit value scaled to 16 bits
    i32 = rng.integers(-70000, 140000, (h, w)).astype(np.int32)
    f32 = rng.uniform(-0.2, 1.2, (h, w)).astype(np.float32)
    la = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (h, w), dtype=np.uint8)
    alpha = rng.integers(0, 256, 256, dtype=np.uint8)
    cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)

    def paletted(transparency):
        def save(path):
            image = Image.fromarray(index, "P")
            image.putpalette(palette.tobytes())
            image.save(path, transparency=transparency)
        return save

    cmy, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return {
        # 16-bit greyscale keeps its top byte: x >> 8 (65535 -> 255, v * 257 -> v)
        "I;16": ("a.png", lambda p: Image.fromarray(u16).save(p), grey_rgb(u16 >> 8)),
        "I;16B": ("a.tif", lambda p: Image.frombytes("I;16B", (w, h), u16.astype(">u2").tobytes()).save(p),
                  grey_rgb(u16 >> 8)),
        # 16-bit PGM decodes as I; 32-bit integers are read as 16-bit data, clipped to 0..65535
        "I (16-bit PGM)": ("a.pgm", lambda p: Image.fromarray(u16).save(p), grey_rgb(u16 >> 8)),
        "I": ("a.tif", lambda p: Image.fromarray(i32).save(p), grey_rgb(np.clip(i32, 0, 65535) >> 8)),
        "F": ("a.tif", lambda p: Image.fromarray(f32).save(p), grey_rgb(np.round(np.clip(f32, 0, 1) * 255))),
        "LA": ("a.png", lambda p: Image.fromarray(la, "LA").save(p), grey_rgb(la[..., 0])),  # alpha dropped
        "RGBA": ("a.png", lambda p: Image.fromarray(rgba, "RGBA").save(p), rgba[..., :3]),
        "P": ("a.png", paletted(None), palette[index]),
        "P + transparent index": ("a.png", paletted(int(index[0, 0])), palette[index]),
        "P + alpha per entry": ("a.png", paletted(alpha.tobytes()), palette[index]),
        # CMYK: (255 - C)(255 - K) / 255 per channel, PIL's rounding within 1
        "CMYK": ("a.tif", lambda p: Image.fromarray(cmyk, "CMYK").save(p),
                 np.round((255 - cmy) * (255 - k) / 255)),
    }


@pytest.mark.parametrize("mode", list(mode_cases(np.random.default_rng(0))))
def test_every_mode_becomes_the_right_8_bit_rgb(tmp_path, mode):
    name, save, expected = mode_cases(np.random.default_rng(0))[mode]
    path = str(tmp_path / name)
    save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode.split(" ")[0]  # the file really decodes in that mode
        if mode.startswith("P +"):
            assert "transparency" in opened.info
    image = load_rgb(path)
    assert image.mode == "RGB"
    got = np.asarray(image).astype(np.int64)
    tolerance = 1 if mode == "CMYK" else 0
    assert np.abs(got - expected.astype(np.int64)).max() <= tolerance
    if mode in ("I;16", "I (16-bit PGM)"):
        assert (got == 255).mean() < 0.05  # PIL's own convert("RGB") makes ~99% of such pixels 255


def test_float_image_with_nan_is_refused(tmp_path):
    pixels = np.full((4, 4), 0.5, np.float32)
    pixels[1, 2] = np.nan
    path = str(tmp_path / "nan.tif")
    Image.fromarray(pixels).save(path)
    with pytest.raises(DataError, match=r"cannot read image .*nan.tif: 1 pixel\(s\) of the float image are NaN"):
        load_rgb(path)


def test_the_runner_decodes_images_as_training_does(tmp_path):
    from src.deploy.runner import preprocess

    u16 = np.random.default_rng(1).integers(0, 65536, (40, 44)).astype(np.uint16)
    deep, flat = str(tmp_path / "deep.png"), str(tmp_path / "flat.png")
    Image.fromarray(u16).save(deep)
    Image.fromarray(grey_rgb(u16 >> 8)).save(flat)
    config = {"img_size": 32, "resize": 36, "interpolation": "bicubic", "mean": MEAN.tolist(), "std": STD.tolist(),
              "layout": "NCHW", "pixel_scale": 1 / 255}
    np.testing.assert_array_equal(preprocess([deep], config), preprocess([flat], config))


def test_eval_resize_crop_matches_hand_computation():
    image = Image.fromarray(np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3) % 251)
    out = ResizeCenterCrop(32, 36, Image.BICUBIC)(image)
    resized = image.resize((48, 36), Image.BICUBIC)  # short side 60 -> 36, long 80 -> int(36 * 80 / 60)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(resized)[2:34, 8:40])


def test_eval_loader_normalises_and_shards(tmp_path):
    root = make_folder(tmp_path, per_class=3, modes=("RGB",), noise=False)
    config = base_config(dataset="folder", data_path=root, eval_batch_size=4)
    whole = create_eval_loader(config, 16)
    assert whole.num_samples == 9
    batches = list(whole.dataset().create_tuple_iterator(output_numpy=True))
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.shape == (9, 3, 16, 16) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    # channel `label` was 255 everywhere: normalised, it is (1 - mean) / std
    for image, label in zip(images, labels, strict=True):
        np.testing.assert_allclose(image[label], (1.0 - MEAN[label]) / STD[label], rtol=1e-5)
    shards = [create_eval_loader(config, 16, rank, 2) for rank in (0, 1)]
    assert [s.num_samples for s in shards] == [5, 4]
    shard_labels = [np.concatenate([b[1] for b in s.dataset().create_tuple_iterator(output_numpy=True)])
                    for s in shards]
    np.testing.assert_array_equal(shard_labels[0], labels[0::2])
    np.testing.assert_array_equal(shard_labels[1], labels[1::2])


def test_train_loader_gives_soft_targets(tmp_path):
    root = make_folder(tmp_path)
    config = base_config(dataset="folder", data_path=root, batch_size=4, num_classes=3, epochs=1,
                         auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0)
    loader = create_train_loader(config, 24)
    batches = [(i.asnumpy(), t.asnumpy()) for i, t in loader.batches()]
    assert len(batches) == loader.batches_per_epoch == 3
    for images, targets in batches:
        assert images.shape == (4, 3, 24, 24) and images.dtype == np.float32
        assert targets.shape == (4, 3) and targets.dtype == np.float32
        np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
        assert targets.min() >= 0.1 / 3 - 1e-6  # smoothing floor


RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup=0.8, cutmix=1.0, interpolation="random",
              num_classes=3, epochs=2)


def stream(config: dict, rank: int = 0, group_size: int = 1, start: int = 0) -> list[tuple[np.ndarray, ...]]:
    loader = create_train_loader(config, 16, rank, group_size)
    return [(i.asnumpy(), t.asnumpy()) for i, t in loader.batches(start)]


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(targets_a, targets_b)


@pytest.fixture(scope="module")
def recipe_folder(tmp_path_factory) -> str:
    return make_folder(tmp_path_factory.mktemp("recipe"), per_class=8, size=(40, 30))


def test_batches_are_identical_whatever_the_workers(recipe_folder):
    """The full recipe (RandAugment, erasing, Mixup/CutMix) gives the same batches bit for bit in threads or
    processes, with one worker or two, and a different seed gives other ones."""
    config = base_config(dataset="folder", data_path=recipe_folder, batch_size=4, **RECIPE)
    reference = stream(config)
    assert len(reference) == 2 * 6
    for processes in (False, True):
        for num_workers in (1, 2):
            assert_same(stream(dict(config, python_multiprocessing=processes, num_parallel_workers=num_workers)),
                        reference)
    other = stream(dict(config, seed=config["seed"] + 1))
    assert not np.array_equal(other[0][0], reference[0][0])
    # epochs differ (a new order and new draws), and the images really are augmented
    assert not np.array_equal(reference[0][0], reference[6][0])


def test_a_stream_resumed_mid_run_reads_the_same_batches(recipe_folder):
    config = base_config(dataset="folder", data_path=recipe_folder, batch_size=4, **RECIPE)
    whole = stream(config)
    assert_same(stream(config, start=5), whole[5:])


def test_ranks_share_the_global_batch_of_one_process(recipe_folder):
    """Two ranks of batch 4 see exactly the images of one process of batch 8, augmented alike."""
    config = base_config(dataset="folder", data_path=recipe_folder, **dict(RECIPE, mixup=0.0, cutmix=0.0))
    single = stream(dict(config, batch_size=8))
    ranks = [stream(dict(config, batch_size=4), rank, 2) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2 * 3
    for k, (images, targets) in enumerate(single):
        np.testing.assert_array_equal(images, np.concatenate([ranks[0][k][0], ranks[1][k][0]]))
        np.testing.assert_array_equal(targets, np.concatenate([ranks[0][k][1], ranks[1][k][1]]))


def test_accumulation_and_step_cap_shape_the_epoch(recipe_folder):
    config = base_config(dataset="folder", data_path=recipe_folder, batch_size=2, num_classes=3, epochs=1)
    assert create_train_loader(config, 16).batches_per_epoch == 12  # 24 images
    assert create_train_loader(dict(config, accum_steps=5), 16).batches_per_epoch == 10  # two whole updates
    assert create_train_loader(dict(config, accum_steps=5, max_steps_per_epoch=1), 16).batches_per_epoch == 5
    with pytest.raises(ValueError, match="fewer than one update of 13 x 2 images"):
        create_train_loader(dict(config, accum_steps=13), 16)


def corrupt_folder_config(tmp_path, **overrides) -> dict:
    """A folder dataset of 12 training images whose train/dog/1.jpg is truncated, read 2 at a time by 2 workers."""
    root = make_folder(tmp_path)
    truncate(os.path.join(root, "train", "dog", "1.jpg"))
    return base_config(dataset="folder", data_path=root, batch_size=2, shuffle=False, num_classes=3, epochs=1,
                       num_parallel_workers=2, **overrides)


@pytest.mark.parametrize("processes", [False, True])
def test_corrupt_image_stops_with_its_path(tmp_path, processes):
    config = corrupt_folder_config(tmp_path, python_multiprocessing=processes)
    with pytest.raises(DataError, match="cannot read image .*dog/1.jpg"):
        list(create_train_loader(config, 16).batches())
    with pytest.raises(DataError, match="cannot read image .*dog/1.jpg"):
        list(create_eval_loader(dict(config, val_split="train"), 16).batches())


@pytest.mark.parametrize("processes", [False, True])
def test_corrupt_image_skipped_and_counted(tmp_path, processes):
    config = corrupt_folder_config(tmp_path, skip_corrupt=True, label_smoothing=0.0, python_multiprocessing=processes)
    train = create_train_loader(config, 16)
    targets = np.concatenate([t.asnumpy() for _, t in train.batches()])
    assert len(targets) == 12  # the unreadable image is replaced by a drawn one: batches keep their shape
    labels = targets.argmax(1)
    np.testing.assert_array_equal(np.delete(labels, 5), [0] * 4 + [1] * 3 + [2] * 4)
    bad = os.path.join(config["data_path"], "train", "dog", "1.jpg")
    assert train.skipped == {bad}
    val = create_eval_loader(dict(config, val_split="train"), 16)
    labels = np.concatenate([t.asnumpy() for _, t in val.batches()])
    np.testing.assert_array_equal(labels, [0] * 4 + [1] * 3 + [2] * 4)  # left out of evaluation
    assert val.skipped == {bad}


def content_boxes(images: np.ndarray) -> tuple[np.ndarray, ...]:
    """First and last non-black row and column of each HWC image."""
    def extent(mask):
        return mask.argmax(1), mask.shape[1] - 1 - mask[:, ::-1].argmax(1)
    ink = images.max(axis=-1) > 0
    return (*extent(ink.any(2)), *extent(ink.any(1)))


def test_demo_digits_split():
    train_images, train_labels = demo_digits("train")
    val_images, val_labels = demo_digits("val")
    assert len(train_labels) == 3 * 1438 and len(val_labels) == 3 * 359  # 1,797 digits, 80/20, drawn 3 times
    assert train_images.shape[1:] == (32, 32, 3) and train_images.dtype == np.uint8
    assert set(np.unique(val_labels)) == set(range(10))
    # the three draws of a digit carry its label
    np.testing.assert_array_equal(val_labels.reshape(3, 359), np.tile(val_labels[:359], (3, 1)))
    # disjoint: no validation image appears in training
    train_set = {img.tobytes() for img in train_images}
    overlap = sum(img.tobytes() in train_set for img in val_images)
    assert overlap <= 2  # the digits set itself holds a few exact duplicates
    again, _ = demo_digits("val")
    np.testing.assert_array_equal(again, val_images)


def test_demo_digits_are_small_or_large_near_the_centre():
    images, _ = demo_digits("train")
    top, bottom, left, right = content_boxes(images)
    side = np.maximum(bottom - top, right - left) + 1  # the drawn square: every digit touches two of its edges
    small = side <= 13
    assert np.all(side[small] >= 9) and np.all((side[~small] >= 20) & (side[~small] <= 32))
    assert 0.45 < small.mean() < 0.55
    # the square starts within 2 px of centred (and inside the canvas), so its ink stays within that reach
    first = np.maximum((32 - side) // 2 - 2, 0)
    last = np.minimum((32 - side) // 2 + 2 + side - 1, 31)
    for start, end in ((top, bottom), (left, right)):
        assert np.all(start >= first) and np.all(end <= last)
    assert top[small].min() >= 7 and bottom[small].max() <= 23  # a small digit never nears an edge


def test_cifar10_binary(tmp_path):
    root = str(tmp_path / "cifar-10-batches-bin")
    test_labels = write_cifar10(root)
    config = base_config(dataset="cifar10", data_path=root, batch_size=2, eval_batch_size=4, num_classes=10)
    train = create_train_loader(config, 16)
    assert train.num_classes == 10
    images, targets = (t.asnumpy() for t in next(train.batches()))
    assert images.shape == (2, 3, 16, 16) and targets.shape == (2, 10)
    val = create_eval_loader(config, 16)
    labels = np.concatenate([b[1] for b in val.dataset().create_tuple_iterator(output_numpy=True)])
    np.testing.assert_array_equal(labels, test_labels)
    with pytest.raises(DataError, match="holds none of the cifar10 train files"):
        create_train_loader(dict(config, data_path=str(tmp_path)), 16)


@pytest.mark.parametrize("interpolation,crop_pct", [("bicubic", 0.875), ("bilinear", 1.0), ("random", 0.9)])
def test_the_runner_prepares_images_as_the_eval_loader_does(tmp_path, interpolation, crop_pct):
    """The runner's preprocessing is a deliberate copy (runner.py stays one self-contained file) of the eval
    loader's: on the same files, in several modes, formats and odd sizes, through the manifest fields export
    writes, both give the same arrays. Equal to 1e-6, not bit-equal: the loader computes
    (x - 255 mean) / (255 std), the runner (x / 255 - mean) / std, and float32 rounds the two up to 3 ulp apart
    (7e-7 at |x| < 4, where an ulp is 2.4e-7)."""
    from src.data.transforms import EvalTransform
    from src.deploy.export import preprocess_fields
    from src.deploy.runner import preprocess

    rng = np.random.default_rng(3)
    paths = []
    for i, (mode, size, ext) in enumerate([("RGB", (37, 53), "jpg"), ("L", (61, 29), "jpg"), ("RGBA", (33, 33), "png"),
                                           ("P", (45, 71), "png"), ("L", (32, 40), "png"), ("RGB", (90, 31), "png")]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = str(tmp_path / f"{i}_{mode}.{ext}")
        image = Image.fromarray(pixels).convert(mode)
        if mode == "RGBA":
            image.putalpha(Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)))
        image.save(path)
        paths.append(path)
    config = base_config(interpolation=interpolation, crop_pct=crop_pct)
    loader = EvalTransform(config, 28)
    expected = np.stack([loader(load_rgb(path)) for path in paths])
    got = preprocess(paths, preprocess_fields(config, 28))
    assert got.shape == expected.shape == (len(paths), 3, 28, 28) and got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
