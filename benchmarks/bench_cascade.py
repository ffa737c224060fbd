"""Throughput of the DVT cascade (every exit), ours against the official PyTorch DVT, side by side.

usage: python benchmarks/bench_cascade.py [--model dvt_t2t_vit_12] [--batch 16] [--rounds 5]
                                          [--official PATH_TO_OFFICIAL_CHECKOUT]

Rounds alternate between the two implementations in one process, so machine noise hits both; the
ratio of the medians is the figure to read. Without --official (or without torch) only ours is timed.
The official code (torch 1.8 era) runs on torch 2.x through small import shims set up here; nothing
of it is part of this repository and nothing is downloaded.
"""

import argparse
import collections.abc
import importlib
import math
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from src.flops import exit_gflops  # noqa: E402
from src.models import create_model, model_spec  # noqa: E402

OFFICIAL_NAMES = {"dvt_t2t_vit_12": "DVT_T2t_vit_12", "dvt_t2t_vit_14": "DVT_T2t_vit_14",
                  "dvt_deit_small": "DVT_Deit_small"}


class _Unavailable(types.ModuleType):
    """An import-only stand-in: the official model code imports torchvision but never calls it."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self.__name__}.{name}")


def build_official(checkout: str, model: str, batch: int):
    """The official DVT on torch 2.x CPU: torch._six, torchvision and Tensor.cuda made harmless."""
    import torch

    six = types.ModuleType("torch._six")
    six.container_abcs, six.string_classes, six.int_classes, six.inf = collections.abc, (str, bytes), int, math.inf
    sys.modules["torch._six"] = six
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.datasets", "torchvision.utils", "torchvision.models", "torchvision.ops"):
        sys.modules.setdefault(name, _Unavailable(name))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, os.path.abspath(checkout))
    for module in ("models", "models_deit"):  # importing them registers the DVTs with the bundled timm
        importlib.import_module(module)
    timm = importlib.import_module("timm")
    net = timm.create_model(OFFICIAL_NAMES[model], pretrained=False, num_classes=1000, drop_path_rate=0.1).eval()
    x = torch.randn(batch, 3, 224, 224)

    def run():
        with torch.no_grad():
            net(x)
    return run


def build_ours(model: str, batch: int):
    net = create_model(model)
    net.set_train(False)
    x = ms.Tensor(np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32))

    def run():
        outputs = net(x)
        outputs[-1].asnumpy()  # wait for the result
    return run


def time_batches(run, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        run()
    return (time.perf_counter() - start) / batches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_12", choices=sorted(OFFICIAL_NAMES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="batches timed per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--official", metavar="PATH", help="a checkout of blackfeather-wang/Dynamic-Vision-Transformer")
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)

    runners = {"ours (MindSpore)": build_ours(args.model, args.batch)}
    if args.official:
        try:
            import torch
        except ImportError:
            print("skipping the official model: torch is not installed (pip install -r requirements-convert.txt)")
        else:
            torch.set_num_threads(args.threads)
            runners["official (PyTorch)"] = build_official(args.official, args.model, args.batch)
    start = time.perf_counter()
    for run in runners.values():
        run()  # compile / warm up
    print(f"warm-up (graph compile included): {time.perf_counter() - start:.1f} s")

    seconds = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            seconds[name].append(time_batches(run, args.batches))
    gflops = exit_gflops(model_spec(args.model))[-1]
    print(f"{args.model}, all exits, batch {args.batch}, {os.cpu_count()} cores, "
          f"{args.rounds} rounds x {args.batches} batches (median):")
    throughput = {}
    for name, times in seconds.items():
        throughput[name] = args.batch / statistics.median(times)
        print(f"  {name:<20} {throughput[name]:7.2f} img/s  ({throughput[name] * gflops:6.1f} GFLOP/s)")
    if len(throughput) == 2:
        ours, official = throughput.values()
        print(f"  ratio ours / official: {ours / official:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
