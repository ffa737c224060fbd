"""Real early exit: stage 1 on the whole batch, then each later stage only on the samples still undecided.

The exit decision is made on the host from the stage's logits (cheap); the images and reuse tensors of the
samples that go on are selected with `ops.gather` on the device, never through NumPy. Sub-batch shapes:
- `buckets=0`: every stage is compiled once with a dynamic batch dimension (`set_inputs` with None), so any
  sub-batch size reuses it; MindSpore's dynamic-shape kernels are about 1.45x slower on CPU;
- `buckets=n`: static graphs for n sizes per stage (ceil(i * B / n), i = 1..n, for batch B), each compiled on
  first use and kept; a sub-batch is padded up to the next size (the gather that selects it also pads it).
Thresholds come from eval.py's table by budget and can be switched between batches without recompiling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from ..models import DVT
from .evaluate import softmax


@dataclass
class AdaptiveResult:
    """Per image: predicted class, confidence, and the exit (0-based) it left at."""

    predictions: np.ndarray
    confidences: np.ndarray
    exits: np.ndarray


def load_threshold_table(path: str) -> list[tuple[float, list[float]]]:
    """(budget GFLOPs, thresholds) rows of eval.py's thresholds.json, by increasing budget."""
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    rows = [(float(r["budget_gflops"]), [float(t) for t in r["thresholds"]]) for r in content["budgets"]]
    if not rows:
        raise ValueError(f"{path} holds no thresholds")
    return sorted(rows)


def thresholds_for(table: list[tuple[float, list[float]]], budget: float) -> list[float]:
    """The thresholds solved for the largest budget that does not exceed `budget`."""
    fitting = [thresholds for solved, thresholds in table if solved <= budget + 1e-12]
    if not fitting:
        raise ValueError(f"no thresholds for a budget of {budget:.4g} GFLOPs: the smallest solved is {table[0][0]:.4g}")
    return fitting[-1]


def _softmax_max(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = softmax(logits)
    return probs.argmax(1), probs.max(1)


class AdaptiveCascade:
    """Runs a DVT's stages with early exit. `thresholds[k]` gates exit k; the last exit takes the rest."""

    def __init__(self, net: DVT, thresholds: list[float] | None = None, buckets: int = 0):
        self.net = net
        self.stages = list(net.stages)
        self.buckets = buckets
        spec = net.spec
        net.set_train(False)
        for k, stage in enumerate(self.stages):
            if buckets:
                break
            dynamic = [Tensor(shape=[None, spec.in_chans, spec.img_size, spec.img_size], dtype=ms.float32)]
            if k:
                n_up = spec.num_tokens(k - 1)
                if stage.takes_tokens:
                    dynamic.append(Tensor(shape=[None, n_up, spec.embed_dim], dtype=ms.float32))
                if stage.takes_relations:
                    dynamic.append(Tensor(shape=[None, spec.depth * spec.num_heads, n_up, n_up], dtype=ms.float32))
            stage.set_inputs(*dynamic)
        self.thresholds = list(thresholds) if thresholds is not None else [0.0] * len(self.stages)

    def set_thresholds(self, thresholds: list[float]) -> None:
        if len(thresholds) != len(self.stages):
            raise ValueError(f"{len(thresholds)} thresholds for {len(self.stages)} exits")
        self.thresholds = [float(t) for t in thresholds]

    def _padded_size(self, count: int, batch: int) -> int:
        if not self.buckets:
            return count
        return min(size for size in (-(-i * batch // self.buckets) for i in range(1, self.buckets + 1))
                   if size >= count)

    def __call__(self, images: Tensor) -> AdaptiveResult:
        batch = images.shape[0]
        predictions = np.zeros(batch, np.int64)
        confidences = np.zeros(batch, np.float64)
        exits = np.zeros(batch, np.int64)
        remaining = np.arange(batch)
        inputs = images
        upstream: tuple = ()
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            outputs = stage(inputs, *upstream)
            # rows beyond len(remaining) are padding (bucket mode): ignored
            predicted, confidence = _softmax_max(outputs[0].asnumpy()[:len(remaining)])
            leave = np.ones(len(remaining), bool) if k == last else confidence >= self.thresholds[k]
            chosen = remaining[leave]
            predictions[chosen], confidences[chosen], exits[chosen] = predicted[leave], confidence[leave], k
            stay = np.nonzero(~leave)[0]
            if len(stay) == 0:
                break
            remaining = remaining[stay]
            rows = np.concatenate([stay, np.full(self._padded_size(len(stay), batch) - len(stay), stay[0])])
            if len(rows) < outputs[0].shape[0] or not np.array_equal(rows, np.arange(len(rows))):
                index = Tensor(rows.astype(np.int32))
                inputs = ops.gather(inputs, index, 0)
                upstream = tuple(ops.gather(t, index, 0) for t in outputs[1:])
            else:
                upstream = tuple(outputs[1:])
        return AdaptiveResult(predictions, confidences, exits)
