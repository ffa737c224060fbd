"""The JSON beside a checkpoint: one schema, written by training and the converter alike, and one reader.

The model fields are `model_meta`'s: the registry name, the spec, classes, grids, image size and the analytic
GFLOPs of every exit. Converters before this schema wrote `arch` and `analytic_gflops`; `read_meta` maps those
names, here and nowhere else, so such checkpoints still read.
"""

from __future__ import annotations

import json
import os

from .flops import exit_gflops
from .models.spec import DVTSpec
from .models.weights import UnreadableCheckpoint

LEGACY_NAMES = {"arch": "model", "analytic_gflops": "exit_gflops"}


def meta_path(ckpt_path: str) -> str:
    """The JSON beside a checkpoint: `<name>.ckpt` -> `<name>.json`."""
    return os.path.splitext(ckpt_path)[0] + ".json"


def eval_folder_of(ckpt_path: str) -> str:
    """`eval/` beside a checkpoint: where eval.py writes its results and export.py finds its thresholds.json."""
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "eval")


def model_meta(model_name: str, spec: DVTSpec) -> dict:
    """The fields that say which model a checkpoint holds and what each exit costs."""
    return {"model": model_name, "spec": spec.to_dict(), "num_classes": spec.num_classes, "grids": list(spec.grids),
            "exit_gflops": exit_gflops(spec), "img_size": spec.img_size}


def read_meta(ckpt_path: str) -> dict:
    """The JSON beside a checkpoint ({} when there is none), older names mapped to the schema's."""
    path = meta_path(ckpt_path)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UnreadableCheckpoint(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict):
        raise UnreadableCheckpoint(f"cannot read {path}: not a JSON object")
    for old, new in LEGACY_NAMES.items():
        if old in meta:
            meta.setdefault(new, meta.pop(old))
    return meta
