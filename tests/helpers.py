"""Helpers the test modules share (test modules do not import each other): generated datasets, train.py as a
subprocess and what it leaves, planted run-directory locks, synthetic exit probabilities, weights copied
between twin cells."""

import json
import os
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
from PIL import Image

from src.engine.evaluate import softmax
from src.engine.run_dir import LOCK_NAME

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# A tiny deterministic recipe: no augmentation, no mixing, no stochastic depth.
QUIET = ["--progress", "false", "--num_parallel_workers", "1", "--auto_augment", "null", "--re_prob", "0",
         "--mixup", "0", "--cutmix", "0", "--drop_path_rate", "0", "--device_target", "CPU", "--cooldown_epochs", "0",
         "--warmup_epochs", "0"]


def make_folder(root, classes=("cat", "dog", "owl"), per_class=4, size=(40, 30), modes=("RGB", "L", "P", "RGBA"),
                noise: bool = True) -> str:
    """train/ and val/ with images in several modes and formats, as ImageNet folders mix them."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256 if noise else 1, (size[1], size[0], 3), dtype=np.uint8)
                pixels[..., label % 3] = 255  # a class colour: learnable
                image = Image.fromarray(pixels).convert(modes[i % len(modes)])
                ext = "jpg" if image.mode in ("RGB", "L") and noise else "png"
                image.save(os.path.join(folder, f"{i}.{ext}"))
    return str(root)


def truncate(path: str) -> None:
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 3])


def write_cifar10(root, per_file: int = 6) -> np.ndarray:
    """The CIFAR-10 binary layout: records of 1 label byte then 3072 pixel bytes (R, G, B planes)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(1)
    labels = []
    for name in ("data_batch_1.bin", "test_batch.bin"):
        records = np.zeros((per_file, 3073), np.uint8)
        records[:, 0] = np.arange(per_file) % 10
        records[:, 1:] = rng.integers(0, 256, (per_file, 3072))
        records.tofile(os.path.join(root, name))
        labels.append(records[:, 0].copy())
    return labels[1]


def run_train(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([PYTHON, "train.py", *QUIET, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["type"] == kind]


def by_step(run_dir: str, key: str) -> dict[int, float]:
    steps = records(run_dir, "step")
    assert len({r["step"] for r in steps}) == len(steps), "a step recorded twice"
    return {r["step"]: r[key] for r in steps}


def final_weights(path: str) -> dict[str, np.ndarray]:
    return {name: value.asnumpy() for name, value in ms.load_checkpoint(path).items()
            if name.startswith(("stages.", "ema.", "adam_")) or name in ("global_step", "scale_sense")}


def copy_weights(source, target) -> None:
    """Give the cell `target` copies of the weights of `source`, a cell of the same architecture."""
    ms.load_param_into_net(target, {p.name: ms.Parameter(p.data.copy(), name=p.name) for p in source.get_parameters()})


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys() and any(n.startswith("adam_v.") for n in a)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant_lock(run_dir, **owner) -> str:
    path = os.path.join(run_dir, LOCK_NAME)
    with open(path, "w") as handle:
        json.dump({"host": socket.gethostname(), "since": "2026-01-01T00:00:00", **owner}, handle)
    return path


def synthetic_probs(num: int, exits: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (exits, num, classes) softmax outputs and labels for tests and benchmarks: later exits are
    more accurate, and every exit is more confident on the same easy samples, as in a real cascade."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, num)
    ease = rng.normal(0, 1, num)
    probs = []
    for k in range(exits):
        logits = rng.normal(0, 1, (num, classes))
        logits[np.arange(num), labels] += 1.0 + 0.8 * k + 1.2 * ease
        probs.append(softmax(logits))
    return np.stack(probs).astype(np.float32), labels
