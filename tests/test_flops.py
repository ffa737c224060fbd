"""Per-exit GFLOPs against the paper and fvcore; parameter counts against the official models."""

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


@pytest.mark.parametrize("name,tensors,elements", [
    ("dvt_t2t_vit_12", 650, 22_461_516),
    ("dvt_t2t_vit_14", 740, 67_881_836),
    ("dvt_deit_small", 608, 70_442_232),
])
def test_parameter_counts_match_the_official_models(name, tensors, elements):
    params = list(create_model(name).get_parameters())
    assert len(params) == tensors
    assert sum(p.size for p in params) == elements
