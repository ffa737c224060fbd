"""Strict checkpoint loading: every parameter present, none left over, every shape equal."""

from __future__ import annotations

import os

import mindspore as ms
import numpy as np
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from .dvt import DVT
from .spec import DVTSpec


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the network it is loaded into."""


class UnreadableCheckpoint(CheckpointMismatch):
    """A checkpoint file (or its JSON) is damaged: truncated, corrupt, not a checkpoint."""


def compare_parameters(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    """Raise CheckpointMismatch naming missing, unexpected and mis-shaped parameters."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(name for name in set(expected) & set(found) if tuple(expected[name]) != tuple(found[name]))
    if not (missing or unexpected or mis_shaped):
        return
    lines = [f"{source} does not fit this model:"]
    for title, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            lines.append(f"  {len(names)} {title}: {shown}")
    for name in mis_shaped[:10]:
        lines.append(f"  shape of {name}: model {tuple(expected[name])}, checkpoint {tuple(found[name])}")
    if len(mis_shaped) > 10:
        lines.append(f"  ... {len(mis_shaped) - 10} more shape mismatches")
    raise CheckpointMismatch("\n".join(lines))


def parameter_shapes(net: nn.Cell) -> dict[str, tuple]:
    return {p.name: tuple(p.shape) for p in net.get_parameters()}


def spec_parameter_shapes(spec: DVTSpec) -> dict[str, tuple]:
    """Names and shapes of a spec's parameters, from a model built without drawing its random weights."""
    with no_init_parameters():
        return parameter_shapes(DVT(spec))


def read_checkpoint(path: str) -> dict:
    """All parameters of a checkpoint file, with an error that names the file if it cannot be read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return ms.load_checkpoint(path)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError for corrupt or truncated files
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {err}") from err


def load_checked(net: nn.Cell, params: dict, source: str, expected: dict[str, tuple] | None = None) -> None:
    """Load `params` into `net` after compare_parameters: exactly `expected` (name: shape; default every parameter
    of `net`, loaded strictly), anything else a CheckpointMismatch naming `source`. The one strict loader."""
    compare_parameters(parameter_shapes(net) if expected is None else expected,
                       {name: tuple(np.shape(value)) for name, value in params.items()}, source)
    ms.load_param_into_net(net, params, strict_load=expected is None)


def load_weights(net: nn.Cell, path: str) -> None:
    """Load a MindSpore checkpoint into `net`, refusing any mismatch with a message that names it."""
    load_checked(net, read_checkpoint(path), path)
