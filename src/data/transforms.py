"""Per-image transforms of the recipe, with timm's semantics, every random draw from the generator passed in.

Training (timm's `transforms_imagenet_train`): random-resized crop (PIL, bilinear or bicubic, or one of the
two at random), horizontal flip, RandAugment, normalise to CHW float32, random erasing (per-pixel normal
noise). Evaluation (timm's eval transform): PIL resize of the short side to img_size / crop_pct, centre crop,
normalise. Images arrive as RGB PIL images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from . import affine, resample
from .pixels import rgb_pixels
from .randaugment import RandAugment, rand_augment_from_string

PIL_INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
RANDOM_INTERPOLATION = (Image.BILINEAR, Image.BICUBIC)  # timm's 'random'
CROP_ATTEMPTS = 10
ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_LOG_RATIO = (math.log(0.3), math.log(1.0 / 0.3))
ERASE_ATTEMPTS = 10


class Normalise:
    """HWC uint8 RGB -> CHW float32 (x - mean) / std, with mean and std given on the 0..1 scale."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = (255.0 * np.asarray(mean, np.float32)).reshape(3, 1, 1)
        self.inverse_std = (1.0 / (255.0 * np.asarray(std, np.float32))).reshape(3, 1, 1)

    def __call__(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise into `out` (a CHW float32 slot of the batch, sparing a copy) or a new array."""
        if out is None:
            out = np.empty((3, *image.shape[:2]), np.float32)
        np.subtract(image.transpose(2, 0, 1), self.mean, out=out, dtype=np.float32)
        out *= self.inverse_std
        return out


def crop_box(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """timm's RandomResizedCrop parameters (top, left, height, width): ten tries at a random area and log-uniform
    aspect, then the whole image clamped to the aspect range, centred."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def erase(image: np.ndarray, rng: np.random.Generator) -> None:
    """timm's RandomErasing (mode 'pixel', one box), in place on a normalised CHW image; the caller draws the
    probability. The box keeps the image's size limits: tried ten times, else nothing is erased."""
    channels, height, width = image.shape
    for _ in range(ERASE_ATTEMPTS):
        target_area = rng.uniform(*ERASE_AREA) * height * width
        aspect = math.exp(rng.uniform(*ERASE_LOG_RATIO))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            image[:, top:top + h, left:left + w] = rng.standard_normal((channels, h, w), dtype=np.float32)
            return


class TrainTransform:
    """One training image: PIL RGB in, normalised CHW float32 out."""

    def __init__(self, config: dict, img_size: int):
        self.size = img_size
        self.scale = tuple(config["scale"])
        self.ratio = tuple(config["ratio"])
        name = config["interpolation"]
        self.interpolations = RANDOM_INTERPOLATION if name == "random" else (PIL_INTERPOLATIONS[name],)
        self.hflip = config["hflip"]
        policy = config["auto_augment"]
        self.augment: RandAugment | None = rand_augment_from_string(policy) if policy else None
        self.normalise = Normalise(config["mean"], config["std"])
        self.erase_prob = config["re_prob"]
        resample.available()  # built (or found wanting) here, before the loader's workers start
        if self.augment is not None:
            affine.available()

    def __call__(self, image: Image.Image, rng: np.random.Generator, out: np.ndarray | None = None) -> np.ndarray:
        """The transformed image, written into `out` (CHW float32) when given."""
        top, left, h, w = crop_box(image.width, image.height, self.scale, self.ratio, rng)
        interpolation = self.interpolations[int(rng.integers(len(self.interpolations)))]
        side = (self.size, self.size)
        image = Image.fromarray(resample.resize_window(image, (left, top, w, h), side, (0, 0, *side), interpolation))
        if self.hflip > 0 and rng.random() < self.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            image = self.augment.augment(image, rng)
        out = self.normalise(rgb_pixels(image).view(), out)  # read in Pillow's storage, not copied out of it
        if self.erase_prob > 0 and rng.random() < self.erase_prob:
            erase(out, rng)
        return out


class ResizeCenterCrop:
    """PIL resize of the short side to `resize`, then a centre crop of `size` (torchvision's eval), as an (h, w, 3)
    uint8 array; only the crop is resampled (`resample.py`, the same values)."""

    def __init__(self, size: int, resize: int, interpolation: int):
        self.size = size
        self.resize = resize
        self.interpolation = interpolation
        resample.available()  # built (or found wanting) here, before the loader's workers start

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        new_size = (width, height)
        if min(width, height) != self.resize:
            if width <= height:
                new_size = (self.resize, int(self.resize * height / width))
            else:
                new_size = (int(self.resize * width / height), self.resize)
        left = int(round((new_size[0] - self.size) / 2.0))
        top = int(round((new_size[1] - self.size) / 2.0))
        return resample.resize_window(image, (0, 0, width, height), new_size, (left, top, self.size, self.size),
                                      self.interpolation)


def eval_resize(config: dict, img_size: int) -> int:
    return int(math.floor(img_size / config["crop_pct"]))


class EvalTransform:
    """One evaluation image: PIL RGB in, normalised CHW float32 out (deterministic)."""

    def __init__(self, config: dict, img_size: int):
        interpolation = PIL_INTERPOLATIONS.get(config["interpolation"], Image.BICUBIC)  # 'random': bicubic
        self.resize_crop = ResizeCenterCrop(img_size, eval_resize(config, img_size), interpolation)
        self.normalise = Normalise(config["mean"], config["std"])

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """The transformed image, written into `out` (CHW float32) when given."""
        return self.normalise(self.resize_crop(image), out)
