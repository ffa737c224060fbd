"""Every exit's logits, stage by stage in static micro-batches: offline evaluation in bounded memory.

A DVT called as one Cell compiles the whole cascade into one graph, and MindSpore's CPU runtime keeps that
graph's intermediates alive for the whole call: peak memory grows with the batch times every stage's
activations (README, "Evaluation under a compute budget", Memory). Here each micro-batch of m samples runs
stage 1, then stage 2 on stage 1's reuse tensors, and so on; only one stage's graph runs at a time, and only the
m samples' reuse tensors are carried to the next stage. The logits are those of the whole-cascade call (the same
stages, the same weights), and each stage compiles at most 1 + log2(m) graphs (the remainder of a batch runs in
graphs of its binary digits, as in early exit, src/engine/adaptive.py).
"""

from __future__ import annotations

from mindspore import Tensor, ops

from ..models import DVT
from .adaptive import micro_batches


class StagewiseCascade:
    """`cascade(images)` returns every exit's logits, like `net(images)`, in micro-batches of `micro_batch`."""

    def __init__(self, net: DVT, micro_batch: int):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be a positive number of samples, not {micro_batch}")
        self.net = net
        self.micro_batch = micro_batch

    def set_train(self, mode: bool = True) -> StagewiseCascade:
        self.net.set_train(mode)
        return self

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        per_exit: list[list[Tensor]] = [[] for _ in self.net.stages]
        start = 0
        for size in micro_batches(images.shape[0], self.micro_batch):
            chunk = images if size == images.shape[0] else images[start:start + size]
            upstream: tuple = ()
            for logits, stage in zip(per_exit, self.net.stages, strict=True):
                outputs = stage(chunk, *upstream)
                logits.append(outputs[0])
                upstream = outputs[1:]
            start += size
        return tuple(parts[0] if len(parts) == 1 else ops.concat(parts, 0) for parts in per_exit)
