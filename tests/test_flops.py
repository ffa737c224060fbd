"""Per-exit GFLOPs against the paper and fvcore; parameter counts against the official models."""

import numpy as np
import pytest

from src.flops import exit_gflops
from src.models import create_model, model_spec

# (model, overrides, published cumulative GFLOPs per exit): paper Tables 1, 4 and 6, and fvcore runs of the
# official code (blackfeather-wang/Dynamic-Vision-Transformer) for T2T-ViT-14 and DeiT-small DVTs.
PUBLISHED = [
    ("dvt_t2t_vit_12", {}, [0.47, 1.46, 3.50]),
    ("dvt_t2t_vit_12", {"feature_reuse": False, "relation_reuse": False}, [0.47, 1.37, 3.15]),
    ("dvt_t2t_vit_12", {"relation_reuse": False}, [0.47, 1.43, 3.31]),
    ("dvt_t2t_vit_12", {"feature_reuse": False}, [0.47, 1.41, 3.34]),
    ("t2t_vit_12", {}, [1.78]),
    ("t2t_vit_12", {"grid": 7}, [0.47]),
    ("deit_small", {}, [4.61]),
    ("dvt_t2t_vit_14", {}, [1.207, 3.841, 9.328]),
    ("dvt_deit_small", {}, [1.145, 3.656, 8.844]),
]


def tolerance(published: float) -> float:
    """0.5%, or half a unit of the published last digit where rounding alone is larger.

    The paper prints 0.47 for the 7x7 exit that fvcore counts at 0.4725 on the official code: 0.53%
    apart by rounding alone. The exact fvcore figures are pinned separately below.
    """
    decimals = len(repr(published).split(".")[1])
    return max(0.005 * published, 0.5 * 10 ** -decimals)


@pytest.mark.parametrize("name,overrides,published", PUBLISHED)
def test_exit_gflops_match_published_figures(name, overrides, published):
    ours = exit_gflops(model_spec(name, **overrides))
    assert len(ours) == len(published)
    for exit_index, (got, want) in enumerate(zip(ours, published, strict=True)):
        assert abs(got - want) <= tolerance(want), f"exit {exit_index + 1}: {got:.4f} vs {want}"


@pytest.mark.parametrize("name,overrides,fvcore", [
    ("dvt_t2t_vit_12", {}, [0.4725, 1.4625, 3.4975]),
    ("dvt_t2t_vit_12", {"relation_reuse": False}, [0.4725, 1.4251, 3.3077]),
    ("dvt_t2t_vit_12", {"feature_reuse": False}, [0.4725, 1.4081, 3.3353]),
    ("dvt_t2t_vit_12", {"feature_reuse": False, "relation_reuse": False}, [0.4725, 1.3707, 3.1454]),
    ("dvt_t2t_vit_14", {}, [1.2065, 3.8409, 9.3276]),
    ("dvt_deit_small", {}, [1.1453, 3.6563, 8.8438]),
])
def test_gflops_equal_fvcore_on_the_official_code(name, overrides, fvcore):
    """fvcore's count of the official PyTorch models at batch 1, measured beside ours."""
    assert [round(g, 4) for g in exit_gflops(model_spec(name, **overrides))] == fvcore


def test_executed_gflops_count_the_last_block_for_the_cls_token_alone():
    """DeiT-S's 14x14 stage hands nothing on, so inference computes its last block's attention output, projection,
    norm2 and MLP for one token of 197 and skips its feature-reuse branch (counted by hand below)."""
    spec = model_spec("dvt_deit_small")
    n, d, hidden, mlp_in, n_up = 197, 384, 1536, 384 + spec.reuse_dim, 101
    skipped_rows = (n - 1) * (2 * n * d + d * d + 5 * mlp_in + mlp_in * hidden + hidden * d)
    reuse_branch = 5 * n_up * d + n_up * d * spec.reuse_hidden + n_up * spec.reuse_hidden * spec.reuse_dim \
        + 2 * spec.reuse_dim * 20 ** 2  # LN, the MLP, nearest x2 of 10x10 and its pooling
    paper, executed = exit_gflops(spec), exit_gflops(spec, executed=True)
    assert executed[:2] == paper[:2]
    assert (paper[2] - executed[2]) * 1e9 == pytest.approx(skipped_rows + reuse_branch, abs=1)


@pytest.mark.parametrize("overrides,cls_only", [
    ({}, [False, False, True]),
    ({"feature_reuse": False}, [False, False, True]),
    ({"relation_reuse": False}, [False, False, True]),
    ({"feature_reuse": False, "relation_reuse": False}, [True, True, True]),
])
def test_executed_gflops_know_which_last_blocks_compute_the_cls_token_alone(overrides, cls_only):
    """A stage's last block computes the cls token alone exactly when no later stage reuses anything of it: the
    last stage always, every stage when both reuses are off. The executed count follows the same blocks."""
    net = create_model("dvt_tiny_deit", **overrides)
    assert [stage.blocks[-1].cls_only for stage in net.stages] == cls_only
    assert [not net.spec.hands_on(k) for k in range(net.spec.num_stages)] == cls_only
    saved_by_exit = np.subtract(exit_gflops(net.spec), exit_gflops(net.spec, executed=True))
    assert list(np.diff(saved_by_exit, prepend=0.0) > 0) == cls_only


@pytest.mark.parametrize("name,tensors,elements", [
    ("dvt_t2t_vit_12", 650, 22_461_516),
    ("dvt_t2t_vit_14", 740, 67_881_836),
    ("dvt_deit_small", 608, 70_442_232),
])
def test_parameter_counts_match_the_official_models(name, tensors, elements):
    params = list(create_model(name).get_parameters())
    assert len(params) == tensors
    assert sum(p.size for p in params) == elements
