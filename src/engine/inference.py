"""A configured network for inference: the device, the model a config describes, a checkpoint's weights.

eval.py and export.py load their network here; the trainer builds its models with the same `build_model`.
"""

from __future__ import annotations

import mindspore as ms

from ..flops import exit_gflops
from ..models import DVT, create_model
from .checkpoint import check_architecture, load_model_weights, read_meta


def use_device(target: str) -> None:
    """Graph mode on `target`. MindSpore fixes the device once kernels have run; asking again for the
    same one (a second run in one process) is fine, asking for another is its error."""
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(target)
    except RuntimeError:
        if ms.get_context("device_target") != target:
            raise


def build_model(config: dict, num_classes: int) -> DVT:
    """The configured model (its grids, image size, reuse switches and dropout rates) with `num_classes`."""
    overrides = {key: config[key] for key in ("img_size", "grids") if config[key] is not None}
    return create_model(config["model"], num_classes=num_classes, feature_reuse=config["feature_reuse"],
                        relation_reuse=config["relation_reuse"], drop_path_rate=config["drop_path_rate"],
                        drop_rate=config["drop_rate"], **overrides)


def load_network(config: dict, checkpoint_path: str) -> tuple[DVT, dict]:
    """The configured model on the configured device with a checkpoint's weights (the EMA's when present),
    refusing a checkpoint of another architecture; returns it and the checkpoint's JSON."""
    use_device(config["device_target"])
    net = build_model(config, config["num_classes"])
    meta = read_meta(checkpoint_path)
    check_architecture(meta, net.spec.to_dict(), config["model"], checkpoint_path)
    load_model_weights(net, checkpoint_path, prefer_ema=True)
    return net, meta


def exit_costs(net: DVT, meta: dict) -> list[float]:
    """Cumulative GFLOPs of every exit: the checkpoint's record when it has one, else counted."""
    return [float(f) for f in (meta.get("exit_gflops") or exit_gflops(net.spec))]
