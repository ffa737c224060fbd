"""mindspore.dataset pipelines for training and validation, sharded by rank.

Training: random-resized crop, flip, RandAugment, normalise, random erasing, then batch-level
Mixup/CutMix with label smoothing, so every batch carries soft targets (B, num_classes).
Validation: short side to img_size / crop_pct (PIL bicubic, as the reference), centre crop, normalise;
each rank takes every group_size-th image with no padding, so summed counts are exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import mindspore.dataset as ds
import numpy as np
from mindspore.dataset import transforms, vision
from PIL import Image

from .mixup import MixupCutmix
from .randaugment import rand_augment_from_string
from .sources import (
    CIFAR_CLASSES,
    SKIPPED_LABEL,
    ArraySource,
    ImageFolderSource,
    demo_digits,
    find_classes,
    list_images,
    read_cifar,
)

INTERPOLATIONS = {"bicubic": vision.Inter.BICUBIC, "bilinear": vision.Inter.BILINEAR}
PIL_INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "random": Image.BICUBIC}


@dataclass
class Loader:
    """A batched dataset and what the training loop needs to know about it."""

    dataset: ds.Dataset
    num_samples: int  # images this rank reads per epoch (before skipping corrupt ones)
    num_classes: int
    source: Any  # the random-access source, for the count of skipped images

    @property
    def skipped(self) -> set[str]:
        return getattr(self.source, "skipped", set())


class ResizeCenterCrop:
    """PIL resize of the short side to `resize`, then a centre crop of `size` (torchvision's eval)."""

    def __init__(self, size: int, resize: int, interpolation: int):
        self.size = size
        self.resize = resize
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if min(width, height) != self.resize:
            if width <= height:
                new_size = (self.resize, int(self.resize * height / width))
            else:
                new_size = (int(self.resize * width / height), self.resize)
            image = image.resize(new_size, self.interpolation)
            width, height = image.size
        left = int(round((width - self.size) / 2.0))
        top = int(round((height - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))


def eval_resize(config: dict, img_size: int) -> int:
    return int(math.floor(img_size / config["crop_pct"]))


def _normalise(config: dict) -> list:
    mean = [255.0 * m for m in config["mean"]]
    std = [255.0 * s for s in config["std"]]
    return [vision.Normalize(mean=mean, std=std), vision.HWC2CHW()]


def _random_resized_crop(config: dict, img_size: int):
    def crop(name: str):
        return vision.RandomResizedCrop(img_size, scale=tuple(config["scale"]), ratio=tuple(config["ratio"]),
                                        interpolation=INTERPOLATIONS[name])
    if config["interpolation"] == "random":
        return transforms.RandomChoice([crop("bilinear"), crop("bicubic")])
    return crop(config["interpolation"])


def train_image_ops(config: dict, img_size: int) -> list:
    ops = [_random_resized_crop(config, img_size)]
    if config["hflip"] > 0:
        ops.append(vision.RandomHorizontalFlip(config["hflip"]))
    if config["auto_augment"]:
        ops.append(rand_augment_from_string(config["auto_augment"]))
    ops.extend(_normalise(config))
    if config["re_prob"] > 0:
        ops.append(vision.RandomErasing(prob=config["re_prob"], value="random"))
    return ops


def _mixer(config: dict, num_classes: int) -> MixupCutmix:
    """Batch Mixup/CutMix with smoothing; with both alphas 0 it only smooths the labels."""
    return MixupCutmix(num_classes, mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"],
                       prob=config["mixup_prob"], switch_prob=config["mixup_switch_prob"],
                       label_smoothing=config["label_smoothing"])


def _source(config: dict, split: str, pil_transform=None, class_names: list[str] | None = None):
    """The random-access source of a split and its number of classes."""
    name = config["dataset"]
    if name == "demo":
        images, labels = demo_digits(split)
        return ArraySource(images, labels, pil_transform), 10
    root = config["data_path"]
    if not root:
        raise ValueError(f"dataset {name!r} needs data_path")
    if name == "folder":
        sub = config["train_split"] if split == "train" else config["val_split"]
        items, classes = list_images(os.path.join(root, sub), class_names)
        return ImageFolderSource(items, config["skip_corrupt"], pil_transform), len(classes)
    images, labels = read_cifar(root, name, split)
    return ArraySource(images, labels, pil_transform), CIFAR_CLASSES[name]


def _is_readable(label: np.ndarray) -> bool:
    return int(label) != SKIPPED_LABEL


def workers(config: dict) -> int:
    """Loader threads: as configured, but no more than this machine's cores (MindSpore refuses more)."""
    return max(1, min(config["num_parallel_workers"], os.cpu_count() or 1))


def _generator(config: dict, source, **sampling) -> ds.Dataset:
    data = ds.GeneratorDataset(source, ["image", "label"], num_parallel_workers=workers(config),
                               python_multiprocessing=False, **sampling)
    if config["skip_corrupt"]:
        data = data.filter(_is_readable, input_columns=["label"])
    return data


def create_train_loader(config: dict, img_size: int, rank: int = 0, group_size: int = 1) -> Loader:
    """Shuffled, augmented, sharded training batches of (images, soft targets)."""
    source, num_classes = _source(config, "train")
    num_samples = math.ceil(len(source) / group_size)
    if num_samples < config["batch_size"]:
        raise ValueError(f"the training split has {num_samples} images per device, fewer than one batch "
                         f"of {config['batch_size']}")
    shard = dict(num_shards=group_size, shard_id=rank) if group_size > 1 else {}
    data = _generator(config, source, shuffle=config["shuffle"], **shard)
    data = data.map(train_image_ops(config, img_size), input_columns="image",
                    num_parallel_workers=workers(config))
    mixer = _mixer(config, num_classes)
    data = data.batch(config["batch_size"], drop_remainder=True, per_batch_map=mixer.per_batch_map,
                      input_columns=["image", "label"], output_columns=["image", "target"])
    return Loader(data, num_samples, num_classes, source)


def create_eval_loader(config: dict, img_size: int, rank: int = 0, group_size: int = 1, split: str = "val",
                       subset: int | None = None, subset_seed: int = 0) -> Loader:
    """Deterministic eval-transformed batches of (images, int labels); this rank's share, unpadded.

    `subset` draws that many images of the split at random (seeded), in index order: the calibration
    set that thresholds are solved on is such a subset of the training split.
    """
    resize = ResizeCenterCrop(img_size, eval_resize(config, img_size), PIL_INTERPOLATIONS[config["interpolation"]])
    class_names = None
    if config["dataset"] == "folder" and config["data_path"]:
        class_names = find_classes(os.path.join(config["data_path"], config["train_split"]))  # names only
    source, num_classes = _source(config, split, resize, class_names)
    chosen = np.arange(len(source))
    if subset is not None and subset < len(source):
        chosen = np.sort(np.random.default_rng(subset_seed).choice(len(source), subset, replace=False))
    indices = chosen[rank::group_size].tolist()
    data = _generator(config, source, sampler=ds.SubsetSampler(indices))
    data = data.map(_normalise(config), input_columns="image", num_parallel_workers=workers(config))
    data = data.batch(config["eval_batch_size"], drop_remainder=False)
    return Loader(data, len(indices), num_classes, source)
