"""The T2T soft split: `ops.unfold` (Im2Col) against the portable gather that ONNX export uses, side by side.

usage: python benchmarks/bench_soft_split.py [--model dvt_t2t_vit_12] [--batch 16] [--rounds 5] [--whole]

One process, rounds alternating between the two, so machine noise hits both; prints the max difference of the
outputs and the median time of each: the tokenizers of every stage in eval (forward) and training (forward and
backward), or with --whole the whole cascade's eval forward. The ratio is gather / unfold (> 1: gather slower).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import nn, ops  # noqa: E402

from src.models import create_model  # noqa: E402
from src.models.tokenizers import SoftSplit  # noqa: E402


class Tokenizers(nn.Cell):
    """Every stage's tokenizer on one image batch: the soft splits are what differs."""

    def __init__(self, net):
        super().__init__()
        self.tokenizers = nn.CellList([stage.tokenizer for stage in net.stages])

    def construct(self, image):
        return tuple(tokenizer(image) for tokenizer in self.tokenizers)


class TrainStep(nn.Cell):
    """Forward and backward of the tokenizers (sum of squares as the loss)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.grad = ops.GradOperation(get_by_list=True)
        self.weights = cell.trainable_params()

    def loss(self, image):
        total = 0.0
        for out in self.cell(image):
            total = total + (out * out).mean()
        return total

    def construct(self, image):
        return self.grad(self.loss, self.weights)(image)


def timed(fn, image) -> float:
    start = time.perf_counter()
    out = fn(image)
    for leaf in out if isinstance(out, (tuple, list)) else (out,):
        leaf.asnumpy()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_12")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--whole", action="store_true", help="also time the whole cascade (eval forward)")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(0)
    reference = create_model(args.model)
    spec = reference.spec
    image = ms.Tensor(np.random.default_rng(0).normal(size=(args.batch, 3, spec.img_size, spec.img_size))
                      .astype(np.float32))
    cases = {}
    for kind in ("unfold", "gather"):
        # One network per case: set_train on the training step would switch a shared one's dropout on.
        nets = [create_model(args.model) for _ in range(1 if args.whole else 2)]
        for net in nets:
            ms.load_param_into_net(net, reference.parameters_dict())
            for _, cell in net.cells_and_names():  # only the soft split differs
                if isinstance(cell, SoftSplit):
                    cell.portable = kind == "gather"
            net.set_train(False)
        cases[("tokenizers, eval", kind)] = Tokenizers(nets[0])
        if args.whole:
            cases[("whole cascade, eval", kind)] = nets[0]
        else:
            cases[("tokenizers, train step", kind)] = TrainStep(Tokenizers(nets[1]))
            cases[("tokenizers, train step", kind)].set_train(True)
    outputs = {kind: [o.asnumpy() for o in cases[("tokenizers, eval", kind)](image)] for kind in ("unfold", "gather")}
    diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["unfold"], outputs["gather"], strict=True))
    print(f"{args.model}, batch {args.batch}: tokenizer outputs max abs diff gather vs unfold {diff:.3g}")
    times = {key: [] for key in cases}
    for cell in cases.values():  # compile and warm up
        timed(cell, image)
    for _ in range(args.rounds):
        for key, cell in cases.items():
            times[key].append(timed(cell, image))
    for what in dict.fromkeys(key[0] for key in cases):
        unfold, gather = (statistics.median(times[(what, kind)]) for kind in ("unfold", "gather"))
        print(f"{what:24s} unfold {unfold * 1e3:8.1f} ms   gather {gather * 1e3:8.1f} ms   "
              f"gather / unfold {gather / unfold:.2f}")


if __name__ == "__main__":
    main()
