"""Run an exported DVT with early exit: the file an edge app copies (NumPy, Pillow, and a runtime).

    python -m src.deploy.runner --manifest export/manifest.json --budget 1.5 cat.jpg dog.png

Reads manifest.json (written by export.py), checks its schema and every file's size and sha256 before it
loads anything (a one-line error names what differs), preprocesses images with the manifest's fields (8-bit
RGB by `to_rgb`, short side to `resize` with its `interpolation`, centre crop to `img_size`, times
`pixel_scale`, normalise by `mean` / `std`, `layout`), runs stage 1 on all of them, lets each image leave at
the first exit whose top probability reaches that exit's threshold for the chosen budget, and runs the next
stage only on the rest. A fixed-batch export takes any number of images: they are split into its batch and
the last piece is padded with zeros, whose rows are dropped (every row of a stage is computed on its own).

Runtimes, behind one `Stage` interface (`load_stage`): onnxruntime for ONNX exports; for MindIR, MindSpore
Lite when `mindspore_lite` is installed, else MindSpore's `nn.GraphCell`. AIR files are for Ascend's own
tools. A runtime that is not installed is a one-line error saying how to install it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

Stage = Callable[[list[np.ndarray]], list[np.ndarray]]
PIL_RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
LAYOUTS = ("NCHW", "NHWC")
# /2: every file's size and sha256 are recorded; /3: file_format, class_names, any format's files
MANIFEST_FORMAT = "dvt-export/3"
FILE_FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
BACKENDS = {"MINDIR": ("lite", "mindspore"), "ONNX": ("onnxruntime",), "AIR": ()}
INSTALL = {"onnxruntime": "pip install -r requirements-onnx.txt",
           "lite": "pip install mindspore-lite of the MindSpore version that exported the model",
           "mindspore": "pip install -r requirements.txt"}


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or names files that are not there or not what it recorded."""


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return os.path.getsize(path), digest.hexdigest()


def _is_number(value) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # JSON reads 1e400 as inf, but 1 followed by 400 zeros as an int
        return False


def _require(entry: dict, key: str, kind: type, where: str):
    if key not in entry:
        raise ManifestError(f"{where} lacks '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{where}: '{key}' must be {kind.__name__}, not {type(value).__name__} {value!r}")
    return value


def threshold_rows(rows, num_exits: int, source: str) -> list[tuple[float, list[float]]]:
    """Check thresholds-by-budget rows ({"budget_gflops": B, "thresholds": [one per exit]}, as eval.py's
    thresholds.json and the manifest hold them); returns (budget, thresholds) by increasing budget."""
    if not isinstance(rows, list):
        raise ValueError(f"{source}: the thresholds must be a list of rows, not {type(rows).__name__}")
    table = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "budget_gflops" not in row or "thresholds" not in row:
            raise ValueError(f"{source}: row {i} must hold 'budget_gflops' and 'thresholds'")
        budget, values = row["budget_gflops"], row["thresholds"]
        if not _is_number(budget) or budget <= 0:
            raise ValueError(f"{source}: row {i}: budget_gflops must be a positive finite number, not {budget!r}")
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise ValueError(f"{source}: row {i} ({budget:.4g} GFLOPs): thresholds must be a list of finite numbers")
        if len(values) != num_exits:
            raise ValueError(f"{source}: row {i} ({budget:.4g} GFLOPs) holds {len(values)} threshold(s) for "
                             f"{num_exits} exits: give one per exit (the last exit's is not used)")
        table.append((float(budget), [float(v) for v in values]))
    return sorted(table)


def _check_file_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where} must be an object, not {type(entry).__name__}")
    name = _require(entry, "file", str, where)
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ManifestError(f"{where}: file {name!r} must be a plain file name (the files sit beside the manifest)")
    if _require(entry, "bytes", int, where) < 0:
        raise ManifestError(f"{where}: 'bytes' must not be negative")
    digest = _require(entry, "sha256", str, where)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ManifestError(f"{where}: 'sha256' must be 64 lower-case hex digits, not {digest!r}")
    _require(entry, "inputs", list, where)
    _require(entry, "outputs", list, where)
    return entry


def check_manifest(manifest, path: str) -> list[dict]:
    """Check the manifest's schema; returns its file entries (the stages, then the whole cascade if any)."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} must hold a JSON object, not {type(manifest).__name__}")
    found = manifest.get("format")
    if found != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: format {found!r} is not {MANIFEST_FORMAT!r}: export the model again with "
                            "this version's export.py" if "format" in manifest else f"{path} lacks 'format'")
    num_classes = _require(manifest, "num_classes", int, path)
    if num_classes < 1:
        raise ManifestError(f"{path}: 'num_classes' must be positive")
    if _require(manifest, "file_format", str, path) not in FILE_FORMATS:
        raise ManifestError(f"{path}: file_format {manifest['file_format']!r} is not one of {', '.join(FILE_FORMATS)}")
    batch = manifest.get("batch_size")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ManifestError(f"{path}: 'batch_size' must be null (dynamic) or a positive int, not {batch!r}")
    names = manifest.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes
                              or not all(isinstance(name, str) for name in names)):
        raise ManifestError(f"{path}: 'class_names' must be null or {num_classes} strings")
    stages = _require(manifest, "stages", list, path)
    if not stages:
        raise ManifestError(f"{path}: 'stages' is empty")
    entries = [_check_file_entry(stage, f"{path}: stage {k}") for k, stage in enumerate(stages, 1)]
    if "cascade" in manifest:
        entries.append(_check_file_entry(manifest["cascade"], f"{path}: cascade"))
    config = _require(manifest, "preprocess", dict, path)
    where = f"{path}: preprocess"
    for key in ("img_size", "resize"):
        if _require(config, key, int, where) < 1:
            raise ManifestError(f"{where}: '{key}' must be positive")
    for key in ("mean", "std"):
        values = _require(config, key, list, where)
        if len(values) != 3 or not all(_is_number(v) for v in values) or (key == "std" and min(values) <= 0):
            raise ManifestError(f"{where}: '{key}' must be 3 finite numbers (RGB){', positive' * (key == 'std')}")
    if _require(config, "interpolation", str, where) not in PIL_RESAMPLING:
        raise ManifestError(f"{where}: interpolation {config['interpolation']!r} is not one of "
                            f"{', '.join(PIL_RESAMPLING)}")
    if _require(config, "layout", str, where) not in LAYOUTS:
        raise ManifestError(f"{where}: layout {config['layout']!r} is not one of {', '.join(LAYOUTS)}")
    scale = config.get("pixel_scale")
    if not _is_number(scale) or scale <= 0:
        raise ManifestError(f"{where}: 'pixel_scale' must be a positive finite number, not {scale!r}")
    try:
        threshold_rows(manifest.get("thresholds", []), len(stages), f"{path}: thresholds")
    except ValueError as err:
        raise ManifestError(str(err)) from None
    return entries


def verify_files(entries: list[dict], folder: str, path: str) -> None:
    """Every file the manifest names is there with the size and sha256 it recorded."""
    missing = [e["file"] for e in entries if not os.path.isfile(os.path.join(folder, e["file"]))]
    if missing:
        raise ManifestError(f"{path} names file(s) that are missing in {folder}: {', '.join(missing)}")
    for entry in entries:
        file = os.path.join(folder, entry["file"])
        size, digest = file_digest(file)
        if size != entry["bytes"]:
            raise ManifestError(f"{file} is {size} bytes, the manifest recorded {entry['bytes']}: the export is "
                                "incomplete or was changed; export again")
        if digest != entry["sha256"]:
            raise ManifestError(f"{file}: sha256 {digest[:16]}... differs from the manifest's "
                                f"{entry['sha256'][:16]}...: the file was changed; export again")


def read_manifest(path: str) -> dict:
    """Read manifest.json, check its schema and verify every file it names (size, sha256)."""
    if not os.path.isfile(path):
        raise ManifestError(f"manifest not found: {path}" + (" (it is a directory)" if os.path.isdir(path) else ""))
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"cannot read {path}: {err}") from err
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err
    entries = check_manifest(manifest, path)
    verify_files(entries, os.path.dirname(os.path.abspath(path)), path)
    return manifest


class RuntimeMissing(RuntimeError):
    """The runtime a backend needs is not installed; `str()` says how to install it."""


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


def _onnxruntime_stage(path: str) -> Stage:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [entry.name for entry in session.get_inputs()]  # the manifest's names: export names them so

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in zip(names, arrays, strict=True)}
        return session.run(None, feeds)

    return run


STAGE_LOADERS = {"lite": _lite_stage, "mindspore": _mindspore_stage, "onnxruntime": _onnxruntime_stage}
RUNTIME_MODULES = {"lite": "mindspore_lite", "mindspore": "mindspore", "onnxruntime": "onnxruntime"}


def _installed(backend: str) -> bool:
    try:
        importlib.import_module(RUNTIME_MODULES[backend])
    except ImportError:
        return False
    return True


def choose_backend(file_format: str, backend: str | None = None) -> str:
    """The backend that runs `file_format`: the one asked for, else the format's first installed one.

    ValueError for a backend that cannot run the format; RuntimeMissing (saying how to install it) when the
    runtime is not installed."""
    choices = BACKENDS[file_format]
    if not choices:
        raise ValueError(f"{file_format} files run only with Ascend's own tools (ACL), not with this runner: "
                         "export MINDIR or ONNX")
    if backend is not None and backend not in choices:
        raise ValueError(f"the {backend} backend cannot run {file_format} files: use {' or '.join(choices)}")
    for candidate in (backend,) if backend else choices:
        if _installed(candidate):
            return candidate
    wanted = backend or choices[-1]
    raise RuntimeMissing(f"the {wanted} runtime for {file_format} files is not installed: {INSTALL[wanted]}")


def runtime_description(backend: str) -> str:
    """'onnxruntime 1.32.0', 'mindspore 2.10.0 (GraphCell)', ...: what the runner says it runs on."""
    module = importlib.import_module(RUNTIME_MODULES[backend])
    detail = {"mindspore": " (nn.GraphCell)", "lite": "", "onnxruntime": " (CPUExecutionProvider)"}[backend]
    return f"{RUNTIME_MODULES[backend]} {getattr(module, '__version__', '?')}{detail}"


def load_stage(path: str, backend: str) -> Stage:
    """A callable running one exported stage: list of input arrays in, list of output arrays out."""
    return STAGE_LOADERS[backend](path)


def fixed_batch(stage: Stage, batch: int) -> Stage:
    """A stage exported for exactly `batch` rows, run on any number: pieces of `batch`, the last one padded with
    zeros whose output rows are dropped (no op of a stage mixes rows, so padding cannot change a real row)."""

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        count = len(arrays[0])
        pieces = []
        for start in range(0, count, batch):
            piece = [a[start:start + batch] for a in arrays]
            real = len(piece[0])
            if real < batch:
                piece = [np.concatenate([a, np.zeros((batch - real, *a.shape[1:]), a.dtype)]) for a in piece]
            pieces.append([out[:real] for out in stage(piece)])
        return [np.concatenate(parts) for parts in zip(*pieces, strict=True)]

    return run


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB the way the model saw its training images (src/data/sources.py decodes through this too).

    Alpha (RGBA, LA, PA, palette transparency) is dropped, not composited, as torchvision's loader does;
    16-bit greyscale (I;16, I;16B, ...) and I, in which PIL decodes 16-bit PNG / PGM / TIFF, keep their top
    byte (x >> 8, values clipped to 0..65535), where PIL's own conversion clips at 255; F is taken as 0..1
    (x * 255, rounded, clipped) and must be finite; CMYK, YCbCr and the rest convert with PIL.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        grey = (np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.asarray(image, np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{int((~np.isfinite(values)).sum())} pixel(s) of the float image are NaN or Inf")
        grey = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif mode in ("P", "PA"):
        return image.convert("RGBA").convert("RGB")  # palette colours, transparency dropped, no warning
    else:
        return image.convert("RGB")
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def preprocess(paths: list[str], config: dict) -> np.ndarray:
    """Images to the float32 batch the manifest's `preprocess` describes (eval.py's preparation)."""
    size, resize = config["img_size"], config["resize"]
    mean = np.asarray(config["mean"], np.float32)
    std = np.asarray(config["std"], np.float32)
    scale = np.float32(config["pixel_scale"])
    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                image = to_rgb(image)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        width, height = image.size
        if min(width, height) != resize:
            new_size = ((resize, int(resize * height / width)) if width <= height
                        else (int(resize * width / height), resize))
            image = image.resize(new_size, PIL_RESAMPLING[config["interpolation"]])
            width, height = image.size
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) * scale
        normalised = (pixels - mean) / std  # HWC
        batch.append(normalised.transpose(2, 0, 1) if config["layout"] == "NCHW" else normalised)
    return np.stack(batch).astype(np.float32)


def read_budget(text: str) -> float:
    """A budget in GFLOPs per image: a positive finite number."""
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"--budget must be a positive number of GFLOPs per image, not {text!r}")
    return budget


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


def exit_early(stages: list[Stage], images: np.ndarray, thresholds: list[float]) -> Decision:
    """Run stage 1 on every image, let each leave at the first exit whose top probability reaches its threshold,
    and run each later stage only on the images still there (with their rows of what the stage reuses)."""
    if len(thresholds) != len(stages):
        raise ValueError(f"{len(thresholds)} threshold(s) for {len(stages)} exits: give one per exit")
    batch = len(images)
    predictions, confidences = np.zeros(batch, np.int64), np.zeros(batch, np.float64)
    exits = np.zeros(batch, np.int64)
    remaining, inputs, upstream = np.arange(batch), images, []
    last = len(stages) - 1
    for k, stage in enumerate(stages):
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


class CascadeRunner:
    """The exported stages with early-exit gating on the host."""

    def __init__(self, manifest_path: str, backend: str | None = None):
        self.manifest = read_manifest(manifest_path)
        folder = os.path.dirname(os.path.abspath(manifest_path))
        self.backend = choose_backend(self.manifest["file_format"], backend)
        self.stages = [load_stage(os.path.join(folder, s["file"]), self.backend) for s in self.manifest["stages"]]
        if self.manifest["batch_size"] is not None:
            self.stages = [fixed_batch(stage, self.manifest["batch_size"]) for stage in self.stages]

    def run(self, images: np.ndarray, thresholds: list[float]) -> Decision:
        """Predictions, confidences and exits of `images` (preprocessed) under one threshold per exit."""
        return exit_early(self.stages, images, thresholds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Classify images with an exported DVT, exiting early.")
    parser.add_argument("--manifest", required=True, help="manifest.json written by export.py, or its folder")
    parser.add_argument("--budget", required=True, help="GFLOPs per image (picks the thresholds)")
    parser.add_argument("--backend", choices=tuple(STAGE_LOADERS),
                        help="default: onnxruntime for ONNX; for MindIR lite when installed, else mindspore")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    try:
        budget = read_budget(args.budget)
        manifest = args.manifest
        if os.path.isdir(manifest):
            manifest = os.path.join(manifest, "manifest.json")
        runner = CascadeRunner(manifest, args.backend)
        print(f"runtime: {runtime_description(runner.backend)}, {runner.manifest['file_format']} files, "
              f"batch {runner.manifest['batch_size'] or 'dynamic'}", flush=True)
        thresholds = thresholds_for_budget(runner.manifest, budget)
        decision = runner.run(preprocess(args.images, runner.manifest["preprocess"]), thresholds)
    except (ManifestError, ValueError, OSError, RuntimeError) as err:  # RuntimeError: the runtime's own
        print(f"runner: error: {(str(err).strip() or type(err).__name__).splitlines()[0]}", file=sys.stderr)
        return 1
    names = runner.manifest.get("class_names") or []
    for path, label, confidence, exit_index in zip(args.images, decision.predictions, decision.confidences,
                                                   decision.exits, strict=True):
        shown = names[label] if label < len(names) else str(label)
        print(f"{path}: {shown} (confidence {confidence:.3f}, exit {exit_index + 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
