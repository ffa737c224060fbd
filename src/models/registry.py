"""The model registry: `create_model(name, ...)` builds any registered DVT or plain backbone."""

from __future__ import annotations

import difflib

from .dvt import DVT
from .spec import DEIT, SPEC_FIELDS, T2T, DVTSpec
from .weights import load_weights

T2T_VIT_12 = dict(family=T2T, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, norm_eps=1e-5)
T2T_VIT_14 = dict(family=T2T, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, norm_eps=1e-5)
DEIT_SMALL = dict(family=DEIT, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, norm_eps=1e-6)
# Tiny variants for tests and the CPU demo: 32x32 images, 2x2 -> 3x3 -> 4x4 tokens.
TINY_T2T = dict(family=T2T, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, norm_eps=1e-5, token_dim=8,
                img_size=32, grids=(2, 3, 4), num_classes=10)
TINY_DEIT = dict(family=DEIT, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True, norm_eps=1e-6,
                 img_size=32, grids=(2, 3, 4), num_classes=10)

DVT_GRIDS = (7, 10, 14)
BACKBONE_GRID = 14

_REGISTRY: dict[str, dict] = {
    "dvt_t2t_vit_12": dict(T2T_VIT_12, grids=DVT_GRIDS),
    "dvt_t2t_vit_14": dict(T2T_VIT_14, grids=DVT_GRIDS),
    "dvt_deit_small": dict(DEIT_SMALL, grids=DVT_GRIDS),
    "t2t_vit_12": dict(T2T_VIT_12, grids=(BACKBONE_GRID,)),
    "t2t_vit_14": dict(T2T_VIT_14, grids=(BACKBONE_GRID,)),
    "deit_small": dict(DEIT_SMALL, grids=(BACKBONE_GRID,)),
    "dvt_tiny_t2t": TINY_T2T,
    "dvt_tiny_deit": TINY_DEIT,
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def model_spec(name: str, **overrides) -> DVTSpec:
    """The spec of a registered model with fields overridden; `grid=g` is short for `grids=(g,)`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}{_closest(name, _REGISTRY)}; registered: {', '.join(list_models())}")
    if "grid" in overrides:
        if "grids" in overrides:
            raise ValueError("give either grid or grids, not both")
        overrides["grids"] = (overrides.pop("grid"),)
    unknown = [key for key in overrides if key not in SPEC_FIELDS]
    if unknown:
        hints = "".join(f"\n  {key!r}{_closest(key, SPEC_FIELDS)}" for key in unknown)
        valid = ", ".join(("grid", "checkpoint_path") + SPEC_FIELDS)
        raise TypeError(f"unknown argument(s) for {name}:{hints}\nvalid: {valid}")
    fields = dict(_REGISTRY[name])
    fields.update(overrides)
    return DVTSpec(**fields)


def create_model(name: str, num_classes: int | None = None, feature_reuse: bool = True,
                 relation_reuse: bool = True, drop_path_rate: float = 0.1,
                 checkpoint_path: str | None = None, **kwargs) -> DVT:
    """Build a registered model; any `DVTSpec` field can be overridden (grids, img_size, drop_rate, ...).

    num_classes defaults to the registered one (1000 for the ImageNet models). With `checkpoint_path`
    the MindSpore checkpoint is loaded strictly: a missing, unexpected or mis-shaped parameter is an error.
    """
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    spec = model_spec(name, feature_reuse=feature_reuse, relation_reuse=relation_reuse,
                      drop_path_rate=drop_path_rate, **kwargs)
    net = DVT(spec)
    if checkpoint_path is not None:
        load_weights(net, checkpoint_path)
    return net
