"""What a DVT is, as data: backbone dimensions, token grids (one per exit) and reuse switches.

Every model in the registry is a `DVTSpec`; a plain backbone is a spec with one grid. Exits, grids
and tokenizer geometry are configuration, so a two-exit 7x7/14x14 cascade or one that starts at 4x4
is a change of `grids`, not of code.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

T2T = "t2t"
DEIT = "deit"
FAMILIES = (T2T, DEIT)
T2T_ATTENTIONS = ("performer", "transformer")

# The official DVT's first soft split (kernel, stride, padding) at 224x224, by final grid.
OFFICIAL_T2T_SOFT_SPLITS = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}


@dataclass(frozen=True)
class Tokenizer:
    """The image-to-token geometry of one stage: the first soft split (T2T) or the patch conv (DeiT)."""

    kernel: int
    stride: int
    padding: int


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a convolution / unfold with symmetric zero padding."""
    return (size + 2 * padding - kernel) // stride + 1


def t2t_grid(img_size: int, tok: Tokenizer) -> int:
    """Final token grid side of a T2T tokenizer: first split, then two 3x3/s2/p1 splits."""
    side = conv_out(img_size, tok.kernel, tok.stride, tok.padding)
    for _ in range(2):
        side = conv_out(side, 3, 2, 1)
    return side


def default_t2t_tokenizer(img_size: int, grid: int) -> Tokenizer:
    """The official soft split at 224 for grids 7/10/14; otherwise the smallest split that fits.

    The search keeps the reference's shape: stride about img / 4g and an overlapping kernel of at
    least 1.75 strides, with the least zero padding that gives a g x g grid after the two 3x3/s2 splits.
    """
    if img_size == 224 and grid in OFFICIAL_T2T_SOFT_SPLITS:
        return Tokenizer(*OFFICIAL_T2T_SOFT_SPLITS[grid])
    if 4 * grid - 3 > img_size:
        raise ValueError(f"a {grid}x{grid} T2T grid needs an image of at least {4 * grid - 3} pixels, got {img_size}")
    base_stride = max(1, img_size // (4 * grid))
    for stride in (base_stride, base_stride + 1):
        for kernel in range(math.ceil(1.75 * stride), img_size + 1):
            for padding in range(kernel // 2 + 1):
                tok = Tokenizer(kernel, stride, padding)
                if t2t_grid(img_size, tok) == grid:
                    return tok
    raise ValueError(f"no T2T soft split maps a {img_size}-pixel image to a {grid}x{grid} grid")


def default_patch_tokenizer(img_size: int, grid: int) -> Tokenizer:
    """Non-overlapping patches of side ceil(img / g), zero padded: the official /32, /23 (pad 3) and /16."""
    patch = math.ceil(img_size / grid)
    padding = math.ceil((patch * grid - img_size) / 2)
    tok = Tokenizer(patch, patch, padding)
    if conv_out(img_size, patch, patch, padding) != grid:
        raise ValueError(f"no patch embedding maps a {img_size}-pixel image to a {grid}x{grid} grid")
    return tok


@dataclass(frozen=True)
class DVTSpec:
    """A cascade of vision transformers that share their dimensions and differ in token grid.

    Stage k (k >= 1) reuses the final tokens (`feature_reuse`) and the attention logits
    (`relation_reuse`) of stage k-1. The first stage never reuses anything.
    """

    family: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    grids: tuple[int, ...] = (7, 10, 14)
    feature_reuse: bool = True
    relation_reuse: bool = True
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    qkv_bias: bool = False
    norm_eps: float = 1e-5
    token_dim: int = 64
    t2t_attention: str = "performer"
    tokenizers: tuple[Tokenizer, ...] | None = None
    reuse_dim: int = 48
    reuse_hidden: int = 128
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.t2t_attention not in T2T_ATTENTIONS:
            raise ValueError(f"t2t_attention must be one of {T2T_ATTENTIONS}, got {self.t2t_attention!r}")
        grids = tuple(int(g) for g in self.grids)
        object.__setattr__(self, "grids", grids)
        if not grids or min(grids) < 1:
            raise ValueError(f"grids must be a non-empty list of positive sides, got {self.grids}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")
        if self.tokenizers is None:
            default = default_t2t_tokenizer if self.family == T2T else default_patch_tokenizer
            object.__setattr__(self, "tokenizers", tuple(default(self.img_size, g) for g in grids))
        else:
            toks = tuple(t if isinstance(t, Tokenizer) else Tokenizer(*t) for t in self.tokenizers)
            object.__setattr__(self, "tokenizers", toks)
        if len(self.tokenizers) != len(grids):
            raise ValueError(f"{len(self.tokenizers)} tokenizers given for {len(grids)} grids")
        for grid, tok in zip(grids, self.tokenizers, strict=True):
            side = self.tokenizer_grid(tok)
            if side != grid:
                raise ValueError(f"tokenizer {tok} gives a {side}x{side} grid at {self.img_size} px, not {grid}x{grid}")

    def tokenizer_grid(self, tok: Tokenizer) -> int:
        if self.family == T2T:
            return t2t_grid(self.img_size, tok)
        return conv_out(self.img_size, tok.kernel, tok.stride, tok.padding)

    @property
    def num_stages(self) -> int:
        return len(self.grids)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def num_tokens(self, stage: int) -> int:
        """Tokens of a stage, the cls token included."""
        return self.grids[stage] ** 2 + 1

    def uses_feature_reuse(self, stage: int) -> bool:
        return self.feature_reuse and stage > 0

    def uses_relation_reuse(self, stage: int) -> bool:
        return self.relation_reuse and stage > 0

    def hands_on_tokens(self, stage: int) -> bool:
        """Whether the next stage reuses this stage's final tokens (feature reuse)."""
        return stage + 1 < self.num_stages and self.uses_feature_reuse(stage + 1)

    def hands_on_relations(self, stage: int) -> bool:
        """Whether the next stage reuses this stage's attention logits (relationship reuse)."""
        return stage + 1 < self.num_stages and self.uses_relation_reuse(stage + 1)

    def hands_on(self, stage: int) -> bool:
        """Whether anything but the head reads this stage's blocks: if not, its last block's cls token is enough."""
        return self.hands_on_tokens(stage) or self.hands_on_relations(stage)

    def to_dict(self) -> dict:
        """Plain JSON-friendly form, stored next to checkpoints."""
        out = dataclasses.asdict(self)
        out["grids"] = list(self.grids)
        out["tokenizers"] = [dataclasses.astuple(t) for t in self.tokenizers]
        return out


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(DVTSpec))
