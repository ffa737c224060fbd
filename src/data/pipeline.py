"""mindspore.dataset pipelines for training and validation: whole batches built in worker processes.

Each item of a pipeline is a whole batch, built by one worker (a process with `python_multiprocessing`, the
default, which builds it in shared memory: src/data/shared_workers.py; else a thread): it decodes its images,
transforms them (src/data/transforms.py) into their places in the batch and, for training, mixes the batch
(Mixup/CutMix with label smoothing, so every batch carries soft targets). What a batch holds and every random
draw in it follow from (seed, epoch, position) alone (src/data/stream.py), so batches are identical whatever
the number or timing of workers, and a run resumed at micro-batch g reads the very batches the uninterrupted
run read there.

Training reads one stream of micro-batches over the whole run, sharded by rank. Validation gives each rank
every group_size-th image with no padding, so summed counts are exact. An unreadable image stops the run
naming its path, or with `skip_corrupt` is left out (validation) or replaced by a drawn one (training, so
batches keep their shape), and counted.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import mindspore.dataset as ds
import numpy as np
from mindspore import Tensor

from .mixup import MixupCutmix
from .shared_workers import SharedMemoryBatches
from .sources import (
    CIFAR_CLASSES,
    ArraySource,
    DataError,
    ImageFolderSource,
    demo_digits,
    find_classes,
    list_images,
    read_cifar,
)
from .stream import BATCH, IMAGE, REPLACEMENT, BatchPlan, keyed_rng
from .transforms import EvalTransform, TrainTransform

NO_IMAGE = -1  # padding of the `skipped` column
REPLACEMENT_ATTEMPTS = 10


def _record_skip(skipped: np.ndarray, index: int) -> None:
    free = np.flatnonzero(skipped == NO_IMAGE)
    if free.size:
        skipped[free[0]] = index


class BatchSource:
    """A random-access source of whole batches: `build` writes batch b into arrays laid out by `slot_layout` (a
    worker's shared-memory slot, src/data/shared_workers.py) and returns the filled part of each."""

    columns: list[str]

    def slot_layout(self) -> list[tuple[tuple[int, ...], type]]:
        raise NotImplementedError

    def build(self, batch: int, out: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def __getitem__(self, batch: int) -> tuple[np.ndarray, ...]:
        return self.build(int(batch), tuple(np.empty(shape, dtype) for shape, dtype in self.slot_layout()))


class TrainBatches(BatchSource):
    """GeneratorDataset source: item g is this rank's micro-batch g of the run, as (images, soft targets,
    indices of the unreadable images it skipped)."""

    columns = ["image", "target", "skipped"]

    def __init__(self, source, plan: BatchPlan, transform: TrainTransform, mixer: MixupCutmix, skip_corrupt: bool):
        self.source = source
        self.plan = plan
        self.transform = transform
        self.mixer = mixer
        self.skip_corrupt = skip_corrupt
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.plan.total_batches

    def order(self, epoch: int) -> np.ndarray:
        cached = self._order
        if cached is None or cached[0] != epoch:
            cached = (epoch, self.plan.order(epoch))
            self._order = cached
        return cached[1]

    def _load(self, item: int, epoch: int, position: int, skipped: np.ndarray):
        """The image at `item`; with skip_corrupt, an unreadable one is recorded and replaced by a drawn one."""
        draws = None
        for _ in range(REPLACEMENT_ATTEMPTS):
            try:
                return self.source.load(item)
            except DataError:
                if not self.skip_corrupt:
                    raise
                _record_skip(skipped, item)
                draws = draws or keyed_rng(self.plan.seed, REPLACEMENT, epoch, position)
                item = int(draws.integers(len(self.source)))
        raise DataError(f"{REPLACEMENT_ATTEMPTS} unreadable images in a row replacing one of epoch {epoch + 1}; "
                        f"the last was {self.source.name(item)}")

    def slot_layout(self) -> list[tuple[tuple[int, ...], type]]:
        """Each column's shape and dtype (shared-memory workers size their slots by it)."""
        size, batch = self.transform.size, self.plan.batch_size
        return [((batch, 3, size, size), np.float32), ((batch, self.mixer.num_classes), np.float32),
                ((batch,), np.int64)]

    def build(self, batch: int, out: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        plan = self.plan
        images, targets, skipped = out
        epoch, index, positions = plan.positions(batch)
        items = self.order(epoch)[positions]
        labels = np.empty(plan.batch_size, np.int32)
        skipped.fill(NO_IMAGE)
        for slot, (position, item) in enumerate(zip(positions.tolist(), items.tolist(), strict=True)):
            image, labels[slot] = self._load(item, epoch, position, skipped)
            self.transform(image, keyed_rng(plan.seed, IMAGE, epoch, position), images[slot])
        _, targets[...] = self.mixer(images, labels, keyed_rng(plan.seed, BATCH, epoch, index, plan.rank),
                                     in_place=True)  # mixes `images` where they lie
        return images, targets, skipped


class EvalBatches(BatchSource):
    """GeneratorDataset source: item b is batch b of this rank's evaluation images, as (images, labels,
    indices of the unreadable images left out)."""

    columns = ["image", "label", "skipped"]

    def __init__(self, source, indices: list[int], batch_size: int, transform: EvalTransform, skip_corrupt: bool):
        self.source = source
        self.indices = indices
        self.batch_size = batch_size
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def slot_layout(self) -> list[tuple[tuple[int, ...], type]]:
        """Each column's largest shape and dtype (shared-memory workers size their slots by it)."""
        size = self.transform.resize_crop.size
        return [((self.batch_size, 3, size, size), np.float32), ((self.batch_size,), np.int32),
                ((self.batch_size,), np.int64)]

    def build(self, batch: int, out: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        chunk = self.indices[batch * self.batch_size:(batch + 1) * self.batch_size]
        images, labels, skipped = out  # each image written into its place
        skipped.fill(NO_IMAGE)
        count = 0
        for item in chunk:
            try:
                image, labels[count] = self.source.load(item)
            except DataError:
                if not self.skip_corrupt:
                    raise
                _record_skip(skipped, item)
                continue
            self.transform(image, images[count])
            count += 1
        return images[:count], labels[:count], skipped


@dataclass
class Loader:
    """Batches of one split and what the training loop needs to know about them."""

    items: TrainBatches | EvalBatches  # the random-access source of whole batches
    num_samples: int  # images this rank reads per epoch
    num_classes: int
    batches_per_epoch: int
    workers: int
    processes: bool
    skipped: set[str] = field(default_factory=set)

    def _pipeline(self, start: int) -> tuple[ds.Dataset, SharedMemoryBatches | None]:
        shared = SharedMemoryBatches(self.items, self.workers, start) if self.processes and self.workers > 1 else None
        source, threads = (self.items, self.workers) if shared is None else (shared, 1)  # shared: read in order
        return ds.GeneratorDataset(source, self.items.columns, sampler=ds.SequentialSampler(start_index=start),
                                   num_parallel_workers=threads, python_multiprocessing=False), shared

    def dataset(self, start: int = 0) -> ds.Dataset:
        """The mindspore.dataset pipeline from batch `start` on. Worker processes (more than one) hand their
        batches over in shared memory (src/data/shared_workers.py), read in order by one pipeline thread;
        they stop when the pipeline is collected."""
        return self._pipeline(start)[0]

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, targets or labels) of every batch from `start` on; counts skipped images and turns an
        unreadable one deep in a worker into a DataError naming it. Worker processes stop when the batches
        end or the caller stops reading them."""
        dataset, shared = self._pipeline(start)
        rows = dataset.create_tuple_iterator(num_epochs=1, do_copy=False)
        try:
            for images, targets, skipped in rows:
                lost = skipped.asnumpy()
                self.skipped.update(self.items.source.name(int(i)) for i in lost[lost != NO_IMAGE])
                if images.shape[0]:
                    yield images, targets
        except RuntimeError as err:
            found = re.findall(r"DataError: (?!Traceback)([^\n]*)", str(err))  # the worker's own message
            if not found:
                raise
            raise DataError(f"{found[-1].strip()}\n(set skip_corrupt: true to skip and count unreadable "
                            "images)") from None
        finally:
            if shared is not None:
                shared.close()
            rows.stop()


def _source(config: dict, split: str, class_names: list[str] | None = None):
    """The random-access source of a split and its number of classes."""
    name = config["dataset"]
    if name == "demo":
        images, labels = demo_digits(split)
        return ArraySource(images, labels, f"demo {split}"), 10
    root = config["data_path"]
    if not root:
        raise ValueError(f"dataset {name!r} needs data_path")
    if name == "folder":
        sub = config["train_split"] if split == "train" else config["val_split"]
        items, classes = list_images(os.path.join(root, sub), class_names)
        return ImageFolderSource(items), len(classes)
    images, labels = read_cifar(root, name, split)
    return ArraySource(images, labels, f"{name} {split}"), CIFAR_CLASSES[name]


def workers(config: dict) -> int:
    """Loader workers: as configured, but no more than this machine's cores (MindSpore refuses more)."""
    return max(1, min(config["num_parallel_workers"], os.cpu_count() or 1))


def _mixer(config: dict, num_classes: int) -> MixupCutmix:
    """Batch Mixup/CutMix with smoothing; with both alphas 0 it only smooths the labels."""
    return MixupCutmix(num_classes, mixup_alpha=config["mixup"], cutmix_alpha=config["cutmix"],
                       prob=config["mixup_prob"], switch_prob=config["mixup_switch_prob"],
                       label_smoothing=config["label_smoothing"])


def train_plan(config: dict, num_items: int, rank: int = 0, group_size: int = 1) -> BatchPlan:
    """This rank's stream: whole optimizer updates of `accum_steps` micro-batches per epoch, at most
    `max_steps_per_epoch` updates."""
    batch, accum = config["batch_size"], config["accum_steps"]
    updates = num_items // (group_size * batch * accum)
    if config["max_steps_per_epoch"]:
        updates = min(updates, config["max_steps_per_epoch"])
    if updates < 1:
        raise ValueError(f"the training split has {num_items} images, fewer than one update of {accum} x "
                         f"{batch} images on each of {group_size} device(s)")
    return BatchPlan(num_items, batch, updates * accum, config["epochs"] + config["cooldown_epochs"],
                     config["seed"], config["shuffle"], rank, group_size)


def create_train_loader(config: dict, img_size: int, rank: int = 0, group_size: int = 1) -> Loader:
    """Augmented, mixed, sharded micro-batches of (images, soft targets) over the whole run."""
    source, num_classes = _source(config, "train")
    plan = train_plan(config, len(source), rank, group_size)
    batches = TrainBatches(source, plan, TrainTransform(config, img_size), _mixer(config, num_classes),
                           config["skip_corrupt"])
    return Loader(batches, plan.batches_per_epoch * plan.batch_size, num_classes, plan.batches_per_epoch,
                  workers(config), config["python_multiprocessing"])


def create_eval_loader(config: dict, img_size: int, rank: int = 0, group_size: int = 1, split: str = "val",
                       subset: int | None = None, subset_seed: int = 0) -> Loader:
    """Deterministic eval-transformed batches of (images, int labels); this rank's share, unpadded.

    `subset` draws that many images of the split at random (seeded), in index order: the calibration
    set that thresholds are solved on is such a subset of the training split.
    """
    class_names = None
    if config["dataset"] == "folder" and config["data_path"]:
        class_names = find_classes(os.path.join(config["data_path"], config["train_split"]))  # names only
    source, num_classes = _source(config, split, class_names)
    chosen = np.arange(len(source))
    if subset is not None and subset < len(source):
        chosen = np.sort(np.random.default_rng(subset_seed).choice(len(source), subset, replace=False))
    indices = chosen[rank::group_size].tolist()
    batches = EvalBatches(source, indices, config["eval_batch_size"], EvalTransform(config, img_size),
                          config["skip_corrupt"])
    return Loader(batches, len(indices), num_classes, len(batches), workers(config), config["python_multiprocessing"])
