"""One transformer of the DVT cascade: `stage(image, *upstream) -> (logits, *reusable)`.

`upstream` is what the previous stage hands over, in this order and only what this stage reuses:
its final tokens before the last norm (B, N_up, D) for feature reuse, then its attention logits of
every layer stacked layer-major (B, L*NH, N_up, N_up) for relationship reuse. `reusable` is the same
kind of tuple for the next stage, holding only what the next stage consumes.
"""

from __future__ import annotations

import numpy as np
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer

from .dropout import Dropout
from .layers import Block, dense, frozen, layer_norm, sinusoid_table
from .reuse import FeatureReuse, RelationReuse
from .spec import T2T, DVTSpec
from .tokenizers import build_tokenizer


class Stage(nn.Cell):
    """Tokenizer, cls token and position embedding, `depth` blocks, final norm and head."""

    def __init__(self, spec: DVTSpec, index: int):
        super().__init__()
        self.num_heads = spec.num_heads
        self.num_layers = spec.depth
        self.takes_tokens = spec.uses_feature_reuse(index)
        self.takes_relations = spec.uses_relation_reuse(index)
        self.emit_tokens = spec.hands_on_tokens(index)
        self.emit_relations = spec.hands_on_relations(index)
        grid = spec.grids[index]
        num_tokens = spec.num_tokens(index)
        dim = spec.embed_dim

        self.tokenizer = build_tokenizer(spec, index)
        self.cls_token = Parameter(initializer(TruncatedNormal(sigma=0.02), (1, 1, dim)), name="cls_token")
        if spec.family == T2T:
            self.pos_embed = frozen("pos_embed", sinusoid_table(num_tokens, dim))
        else:
            self.pos_embed = Parameter(initializer(TruncatedNormal(sigma=0.02), (1, num_tokens, dim)),
                                       name="pos_embed")
        self.pos_drop = Dropout(spec.drop_rate)

        drop_path_rates = np.linspace(0, spec.drop_path_rate, spec.depth)
        blocks = []
        for layer in range(spec.depth):
            feature_reuse = None
            if self.takes_tokens:
                feature_reuse = FeatureReuse(dim, spec.reuse_hidden, spec.reuse_dim, spec.grids[index - 1], grid,
                                             spec.norm_eps, spec.drop_rate)
            # the last block of a stage that hands nothing on feeds only the head, which reads the cls token
            cls_only = layer == spec.depth - 1 and not spec.hands_on(index)
            blocks.append(Block(dim, spec.num_heads, num_tokens, spec.mlp_hidden, spec.norm_eps, spec.qkv_bias,
                                spec.drop_rate, spec.attn_drop_rate, float(drop_path_rates[layer]),
                                feature_reuse, spec.reuse_dim, cls_only))
        self.blocks = nn.CellList(blocks)
        self.relation_reuse = None
        if self.takes_relations:
            self.relation_reuse = RelationReuse(spec.depth * spec.num_heads, spec.grids[index - 1], grid)
        self.norm = layer_norm(dim, spec.norm_eps)
        self.head = dense(dim, spec.num_classes)

    @property
    def upstream_names(self) -> tuple[str, ...]:
        """Names of the upstream inputs this stage takes after the image, in order."""
        return ("tokens",) * self.takes_tokens + ("relations",) * self.takes_relations

    @property
    def reusable_names(self) -> tuple[str, ...]:
        """Names of the outputs after the logits, in order."""
        return ("tokens",) * self.emit_tokens + ("relations",) * self.emit_relations

    def embed(self, image):
        x = self.tokenizer(image)
        cls = ops.zeros_like(x[:, :1, :]) + self.cls_token
        return self.pos_drop(ops.cat((cls, x), 1) + self.pos_embed)

    def construct(self, image, *upstream):
        x = self.embed(image)
        upstream_tokens = None
        relation_bias = None
        if self.takes_tokens:
            upstream_tokens = upstream[0]
        if self.takes_relations:
            relation_bias = self.relation_reuse(upstream[-1])
        relations = ()
        for layer in range(self.num_layers):
            layer_bias = None
            if self.takes_relations:
                layer_bias = relation_bias[:, layer * self.num_heads:(layer + 1) * self.num_heads]
            x, logits = self.blocks[layer](x, upstream_tokens, layer_bias)
            if self.emit_relations:
                relations = relations + (logits,)
        # LayerNorm acts per token, so normalising the cls token alone equals the reference's norm-then-slice.
        outputs = (self.head(self.norm(x[:, 0])),)
        if self.emit_tokens:
            outputs = outputs + (x,)
        if self.emit_relations:
            outputs = outputs + (ops.cat(relations, 1),)
        return outputs
