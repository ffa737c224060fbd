"""Run an exported DVT with early exit: the file an edge app copies (NumPy, Pillow, and a MindIR runtime).

    python -m src.deploy.runner --manifest export/manifest.json --budget 1.5 cat.jpg dog.png

Reads manifest.json (written by export.py), preprocesses images as the model was evaluated (short side to
`resize` with PIL, centre crop, normalise), runs stage 1 on all of them, lets each image leave at the first
exit whose top probability reaches that exit's threshold for the chosen budget, and runs the next stage only
on the rest. The runtime is MindSpore Lite when `mindspore_lite` is installed, MindSpore's `nn.GraphCell`
otherwise; both sit behind `load_stage`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

Stage = Callable[[list[np.ndarray]], list[np.ndarray]]
PIL_RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or names files that are not there."""


def read_manifest(path: str) -> dict:
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            manifest = json.load(handle)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from err
    for key in ("stages", "preprocess", "num_classes"):
        if key not in manifest:
            raise ManifestError(f"{path} lacks '{key}'")
    folder = os.path.dirname(os.path.abspath(path))
    missing = [s["file"] for s in manifest["stages"] if not os.path.isfile(os.path.join(folder, s["file"]))]
    if missing:
        raise ManifestError(f"{path} names stage file(s) that are missing in {folder}: {', '.join(missing)}")
    return manifest


def _lite_stage(path: str) -> Stage:
    import mindspore_lite as mslite

    context = mslite.Context()
    context.target = ["cpu"]
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.MINDIR, context)

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        inputs = model.get_inputs()
        model.resize(inputs, [list(a.shape) for a in arrays])
        for tensor, array in zip(inputs, arrays, strict=True):
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return [out.get_data_to_numpy() for out in model.predict(inputs)]

    return run


def _mindspore_stage(path: str) -> Stage:
    import mindspore as ms
    from mindspore import nn

    cell = nn.GraphCell(ms.load(path))

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        outputs = cell(*[ms.Tensor(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays])
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return [out.asnumpy() for out in outputs]

    return run


def runtime() -> str:
    """'lite' when MindSpore Lite is installed, else 'mindspore'."""
    try:
        import mindspore_lite  # noqa: F401
    except ImportError:
        return "mindspore"
    return "lite"


def load_stage(path: str, backend: str | None = None) -> Stage:
    """A callable running one exported stage: list of input arrays in, list of output arrays out."""
    return (_lite_stage if (backend or runtime()) == "lite" else _mindspore_stage)(path)


def preprocess(paths: list[str], config: dict) -> np.ndarray:
    """Images to a normalised (B, 3, S, S) float32 batch, as eval.py prepares them."""
    size, resize = config["img_size"], config["resize"]
    mean = np.asarray(config["mean"], np.float32)
    std = np.asarray(config["std"], np.float32)
    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        width, height = image.size
        if min(width, height) != resize:
            new_size = ((resize, int(resize * height / width)) if width <= height
                        else (int(resize * width / height), resize))
            image = image.resize(new_size, PIL_RESAMPLING.get(config.get("interpolation"), Image.BICUBIC))
            width, height = image.size
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
        batch.append(((pixels - mean) / std).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def thresholds_for_budget(manifest: dict, budget: float) -> list[float]:
    """The thresholds solved for the largest budget that does not exceed `budget`."""
    rows = sorted((row["budget_gflops"], row["thresholds"]) for row in manifest.get("thresholds", []))
    fitting = [thresholds for solved, thresholds in rows if solved <= budget + 1e-12]
    if not fitting:
        smallest = f"the smallest is {rows[0][0]:.4g}" if rows else "the manifest holds none (export with eval's"
        raise ValueError(f"no thresholds for {budget:.4g} GFLOPs: {smallest}"
                         + (" thresholds.json)" if not rows else ""))
    return fitting[-1]


@dataclass
class Decision:
    predictions: np.ndarray
    confidences: np.ndarray
    exits: np.ndarray


class CascadeRunner:
    """The exported stages with early-exit gating on the host."""

    def __init__(self, manifest_path: str, backend: str | None = None):
        self.manifest = read_manifest(manifest_path)
        folder = os.path.dirname(os.path.abspath(manifest_path))
        self.backend = backend or runtime()
        self.stages = [load_stage(os.path.join(folder, s["file"]), self.backend) for s in self.manifest["stages"]]

    def run(self, images: np.ndarray, thresholds: list[float]) -> Decision:
        batch = len(images)
        predictions, confidences = np.zeros(batch, np.int64), np.zeros(batch, np.float64)
        exits = np.zeros(batch, np.int64)
        remaining, inputs, upstream = np.arange(batch), images, []
        last = len(self.stages) - 1
        for k, stage in enumerate(self.stages):
            outputs = stage([inputs, *upstream])
            logits = outputs[0].astype(np.float64)
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            confidence = probs.max(1)
            leave = np.ones(len(remaining), bool) if k == last else confidence >= thresholds[k]
            chosen = remaining[leave]
            predictions[chosen], confidences[chosen], exits[chosen] = probs.argmax(1)[leave], confidence[leave], k
            stay = ~leave
            if not stay.any():
                break
            remaining, inputs, upstream = remaining[stay], inputs[stay], [out[stay] for out in outputs[1:]]
        return Decision(predictions, confidences, exits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with an exported DVT, exiting early.")
    parser.add_argument("--manifest", required=True, help="manifest.json written by export.py")
    parser.add_argument("--budget", type=float, required=True, help="GFLOPs per image (picks the thresholds)")
    parser.add_argument("--backend", choices=("lite", "mindspore"), help="default: lite when installed")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        runner = CascadeRunner(args.manifest, args.backend)
        thresholds = thresholds_for_budget(runner.manifest, args.budget)
        decision = runner.run(preprocess(args.images, runner.manifest["preprocess"]), thresholds)
    except (ManifestError, ValueError) as err:
        print(f"runner: error: {err}", file=sys.stderr)
        return 1
    names = runner.manifest.get("class_names") or []
    for path, label, confidence, exit_index in zip(args.images, decision.predictions, decision.confidences,
                                                   decision.exits, strict=True):
        shown = names[label] if label < len(names) else str(label)
        print(f"{path}: {shown} (confidence {confidence:.3f}, exit {exit_index + 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
