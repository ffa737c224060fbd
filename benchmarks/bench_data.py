"""Input pipeline throughput: ours against MindSpore's own C++ pipeline, same files, same workers, one run.

usage: python benchmarks/bench_data.py [--images 256] [--batch_size 32] [--workers 2] [--rounds 3]

Writes `--images` JPEGs of 500x375 (ImageNet's most common size; textured, quality 90, about 85 KB each) into
a temporary folder, then times:
- train, ours: the DVT recipe (RandomResizedCrop, flip, RandAugment rand-m9-mstd0.5-inc1, normalise, random
  erasing 0.25, Mixup/CutMix with smoothing), deterministic, in worker processes; with 1 and with N workers,
  and in threads;
- train, MindSpore C++: ImageFolderDataset, Decode, RandomResizedCrop, flip, C++ RandAugment, Normalize,
  HWC2CHW, batch (not the recipe: no magnitude noise, no erasing, no mixing, not deterministic);
- eval, ours (PIL bicubic resize, centre crop, normalise) and MindSpore C++ (Decode, Resize, CenterCrop,
  Normalize, HWC2CHW).
Each pipeline is built, run alone for three epochs and torn down, the pipelines taking turns round by round;
the rate is that of the last two epochs.
- the host's bound: N independent copies of our 1-worker pipeline, each in its own process, started together.
  They share nothing, so their summed rate over one copy alone is the most any N-worker form of the same
  per-image work can reach on this host (cores that slow down when their neighbours work show here).
Prints the median images/s of each and the ratios: ours / C++ with N workers, N workers / 1 worker (for
both: how far the host lets decoding and resampling scale, whatever the pipeline), and ours against the bound.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore.dataset as ds  # noqa: E402
import numpy as np  # noqa: E402
from mindspore.dataset import vision  # noqa: E402
from PIL import Image  # noqa: E402

from src.config import OPTIONS  # noqa: E402
from src.data.pipeline import create_eval_loader, create_train_loader  # noqa: E402

SIDE = 224
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def write_jpegs(root: str, count: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(count):
            folder = os.path.join(root, split, f"class{i % 2}")
            os.makedirs(folder, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375),
                                                                                             Image.BICUBIC)
            pixels = np.clip(np.asarray(coarse, np.float64) + rng.normal(0, 12, (375, 500, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


EPOCHS = 3  # one warm-up epoch (workers start, files enter the page cache), then two timed ones


def recipe(root: str, batch_size: int, workers: int, processes: bool) -> dict:
    config = {key: option.default for key, option in OPTIONS.items()}
    config.update(dataset="folder", data_path=root, num_classes=2, batch_size=batch_size, eval_batch_size=batch_size,
                  num_parallel_workers=workers, python_multiprocessing=processes, interpolation="random",
                  epochs=EPOCHS, cooldown_epochs=0)
    return config


def ours_train(root, batch_size, workers, processes=True):
    return create_train_loader(recipe(root, batch_size, workers, processes), SIDE).dataset()


def ours_eval(root, batch_size, workers):
    """eval.py reads its 100,000 images in one pass, so the epochs here are one pass over the images EPOCHS times:
    `repeat` would drain the workers every 256 images."""
    loader = create_eval_loader(recipe(root, batch_size, workers, True), SIDE)
    loader.items.indices = loader.items.indices * EPOCHS  # the batches follow their indices
    return loader.dataset()


def cpp_train(root, batch_size, workers):
    data = ds.ImageFolderDataset(os.path.join(root, "train"), num_parallel_workers=workers, shuffle=True)
    ops = [vision.Decode(), vision.RandomResizedCrop(SIDE, scale=(0.08, 1.0)), vision.RandomHorizontalFlip(),
           vision.RandAugment(), vision.Normalize(MEAN, STD), vision.HWC2CHW()]
    data = data.map(ops, input_columns="image", num_parallel_workers=workers).batch(batch_size, drop_remainder=True)
    return data.repeat(EPOCHS)


def cpp_eval(root, batch_size, workers):
    data = ds.ImageFolderDataset(os.path.join(root, "val"), num_parallel_workers=workers, shuffle=False)
    ops = [vision.Decode(), vision.Resize(int(SIDE / 0.875), vision.Inter.BICUBIC), vision.CenterCrop(SIDE),
           vision.Normalize(MEAN, STD), vision.HWC2CHW()]
    return data.map(ops, input_columns="image", num_parallel_workers=workers).batch(batch_size).repeat(EPOCHS)


def steady_rate(dataset) -> float:
    """Images/s over the epochs after the first; the pipeline is built and torn down here, alone on the host."""
    sizes, times = [], []
    for batch in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True):
        sizes.append(batch[0].shape[0])
        times.append(time.perf_counter())
    first = len(sizes) // EPOCHS
    return sum(sizes[first:]) / (times[-1] - times[first - 1])


READY, GO, RATE = "ready", "go", "rate="


def independent_copies(kind: str, root: str, batch_size: int, copies: int) -> float:
    """Summed images/s of `copies` 1-worker pipelines, each in its own process, built first and then started
    together."""
    command = [sys.executable, os.path.abspath(__file__), "--single", kind, "--root", root,
               "--batch_size", str(batch_size)]
    children = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(copies)]
    try:
        for child in children:
            if child.stdout.readline().strip() != READY:
                raise RuntimeError(f"a {kind} copy failed to build (exit {child.wait()})")
        for child in children:
            child.stdin.write(GO + "\n")
            child.stdin.flush()
        rates = [child.stdout.readline().strip() for child in children]
    finally:
        for child in children:
            child.stdin.close()
            child.wait()
    if not all(rate.startswith(RATE) for rate in rates):
        raise RuntimeError(f"a {kind} copy failed: {rates}")
    return sum(float(rate[len(RATE):]) for rate in rates)


def single_copy(kind: str, root: str, batch_size: int) -> int:
    """The child of `independent_copies`: build, say so, wait for the start, run, print the rate."""
    dataset = (ours_train if kind == "train" else ours_eval)(root, batch_size, 1)
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        return 1
    print(f"{RATE}{steady_rate(dataset)}", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single", choices=("train", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n, batch = args.workers, args.batch_size
    if args.single:
        return single_copy(args.single, args.root, batch)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, args.images)
        pipelines = {
            f"train ours, {n} worker processes": lambda: ours_train(root, batch, n),
            "train ours, 1 worker process": lambda: ours_train(root, batch, 1),
            f"train ours, {n} worker threads": lambda: ours_train(root, batch, n, processes=False),
            f"train MindSpore C++, {n} workers": lambda: cpp_train(root, batch, n),
            "train MindSpore C++, 1 worker": lambda: cpp_train(root, batch, 1),
            f"eval ours, {n} worker processes": lambda: ours_eval(root, batch, n),
            "eval ours, 1 worker process": lambda: ours_eval(root, batch, 1),
            f"eval MindSpore C++, {n} workers": lambda: cpp_eval(root, batch, n),
            "eval MindSpore C++, 1 worker": lambda: cpp_eval(root, batch, 1),
        }
        bounds = {f"{kind} ours, {n} x 1 worker at once": kind for kind in ("train", "eval")}
        rates = {name: [] for name in [*pipelines, *bounds]}
        for _ in range(args.rounds):
            for name, build in pipelines.items():
                rates[name].append(steady_rate(build()))
            for name, kind in bounds.items():
                rates[name].append(independent_copies(kind, root, batch, n))
    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{args.images} JPEGs of 500x375, batch {batch}, {n} workers, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds")
    for name, rate in median.items():
        print(f"  {name:<36} {rate:8.1f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in rates[name])})")
    for kind in ("train", "eval"):
        ours, cpp = median[f"{kind} ours, {n} worker processes"], median[f"{kind} MindSpore C++, {n} workers"]
        one, bound = median[f"{kind} ours, 1 worker process"], median[f"{kind} ours, {n} x 1 worker at once"]
        print(f"{kind}: ours / MindSpore C++ ({n} workers) = {ours / cpp:.2f}; "
              f"{n} workers / 1 worker = {ours / one:.2f} "
              f"(MindSpore C++: {cpp / median[f'{kind} MindSpore C++, 1 worker']:.2f}; "
              f"the host's bound, {n} independent copies at once: {bound / one:.2f}); "
              f"ours per worker {ours / n:.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
