"""MindIR export of a DVT: one graph per stage with the stage signature, a manifest that says how to run them.

Stage 1 takes the image and returns its logits and the tensors stage 2 reuses; stage k takes the image and
those tensors and returns logits (and, unless last, what stage k+1 reuses). An edge app runs stage 1,
lets confident images leave, and feeds the rest on: the gating of src/engine/adaptive.py, with the
thresholds by budget that the manifest carries.
"""

from __future__ import annotations

import json
import os

import mindspore as ms
import numpy as np
from mindspore import Tensor

from ..models import DVT
from ..models.layers import use_stock_ops

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "dvt-mindir/1"


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


def _export(cell, inputs: list[dict], path: str) -> None:
    """ms.export to `path` (.mindir); MindSpore writes it read-only, so an old file is removed first."""
    if os.path.exists(path):
        os.chmod(path, 0o600)
        os.remove(path)
    placeholders = _placeholders(inputs)
    if all(entry["shape"][0] != -1 for entry in inputs):
        placeholders = [Tensor(np.zeros(entry["shape"], np.float32)) for entry in inputs]
    ms.export(cell, *placeholders, file_name=os.path.splitext(path)[0], file_format="MINDIR")


def export_cascade(net: DVT, file_name: str, batch: int | None = None, whole_cascade: bool = False,
                   preprocess: dict | None = None, thresholds: list[dict] | None = None,
                   exit_gflops: list[float] | None = None, model_name: str = "") -> str:
    """Write `<file_name>_stage<k>.mindir` for every stage (and `<file_name>_cascade.mindir`), plus
    manifest.json beside them; returns the manifest's path."""
    net.set_train(False)
    use_stock_ops(net)  # a MindIR must run without our CPU kernel library (Lite, other machines)
    folder = os.path.dirname(os.path.abspath(file_name))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(file_name)
    stages = []
    for k, cell in enumerate(net.stages):
        inputs, outputs = stage_signature(net, k, batch)
        path = os.path.join(folder, f"{base}_stage{k + 1}.mindir")
        _export(cell, inputs, path)
        stages.append({"file": os.path.basename(path), "grid": net.spec.grids[k], "inputs": inputs,
                       "outputs": outputs})
    manifest = {"format": MANIFEST_FORMAT, "model": model_name, "num_classes": net.spec.num_classes,
                "batch_size": batch, "grids": list(net.spec.grids), "exit_gflops": exit_gflops,
                "preprocess": preprocess or {}, "stages": stages, "thresholds": thresholds or []}
    if whole_cascade:
        inputs = stage_signature(net, 0, batch)[0]
        path = os.path.join(folder, f"{base}_cascade.mindir")
        _export(net, inputs, path)
        manifest["cascade"] = {"file": os.path.basename(path), "inputs": inputs,
                               "outputs": [{"name": f"logits_exit{k + 1}", "shape": [-1 if batch is None else batch,
                                                                                  net.spec.num_classes],
                                            "dtype": "float32"} for k in range(net.num_exits)]}
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
    os.replace(tmp, manifest_path)
    return manifest_path
