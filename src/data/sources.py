"""Where images come from: ImageNet-style class folders, the CIFAR binary release, and the demo digits.

Each source is random access: `load(index)` gives (RGB PIL image, label) and `name(index)` says which image
that is. Folder images are decoded with PIL in the loader's workers, so a corrupt file raises a DataError
naming its path. Every mode becomes 8-bit RGB through `src.deploy.runner.to_rgb` (the exported model's
runner decodes the same way): alpha is dropped as torchvision's loader drops it, 16-bit greyscale keeps its
top byte, float greyscale is read as 0..1, CMYK converts with PIL.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..deploy.runner import to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEMO_IMAGE_SIDE = 32
DEMO_VAL_FRACTION = 0.2
DEMO_SPLIT_SEED = 0
DEMO_DRAWS = 3  # each digit is drawn this many times, each at its own size and place
DEMO_SIZES = ((9, 13), (20, 32))  # small (about the digits' own 8 px) or large, in pixels, half and half
DEMO_MAX_SHIFT = 2  # pixels the digit's box may move from the canvas centre
DEMO_DRAW_SEEDS = {"train": 1, "val": 2}


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty, or holding an unreadable image."""


def find_classes(split_dir: str) -> list[str]:
    """Sorted class folder names; each must hold at least one image."""
    if not os.path.isdir(split_dir):
        raise DataError(f"dataset folder not found: {split_dir}")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>)")
    return classes


def list_images(split_dir: str, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image under split_dir/<class>/, in a fixed order, and the class names.

    `classes` pins the label order (the training split's, for validation); a class folder without any
    image is an error naming it, since it would silently shift what the head's outputs mean.
    """
    found = find_classes(split_dir)
    classes = classes if classes is not None else found
    missing = sorted(set(classes) - set(found))
    if missing:
        raise DataError(f"{split_dir} lacks class folder(s) {', '.join(missing[:5])} of the training split")
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(f"{split_dir} has class folder(s) {', '.join(extra[:5])} that the training split lacks")
    items = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        files = sorted(
            entry.path for entry in os.scandir(class_dir)
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items.extend((path, label) for path in files)
    return items, classes


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully and convert it to 8-bit RGB (`to_rgb`); raises DataError naming the file when it
    cannot."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)  # no copy of what is RGB already
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


class ImageFolderSource:
    """(path, label) items of a class-folder dataset, decoded on demand."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        return self.items[index][0]

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.items[index]
        return load_rgb(path), label


class ArraySource:
    """In-memory HWC uint8 RGB images (the demo digits, CIFAR)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, description: str):
        self.images = images
        self.labels = labels.astype(np.int32)
        self.description = description

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"{self.description} image {index}"

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


def demo_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), split 80/20, drawn on 32x32 black canvases.

    The split is a fixed permutation, so train and val never share a digit on any machine. Each digit is drawn
    DEMO_DRAWS times, each time resized (bilinear) to a square of a random side: small (9-13 px, near the digits'
    own resolution) or large (20-32 px) with equal odds, near the centre. Coarse tokens read the large digits
    but miss the small ones, which is the case for DVT's finer exits (README, "The demo").
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the demo dataset needs scikit-learn: pip install -r requirements-demo.txt") from err
    digits = load_digits()
    order = np.random.default_rng(DEMO_SPLIT_SEED).permutation(len(digits.target))
    num_val = int(round(len(order) * DEMO_VAL_FRACTION))
    chosen = order[num_val:] if split == "train" else order[:num_val]
    grey = np.round(digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(DEMO_DRAW_SEEDS[split])
    canvases = np.zeros((DEMO_DRAWS, len(chosen), DEMO_IMAGE_SIDE, DEMO_IMAGE_SIDE), np.uint8)
    for draw in canvases:
        for canvas, digit in zip(draw, grey, strict=True):
            low, high = DEMO_SIZES[rng.integers(len(DEMO_SIZES))]
            side = int(rng.integers(low, high + 1))
            free = DEMO_IMAGE_SIDE - side
            top, left = np.clip(free // 2 + rng.integers(-DEMO_MAX_SHIFT, DEMO_MAX_SHIFT + 1, size=2), 0, free)
            canvas[top:top + side, left:left + side] = Image.fromarray(digit).resize((side, side), Image.BILINEAR)
    images = canvases.reshape(-1, DEMO_IMAGE_SIDE, DEMO_IMAGE_SIDE)
    labels = np.tile(digits.target[chosen].astype(np.int32), DEMO_DRAWS)
    return np.repeat(images[..., None], 3, axis=-1), labels


CIFAR_FILES = {
    "cifar10": {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "val": ["test_batch.bin"]},
    "cifar100": {"train": ["train.bin"], "val": ["test.bin"]},
}
CIFAR_LABEL_BYTES = {"cifar10": 1, "cifar100": 2}  # CIFAR-100 records hold (coarse, fine) labels
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}
CIFAR_PIXELS = 3 * 32 * 32


def read_cifar(root: str, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The CIFAR binary release: records of label byte(s), then 1024 R, 1024 G, 1024 B bytes.

    Returns HWC uint8 images and int32 labels (CIFAR-100: the fine label). Present batch files are read
    (CIFAR-10 training may be a subset of its five); none present, or a truncated file, is an error.
    """
    if not os.path.isdir(root):
        raise DataError(f"{name} folder not found: {root}")
    names = CIFAR_FILES[name][split]
    paths = [os.path.join(root, file) for file in names if os.path.isfile(os.path.join(root, file))]
    if not paths:
        raise DataError(f"{root} holds none of the {name} {split} files ({', '.join(names)}); "
                        f"point data_path at the extracted {name} binary release")
    label_bytes = CIFAR_LABEL_BYTES[name]
    record = label_bytes + CIFAR_PIXELS
    images, labels = [], []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise DataError(f"{path} is not a {name} binary file: {raw.size} bytes is not a multiple of "
                            f"the {record}-byte record (truncated?)")
        rows = raw.reshape(-1, record)
        labels.append(rows[:, label_bytes - 1].astype(np.int32))
        images.append(rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate(labels)
    if labels.max() >= CIFAR_CLASSES[name]:
        raise DataError(f"{root}: label {labels.max()} is out of range for {name}")
    return np.ascontiguousarray(np.concatenate(images)), labels


CIFAR_NAME_FILES = {"cifar10": "batches.meta.txt", "cifar100": "fine_label_names.txt"}  # in the binary release


def class_names(dataset: str, data_path: str | None) -> list[str] | None:
    """The names of the labels, as the training data gives them (for the export's manifest): the class folders
    of `data_path/train`, the CIFAR release's label-name file, the digits 0-9 of the demo; None when the data
    is not at hand or names none."""
    if dataset == "demo":
        return [str(digit) for digit in range(10)]
    if not data_path:
        return None
    if dataset in CIFAR_NAME_FILES:
        path = os.path.join(data_path, CIFAR_NAME_FILES[dataset])
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            names = [line.strip() for line in handle if line.strip()]
        return names if len(names) == CIFAR_CLASSES[dataset] else None
    train = os.path.join(data_path, "train")
    return find_classes(train) if os.path.isdir(train) else None
