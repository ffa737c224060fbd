"""Real early exit: stage 1 on the whole batch, then each later stage only on the samples still undecided.

The exit decision is made on the host from the stage's logits (cheap); the images and reuse tensors of the
samples that go on are selected with `ops.gather` on the device, never through NumPy. How a stage runs a
sub-batch of n samples:
- `micro_batch=m` (the default, 16): in static-shape graphs of m samples, and the remainder n mod m in graphs
  of its binary digits (13 = 8 + 4 + 1), so nothing is padded. Each stage compiles at most 1 + log2(m) graphs,
  on first use; memory depends on m, not on the batch. Each call costs a fixed 10-25 ms on CPU, so a graph of 2
  runs 13-36% slower per image than one of 16; the binary digits keep such calls to a few per stage (README,
  "Benchmarks");
- `micro_batch=0`: one call per stage, compiled once with a dynamic batch dimension (`set_inputs` with None).
  It compiles least, but MindSpore's dynamic-shape kernels are about 1.45x slower on CPU and its memory grows
  with the batch.
Thresholds come from eval.py's thresholds.json by budget (`src.thresholds`) and can be switched between batches
without recompiling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..models import DVT
from ..models.layers import use_stock_ops
from .evaluate import softmax


@dataclass
class AdaptiveResult:
    """Per image: predicted class, confidence, and the exit (0-based) it left at."""

    predictions: np.ndarray
    confidences: np.ndarray
    exits: np.ndarray


def _softmax_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = softmax(logits)
    return probs.argmax(1), probs.max(1)


def micro_batches(count: int, size: int) -> list[int]:
    """Sizes that cover `count` samples exactly: full micro-batches of `size`, then the remainder's binary digits."""
    remainder = count % size
    return [size] * (count // size) + [1 << bit for bit in reversed(range(remainder.bit_length()))
                                       if remainder >> bit & 1]


def dynamic_twin(net: DVT) -> DVT:
    """A DVT with `net`'s weights for dynamic-batch stages. `set_inputs` and MindSpore's stock ops (the AOT CPU
    kernels take static shapes only) change a network for good, so they go on a copy, not on the caller's."""
    twin = DVT(net.spec)
    use_stock_ops(twin)
    missing, unused = ms.load_param_into_net(twin, net.parameters_dict(), strict_load=True)
    if missing or unused:
        raise ValueError(f"the twin of {net.spec.family} DVT misses {missing} and does not take {unused}")
    return twin


class AdaptiveCascade:
    """Runs a DVT's stages with early exit. `thresholds[k]` gates exit k; the last exit takes the rest.

    With `micro_batch` m > 0 it runs `net` itself; with 0, a `dynamic_twin` of it, leaving `net` as it was."""

    def __init__(self, net: DVT, thresholds: list[float] | None = None, micro_batch: int = 16):
        if micro_batch < 0:
            raise ValueError(f"micro_batch must be 0 (dynamic batch) or a size, not {micro_batch}")
        self.net = net if micro_batch else dynamic_twin(net)
        self.stages = list(self.net.stages)
        self.micro_batch = micro_batch
        self.net.set_train(False)
        if not micro_batch:
            spec = net.spec
            for k, stage in enumerate(self.stages):
                dynamic = [Tensor(shape=[None, spec.in_chans, spec.img_size, spec.img_size], dtype=ms.float32)]
                if k:
                    n_up = spec.num_tokens(k - 1)
                    if stage.takes_tokens:
                        dynamic.append(Tensor(shape=[None, n_up, spec.embed_dim], dtype=ms.float32))
                    if stage.takes_relations:
                        dynamic.append(Tensor(shape=[None, spec.depth * spec.num_heads, n_up, n_up],
                                              dtype=ms.float32))
                stage.set_inputs(*dynamic)
        self.set_thresholds(thresholds if thresholds is not None else [0.0] * len(self.stages))

    def warm_up(self) -> int:
        """Compile every graph the stages can meet, so that timing afterwards measures the steady state; returns
        how many graphs the stages hold.

        Zero batches that no sample leaves early run every stage: m + r samples for remainders r whose binary
        digits together are every power of two below the micro-batch m (m - 1 when m is a power of two), so
        each stage meets every sub-batch size, through the device gathers; one small batch for dynamic stages."""
        m = self.micro_batch
        counts = [m + (m - 1)] + [m + (1 << b) for b in range((m - 1).bit_length()) if not (m - 1) >> b & 1] \
            if m else [2]
        spec = self.net.spec
        thresholds = self.thresholds
        self.set_thresholds([math.inf] * len(self.stages))
        try:
            for count in counts:
                self(Tensor(np.zeros((count, spec.in_chans, spec.img_size, spec.img_size), np.float32)))
        finally:
            self.set_thresholds(thresholds)
        return sum(len(stage.compile_cache) for stage in self.stages)

    def set_thresholds(self, thresholds: list[float]) -> None:
        if len(thresholds) != len(self.stages):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.stages)} exits")
        self.thresholds = [float(t) for t in thresholds]

    def _run_stage(self, stage, images: Tensor, samples: np.ndarray, upstream: tuple,
                   rows: np.ndarray) -> tuple[np.ndarray, tuple]:
        """Stage logits for `samples` (indices into `images`) and its reuse tensors (none from the last stage).

        `rows` are the same samples' rows in `upstream`, the previous stage's reuse tensors.
        """
        sizes = micro_batches(len(samples), self.micro_batch) if self.micro_batch else [len(samples)]
        logits, emitted, start = [], [], 0
        for size in sizes:
            if size == images.shape[0]:  # the whole batch, in order: nothing to select
                outputs = stage(images, *upstream)
            else:
                pick = Tensor(samples[start:start + size].astype(np.int32))
                pick_up = Tensor(rows[start:start + size].astype(np.int32))
                outputs = stage(ops.gather(images, pick, 0), *(ops.gather(t, pick_up, 0) for t in upstream))
            logits.append(outputs[0].asnumpy())
            emitted.append(outputs[1:])
            start += size
        if len(emitted) > 1:
            emitted = [tuple(ops.concat(parts, 0) for parts in zip(*emitted, strict=True))]
        return np.concatenate(logits), emitted[0]

    def __call__(self, images: Tensor) -> AdaptiveResult:
        batch = images.shape[0]
        predictions = np.zeros(batch, np.int64)
        confidences = np.zeros(batch, np.float64)
        exits = np.zeros(batch, np.int64)
        remaining = np.arange(batch)  # the samples that run this stage, as indices into `images`
        rows = remaining  # their rows in `upstream`
        upstream: tuple = ()
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            logits, upstream = self._run_stage(stage, images, remaining, upstream, rows)
            predicted, confidence = _softmax_max(logits)
            leave = np.ones(len(remaining), bool) if k == last else confidence >= self.thresholds[k]
            chosen = remaining[leave]
            predictions[chosen], confidences[chosen], exits[chosen] = predicted[leave], confidence[leave], k
            rows = np.nonzero(~leave)[0]
            if len(rows) == 0:
                break
            remaining = remaining[rows]
        return AdaptiveResult(predictions, confidences, exits)
