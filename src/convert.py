"""Official PyTorch DVT checkpoint -> MindSpore checkpoint plus a JSON of its metadata.

The official release is a `torch.save`d dict: `model_state_dict` and the evaluation records `flops`,
`anytime_classification`, `dynamic_threshold`, `budgeted_batch_classification`. The name mapping is
all here, in `official_to_mindspore`; torch is needed only to read the file.
"""

from __future__ import annotations

import os
import re

import numpy as np

from .atomic import write_atomic, write_json
from .metadata import meta_path, model_meta
from .models.registry import model_spec
from .models.weights import compare_parameters

STAGE_PREFIXES = {"less_less_token.": 0, "less_token.": 1, "normal_token.": 2}
RENAMES = (
    (re.compile(r"^tokens_to_token\.|^patch_embed\."), "tokenizer."),
    (re.compile(r"\.feature_resuse_mlp\.0\."), ".feature_reuse.norm."),
    (re.compile(r"\.feature_resuse_mlp\.1\."), ".feature_reuse.mlp."),
    (re.compile(r"^relation_reuse_conv\.0\."), "relation_reuse.fc1."),
    (re.compile(r"^relation_reuse_conv\.2\."), "relation_reuse.fc2."),
)
METADATA_KEYS = ("flops", "anytime_classification", "dynamic_threshold", "budgeted_batch_classification")


class ConversionError(ValueError):
    """The source checkpoint cannot be converted to the requested architecture."""


def _stage_name(name: str) -> str:
    """Official name -> our name inside the stage list ('less_token.x' -> 'stages.1.x')."""
    for prefix, stage in STAGE_PREFIXES.items():
        if name.startswith(prefix):
            return f"stages.{stage}.{_inner_name(name[len(prefix):])}"
    return f"stages.0.{_inner_name(name)}"  # a plain backbone has no stage prefix


def _inner_name(name: str) -> str:
    for pattern, replacement in RENAMES:
        name = pattern.sub(replacement, name)
    return name


def official_to_mindspore(state_dict: dict[str, np.ndarray], target_shapes: dict[str, tuple],
                          source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename and reshape official parameters to ours; any mismatch is a ConversionError naming it.

    LayerNorm `weight`/`bias` become `gamma`/`beta`; the relation-reuse 1x1 conv weights (out, in, 1, 1)
    become matrices (out, in) and their biases columns (out, 1).
    """
    converted = {}
    for name, value in state_dict.items():
        name = name[len("module."):] if name.startswith("module.") else name
        ours = _stage_name(name)
        if ours not in target_shapes:
            for torch_suffix, ms_suffix in ((".weight", ".gamma"), (".bias", ".beta")):
                if ours.endswith(torch_suffix) and ours[:-len(torch_suffix)] + ms_suffix in target_shapes:
                    ours = ours[:-len(torch_suffix)] + ms_suffix
        value = np.asarray(value, dtype=np.float32)
        if ".relation_reuse." in ours and ours in target_shapes and value.size == np.prod(target_shapes[ours]):
            value = value.reshape(target_shapes[ours])
        if ours in converted:
            raise ConversionError(f"{source}: two parameters map to {ours}")
        converted[ours] = value
    try:
        compare_parameters(target_shapes, {k: v.shape for k, v in converted.items()}, source)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    return converted


def infer_num_classes(state_dict: dict[str, np.ndarray]) -> int:
    heads = [np.shape(v)[0] for k, v in state_dict.items() if k.endswith("head.weight")]
    if not heads:
        raise ConversionError("no classifier head ('...head.weight') in the checkpoint: cannot read num_classes")
    return int(heads[-1])


def read_torch_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict as NumPy, metadata) of an official `.pth.tar`; needs torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source checkpoint not found: {path}")
    try:
        import torch
    except ImportError:
        raise ImportError("reading a PyTorch checkpoint needs torch: pip install -r requirements-convert.txt") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, unpickling refused
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {err}") from err
    if not isinstance(blob, dict):
        raise ConversionError(f"{path} holds a {type(blob).__name__}, not a checkpoint dict")
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(blob.get(key), dict):
            state, meta = blob[key], {k: blob[k] for k in METADATA_KEYS if k in blob}
            break
    else:
        state, meta = blob, {}
    arrays = {}
    for name, value in state.items():
        if not hasattr(value, "detach"):
            raise ConversionError(f"{path}: entry {name!r} of the state dict is not a tensor")
        arrays[name] = value.detach().float().numpy()
    return arrays, {k: _plain(v) for k, v in meta.items()}


def _plain(value):
    """Tensors and nested lists of them -> plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def convert_checkpoint(src: str, arch: str, dst: str) -> dict:
    """Convert `src` (official .pth.tar) for model `arch`; write `dst` (.ckpt) and `dst` minus .ckpt + .json.

    Both are written whole or not at all: the checkpoint to a temp name, then the JSON, then the checkpoint is
    renamed, so a failure (`src.atomic.WriteFailed`) leaves an earlier conversion at `dst` as it was. Returns
    the metadata written to the JSON.
    """
    import mindspore as ms

    from .models.weights import spec_parameter_shapes

    state, meta = read_torch_checkpoint(src)
    num_classes = infer_num_classes(state)
    spec = model_spec(arch, num_classes=num_classes)
    params = official_to_mindspore(state, spec_parameter_shapes(spec), source=src)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    records = [{"name": name, "data": ms.Tensor(value)} for name, value in params.items()]
    info = {**model_meta(arch, spec), "source": os.path.abspath(src), **meta}

    def write(tmp: str) -> None:
        ms.save_checkpoint(records, tmp, format="ckpt")
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the checkpoint is on disk before its JSON replaces the old one
        write_json(meta_path(dst), info)  # a failure here keeps the old pair: the checkpoint is not renamed

    write_atomic(dst, write)
    return info
