"""ONNX export and onnxruntime: the portable ops equal what they replace, every ONNX stage equals the MindSpore
stage, the runner on onnxruntime equals adaptive inference, and fixed-batch exports take any number of images.

One ONNX export per model (batch 4) for the whole module; onnxruntime is an optional extra
(requirements-onnx.txt, installed by the test command).
"""

import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_runner_equals_adaptive, load_official_state
from mindspore import ops
from numpy_dvt import official_state_dict, unfold
from PIL import Image
from scipy.special import erf

from src.deploy.export import export_cascade
from src.deploy.runner import CascadeRunner, preprocess, read_manifest
from src.models import create_model
from src.models.layers import GELU, LayerNorm, rational_erf, use_stock_ops
from src.models.tokenizers import SoftSplit, concat_pad

ort = pytest.importorskip("onnxruntime")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
PREPROCESS = {"img_size": 32, "resize": 36, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "layout": "NCHW", "pixel_scale": 1 / 255}


@pytest.mark.parametrize("channels, side, kernel, stride, padding",
                         [(3, 32, 7, 4, 2), (3, 224, 7, 4, 2), (3, 224, 14, 8, 3), (3, 224, 11, 6, 5), (8, 28, 3, 2, 1),
                          (8, 9, 3, 2, 1)])
def test_soft_split_is_torch_unfold_bit_for_bit(channels, side, kernel, stride, padding):
    x = np.random.default_rng(side + kernel).normal(size=(2, channels, side, side)).astype(np.float32)
    got = SoftSplit(channels, side, kernel, stride, padding)(ms.Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, unfold(x, kernel, stride, padding).transpose(0, 2, 1).astype(np.float32))
    im2col = ops.unfold(ms.Tensor(x), kernel, 1, padding, stride).asnumpy()
    np.testing.assert_array_equal(got, im2col.transpose(0, 2, 1))


def test_portable_erf_gelu_and_padding():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4991) * 3, [-30, -8, -4, -1e-3, 0, 1e-3, 4, 8, 30]]).astype(np.float32)
    np.testing.assert_allclose(rational_erf(ms.Tensor(x)).asnumpy(), erf(x.astype(np.float64)), rtol=0, atol=1e-6)
    gelu = GELU()
    gelu.set_train(False)
    use_stock_ops(gelu)
    gelu.portable = True
    want = 0.5 * x.astype(np.float64) * (1 + erf(x.astype(np.float64) / np.sqrt(2)))
    np.testing.assert_allclose(gelu(ms.Tensor(x)).asnumpy(), want, rtol=2e-6, atol=1e-6)
    image = rng.normal(size=(2, 3, 5, 7)).astype(np.float32)
    padded = np.pad(image, ((0, 0), (0, 0), (3, 3), (3, 3)))
    np.testing.assert_array_equal(concat_pad(ms.Tensor(image), 3).asnumpy(), padded)


def perturbed(name: str, seed: int):
    """A tiny cascade with the spec's perturbed weights (no LayerNorm at 1, no zero bias) in eval mode."""
    net = create_model(name, drop_path_rate=0.0)
    load_official_state(net, official_state_dict(net.spec, np.random.default_rng(seed)))
    net.set_train(False)
    return net


@pytest.fixture(scope="module", params=["dvt_tiny_t2t", "dvt_tiny_deit"])
def onnx_export(request, tmp_path_factory):
    net = perturbed(request.param, 1)
    folder = tmp_path_factory.mktemp(request.param)
    manifest = export_cascade(net, str(folder / "tiny"), preprocess=PREPROCESS, batch=BATCH, file_format="ONNX",
                              whole_cascade=True, class_names=[f"class {i}" for i in range(10)],
                              thresholds=[{"budget_gflops": 0.002, "thresholds": [0.2, 0.16, 0.0]}])
    return net, manifest


def session(manifest_path: str, entry: dict):
    return ort.InferenceSession(os.path.join(os.path.dirname(manifest_path), entry["file"]),
                                providers=["CPUExecutionProvider"])


def test_every_onnx_stage_equals_the_mindspore_stage(onnx_export):
    """Each ONNX stage gives the stage's outputs, run by the network as export handed it back: its fast kernels
    and non-portable forms restored."""
    net, manifest_path = onnx_export
    assert not any(getattr(cell, "portable", False) for _, cell in net.cells_and_names())
    assert all(cell.fast_kernel is not None for _, cell in net.cells_and_names() if isinstance(cell, (GELU, LayerNorm)))
    manifest = read_manifest(manifest_path)
    assert manifest["file_format"] == "ONNX" and manifest["batch_size"] == BATCH
    assert [s["file"] for s in manifest["stages"]] == [f"tiny_stage{k}.onnx" for k in (1, 2, 3)]
    images = np.random.default_rng(0).normal(size=(BATCH, 3, 32, 32)).astype(np.float32)
    upstream = ()
    for k, entry in enumerate(manifest["stages"]):
        expected = [o.asnumpy() for o in net.stages[k](ms.Tensor(images), *upstream)]
        stage = session(manifest_path, entry)
        assert [i.name for i in stage.get_inputs()] == [i["name"] for i in entry["inputs"]]
        assert [list(i.shape) for i in stage.get_inputs()] == [i["shape"] for i in entry["inputs"]]
        assert [o.name for o in stage.get_outputs()] == [o["name"] for o in entry["outputs"]]
        feeds = {"image": images} | {name: a for name, a in zip(net.stages[k].upstream_names,
                                                                 (u.asnumpy() for u in upstream), strict=True)}
        got = stage.run(None, feeds)
        assert len(got) == len(expected) == len(entry["outputs"])
        for a, b, spec in zip(got, expected, entry["outputs"], strict=True):
            assert list(a.shape) == spec["shape"] and np.abs(b).max() > 0.1
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        upstream = tuple(net.stages[k](ms.Tensor(images), *upstream)[1:])
    cascade = session(manifest_path, manifest["cascade"])
    assert [o.name for o in cascade.get_outputs()] == [f"logits_exit{k}" for k in (1, 2, 3)]
    whole = cascade.run(None, {"image": images})
    for a, b in zip(whole, net(ms.Tensor(images)), strict=True):
        np.testing.assert_allclose(a, b.asnumpy(), rtol=0, atol=1e-5)


def write_images(folder, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = str(folder / f"{seed}_{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + i % 5, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("count", [1, 3, 4, 10])
def test_onnxruntime_runner_equals_adaptive_inference(onnx_export, tmp_path, count):
    """Fewer, as many as, more and not a multiple of the exported batch of 4: the same exits and predictions."""
    net, manifest_path = onnx_export
    images = preprocess(write_images(tmp_path, count, count), PREPROCESS)
    runner = CascadeRunner(manifest_path, backend="onnxruntime")
    seen = assert_runner_equals_adaptive(runner, net, images)
    assert count == 1 or len(seen) == 3  # the policies differ: the comparison can fail


def test_runner_cli_names_the_runtime_and_the_classes(onnx_export, tmp_path):
    _, manifest_path = onnx_export
    paths = write_images(tmp_path, 5, 7)
    cli = subprocess.run([sys.executable, "-m", "src.deploy.runner", "--manifest", manifest_path, "--budget", "0.002",
                          *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.strip().splitlines()
    assert lines[0] == f"runtime: onnxruntime {ort.__version__} (CPUExecutionProvider), ONNX files, batch {BATCH}"
    assert len(lines) == 6 and all(line.startswith(f"{p}: class ") and "exit " in line
                                   for p, line in zip(paths, lines[1:], strict=True))
