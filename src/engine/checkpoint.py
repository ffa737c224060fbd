"""Checkpoints that are never half-written, carry their metadata, and restore a run exactly.

Two kinds, each a `.ckpt` with a `.json` beside it:
- a training state: model, EMA shadow (`ema.*`), optimizer moments and step, loss-scale state; `--resume`
  restores all of it. `<model>-e<epoch>.ckpt` at the end of an epoch, `<model>-e<epoch>-s<step>.ckpt` inside
  one (`save_interval_steps`); the JSON's `step` (optimizer updates done) orders them;
- `best.ckpt`: model weights only (the EMA's when EMA is on), for eval.py, export.py and `create_model`.
Both files are written all-or-nothing (src/atomic.py), JSON last: a checkpoint whose JSON exists is
complete, and a killed run leaves at worst a temp file that the next run removes. `--resume auto` takes the
newest training state that loads, skipping (and naming) damaged ones.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re

import mindspore as ms
import numpy as np
from mindspore import nn

from ..atomic import write_atomic, write_json
from ..config import ConfigError
from ..metadata import meta_path, read_meta
from ..models.weights import (
    CheckpointMismatch,
    UnreadableCheckpoint,
    load_checked,
    parameter_shapes,
    read_checkpoint,
)
from .train_step import ACCUMULATOR_PREFIX

TRAIN_STATE = "train_state"
MODEL_WEIGHTS = "model"
EMA_PREFIX = "ema."
BEST_NAME = "best"
DAMAGED_SUFFIX = ".damaged"
# The optimizer's learning-rate array: the resumed run's own schedule applies, indexed by the restored step.
SCHEDULE_PARAMETER = "learning_rate"
# Spec fields that change what a checkpoint holds; dropout rates may differ between runs.
ARCHITECTURE_FIELDS = ("family", "embed_dim", "depth", "num_heads", "mlp_ratio", "grids", "feature_reuse",
                       "relation_reuse", "num_classes", "img_size", "in_chans", "qkv_bias", "token_dim",
                       "t2t_attention", "tokenizers", "reuse_dim", "reuse_hidden")

# Config keys that a checkpoint's JSON records, in its spec or beside it (training's eval preprocessing and
# data): a command given no recipe builds, feeds and names the classes of the model the checkpoint holds.
RECIPE_SPEC_KEYS = ("num_classes", "img_size", "grids", "feature_reuse", "relation_reuse")
RECIPE_META_KEYS = ("mean", "std", "crop_pct", "interpolation", "dataset", "data_path")

log = logging.getLogger("dvt")


def save_checkpoint(save_obj, path: str, meta: dict) -> None:
    """Write a checkpoint and its JSON, each all-or-nothing, JSON last."""
    write_atomic(path, lambda tmp: ms.save_checkpoint(save_obj, tmp))
    write_json(meta_path(path), meta)


def recipe_from_checkpoint(ckpt_path: str, model_given: bool) -> dict:
    """The config keys that the JSON beside a checkpoint records (its model, the spec's classes, image size,
    grids and reuse switches, training's eval preprocessing and data), for a command given no recipe.

    A checkpoint whose JSON names no model is a ConfigError saying what to pass, unless `model_given` (the
    command line names it); a missing checkpoint gives {}, for the loader to name it."""
    if not os.path.isfile(ckpt_path):
        return {}
    meta = read_meta(ckpt_path)
    model = meta.get("model")
    if not model:
        if model_given:
            return {}
        raise ConfigError(f"no --config_path, and no {meta_path(ckpt_path)} names the model of {ckpt_path}: give "
                          "--config_path RECIPE (config/*.yaml) or --model NAME")
    spec = meta.get("spec") or {}
    recipe = {"model": model, **{key: spec[key] for key in RECIPE_SPEC_KEYS if key in spec}}
    recipe.update({key: meta[key] for key in RECIPE_META_KEYS if meta.get(key) is not None})
    return recipe


def architecture(spec_dict: dict) -> dict:
    """The architecture fields of a spec, in their JSON form (tuples become lists)."""
    return json.loads(json.dumps({key: spec_dict.get(key) for key in ARCHITECTURE_FIELDS}))


def check_architecture(meta: dict, spec_dict: dict, model_name: str, path: str) -> None:
    """Refuse a checkpoint whose JSON describes another architecture, naming what differs."""
    if not meta.get("spec"):
        return
    saved, wanted = architecture(meta["spec"]), architecture(spec_dict)
    if saved != wanted:
        diffs = [f"{key}: checkpoint {saved[key]!r}, this run {wanted[key]!r}" for key in ARCHITECTURE_FIELDS
                 if saved[key] != wanted[key]]
        raise CheckpointMismatch(f"{path} holds a {meta.get('model', '?')} model, this run builds {model_name}:\n  "
                                 + "\n  ".join(diffs))


def model_weights(params: dict, net: nn.Cell, prefer_ema: bool) -> dict:
    """The network's parameters out of a model or training checkpoint (the EMA's if asked and present)."""
    names = [p.name for p in net.get_parameters()]
    use_ema = prefer_ema and all(EMA_PREFIX + name in params for name in names)
    if use_ema:
        return {name: params[EMA_PREFIX + name] for name in names}
    if any(name.startswith(EMA_PREFIX) for name in params) or "global_step" in params:
        return {name: params[name] for name in names if name in params}
    return params


def load_model_weights(net: nn.Cell, path: str, prefer_ema: bool = True) -> dict:
    """Load a model-only or training checkpoint into `net`, strictly; returns the JSON metadata."""
    load_checked(net, model_weights(read_checkpoint(path), net, prefer_ema), path)
    return read_meta(path)


def load_pretrained(net: nn.Cell, path: str) -> list[str]:
    """Start from another run's weights; heads of another size are dropped (with a warning).

    Returns the names of the dropped parameters. Anything else that does not fit is an error.
    """
    params = model_weights(read_checkpoint(path), net, prefer_ema=True)
    shapes = parameter_shapes(net)
    dropped = [name for name, value in params.items()
               if re.search(r"(^|\.)head\.(weight|bias)$", name) and name in shapes
               and tuple(np.shape(value)) != shapes[name]]
    for name in dropped:
        del params[name]
    if dropped:
        log.warning("pretrained %s: dropped %d head parameter(s) of another size (%s); they start from scratch",
                    path, len(dropped), ", ".join(dropped))
    load_checked(net, params, path, expected={name: shape for name, shape in shapes.items() if name not in dropped})
    return dropped


def restore_newest(train_step: nn.Cell, candidates: list[str], spec_dict: dict,
                   model_name: str) -> tuple[str | None, dict | None, dict[str, str]]:
    """Restore the first of `candidates` (newest first) that loads whole: (its path, its JSON, {damaged path
    before it: why}). A checkpoint of another architecture or run shape is not damage: it stops the search with
    its error."""
    skipped = {}
    for path in candidates:
        try:
            return path, load_train_state(train_step, path, spec_dict, model_name), skipped
        except UnreadableCheckpoint as err:
            skipped[path] = str(err)
    return None, None, skipped


def load_train_state(train_step: nn.Cell, path: str, spec_dict: dict, model_name: str) -> dict:
    """Restore weights, EMA, optimizer moments and step, loss scale; returns the metadata (epoch, step)."""
    meta = read_meta(path)
    if meta.get("kind") != TRAIN_STATE:
        raise CheckpointMismatch(f"{path} is not a training checkpoint (no {os.path.basename(meta_path(path))} "
                                 "with kind train_state); use --pretrained to start from model weights")
    check_architecture(meta, spec_dict, model_name, path)
    params = read_checkpoint(path)
    params.pop(SCHEDULE_PARAMETER, None)
    expected = {name: shape for name, shape in parameter_shapes(train_step).items()
                if name != SCHEDULE_PARAMETER and not name.startswith(ACCUMULATOR_PREFIX)}
    load_checked(train_step, params, path, expected)
    return meta


class CheckpointManager:
    """Rank 0's checkpoints in a run directory: the last `keep` training states and the best weights."""

    def __init__(self, run_dir: str, model_name: str, keep: int):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.run_dir = run_dir
        self.model_name = model_name
        self.keep = keep
        os.makedirs(run_dir, exist_ok=True)

    def train_states(self) -> list[tuple[int, str]]:
        """(step, path) of every complete training checkpoint, oldest first; one whose JSON is damaged comes
        first (step -1), so that resuming tries it last and names it."""
        pattern = re.compile(re.escape(self.model_name) + r"-e\d+(-s\d+)?\.ckpt$")
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.run_dir), f"{self.model_name}-e*.ckpt")):
            if pattern.fullmatch(os.path.basename(path)) and os.path.isfile(meta_path(path)):
                try:
                    step = int(read_meta(path).get("step", -1))
                except (UnreadableCheckpoint, TypeError, ValueError):
                    step = -1
                found.append((step, path))
        return sorted(found)

    def set_aside(self, path: str) -> str:
        """Rename a damaged training state (and its JSON) to `<name>.damaged`: kept for inspection, never
        resumed, never counted or pruned as a newer state."""
        for name in (path, meta_path(path)):
            if os.path.exists(name):
                os.replace(name, name + DAMAGED_SUFFIX)
        return path + DAMAGED_SUFFIX

    def save_train_state(self, train_step: nn.Cell, epoch: int, meta: dict, mid_epoch: bool = False) -> str:
        """Save the whole training state after `epoch` complete epochs and `meta['step']` updates; inside an
        epoch (`mid_epoch`) the name says the epoch in progress and the step."""
        name = f"{self.model_name}-e{epoch + 1:04d}-s{meta['step']:08d}" if mid_epoch else \
            f"{self.model_name}-e{epoch:04d}"
        path = os.path.join(self.run_dir, name + ".ckpt")
        params = [{"name": p.name, "data": p.data} for p in train_step.get_parameters()
                  if not p.name.startswith(ACCUMULATOR_PREFIX)]
        save_checkpoint(params, path, dict(meta, kind=TRAIN_STATE, epoch=epoch))
        for _, old in self.train_states()[:-self.keep]:
            os.remove(meta_path(old))
            os.remove(old)
        return path

    def save_best(self, net: nn.Cell, meta: dict) -> str:
        """Model weights under the model's own parameter names (EMA shadows are renamed back)."""
        path = os.path.join(self.run_dir, f"{BEST_NAME}.ckpt")
        params = [{"name": name.removeprefix(EMA_PREFIX), "data": param.data}
                  for name, param in ((p.name, p) for p in net.get_parameters())]
        save_checkpoint(params, path, dict(meta, kind=MODEL_WEIGHTS))
        return path
