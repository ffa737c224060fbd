"""MindSpore Lite 2.0 on our ONNX stages: convert each to .ms, run it, compare with MindSpore, run the cascade.

usage: python scripts/lite/check_lite.py --dvt_lite BUILD/dvt_lite --work DIR [--models dvt_tiny_t2t dvt_tiny_deit]

Called by scripts/check_lite.sh, which downloads Lite and compiles `dvt_lite` (scripts/lite/dvt_lite.cc). For each
model: random weights (perturbed, so no LayerNorm is the identity and no bias is zero), ONNX export of every stage
at a fixed batch (src/deploy/export.py, as export.py writes it), Lite's converter on each file, each .ms stage run
in Lite on images and upstream tensors from MindSpore (max abs diff of every output printed), then early exit with
the Lite stages (src/deploy/runner.py's gating, any number of images on the fixed batch) against MindSpore's
AdaptiveCascade: exits and predictions must be equal. Lite runs in its own process, one per stage call: its
libmindspore_core.so is not MindSpore 2.10's. Exit code 1 with a one-line reason when a step fails.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402

from src.deploy.export import export_cascade  # noqa: E402
from src.deploy.runner import Stage, exit_early, fixed_batch, read_manifest  # noqa: E402
from src.engine.adaptive import AdaptiveCascade  # noqa: E402
from src.models import create_model  # noqa: E402

BATCH = 4  # the exported batch
IMAGES = 10  # not a multiple of it: the runner's padding is checked in Lite too
TOLERANCE = 1e-4
TIMEOUT = 300  # seconds for one conversion or one stage call (a tiny stage takes about one)
PREPROCESS = {"img_size": 32, "resize": 32, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "layout": "NCHW", "pixel_scale": 1 / 255}


class LiteFailed(RuntimeError):
    """A step of dvt_lite failed; the message is its own one-line reason, the log file has Lite's output."""


def dvt_lite(binary: str, args: list[str], log: str) -> str:
    """Run dvt_lite with `args`; its stdout, Lite's log lines go to `log`."""
    with open(log, "w", encoding="utf-8") as handle:
        try:
            done = subprocess.run([binary, *args], stdout=subprocess.PIPE, stderr=handle, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise LiteFailed(f"dvt_lite {args[0]} {args[1]} did not finish in {TIMEOUT} s (full log: {log})") from None
    if done.returncode != 0:
        with open(log, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        reason = [line for line in lines if line.startswith("dvt_lite:")] or lines[-1:] or ["no message"]
        errors = [line for line in lines if line.startswith("[ERROR]")][-3:]
        raise LiteFailed("; ".join([reason[-1], *errors]) + f" (full log: {log})")
    return done.stdout


def lite_stage(binary: str, model: str, scratch: str) -> Stage:
    """One .ms stage as the runner's Stage: arrays in, arrays out, through one dvt_lite process per call."""

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        inputs = []
        for i, array in enumerate(arrays):
            path = os.path.join(scratch, f"input{i}.bin")
            np.ascontiguousarray(array, np.float32).tofile(path)
            inputs.append(f"{path}:{','.join(str(d) for d in array.shape)}")
        prefix = os.path.join(scratch, "output")
        lines = dvt_lite(binary, ["run", model, prefix, *inputs], os.path.join(scratch, "run.log")).splitlines()
        outputs = []
        for k, line in enumerate(lines):
            shape = [int(d) for d in line.split()[2].split(",")]
            outputs.append(np.fromfile(f"{prefix}{k}.bin", np.float32).reshape(shape))
        return outputs

    return run


def perturbed(name: str, seed: int):
    """A cascade with random weights plus noise on every tensor, in eval mode."""
    ms.set_seed(seed)
    net = create_model(name, drop_path_rate=0.0)
    rng = np.random.default_rng(seed)
    for param in net.get_parameters():
        value = param.asnumpy()
        param.set_data(ms.Tensor((value + rng.normal(0, 0.05, value.shape)).astype(np.float32)))
    net.set_train(False)
    return net


def midway_thresholds(net, images: np.ndarray) -> list[float]:
    """For every exit but the last, a threshold midway between two neighbouring top probabilities near the
    median, so that about half leave and float rounding cannot flip a decision."""
    thresholds = []
    for logits in net(ms.Tensor(images))[:-1]:
        x = logits.asnumpy().astype(np.float64)
        top = np.sort(1.0 / np.exp(x - x.max(1, keepdims=True)).sum(1))
        middle = len(top) // 2
        thresholds.append(float(top[middle - 1] + top[middle]) / 2)
    return thresholds + [0.0]


def check_model(name: str, binary: str, work: str) -> bool:
    """Export, convert, compare every stage and the early-exit cascade of one model; True when all agree."""
    net = perturbed(name, 1)
    exported = os.path.join(work, name, "onnx")  # the export owns this folder: Lite's files go beside it
    folder = os.path.join(work, name, "lite")
    os.makedirs(folder, exist_ok=True)
    manifest = read_manifest(export_cascade(net, os.path.join(exported, name), preprocess=PREPROCESS, batch=BATCH,
                                            file_format="ONNX", model_name=name))
    images = np.random.default_rng(0).normal(size=(IMAGES, 3, 32, 32)).astype(np.float32)
    stages, upstream, agree = [], [], True
    for k, entry in enumerate(manifest["stages"]):
        onnx = os.path.join(exported, entry["file"])
        prefix = os.path.join(folder, os.path.splitext(entry["file"])[0])
        dvt_lite(binary, ["convert", onnx, prefix], prefix + "_convert.log")
        scratch = f"{prefix}_run"  # one stage call's inputs, outputs and log
        os.makedirs(scratch, exist_ok=True)
        stage = fixed_batch(lite_stage(binary, prefix + ".ms", scratch), BATCH)
        stages.append(stage)
        expected = [out.asnumpy() for out in net.stages[k](ms.Tensor(images), *(ms.Tensor(u) for u in upstream))]
        got = stage([images, *upstream])
        shapes = [list(a.shape) for a in got]
        if shapes != [[IMAGES, *out["shape"][1:]] for out in entry["outputs"]]:
            raise LiteFailed(f"{name} stage {k + 1}: Lite's outputs have shapes {shapes}, the manifest says "
                             f"{[out['shape'] for out in entry['outputs']]} (at batch {BATCH})")
        diffs = [float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True)]
        scale = max(float(np.abs(b).max()) for b in expected)
        names = ", ".join(f"{out['name']} {d:.2e}" for out, d in zip(entry["outputs"], diffs, strict=True))
        agree &= max(diffs) <= TOLERANCE
        print(f"{name} stage {k + 1}: ONNX -> .ms converted, {IMAGES} images in Lite vs MindSpore: max abs diff "
              f"{max(diffs):.2e} ({names}; largest output value {scale:.3g})", flush=True)
        upstream = expected[1:]
    thresholds = midway_thresholds(net, images)
    adaptive = AdaptiveCascade(net)
    adaptive.set_thresholds(thresholds)
    want = adaptive(ms.Tensor(images))
    got = exit_early(stages, images, thresholds)
    same = bool(np.array_equal(got.exits, want.exits) and np.array_equal(got.predictions, want.predictions))
    agree &= same
    counts = " / ".join(str(int((got.exits == k).sum())) for k in range(len(stages)))
    print(f"{name} early exit in Lite (thresholds {', '.join(f'{t:.4f}' for t in thresholds[:-1])}): images per exit "
          f"{counts}; exits and predictions {'equal' if same else 'DIFFER from'} MindSpore's AdaptiveCascade; max "
          f"confidence diff {float(np.abs(got.confidences - want.confidences).max()):.2e}", flush=True)
    return agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dvt_lite", required=True, help="the binary built from scripts/lite/dvt_lite.cc")
    parser.add_argument("--work", required=True, help="folder for the exports, .ms files and Lite's logs")
    parser.add_argument("--models", nargs="+", default=["dvt_tiny_t2t", "dvt_tiny_deit"])
    args = parser.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    agree = True
    for name in args.models:
        try:
            agree &= check_model(name, os.path.abspath(args.dvt_lite), os.path.abspath(args.work))
        except LiteFailed as err:
            print(f"check_lite: error: {name}: {err}", file=sys.stderr, flush=True)
            agree = False
    if not agree:
        print("check_lite: error: a stage failed or differs from MindSpore, or the early exit does (see above)",
              file=sys.stderr)
        return 1
    print(f"check_lite: every stage within {TOLERANCE:g} of MindSpore, the same exits and predictions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
