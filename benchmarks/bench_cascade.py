"""Throughput of the DVT cascade (every exit), ours against the official PyTorch DVT, side by side.

usage: python benchmarks/bench_cascade.py [--model dvt_t2t_vit_12] [--batch 16 32] [--micro_batch 8]
                                          [--rounds 5] [--official PATH_TO_OFFICIAL_CHECKOUT] [--no_memory]

Rounds alternate between the two implementations in one process, so machine noise hits both; the
ratio of the medians is the figure to read, with each one's CPU time / wall time (cores kept busy).
Peak memory is per process, so each implementation's is measured after the timing, alone in a fresh
child process that builds it and runs the same batches. Ours runs as eval.py runs it: stage by stage
in micro-batches (src/engine/stagewise.py). Without --official (or without torch) only ours is measured.
The official code (torch 1.8 era) runs on torch 2.x through small import shims set up here; nothing
of it is part of this repository and nothing is downloaded.
"""

import argparse
import collections.abc
import importlib
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

OURS, OFFICIAL = "ours (MindSpore)", "official (PyTorch)"
PEAK_PREFIX = "peak_rss_gb="
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


def build_ours(model: str, batch: int, micro_batch: int):
    """Our cascade, every exit: stage by stage in micro-batches as eval.py runs it, or one graph (`micro_batch` 0)."""
    import mindspore as ms

    from src.engine.stagewise import StagewiseCascade
    from src.models import create_model

    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_model(model)
    net.set_train(False)
    cascade = StagewiseCascade(net, micro_batch) if micro_batch else net
    x = ms.Tensor(np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32))

    def run():
        outputs = cascade(x)
        outputs[-1].asnumpy()  # wait for the result
    return run


def build(name: str, args, batch: int):
    if name == OURS:
        return build_ours(args.model, batch, args.micro_batch)
    import torch

    torch.set_num_threads(args.threads)
    return build_official(args.official, args.model, batch)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_round(run, batches: int) -> tuple[float, float]:
    """Seconds per batch and the cores kept busy (process CPU time / wall time) over `batches` batches."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return wall / batches, cpu / wall


def peak_rss_gb() -> float:
    """This process image's peak RSS: VmHWM starts afresh at exec, while getrusage's ru_maxrss of a child
    started from this large process would already hold the parent's size at the fork."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB
    raise RuntimeError("no VmHWM in /proc/self/status: the memory runs need Linux (or pass --no_memory)")


def child_peak_rss(name: str, args, batch: int) -> float:
    """Peak RSS is per process, so each implementation's is measured alone in a fresh child process."""
    command = [sys.executable, os.path.abspath(__file__), "--only", name, "--model", args.model,
               "--batch", str(batch), "--micro_batch", str(args.micro_batch), "--batches", str(args.batches),
               "--threads", str(args.threads)] + (["--official", args.official] if args.official else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(PEAK_PREFIX):
            return float(line[len(PEAK_PREFIX):])
    raise RuntimeError(f"the memory run of {name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def measure_alone(name: str, args) -> int:
    """The child of `child_peak_rss`: build one implementation, warm it up, run `--batches` batches."""
    run = build(name, args, args.batch[0])
    for _ in range(1 + args.batches):
        run()
    print(f"{PEAK_PREFIX}{peak_rss_gb():.3f}")
    return 0


def official_available(args) -> bool:
    if not args.official:
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        print("skipping the official model: torch is not installed (pip install -r requirements-convert.txt)")
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dvt_t2t_vit_12", choices=sorted(OFFICIAL_NAMES))
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32], help="batch sizes, each measured in turn")
    parser.add_argument("--micro_batch", type=int, default=8,
                        help="ours runs stage by stage in micro-batches of this many samples, as eval.py "
                             "(--eval_micro_batch, default 8); 0: the whole cascade as one graph")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=3, help="batches timed per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--official", metavar="PATH", help="a checkout of blackfeather-wang/Dynamic-Vision-Transformer")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--only", choices=(OURS, OFFICIAL), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_batch < 0:
        parser.error(f"--micro_batch must be 0 (one graph) or a number of samples, not {args.micro_batch}")
    if args.only:
        return measure_alone(args.only, args)

    from src.flops import exit_gflops
    from src.models import model_spec

    names = [OURS] + ([OFFICIAL] if official_available(args) else [])
    gflops = exit_gflops(model_spec(args.model))[-1]
    mode = f"micro-batches of {args.micro_batch}" if args.micro_batch else "one whole-cascade graph"
    for batch in args.batch:
        runners = {name: build(name, args, batch) for name in names}
        start = time.perf_counter()
        for run in runners.values():
            run()  # compile / warm up
        print(f"batch {batch}: warm-up (graph compile included) {time.perf_counter() - start:.1f} s")
        rounds = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, run in runners.items():
                rounds[name].append(time_round(run, args.batches))
        del runners
        peaks = {} if args.no_memory else {name: child_peak_rss(name, args, batch) for name in names}
        print(f"{args.model}, all exits, batch {batch}, ours in {mode}, {os.cpu_count()} cores, "
              f"{args.rounds} rounds x {args.batches} batches (medians):")
        throughput = {}
        for name in names:
            throughput[name] = batch / statistics.median(seconds for seconds, _ in rounds[name])
            cores = statistics.median(busy for _, busy in rounds[name])
            memory = f", peak RSS {peaks[name]:.2f} GB (alone)" if peaks else ""
            print(f"  {name:<20} {throughput[name]:7.2f} img/s ({throughput[name] * gflops:6.1f} GFLOP/s), "
                  f"CPU/wall {cores:.2f}{memory}")
        if len(names) == 2:
            line = f"  ours / official: {throughput[OURS] / throughput[OFFICIAL]:.2f}x img/s"
            if peaks:
                line += f", {peaks[OURS] / peaks[OFFICIAL]:.2f}x peak memory"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
