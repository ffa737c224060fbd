"""MindIR export: every stage loads back and equals the Python model; the runner equals adaptive inference, on
dynamic- and fixed-batch exports; the manifest's preprocessing and class names are what the runner uses; errors
are one line."""

import errno
import json
import os
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from conftest import assert_runner_equals_adaptive
from mindspore import nn
from PIL import Image

from src.atomic import WriteFailed
from src.deploy.export import ExportError, export_cascade
from src.deploy.runner import (
    CascadeRunner,
    ManifestError,
    file_digest,
    preprocess,
    read_manifest,
    thresholds_for_budget,
)
from src.engine.adaptive import AdaptiveCascade
from src.engine.evaluate import softmax
from src.models import create_model
from tests.faults import limit_file_size

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
    assert manifest["format"] == "dvt-export/3" and manifest["model"] == "dvt_tiny_t2t"
    assert manifest["file_format"] == "MINDIR" and manifest["class_names"] is None
    assert manifest["grids"] == [2, 3, 4] and manifest["batch_size"] is None and manifest["num_classes"] == 10
    assert [s["file"] for s in manifest["stages"]] == ["tiny_stage1.mindir", "tiny_stage2.mindir", "tiny_stage3.mindir"]
    assert [i["name"] for i in manifest["stages"][1]["inputs"]] == ["image", "tokens", "relations"]
    assert manifest["stages"][1]["inputs"][2]["shape"] == [-1, 4, 5, 5]  # L*NH channels, (2x2+1) tokens
    assert [o["name"] for o in manifest["stages"][1]["outputs"]] == ["logits", "next_tokens", "next_relations"]
    assert [o["name"] for o in manifest["stages"][2]["outputs"]] == ["logits"]
    assert manifest["preprocess"] == PREPROCESS
    assert len(manifest["thresholds"]) == 2 and manifest["cascade"]["file"] == "tiny_cascade.mindir"
    folder = os.path.dirname(manifest_path)
    for entry in [*manifest["stages"], manifest["cascade"]]:
        assert file_digest(os.path.join(folder, entry["file"])) == (entry["bytes"], entry["sha256"])
        assert entry["bytes"] > 10000
    assert sorted(os.listdir(folder)) == ["manifest.json", "tiny_cascade.mindir", "tiny_stage1.mindir",
                                          "tiny_stage2.mindir", "tiny_stage3.mindir"]
    assert not [name for name in os.listdir(os.path.dirname(folder)) if ".partial-" in name or ".replaced-" in name]


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


def runner_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.deploy.runner", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a CLI that refused its input (exit 1, no traceback)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def copy_export(manifest_path: str, folder) -> str:
    shutil.copytree(os.path.dirname(manifest_path), folder)
    return os.path.join(folder, "manifest.json")


def edit_manifest(path: str, change) -> str:
    with open(path) as handle:
        manifest = json.load(handle)
    change(manifest)
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    return path


def test_manifest_errors(exported, tmp_path):
    _, manifest_path = exported
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "manifest.json"))
    gone = copy_export(manifest_path, tmp_path / "gone")
    edit_manifest(gone, lambda m: m["stages"][1].update(file="gone.mindir"))
    with pytest.raises(ManifestError, match="missing in .*: gone.mindir$"):
        read_manifest(gone)


SCHEMA_CASES = {
    "stage without file": (lambda m: m["stages"][0].pop("file"), "stage 1 lacks 'file'"),
    "file is a number": (lambda m: m["stages"][2].update(file=3), "stage 3: 'file' must be str, not int 3"),
    "file outside the folder": (lambda m: m["stages"][0].update(file="../x.mindir"), "must be a plain file name"),
    "size as text": (lambda m: m["stages"][1].update(bytes="12"), "stage 2: 'bytes' must be int, not str"),
    "no checksum": (lambda m: m["cascade"].pop("sha256"), "cascade lacks 'sha256'"),
    "checksum not hex": (lambda m: m["stages"][0].update(sha256="z" * 64), "'sha256' must be 64 lower-case hex"),
    "no num_classes": (lambda m: m.pop("num_classes"), "lacks 'num_classes'"),
    "stages not a list": (lambda m: m.update(stages={"file": "a"}), "'stages' must be list, not dict"),
    "no stages": (lambda m: m.update(stages=[]), "'stages' is empty"),
    "stage not an object": (lambda m: m["stages"].__setitem__(1, "tiny_stage2.mindir"), "stage 2 must be an object"),
    "unknown format": (lambda m: m.update(format="dvt-mindir/9"), "format 'dvt-mindir/9' is not 'dvt-export/3'"),
    "old format": (lambda m: m.update(format="dvt-mindir/2"), "export the model again"),
    "unknown file format": (lambda m: m.update(file_format="TFLITE"), "file_format 'TFLITE' is not one of MINDIR"),
    "batch of 0": (lambda m: m.update(batch_size=0), "'batch_size' must be null"),
    "class names of 3": (lambda m: m.update(class_names=["a", "b", "c"]), "'class_names' must be null or 10 strings"),
    "unknown layout": (lambda m: m["preprocess"].update(layout="CHW"), "layout 'CHW' is not one of NCHW, NHWC"),
    "no pixel scale": (lambda m: m["preprocess"].pop("pixel_scale"), "'pixel_scale' must be a positive"),
    "no interpolation": (lambda m: m["preprocess"].pop("interpolation"), "preprocess lacks 'interpolation'"),
    "no format": (lambda m: m.pop("format"), "lacks 'format'"),
    "preprocess without resize": (lambda m: m["preprocess"].pop("resize"), "preprocess lacks 'resize'"),
    "mean of 2": (lambda m: m["preprocess"].update(mean=[0.5, 0.5]), "'mean' must be 3 finite numbers"),
    "unknown interpolation": (lambda m: m["preprocess"].update(interpolation="lanczos"), "interpolation 'lanczos'"),
    "thresholds row of 1": (lambda m: m["thresholds"][0].update(thresholds=[0.5]),
                            r"row 1 \(0.001 GFLOPs\) holds 1 threshold\(s\) for 3 exits"),
    "thresholds row of 5": (lambda m: m["thresholds"][1].update(thresholds=[0.5, 0.4, 0.3, 0.2, 0.0]),
                            r"row 2 \(0.002 GFLOPs\) holds 5 threshold\(s\) for 3 exits"),
    "threshold not a number": (lambda m: m["thresholds"][0].update(thresholds=[0.5, "high", 0.0]),
                               "thresholds must be a list of finite numbers"),
    "row without budget": (lambda m: m["thresholds"][0].pop("budget_gflops"), "row 1 must hold 'budget_gflops'"),
}


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_manifest_schema_errors_are_one_line(exported, tmp_path, case):
    change, message = SCHEMA_CASES[case]
    path = edit_manifest(copy_export(exported[1], tmp_path / "export"), change)
    with pytest.raises(ManifestError, match=message) as raised:
        read_manifest(path)
    assert "\n" not in str(raised.value) and str(raised.value).startswith(path)


def test_runner_verifies_every_file_before_loading(exported, tmp_path):
    _, manifest_path = exported
    image = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(image)
    cut = copy_export(manifest_path, tmp_path / "cut")
    stage2 = os.path.join(os.path.dirname(cut), "tiny_stage2.mindir")
    size = os.path.getsize(stage2)
    with open(stage2, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(ManifestError, match=f"tiny_stage2.mindir is {size - 100} bytes, the manifest recorded "
                                            f"{size}"):
        CascadeRunner(cut, backend="mindspore")
    flipped = copy_export(manifest_path, tmp_path / "flipped")
    cascade = os.path.join(os.path.dirname(flipped), "tiny_cascade.mindir")
    with open(cascade, "r+b") as handle:  # same size, one byte changed
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match=r"tiny_cascade.mindir: sha256 [0-9a-f]{16}\.\.\. differs from"):
        read_manifest(flipped)
    line = one_line_error(runner_cli("--manifest", cut, "--budget", "1", image))
    assert line.startswith("runner: error: ") and "tiny_stage2.mindir" in line and "bytes" in line
    line = one_line_error(runner_cli("--manifest", edit_manifest(cut, lambda m: m["stages"][0].pop("file")),
                                     "--budget", "1", image))
    assert "stage 1 lacks 'file'" in line
    for budget in ("nan", "inf", "-1", "0", "cheap"):
        line = one_line_error(runner_cli("--manifest", manifest_path, "--budget", budget, image))
        assert line == f"runner: error: --budget must be a positive number of GFLOPs per image, not {budget!r}"


def test_runner_refuses_a_thresholds_list_of_another_length(exported):
    _, manifest_path = exported
    runner = CascadeRunner(manifest_path, backend="mindspore")
    images = np.zeros((2, 3, 32, 32), np.float32)
    for thresholds in ([0.5], [0.5, 0.4, 0.3, 0.2, 0.0]):
        with pytest.raises(ValueError, match=f"{len(thresholds)} threshold\\(s\\) for 3 exits"):
            runner.run(images, thresholds)


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
    wrong = run("--ckpt_file", ckpt, "--file_name", str(tmp_path / "out" / "x"))
    assert wrong.returncode == 1 and "does not fit this model" in wrong.stderr


def test_mindir_files_do_not_need_the_cpu_kernel_library(exported):
    from src.models import cpu_kernels

    assert cpu_kernels.library_path() is not None  # the net was built with the kernels: the check below can fail
    folder = os.path.dirname(exported[1])
    for name in sorted(os.listdir(folder)):
        if name.endswith(".mindir"):
            with open(os.path.join(folder, name), "rb") as handle:
                assert b"libdvt_cpu_kernels" not in handle.read(), name


def test_export_leaves_the_network_as_it_was(exported):
    """export_cascade writes stock-op graphs but hands the network back with its fast kernels."""
    from src.models import cpu_kernels
    from src.models.layers import GELU, Attention, Block, HeadPermute, LayerNorm, Mlp, ScaledSoftmax
    from src.models.reuse import RelationReuse, TokenResample
    from src.models.tokenizers import SoftSplit, TokenPerformer

    assert cpu_kernels.library_path() is not None
    kernels = {type(cell) for _, cell in exported[0].cells_and_names() if getattr(cell, "fast_kernel", None)}
    assert kernels == {LayerNorm, GELU, Mlp, Attention, Block, ScaledSoftmax, HeadPermute, SoftSplit, TokenResample,
                       RelationReuse, TokenPerformer}


def listing(folder) -> dict:
    return {name: file_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if ".partial-" in name or ".replaced-" in name or ".tmp" in name]


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path):
    ms.set_seed(0)
    net = create_model("dvt_tiny_t2t", drop_path_rate=0.0)
    folder = tmp_path / "export"
    thresholds = [{"budget_gflops": 0.002, "thresholds": [0.2, 0.16, 0.0]}]
    manifest = export_cascade(net, str(folder / "tiny"), preprocess=PREPROCESS, whole_cascade=True,
                              thresholds=thresholds)
    before = listing(folder)
    images = np.random.default_rng(3).normal(size=(8, 3, 32, 32)).astype(np.float32)
    medians = [float(np.median(softmax(o.asnumpy()).max(1))) for o in net(ms.Tensor(images))[:2]]
    policies = (medians + [0.0], [0.0, 0.0, 0.0], [1e8, 1e8, 0.0])
    runner = CascadeRunner(manifest, backend="mindspore")
    answers = [runner.run(images, t) for t in policies]
    # Re-export a 3-class model over it; the file size limit lets every stage through and stops the
    # whole-cascade file part-way, as a disk that fills up during the export.
    ckpt = str(tmp_path / "three.ckpt")
    ms.save_checkpoint(create_model("dvt_tiny_t2t", num_classes=3), ckpt)
    limit = max(size for name, (size, _) in before.items() if "_stage" in name) + 4096
    assert limit < before["tiny_cascade.mindir"][0]
    result = subprocess.run([sys.executable, "export.py", "--config_path", "config/demo.yaml", "--num_classes", "3",
                             "--ckpt_file", ckpt, "--file_name", str(folder / "tiny"), "--whole_cascade"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size(limit))
    assert one_line_error(result) == (f"export.py: error: cannot write {folder}/tiny_cascade.mindir: "
                                      "[Errno 27] File too large")
    assert listing(folder) == before and not leftovers(tmp_path) and not leftovers(folder)
    again = CascadeRunner(manifest, backend="mindspore")
    assert again.manifest["num_classes"] == 10
    for thresholds, answer in zip(policies, answers, strict=True):
        got = again.run(images, thresholds)
        np.testing.assert_array_equal(got.predictions, answer.predictions)
        np.testing.assert_array_equal(got.exits, answer.exits)
        np.testing.assert_array_equal(got.confidences, answer.confidences)
    assert len({tuple(a.exits) for a in answers}) == 3  # the policies differ: the comparison can fail


def test_a_failed_export_into_a_new_or_empty_folder_leaves_nothing(exported, tmp_path, monkeypatch):
    net, _ = exported
    real_export = ms.export

    def disk_fills_on_stage2(cell, *inputs, file_name, file_format):
        if file_name.endswith("_stage2"):
            with open(file_name + ".mindir", "wb") as handle:
                handle.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_export(cell, *inputs, file_name=file_name, file_format=file_format)

    monkeypatch.setattr(ms, "export", disk_fills_on_stage2)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "new"):
        message = rf"^cannot write {folder}/tiny_stage2.mindir: \[Errno 28\] No space left on device$"
        with pytest.raises(WriteFailed, match=message):
            export_cascade(net, str(folder / "tiny"), preprocess=PREPROCESS)
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(empty) == []


def test_export_refuses_a_folder_that_holds_other_files(exported, tmp_path):
    net, _ = exported
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.ckpt").write_bytes(b"weights")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"holds files that are not part of an export \(best.ckpt, notes.txt\)"):
        export_cascade(net, str(run / "tiny"), preprocess=PREPROCESS)
    assert sorted(os.listdir(run)) == ["best.ckpt", "notes.txt"] and os.listdir(tmp_path) == ["run"]


@pytest.mark.parametrize("row", [[0.5], [0.5, 0.4, 0.3, 0.2, 0.0]])
def test_export_refuses_thresholds_rows_of_another_length(exported, tmp_path, capsys, row):
    import export

    net, _ = exported
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(net, ckpt)
    table = str(tmp_path / "thresholds.json")
    with open(table, "w") as handle:
        json.dump({"budgets": [{"budget_gflops": 0.002, "thresholds": [0.2, 0.1, 0.0]},
                               {"budget_gflops": 0.003, "thresholds": row}]}, handle)
    code = export.main(["--config_path", "config/demo.yaml", "--ckpt_file", ckpt, "--file_name",
                        str(tmp_path / "out" / "tiny"), "--thresholds_file", table])
    assert code == 1
    assert capsys.readouterr().err == (f"export.py: error: {table}: row 2 (0.003 GFLOPs) holds {len(row)} "
                                       "threshold(s) for 3 exits: give one per exit (the last exit's is not used)\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture(scope="module")
def fixed_batch_export(exported, tmp_path_factory):
    net, _ = exported
    folder = tmp_path_factory.mktemp("fixed")
    return export_cascade(net, str(folder / "tiny"), preprocess=PREPROCESS, batch=4,
                          class_names=[str(i) for i in range(10)])


@pytest.mark.parametrize("count", [1, 3, 4, 9])
def test_a_fixed_batch_export_runs_any_number_of_images(exported, fixed_batch_export, count):
    """Fewer, as many as, more and not a multiple of the exported 4: split and padded, nothing leaks."""
    net, _ = exported
    images = np.random.default_rng(count).normal(size=(count, 3, 32, 32)).astype(np.float32)
    runner = CascadeRunner(fixed_batch_export, backend="mindspore")
    assert runner.manifest["batch_size"] == 4
    seen = assert_runner_equals_adaptive(runner, net, images)
    assert count == 1 or len(seen) == 3  # the policies differ: the comparison can fail
    if count > 1:  # padding rows would shift these if they leaked: compare with the images run one by one
        alone = [runner.run(images[i:i + 1], [1e8, 1e8, 0.0]).confidences[0] for i in range(count)]
        np.testing.assert_allclose(runner.run(images, [1e8, 1e8, 0.0]).confidences, alone, rtol=0, atol=1e-6)


def test_preprocess_applies_the_manifest_fields(tmp_path):
    """pixel_scale, mean/std, layout, resize and interpolation as given, against NumPy on a PIL resize."""
    rng = np.random.default_rng(4)
    path = str(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(path)
    config = {**PREPROCESS, "resize": 30, "img_size": 28, "interpolation": "bilinear", "pixel_scale": 1 / 127.5,
              "mean": [1.0, 0.5, 0.0], "std": [1.0, 2.0, 0.5], "layout": "NHWC"}
    with Image.open(path) as image:
        resized = np.asarray(image.convert("RGB").resize((30, 37), Image.BILINEAR), np.float64)
    top, left = round((37 - 28) / 2), 1
    want = (resized[top:top + 28, left:left + 28] / 127.5 - [1.0, 0.5, 0.0]) / [1.0, 2.0, 0.5]
    got = preprocess([path], config)
    assert got.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(preprocess([path], {**config, "layout": "NCHW"})[0], want.transpose(2, 0, 1),
                               rtol=0, atol=1e-5)


def test_export_and_runner_cli_errors_are_one_line(exported, fixed_batch_export, tmp_path):
    net, manifest_path = exported
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(net, ckpt)

    def export_cli(*args):
        return subprocess.run([sys.executable, "export.py", "--config_path", "config/demo.yaml", "--ckpt_file", ckpt,
                               "--file_name", str(tmp_path / "out" / "tiny"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    line = one_line_error(export_cli("--file_format", "AIR"))
    assert line == ("export.py: error: AIR export runs only on Ascend (this is CPU): use --file_format MINDIR or "
                    "ONNX here")
    line = one_line_error(export_cli("--file_format", "ONNX"))
    assert line.startswith("export.py: error: ONNX needs a fixed batch") and "--batch_size N" in line
    assert not os.path.exists(tmp_path / "out")
    image = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(image)
    line = one_line_error(runner_cli("--manifest", manifest_path, "--budget", "1", "--backend", "onnxruntime", image))
    assert line == "runner: error: the onnxruntime backend cannot run MINDIR files: use lite or mindspore"
    # A machine without MindSpore Lite nor MindSpore: both imports fail, the error says how to install.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for module in ("mindspore_lite", "mindspore"):
        (blocked / f"{module}.py").write_text("raise ImportError('not installed here')\n")
    result = subprocess.run([sys.executable, "-m", "src.deploy.runner", "--manifest", fixed_batch_export,
                             "--budget", "1", image], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(blocked)})
    assert one_line_error(result) == ("runner: error: the mindspore runtime for MINDIR files is not installed: "
                                      "pip install -r requirements.txt")
    result = subprocess.run([sys.executable, "-m", "src.deploy.runner", "--manifest", fixed_batch_export,
                             "--budget", "1", "--backend", "lite", image], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(blocked)})
    assert "the lite runtime for MINDIR files is not installed: pip install mindspore-lite" in one_line_error(result)


def test_export_writes_the_demo_class_names(tmp_path):
    import export

    ms.set_seed(0)
    net = create_model("dvt_tiny_t2t")
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(net, ckpt)
    assert export.main(["--config_path", "config/demo.yaml", "--ckpt_file", ckpt, "--file_name",
                        str(tmp_path / "out" / "tiny")]) == 0
    manifest = read_manifest(str(tmp_path / "out" / "manifest.json"))
    assert manifest["class_names"] == [str(d) for d in range(10)] and manifest["file_format"] == "MINDIR"


def test_class_names_come_from_the_training_data(tmp_path):
    from src.data.sources import class_names

    for name in ("n02", "n01", "cat"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / name / "a.png")
    assert class_names("folder", str(tmp_path)) == ["cat", "n01", "n02"]
    assert class_names("folder", str(tmp_path / "nowhere")) is None and class_names("folder", None) is None
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    assert class_names("cifar10", str(cifar)) is None
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (cifar / "batches.meta.txt").write_text("\n".join(labels) + "\n\n")
    assert class_names("cifar10", str(cifar)) == labels
    assert class_names("demo", None) == [str(d) for d in range(10)]
