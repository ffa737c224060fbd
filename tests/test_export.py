"""MindIR export: every stage loads back and equals the Python model; the runner equals adaptive inference."""

import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from PIL import Image

from src.deploy.export import export_cascade
from src.deploy.runner import CascadeRunner, ManifestError, preprocess, read_manifest, thresholds_for_budget
from src.engine.adaptive import AdaptiveCascade
from src.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = {"img_size": 32, "resize": 36, "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "layout": "NCHW", "pixel_scale": 1 / 255}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ms.set_seed(0)
    net = create_model("dvt_tiny_t2t", drop_path_rate=0.0)
    net.set_train(False)
    folder = tmp_path_factory.mktemp("export")
    thresholds = [{"budget_gflops": 0.001, "thresholds": [0.15, 0.14, 0.0]},
                  {"budget_gflops": 0.002, "thresholds": [0.2, 0.16, 0.0]}]
    manifest = export_cascade(net, str(folder / "tiny"), whole_cascade=True, preprocess=PREPROCESS,
                              thresholds=thresholds, exit_gflops=[0.0004, 0.0019, 0.0032], model_name="dvt_tiny_t2t")
    return net, manifest


def test_manifest_schema(exported):
    net, manifest_path = exported
    manifest = read_manifest(manifest_path)
    assert manifest["format"] == "dvt-mindir/1" and manifest["model"] == "dvt_tiny_t2t"
    assert manifest["grids"] == [2, 3, 4] and manifest["batch_size"] is None and manifest["num_classes"] == 10
    assert [s["file"] for s in manifest["stages"]] == ["tiny_stage1.mindir", "tiny_stage2.mindir", "tiny_stage3.mindir"]
    assert [i["name"] for i in manifest["stages"][1]["inputs"]] == ["image", "tokens", "relations"]
    assert manifest["stages"][1]["inputs"][2]["shape"] == [-1, 4, 5, 5]  # L*NH channels, (2x2+1) tokens
    assert [o["name"] for o in manifest["stages"][2]["outputs"]] == ["logits"]
    assert manifest["preprocess"] == PREPROCESS
    assert len(manifest["thresholds"]) == 2 and manifest["cascade"]["file"] == "tiny_cascade.mindir"


def test_each_stage_round_trips(exported):
    net, manifest_path = exported
    folder = os.path.dirname(manifest_path)
    manifest = read_manifest(manifest_path)
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    upstream = ()
    for k, entry in enumerate(manifest["stages"]):
        expected = net.stages[k](ms.Tensor(images), *upstream)
        loaded = nn.GraphCell(ms.load(os.path.join(folder, entry["file"])))
        got = loaded(ms.Tensor(images), *upstream)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expected) == len(entry["outputs"])
        for a, b, spec in zip(got, expected, entry["outputs"], strict=True):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5)
            assert list(a.shape)[1:] == spec["shape"][1:]
        upstream = tuple(expected[1:])
    whole = nn.GraphCell(ms.load(os.path.join(folder, manifest["cascade"]["file"])))(ms.Tensor(images))
    for a, b in zip(whole, net(ms.Tensor(images)), strict=True):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), atol=1e-5)


def test_runner_equals_adaptive_inference(exported, tmp_path):
    net, manifest_path = exported
    rng = np.random.default_rng(2)
    paths = []
    for i in range(12):
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    images = preprocess(paths, PREPROCESS)
    assert images.shape == (12, 3, 32, 32)
    runner = CascadeRunner(manifest_path, backend="mindspore")
    adaptive = AdaptiveCascade(net)
    conf = [o.asnumpy() for o in net(ms.Tensor(images))]
    for thresholds in ([float(np.median(c.max(1))) for c in conf[:2]] + [0.0], [1e8, 1e8, 0.0], [0.0, 0.0, 0.0]):
        adaptive.set_thresholds(thresholds)
        expected = adaptive(ms.Tensor(images))
        got = runner.run(images, thresholds)
        np.testing.assert_array_equal(got.exits, expected.exits)
        np.testing.assert_array_equal(got.predictions, expected.predictions)
    assert thresholds_for_budget(runner.manifest, 0.0015) == [0.15, 0.14, 0.0]
    cli = subprocess.run([sys.executable, "-m", "src.deploy.runner", "--manifest", manifest_path, "--budget", "0.002",
                          *paths[:2]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.count("exit ") == 2 and paths[0] in cli.stdout


def test_manifest_errors(exported, tmp_path):
    _, manifest_path = exported
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "manifest.json"))
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest["stages"][1]["file"] = "gone.mindir"
    broken = os.path.join(os.path.dirname(manifest_path), "broken_manifest.json")
    with open(broken, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(ManifestError, match="missing in .*: gone.mindir$"):
        read_manifest(broken)


def test_export_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "export.py", "--config_path", "config/demo.yaml", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    missing = run("--ckpt_file", str(tmp_path / "none.ckpt"), "--file_name", str(tmp_path / "x"))
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr
    ms.set_seed(0)
    other = create_model("dvt_tiny_deit")
    ckpt = str(tmp_path / "deit.ckpt")
    ms.save_checkpoint(other, ckpt)
    wrong = run("--ckpt_file", ckpt, "--file_name", str(tmp_path / "x"))
    assert wrong.returncode == 1 and "does not fit this model" in wrong.stderr


def test_mindir_files_do_not_need_the_cpu_kernel_library(exported):
    from src.models import cpu_kernels

    assert cpu_kernels.library_path() is not None  # the net was built with the kernels: the check below can fail
    folder = os.path.dirname(exported[1])
    for name in sorted(os.listdir(folder)):
        if name.endswith(".mindir"):
            with open(os.path.join(folder, name), "rb") as handle:
                assert b"libdvt_cpu_kernels" not in handle.read(), name
