"""MindIR export: one graph per stage with the stage signature, a manifest that says how to run them.

Stage 1 takes the image and returns its logits and the tensors stage 2 reuses; stage k takes the image and
those tensors and returns logits (and, unless last, what stage k+1 reuses). An edge app runs stage 1,
lets confident images leave, and feeds the rest on: the gating of src/engine/adaptive.py, with the
thresholds by budget that the manifest carries.

An export owns its folder: it is built in a fresh folder beside it, which replaces the old one only when
every file is written, so a failed export leaves the previous one whole. The manifest records each file's
size and sha256, which the runner verifies before it loads anything.
"""

from __future__ import annotations

import os

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..atomic import WriteFailed, replace_folder, write_json
from ..models import DVT
from ..models.layers import use_stock_ops
from .runner import MANIFEST_FORMAT, file_digest

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
    for name in cell.reusable_names:
        outputs.append({"name": name, "shape": shapes[name](stage)})
    for entry in inputs + outputs:
        entry["dtype"] = "float32"
    return inputs, outputs


def _placeholders(signature: list[dict]) -> list[Tensor]:
    return [Tensor(shape=[None if d == -1 else d for d in entry["shape"]], dtype=ms.float32) for entry in signature]


def _export(cell, inputs: list[dict], path: str, final: str) -> dict:
    """ms.export to `path` (.mindir, in the fresh folder); returns the manifest's record of the file (name,
    size, sha256). A failure is a WriteFailed naming `final`, where the file was to end up."""
    placeholders = _placeholders(inputs)
    if all(entry["shape"][0] != -1 for entry in inputs):
        placeholders = [Tensor(np.zeros(entry["shape"], np.float32)) for entry in inputs]
    try:
        ms.export(cell, *placeholders, file_name=os.path.splitext(path)[0], file_format="MINDIR")
        size, digest = file_digest(path)
    except (OSError, RuntimeError) as err:  # MindSpore may report a failed write as RuntimeError
        raise WriteFailed(final, err) from err
    return {"file": os.path.basename(path), "bytes": size, "sha256": digest}


def check_export_folder(folder: str) -> None:
    """Refuse to replace a folder that holds anything but an export (manifest.json and .mindir files)."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise ExportError(f"{folder} is not a folder: give --file_name inside a folder of its own")
    foreign = sorted(name for name in os.listdir(folder) if name != MANIFEST_NAME and not name.endswith(".mindir"))
    if foreign:
        raise ExportError(f"{folder} holds files that are not part of an export ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}); an export replaces its whole folder: give "
                          "--file_name inside a folder of its own")


def export_cascade(net: DVT, file_name: str, *, preprocess: dict, batch: int | None = None,
                   whole_cascade: bool = False, thresholds: list[dict] | None = None,
                   exit_gflops: list[float] | None = None, model_name: str = "") -> str:
    """Write `<file_name>_stage<k>.mindir` for every stage (and `<file_name>_cascade.mindir`), plus
    manifest.json, into a fresh folder that then replaces `file_name`'s folder; returns the manifest's path.

    Raises ExportError for a folder that holds other files, `src.atomic.WriteFailed` when a write fails (the
    old folder is then untouched)."""
    net.set_train(False)
    use_stock_ops(net)  # a MindIR must run without our CPU kernel library (Lite, other machines)
    folder = os.path.dirname(os.path.abspath(file_name))
    check_export_folder(folder)
    base = os.path.basename(file_name)
    b = -1 if batch is None else batch

    def build(fresh: str) -> None:
        stages = []
        for k, cell in enumerate(net.stages):
            inputs, outputs = stage_signature(net, k, batch)
            name = f"{base}_stage{k + 1}.mindir"
            entry = _export(cell, inputs, os.path.join(fresh, name), os.path.join(folder, name))
            stages.append({**entry, "grid": net.spec.grids[k], "inputs": inputs, "outputs": outputs})
        manifest = {"format": MANIFEST_FORMAT, "model": model_name, "num_classes": net.spec.num_classes,
                    "batch_size": batch, "grids": list(net.spec.grids), "exit_gflops": exit_gflops,
                    "preprocess": preprocess, "stages": stages, "thresholds": thresholds or []}
        if whole_cascade:
            inputs = stage_signature(net, 0, batch)[0]
            name = f"{base}_cascade.mindir"
            entry = _export(net, inputs, os.path.join(fresh, name), os.path.join(folder, name))
            manifest["cascade"] = {**entry, "inputs": inputs,
                                   "outputs": [{"name": f"logits_exit{k + 1}", "shape": [b, net.spec.num_classes],
                                                "dtype": "float32"} for k in range(net.num_exits)]}
        write_json(os.path.join(fresh, MANIFEST_NAME), manifest)

    replace_folder(folder, build)
    return os.path.join(folder, MANIFEST_NAME)
