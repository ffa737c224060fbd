"""A float64 NumPy forward of the official DVT (blackfeather-wang/Dynamic-Vision-Transformer), on its key names.

It shares nothing with `src/models` but the tokenizer geometry (kernel/stride/padding, which is
configuration): unfold is explicit slicing, the reuse resampling is a literal nearest x2 followed by
adaptive average pooling, and parameters are looked up by the PyTorch release's names.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

STAGE_PREFIXES = ("less_less_token", "less_token", "normal_token")


# ----------------------------------------------------------------------------- synthetic weights

def official_state_dict(spec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A state dict with the official names and shapes for `spec`, with weights that give O(1) signals.

    Weights are N(0, 1/fan_in), qkv 1.5x larger: clearly non-uniform attention that fp32 still resolves.
    LayerNorm gammas are 1 + N(0, 0.2) and every bias and beta is non-zero, so a dropped bias or a swapped
    norm shows in the logits.
    """
    state = {}
    d, hidden, reuse, reuse_hidden = spec.embed_dim, spec.mlp_hidden, spec.reuse_dim, spec.reuse_hidden

    def linear(name, n_in, n_out, bias=True, gain=1.0):
        state[name + ".weight"] = rng.normal(0, gain / math.sqrt(n_in), (n_out, n_in))
        if bias:
            state[name + ".bias"] = rng.normal(0, 0.1, (n_out,))

    def norm(name, width):
        state[name + ".weight"] = 1 + rng.normal(0, 0.2, (width,))
        state[name + ".bias"] = rng.normal(0, 0.1, (width,))

    for stage, prefix in enumerate(STAGE_PREFIXES[-spec.num_stages:] if spec.num_stages > 1 else ("",)):
        p = prefix + "." if prefix else ""
        grid, tok = spec.grids[stage], spec.tokenizers[stage]
        n = grid * grid + 1
        if spec.family == "t2t":
            emb = spec.token_dim
            for name, dim in (("attention1", spec.in_chans * tok.kernel ** 2), ("attention2", emb * 9)):
                q = f"{p}tokens_to_token.{name}."
                norm(q + "norm1", dim)
                norm(q + "norm2", emb)
                if spec.t2t_attention == "performer":
                    w, _ = np.linalg.qr(rng.normal(size=(emb, emb // 2)))
                    state[q + "w"] = w.T * math.sqrt(emb // 2)
                    linear(q + "kqv", dim, 3 * emb, gain=0.5)
                    linear(q + "proj", emb, emb)
                    linear(q + "mlp.0", emb, emb)
                    linear(q + "mlp.2", emb, emb)
                else:
                    linear(q + "attn.qkv", dim, 3 * emb, bias=False, gain=1.5)
                    linear(q + "attn.proj", emb, emb)
                    linear(q + "mlp.fc1", emb, emb)
                    linear(q + "mlp.fc2", emb, emb)
            linear(f"{p}tokens_to_token.project", emb * 9, d)
            position = np.arange(n)[:, None] / np.power(10000, 2 * (np.arange(d) // 2) / d)[None]
            position[:, 0::2], position[:, 1::2] = np.sin(position[:, 0::2]), np.cos(position[:, 1::2])
            state[p + "pos_embed"] = position[None]
        else:
            fan_in = spec.in_chans * tok.kernel ** 2
            kernel_shape = (d, spec.in_chans, tok.kernel, tok.kernel)
            state[p + "patch_embed.proj.weight"] = rng.normal(0, 1 / math.sqrt(fan_in), kernel_shape)
            state[p + "patch_embed.proj.bias"] = rng.normal(0, 0.1, (d,))
            state[p + "pos_embed"] = rng.normal(0, 0.5, (1, n, d))
        state[p + "cls_token"] = rng.normal(0, 0.5, (1, 1, d))
        feature_reuse = spec.feature_reuse and stage > 0
        for layer in range(spec.depth):
            b = f"{p}blocks.{layer}."
            norm(b + "norm1", d)
            linear(b + "attn.qkv", d, 3 * d, bias=spec.qkv_bias, gain=1.5)
            linear(b + "attn.proj", d, d)
            width = d + reuse if feature_reuse else d
            norm(b + "norm2", width)
            linear(b + "mlp.fc1", width, hidden)
            linear(b + "mlp.fc2", hidden, d)
            if feature_reuse:
                norm(b + "feature_resuse_mlp.0", d)
                linear(b + "feature_resuse_mlp.1.fc1", d, reuse_hidden)
                linear(b + "feature_resuse_mlp.1.fc2", reuse_hidden, reuse)
        norm(p + "norm", d)
        linear(p + "head", d, spec.num_classes)
        if spec.relation_reuse and stage > 0:
            c = spec.depth * spec.num_heads
            state[p + "relation_reuse_conv.0.weight"] = rng.normal(0, 1 / math.sqrt(c), (3 * c, c, 1, 1))
            state[p + "relation_reuse_conv.0.bias"] = rng.normal(0, 0.1, (3 * c,))
            state[p + "relation_reuse_conv.2.weight"] = rng.normal(0, 1 / math.sqrt(3 * c), (c, 3 * c, 1, 1))
            state[p + "relation_reuse_conv.2.bias"] = rng.normal(0, 0.1, (c,))
    return state


# ----------------------------------------------------------------------------- primitives

def gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear(s, name, x):
    y = x @ s[name + ".weight"].T
    return y + s[name + ".bias"] if name + ".bias" in s else y


def unfold(x, k, stride, pad):
    """torch F.unfold: (B, C, H, W) -> (B, C*k*k, L), patch order (c, ki, kj), tokens row-major."""
    b, c, h, w = x.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    cols = np.empty((b, c, k, k, oh, ow))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
    return cols.reshape(b, c * k * k, oh * ow)


def nearest_then_pool(x, out):
    """The reference resampling of the last two axes: nearest to 2*in, adaptive average pool to out."""
    size = x.shape[-1]
    up = 2 * size
    idx = np.arange(up) * size // up
    x = x[..., idx, :][..., :, idx]
    result = np.empty(x.shape[:-2] + (out, out))
    for i in range(out):
        r0, r1 = (i * up) // out, -((-(i + 1) * up) // out)
        for j in range(out):
            c0, c1 = (j * up) // out, -((-(j + 1) * up) // out)
            result[..., i, j] = x[..., r0:r1, c0:c1].mean((-2, -1))
    return result


# ----------------------------------------------------------------------------- the model

def performer(s, p, x, eps):
    emb = s[p + "proj.weight"].shape[0]
    w = s[p + "w"]
    m = w.shape[0]
    x = layer_norm(x, s[p + "norm1.weight"], s[p + "norm1.bias"], eps)
    k, q, v = np.split(linear(s, p + "kqv", x), 3, axis=-1)

    def phi(z):
        return np.exp(z @ w.T - (z * z).sum(-1, keepdims=True) / 2) / math.sqrt(m)

    kp, qp = phi(k), phi(q)
    normaliser = np.einsum("bti,bi->bt", qp, kp.sum(1))[..., None]
    kptv = np.einsum("bin,bim->bnm", v, kp)
    y = np.einsum("bti,bni->btn", qp, kptv) / (normaliser + 1e-8)
    y = v + linear(s, p + "proj", y)
    assert y.shape[-1] == emb
    h = layer_norm(y, s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
    return y + linear(s, p + "mlp.2", gelu(linear(s, p + "mlp.0", h)))


def token_transformer(s, p, x, eps):
    """One-head attention from the input width to emb; the skip is v; scaled by the input width."""
    dim = x.shape[-1]
    h = layer_norm(x, s[p + "norm1.weight"], s[p + "norm1.bias"], eps)
    q, k, v = np.split(linear(s, p + "attn.qkv", h), 3, axis=-1)
    y = v + linear(s, p + "attn.proj", softmax(q @ k.transpose(0, 2, 1) * dim ** -0.5) @ v)
    h = layer_norm(y, s[p + "norm2.weight"], s[p + "norm2.bias"], eps)
    return y + linear(s, p + "mlp.fc2", gelu(linear(s, p + "mlp.fc1", h)))


def tokenize(spec, s, p, image, stage):
    tok = spec.tokenizers[stage]
    if spec.family != "t2t":
        cols = unfold(image, tok.kernel, tok.stride, tok.padding)  # a strided conv = unfold + matmul
        weight = s[p + "patch_embed.proj.weight"].reshape(spec.embed_dim, -1)
        return np.einsum("dk,bkl->bld", weight, cols) + s[p + "patch_embed.proj.bias"]
    x = unfold(image, tok.kernel, tok.stride, tok.padding).transpose(0, 2, 1)
    for name in ("attention1", "attention2"):
        mixer = performer if spec.t2t_attention == "performer" else token_transformer
        x = mixer(s, f"{p}tokens_to_token.{name}.", x, spec.norm_eps)
        side = int(round(math.sqrt(x.shape[1])))
        x = unfold(x.transpose(0, 2, 1).reshape(x.shape[0], -1, side, side), 3, 2, 1).transpose(0, 2, 1)
    return linear(s, p + "tokens_to_token.project", x)


def relation_bias(spec, s, p, relations, grid):
    """Upstream logits (B, L*NH, N_up, N_up) -> per-layer biases on this grid, cls handled as Fig. 5."""
    w1 = s[p + "relation_reuse_conv.0.weight"][:, :, 0, 0]
    w2 = s[p + "relation_reuse_conv.2.weight"][:, :, 0, 0]
    h = gelu(np.einsum("oc,bcqk->boqk", w1, relations) + s[p + "relation_reuse_conv.0.bias"][:, None, None])
    a = np.einsum("oc,bcqk->boqk", w2, h) + s[p + "relation_reuse_conv.2.bias"][:, None, None]
    b, c, n_up, _ = a.shape
    g_up = int(round(math.sqrt(n_up - 1)))
    n = grid * grid + 1
    out = np.empty((b, c, n, n))
    out[:, :, 0, 0] = a[:, :, 0, 0]
    out[:, :, 0, 1:] = nearest_then_pool(a[:, :, 0, 1:].reshape(b, c, g_up, g_up), grid).reshape(b, c, -1)
    out[:, :, 1:, 0] = nearest_then_pool(a[:, :, 1:, 0].reshape(b, c, g_up, g_up), grid).reshape(b, c, -1)
    grid_part = a[:, :, 1:, 1:].reshape(b, c, g_up, g_up, g_up, g_up)  # (query row, col, key row, col)
    keys_done = nearest_then_pool(grid_part, grid)  # resample the key grid
    queries = keys_done.transpose(0, 1, 4, 5, 2, 3)
    out[:, :, 1:, 1:] = nearest_then_pool(queries, grid).transpose(0, 1, 4, 5, 2, 3).reshape(b, c, n - 1, n - 1)
    return out


def stage_forward(spec, s, stage, image, upstream_tokens=None, upstream_relations=None):
    """(logits, final tokens before the norm, attention logits stacked layer-major) of one stage."""
    p = STAGE_PREFIXES[-spec.num_stages:][stage] + "." if spec.num_stages > 1 else ""
    eps, nh, d = spec.norm_eps, spec.num_heads, spec.embed_dim
    grid = spec.grids[stage]
    x = tokenize(spec, s, p, image, stage)
    b = x.shape[0]
    x = np.concatenate([np.broadcast_to(s[p + "cls_token"], (b, 1, d)), x], 1) + s[p + "pos_embed"]
    n = x.shape[1]
    biases = None if upstream_relations is None else relation_bias(spec, s, p, upstream_relations, grid)
    relations = []
    for layer in range(spec.depth):
        q = f"{p}blocks.{layer}."
        h = layer_norm(x, s[q + "norm1.weight"], s[q + "norm1.bias"], eps)
        qkv = linear(s, q + "attn.qkv", h).reshape(b, n, 3, nh, d // nh).transpose(2, 0, 3, 1, 4)
        logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * (d // nh) ** -0.5
        if biases is not None:
            logits = logits + biases[:, layer * nh:(layer + 1) * nh]
        relations.append(logits)
        out = (softmax(logits) @ qkv[2]).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + linear(s, q + "attn.proj", out)
        mlp_in = x
        if upstream_tokens is not None:
            f = layer_norm(upstream_tokens, s[q + "feature_resuse_mlp.0.weight"], s[q + "feature_resuse_mlp.0.bias"],
                           eps)
            f = linear(s, q + "feature_resuse_mlp.1.fc2", gelu(linear(s, q + "feature_resuse_mlp.1.fc1", f)))
            g_up = int(round(math.sqrt(f.shape[1] - 1)))
            grid_f = f[:, 1:].transpose(0, 2, 1).reshape(b, -1, g_up, g_up)
            grid_f = nearest_then_pool(grid_f, grid).reshape(b, -1, grid * grid).transpose(0, 2, 1)
            context = np.concatenate([np.zeros((b, 1, grid_f.shape[-1])), grid_f], 1)
            mlp_in = np.concatenate([x, context], -1)
        h = layer_norm(mlp_in, s[q + "norm2.weight"], s[q + "norm2.bias"], eps)
        x = x + linear(s, q + "mlp.fc2", gelu(linear(s, q + "mlp.fc1", h)))
    cls = layer_norm(x, s[p + "norm.weight"], s[p + "norm.bias"], eps)[:, 0]
    return linear(s, p + "head", cls), x, np.concatenate(relations, 1)


def dvt_forward(spec, s, image) -> list[np.ndarray]:
    """Every exit's logits, exit k+1 reusing exit k's tokens and relations per the spec's switches."""
    exits, tokens, relations = [], None, None
    for stage in range(spec.num_stages):
        use_f = spec.feature_reuse and stage > 0
        use_r = spec.relation_reuse and stage > 0
        logits, tokens, relations = stage_forward(spec, s, stage, image, tokens if use_f else None,
                                                  relations if use_r else None)
        exits.append(logits)
    return exits
