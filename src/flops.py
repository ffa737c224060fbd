"""Analytic FLOPs of every DVT exit, in fvcore's convention (one multiply-add = one FLOP).

Counted as fvcore counts the reference model: Linear tokens*in*out; each attention matmul N^2*D;
conv out_elems*in*kh*kw; einsum MACs; LayerNorm 5*numel; nearest upsampling its output numel;
adaptive average pooling its input numel. Softmax, GELU, exp, additions and unfold are free.
The cost of exit k is cumulative: every stage up to k runs, norm and head included.
"""

from __future__ import annotations

from .models.spec import T2T, DVTSpec, conv_out


def _layer_norm(tokens: int, width: int) -> int:
    return 5 * tokens * width


def _performer(tokens: int, dim: int, emb: int) -> int:
    features = emb // 2
    return (_layer_norm(tokens, dim) + tokens * dim * 3 * emb
            + 2 * tokens * emb * features        # w^T k and w^T q
            + tokens * features                  # normaliser
            + 2 * tokens * emb * features        # v^T phi(k), then phi(q) (.)^T
            + tokens * emb * emb                 # proj
            + _layer_norm(tokens, emb) + 2 * tokens * emb * emb)


def _token_transformer(tokens: int, dim: int, emb: int) -> int:
    return (_layer_norm(tokens, dim) + tokens * dim * 3 * emb + 2 * tokens * tokens * emb
            + tokens * emb * emb + _layer_norm(tokens, emb) + 2 * tokens * emb * emb)


def tokenizer_flops(spec: DVTSpec, stage: int) -> int:
    tok = spec.tokenizers[stage]
    if spec.family != T2T:
        grid = spec.grids[stage]
        return grid * grid * spec.embed_dim * spec.in_chans * tok.kernel ** 2
    mixer = _performer if spec.t2t_attention == "performer" else _token_transformer
    side1 = conv_out(spec.img_size, tok.kernel, tok.stride, tok.padding)
    side2 = conv_out(side1, 3, 2, 1)
    side3 = conv_out(side2, 3, 2, 1)
    split_dim = spec.token_dim * 9
    return (mixer(side1 ** 2, spec.in_chans * tok.kernel ** 2, spec.token_dim)
            + mixer(side2 ** 2, split_dim, spec.token_dim)
            + side3 ** 2 * split_dim * spec.embed_dim)


def block_flops(spec: DVTSpec, stage: int, cls_only: bool = False) -> int:
    """One transformer block, its feature-reuse branch included; with `cls_only`, as a block that computes the cls
    token alone runs it (src/models/layers.py, Block): q, k and v of every token, the rest for one token."""
    n, d, hidden = spec.num_tokens(stage), spec.embed_dim, spec.mlp_hidden
    rows = 1 if cls_only else n
    mlp_in = d + spec.reuse_dim if spec.uses_feature_reuse(stage) else d
    flops = (_layer_norm(n, d) + n * d * 3 * d + 2 * rows * n * d + rows * d * d
             + _layer_norm(rows, mlp_in) + rows * mlp_in * hidden + rows * hidden * d)
    if spec.uses_feature_reuse(stage) and not cls_only:
        up_grid = spec.grids[stage - 1]
        n_up = spec.num_tokens(stage - 1)
        flops += (_layer_norm(n_up, d) + n_up * d * spec.reuse_hidden + n_up * spec.reuse_hidden * spec.reuse_dim
                  + 2 * spec.reuse_dim * (2 * up_grid) ** 2)
    return flops


def relation_reuse_flops(spec: DVTSpec, stage: int) -> int:
    if not spec.uses_relation_reuse(stage):
        return 0
    channels = spec.depth * spec.num_heads
    up_grid = spec.grids[stage - 1]
    n_up, n = spec.num_tokens(stage - 1), spec.num_tokens(stage)
    mlp = 6 * channels * channels * n_up * n_up
    resample = 2 * channels * (n_up + n) * (2 * up_grid) ** 2
    return mlp + resample


def stage_flops(spec: DVTSpec, stage: int, executed: bool = False) -> int:
    """FLOPs of one stage at batch 1, reuse paths included; with `executed`, as inference here runs it: the last
    block of a stage that hands nothing on computes the cls token alone."""
    n, d = spec.num_tokens(stage), spec.embed_dim
    cls_only_last = executed and not spec.hands_on(stage)
    blocks = (spec.depth - cls_only_last) * block_flops(spec, stage) + cls_only_last * block_flops(spec, stage, True)
    return (tokenizer_flops(spec, stage) + blocks + relation_reuse_flops(spec, stage) + _layer_norm(n, d)
            + d * spec.num_classes)


def exit_gflops(spec: DVTSpec, executed: bool = False) -> list[float]:
    """Cumulative GFLOPs of exiting at each exit, at batch 1: the reference model's (the paper's and the budget's
    figures), or with `executed` those this implementation's inference computes (`stage_flops`)."""
    total, out = 0, []
    for stage in range(spec.num_stages):
        total += stage_flops(spec, stage, executed)
        out.append(total / 1e9)
    return out
