"""Top-1 / top-5 of every exit over a validation loader, summed over ranks when data-parallel."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import mindspore as ms
import numpy as np
from mindspore import nn, ops

if TYPE_CHECKING:
    from .stagewise import StagewiseCascade


class _SumOverRanks(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, x):
        return self.all_reduce(x)


@functools.cache
def sum_over_ranks() -> _SumOverRanks:
    """An all-reduce sum over the ranks; one cell per process, so its graph is compiled once per input shape,
    not after every epoch."""
    return _SumOverRanks()


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    """How many labels are among the k largest logits of their row."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64 (the exit decisions compare these against thresholds)."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def collect_probs(net: nn.Cell | StagewiseCascade, batches: Iterable,
                  num_exits: int) -> tuple[np.ndarray, np.ndarray]:
    """Every exit's softmax over (images, labels) batches: (K, N, C) float32 probabilities and (N,) labels.
    `net` is a DVT or its StagewiseCascade (bounded memory)."""
    net.set_train(False)
    probs, labels = [[] for _ in range(num_exits)], []
    for images, batch_labels in batches:
        for k, logits in enumerate(net(images)):
            probs[k].append(softmax(logits.asnumpy()).astype(np.float32))
        labels.append(batch_labels.asnumpy())
    if not labels:
        raise ValueError("the dataset is empty")
    return np.stack([np.concatenate(p) for p in probs]), np.concatenate(labels).astype(np.int64)


def accuracy_per_exit(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 / top-5 (%) of every exit from (K, N, C) probabilities."""
    top1 = [100.0 * topk_correct(p, labels, 1) / len(labels) for p in probs]
    top5 = [100.0 * topk_correct(p, labels, 5) / len(labels) for p in probs]
    return {"top1": top1, "top5": top5, "count": len(labels)}


def evaluate(net: nn.Cell, batches: Iterable, num_exits: int, group_size: int = 1) -> dict:
    """Accuracy (%) of each exit over (images, labels) batches: {'top1': [...], 'top5': [...], 'count': N}.
    `net` returns every exit."""
    net.set_train(False)
    counts = np.zeros((2, num_exits), np.float64)
    total = 0
    for images, labels in batches:
        labels_np = labels.asnumpy()
        for k, logits in enumerate(net(images)):
            logits_np = logits.asnumpy()
            counts[0, k] += topk_correct(logits_np, labels_np, 1)
            counts[1, k] += topk_correct(logits_np, labels_np, 5)
        total += len(labels_np)
    if group_size > 1:
        packed = np.concatenate([counts.ravel(), [total]]).astype(np.float32)
        packed = sum_over_ranks()(ms.Tensor(packed)).asnumpy().astype(np.float64)
        counts, total = packed[:-1].reshape(2, num_exits), int(round(packed[-1]))
    if total == 0:
        raise ValueError("the validation set is empty")
    return {"top1": (100.0 * counts[0] / total).tolist(), "top5": (100.0 * counts[1] / total).tolist(),
            "count": total}
