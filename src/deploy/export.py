"""Export to MindIR, ONNX or AIR: one graph per stage with the stage signature, a manifest that says how to run them.

Stage 1 takes the image and returns its logits and the tensors stage 2 reuses; stage k takes the image and
those tensors and returns logits (and, unless last, what stage k+1 reuses). An edge app runs stage 1,
lets confident images leave, and feeds the rest on: the gating of src/engine/adaptive.py, with the
thresholds by budget that the manifest carries.

An export owns its folder: it is built in a fresh folder beside it, which replaces the old one only when
every file is written, so a failed export leaves the previous one whole. The manifest records each file's
size and sha256, which the runner verifies before it loads anything.

Every graph's inputs are named as in the manifest (image, tokens, relations); its outputs come in the
manifest's order. ONNX files are written from the `portable` form of the network (src/models/layers.py:
the soft split as a gather, erf as a rational function, padding by concatenation, LayerNorm from means),
because MindSpore's ONNX exporter has no Im2Col, Erf or PadV3 and MindSpore Lite 2.0 runs its LayerNorm wrongly;
MindSpore exports ONNX with static shapes only, so ONNX needs a fixed batch. AIR is written only on Ascend
(MindSpore's rule).
"""

from __future__ import annotations

import os

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from ..atomic import WriteFailed, replace_folder, write_json
from ..data.transforms import eval_resize
from ..models import DVT
from ..models.layers import export_forms
from .runner import FILE_FORMATS, MANIFEST_FORMAT, file_digest

MANIFEST_NAME = "manifest.json"


class ExportError(ValueError):
    """An export that cannot be written where it was asked to go."""


def stage_signature(net: DVT, stage: int, batch: int | None) -> tuple[list[dict], list[dict]]:
    """Names and shapes (-1: dynamic batch) of a stage's inputs and outputs."""
    spec = net.spec
    b = -1 if batch is None else batch
    cell = net.stages[stage]
    inputs = [{"name": "image", "shape": [b, spec.in_chans, spec.img_size, spec.img_size]}]
    shapes = {"tokens": lambda k: [b, spec.num_tokens(k), spec.embed_dim],
              "relations": lambda k: [b, spec.depth * spec.num_heads, spec.num_tokens(k), spec.num_tokens(k)]}
    for name in cell.upstream_names:
        inputs.append({"name": name, "shape": shapes[name](stage - 1)})
    outputs = [{"name": "logits", "shape": [b, spec.num_classes]}]
    for name in cell.reusable_names:  # next_tokens: ONNX names must differ from this stage's own `tokens` input
        outputs.append({"name": f"next_{name}", "shape": shapes[name](stage)})
    for entry in inputs + outputs:
        entry["dtype"] = "float32"
    return inputs, outputs


class ImageOnly(nn.Cell):
    """A stage or cascade whose exported graph names its one input `image` (subclasses: and its upstream).

    auto_prefix=False: wrapping must not rename the caller's parameters (MindSpore prefixes them otherwise)."""

    def __init__(self, cell: nn.Cell):
        super().__init__(auto_prefix=False)
        self.cell = cell
        self.identity = ops.Identity()

    def outputs(self, results):
        """Each output through a node of its own: MindSpore's ONNX exporter names an output by renaming its
        tensor, which breaks the nodes that read it too (the tokens a stage returns also feed its head)."""
        return tuple(self.identity(result) for result in results)

    def construct(self, image):
        return self.outputs(self.cell(image))


class ImageTokens(ImageOnly):
    def construct(self, image, tokens):
        return self.outputs(self.cell(image, tokens))


class ImageRelations(ImageOnly):
    def construct(self, image, relations):
        return self.outputs(self.cell(image, relations))


class ImageTokensRelations(ImageOnly):
    def construct(self, image, tokens, relations):
        return self.outputs(self.cell(image, tokens, relations))


NAMED_SIGNATURES = {("image",): ImageOnly, ("image", "tokens"): ImageTokens,
                    ("image", "relations"): ImageRelations, ("image", "tokens", "relations"): ImageTokensRelations}


def _placeholders(signature: list[dict]) -> list[Tensor]:
    if all(entry["shape"][0] != -1 for entry in signature):
        return [Tensor(np.zeros(entry["shape"], np.float32)) for entry in signature]
    return [Tensor(shape=[None if d == -1 else d for d in entry["shape"]], dtype=ms.float32) for entry in signature]


def _export(cell: nn.Cell, inputs: list[dict], outputs: list[dict], path: str, final: str,
            file_format: str) -> dict:
    """Export `cell` to `path` (in the fresh folder), its inputs named as the manifest names them (in ONNX its
    outputs too); returns the manifest's record of the file (name, size, sha256). A failure is a WriteFailed
    naming `final`, where the file was to end up."""
    named = NAMED_SIGNATURES[tuple(entry["name"] for entry in inputs)](cell)
    stem = os.path.splitext(path)[0]
    try:
        if file_format == "ONNX":
            ms.onnx.export(named, *_placeholders(inputs), file_name=stem,
                           input_names=[entry["name"] for entry in inputs],
                           output_names=[entry["name"] for entry in outputs])
        else:
            ms.export(named, *_placeholders(inputs), file_name=stem, file_format=file_format)
        size, digest = file_digest(path)
    except (OSError, RuntimeError) as err:  # MindSpore may report a failed write as RuntimeError
        raise WriteFailed(final, err) from err
    return {"file": os.path.basename(path), "bytes": size, "sha256": digest}


def check_export_folder(folder: str) -> None:
    """Refuse to replace a folder that holds anything but an export (manifest.json, .mindir, .onnx, .air files)."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise ExportError(f"{folder} is not a folder: give --file_name inside a folder of its own")
    extensions = tuple(FILE_FORMATS.values())
    foreign = sorted(name for name in os.listdir(folder) if name != MANIFEST_NAME and not name.endswith(extensions))
    if foreign:
        raise ExportError(f"{folder} holds files that are not part of an export ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); an export replaces its whole folder: give "
                          "--file_name inside a folder of its own")


def check_file_format(file_format: str, batch: int | None, device_target: str | None = None) -> None:
    """ExportError for a format that this device (default: MindSpore's current one) or this batch cannot be
    exported to, before any work is done."""
    device_target = device_target or ms.get_context("device_target")
    if file_format not in FILE_FORMATS:
        raise ExportError(f"file format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
    if file_format == "ONNX" and batch is None:
        raise ExportError("ONNX needs a fixed batch (MindSpore exports ONNX with static shapes only): give "
                          "--batch_size N; the runner splits and pads any number of images to it")
    if file_format == "AIR" and device_target != "Ascend":
        raise ExportError(f"AIR export runs only on Ascend (this is {device_target}): "
                          "use --file_format MINDIR or ONNX here")


def preprocess_fields(config: dict, img_size: int) -> dict:
    """The manifest's `preprocess`: the eval loader's preparation (src/data/transforms.py's EvalTransform) in the
    fields the runner reads, so an exported model sees its images as evaluation did."""
    return {"img_size": img_size, "resize": eval_resize(config, img_size),
            "interpolation": "bilinear" if config["interpolation"] == "bilinear" else "bicubic",  # 'random': bicubic
            "mean": config["mean"], "std": config["std"], "layout": "NCHW", "pixel_scale": 1 / 255}


def export_cascade(net: DVT, file_name: str, *, preprocess: dict, batch: int | None = None,
                   file_format: str = "MINDIR", whole_cascade: bool = False, thresholds: list[dict] | None = None,
                   exit_gflops: list[float] | None = None, model_name: str = "",
                   class_names: list[str] | None = None) -> str:
    """Write `<file_name>_stage<k>.<ext>` for every stage (and `<file_name>_cascade.<ext>`), plus
    manifest.json, into a fresh folder that then replaces `file_name`'s folder; returns the manifest's path.

    Raises ExportError for a format that cannot be written here or a folder that holds other files,
    `src.atomic.WriteFailed` when a write fails (the old folder is then untouched)."""
    check_file_format(file_format, batch)
    if class_names is not None and len(class_names) != net.spec.num_classes:
        raise ExportError(f"{len(class_names)} class names for {net.spec.num_classes} classes")
    net.set_train(False)
    folder = os.path.dirname(os.path.abspath(file_name))
    check_export_folder(folder)
    base = os.path.basename(file_name)
    b = -1 if batch is None else batch
    extension = FILE_FORMATS[file_format]

    def build(fresh: str) -> None:
        stages = []
        for k, cell in enumerate(net.stages):
            inputs, outputs = stage_signature(net, k, batch)
            name = f"{base}_stage{k + 1}{extension}"
            entry = _export(cell, inputs, outputs, os.path.join(fresh, name), os.path.join(folder, name),
                            file_format)
            stages.append({**entry, "grid": net.spec.grids[k], "inputs": inputs, "outputs": outputs})
        manifest = {"format": MANIFEST_FORMAT, "file_format": file_format, "model": model_name,
                    "num_classes": net.spec.num_classes, "class_names": class_names, "batch_size": batch,
                    "grids": list(net.spec.grids), "exit_gflops": exit_gflops, "preprocess": preprocess,
                    "stages": stages, "thresholds": thresholds or []}
        if whole_cascade:
            inputs = stage_signature(net, 0, batch)[0]
            name = f"{base}_cascade{extension}"
            outputs = [{"name": f"logits_exit{k + 1}", "shape": [b, net.spec.num_classes], "dtype": "float32"}
                       for k in range(net.num_exits)]
            entry = _export(net, inputs, outputs, os.path.join(fresh, name), os.path.join(folder, name), file_format)
            manifest["cascade"] = {**entry, "inputs": inputs, "outputs": outputs}
        write_json(os.path.join(fresh, MANIFEST_NAME), manifest)

    with export_forms(net, portable=file_format == "ONNX"):  # the graphs must run without our kernel library
        replace_folder(folder, build)
    return os.path.join(folder, MANIFEST_NAME)
