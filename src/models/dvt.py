"""The DVT cascade: stages with growing token grids, each reusing what the previous one computed."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn

from .dropout import key_masks
from .spec import DVTSpec
from .stage import Stage


class DVT(nn.Cell):
    """`construct(images)` returns a tuple with every exit's logits, in train and eval alike.

    `stages[k]` can also be run on its own with the stage API, `stages[k](image, *upstream)`, which
    is what adaptive inference and per-stage export use. A spec with one grid is a plain backbone.
    """

    def __init__(self, spec: DVTSpec):
        super().__init__()
        self.spec = spec
        self.stages = nn.CellList([Stage(spec, k) for k in range(spec.num_stages)])
        key_masks(self, ms.get_seed() or 0)  # reproducible dropout masks: see dropout.py

    @property
    def num_exits(self) -> int:
        return self.spec.num_stages

    def construct(self, images):
        exits = ()
        upstream = ()
        for stage in self.stages:
            outputs = stage(images, *upstream)
            exits = exits + (outputs[0],)
            upstream = outputs[1:]
        return exits
