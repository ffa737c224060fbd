"""Which images make each batch, and the random draws of each: pure functions of (seed, epoch, position).

Training reads one stream of micro-batches over the whole run: micro-batch `g` belongs to epoch
`g // batches_per_epoch`. Every epoch orders the training set by one permutation drawn from (seed, epoch),
the same on every rank; global batch `b` is positions `[b * G * B, (b + 1) * G * B)` of that order, and rank
`r` takes the `r`-th run of `B` of them. So G ranks of batch B see exactly the images of one process with
batch G * B, and a run resumed at micro-batch `g` reads exactly what the uninterrupted run read there.

Each image's augmentation draws from its own generator keyed by (seed, epoch, position in the epoch's
order), and each batch's Mixup/CutMix from one keyed by (seed, epoch, batch, rank). Nothing depends on
which worker thread or process ran it, on how many there are, or on what ran before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Independent streams of one seed: the epoch order, per-image augmentation, per-batch mixing, replacements.
ORDER, IMAGE, BATCH, REPLACEMENT = range(4)


def keyed_rng(seed: int, *key: int) -> np.random.Generator:
    """A generator that depends on (seed, key) only."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *key])))


@dataclass(frozen=True)
class BatchPlan:
    """The training stream of one rank: `batches_per_epoch` micro-batches of `batch_size` images per epoch."""

    num_items: int
    batch_size: int
    batches_per_epoch: int
    epochs: int
    seed: int
    shuffle: bool = True
    rank: int = 0
    group_size: int = 1

    def __post_init__(self):
        needed = self.batches_per_epoch * self.batch_size * self.group_size
        if self.batches_per_epoch < 1 or needed > self.num_items:
            raise ValueError(f"{self.batches_per_epoch} batches of {self.batch_size} on {self.group_size} rank(s) "
                             f"need {needed} images per epoch; the training split has {self.num_items}")

    @property
    def total_batches(self) -> int:
        return self.batches_per_epoch * self.epochs

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's order of item indices, identical on every rank."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return keyed_rng(self.seed, ORDER, epoch).permutation(self.num_items)

    def positions(self, batch: int) -> tuple[int, int, np.ndarray]:
        """(epoch, batch within the epoch, positions in the epoch's order) of this rank's micro-batch."""
        epoch, index = divmod(batch, self.batches_per_epoch)
        start = (index * self.group_size + self.rank) * self.batch_size
        return epoch, index, np.arange(start, start + self.batch_size)
