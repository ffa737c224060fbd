"""Official checkpoint -> MindSpore: a round trip through a real .pth.tar, and its error cases."""

import errno
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from conftest import ROOT, images
from numpy_dvt import dvt_forward, official_state_dict

from src.convert import ConversionError, official_to_mindspore
from src.flops import exit_gflops
from src.models import CheckpointMismatch, create_model, model_spec
from src.models.weights import parameter_shapes
from tests.faults import limit_file_size

torch = pytest.importorskip("torch", reason="the converter's optional extra (requirements-convert.txt)")

SCRIPT = os.path.join(ROOT, "scripts", "convert_pytorch.py")
NUM_CLASSES = 6


def official_release(path, spec, state):
    """Write `state` the way the official DVT release is saved."""
    torch.save({
        "model_state_dict": {k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()},
        "flops": [0.1, 0.3, 0.7],
        "anytime_classification": [60.0, 65.5, 70.25],
        "dynamic_threshold": torch.tensor([[0.9, 0.8, -1e8], [1e8, 0.7, -1e8]]),
        "budgeted_batch_classification": [[0.2, 0.4], [61.0, 66.0]],
    }, path)


def convert(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    spec = model_spec("dvt_tiny_t2t", num_classes=NUM_CLASSES)
    state = official_state_dict(spec, np.random.default_rng(5))
    folder = tmp_path_factory.mktemp("release")
    path = str(folder / "DVT_tiny.pth.tar")
    official_release(path, spec, state)
    return spec, state, path, folder


def test_round_trip_loads_strictly_and_reproduces_the_oracle(release):
    spec, state, path, folder = release
    dst = str(folder / "out" / "dvt_tiny.ckpt")
    result = convert("--src", path, "--arch", "dvt_tiny_t2t", "--dst", dst)
    assert result.returncode == 0, result.stderr
    net = create_model("dvt_tiny_t2t", num_classes=NUM_CLASSES)
    not_loaded, unexpected = ms.load_param_into_net(net, ms.load_checkpoint(dst), strict_load=True)
    assert not not_loaded and not unexpected
    net.set_train(False)
    x = images(spec, seed=9)
    for ours, ref in zip(net(ms.Tensor(x)), dvt_forward(spec, state, x.astype(np.float64)), strict=True):
        assert np.abs(ours.asnumpy() - ref).max() <= 1e-5
    meta = json.load(open(str(folder / "out" / "dvt_tiny.json")))
    assert meta["model"] == "dvt_tiny_t2t" and meta["num_classes"] == NUM_CLASSES and "arch" not in meta
    assert meta["exit_gflops"] == exit_gflops(spec) and "analytic_gflops" not in meta  # training's names
    assert meta["flops"] == [0.1, 0.3, 0.7] and meta["anytime_classification"] == [60.0, 65.5, 70.25]
    np.testing.assert_allclose(meta["dynamic_threshold"], [[0.9, 0.8, -1e8], [1e8, 0.7, -1e8]], rtol=1e-6)
    assert meta["budgeted_batch_classification"] == [[0.2, 0.4], [61.0, 66.0]]
    assert meta["spec"]["grids"] == [2, 3, 4]
    assert not [f for f in os.listdir(folder / "out") if "partial" in f]


def test_other_architecture_names_the_mismatching_parameters(release):
    _, _, path, folder = release
    result = convert("--src", path, "--arch", "dvt_tiny_deit", "--dst", str(folder / "x.ckpt"))
    assert result.returncode == 1
    assert "does not fit" in result.stderr and "DVT_tiny.pth.tar" in result.stderr
    assert "missing: stages.0.blocks.0.attn.qkv.bias" in result.stderr  # DeiT has a qkv bias, T2T not
    assert "unexpected: stages.0.tokenizer.attention1" in result.stderr
    assert not os.path.exists(folder / "x.ckpt")


def test_missing_key_is_named():
    spec = model_spec("dvt_tiny_t2t")
    state = official_state_dict(spec, np.random.default_rng(0))
    del state["less_token.blocks.1.feature_resuse_mlp.1.fc2.bias"]
    shapes = parameter_shapes(create_model("dvt_tiny_t2t"))
    with pytest.raises(ConversionError, match=r"1 missing: stages\.1\.blocks\.1\.feature_reuse\.mlp\.fc2\.bias"):
        official_to_mindspore(state, shapes)


def test_wrong_shape_is_named():
    spec = model_spec("dvt_tiny_t2t")
    state = official_state_dict(spec, np.random.default_rng(0))
    state["normal_token.head.weight"] = state["normal_token.head.weight"][:3]
    shapes = parameter_shapes(create_model("dvt_tiny_t2t"))
    expected = r"shape of stages\.2\.head\.weight: model \(10, 32\), checkpoint \(3, 32\)"
    with pytest.raises(ConversionError, match=expected):
        official_to_mindspore(state, shapes)


def test_truncated_and_missing_files_are_clear_errors(release, tmp_path):
    _, _, path, _ = release
    truncated = tmp_path / "cut.pth.tar"
    truncated.write_bytes(open(path, "rb").read()[:5000])
    result = convert("--src", str(truncated), "--arch", "dvt_tiny_t2t", "--dst", str(tmp_path / "o.ckpt"))
    assert result.returncode == 1 and "cannot read" in result.stderr and "cut.pth.tar" in result.stderr
    absent = str(tmp_path / "nope.pth.tar")
    result = convert("--src", absent, "--arch", "dvt_tiny_t2t", "--dst", str(tmp_path / "o.ckpt"))
    assert result.returncode == 1 and "not found" in result.stderr
    assert "o.ckpt" not in os.listdir(tmp_path)


def test_loading_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = str(tmp_path / "deit.ckpt")
    ms.save_checkpoint(create_model("dvt_tiny_deit"), path)
    with pytest.raises(CheckpointMismatch, match=r"missing: .*stages\.0\.tokenizer\.attention1"):
        create_model("dvt_tiny_t2t", checkpoint_path=path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("dvt_tiny_t2t", checkpoint_path=str(tmp_path / "absent.ckpt"))


def snapshot(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def converted_logits(dst: str, x: np.ndarray) -> list[np.ndarray]:
    net = create_model("dvt_tiny_t2t", num_classes=NUM_CLASSES, checkpoint_path=dst)
    net.set_train(False)
    return [o.asnumpy() for o in net(ms.Tensor(x))]


@pytest.fixture(scope="module")
def good_conversion(release, tmp_path_factory):
    """A finished conversion of the release, the logits it gives, and a second release with other weights."""
    spec, state, path, folder = release
    out = tmp_path_factory.mktemp("converted")
    dst = str(out / "dvt_tiny.ckpt")
    assert convert("--src", path, "--arch", "dvt_tiny_t2t", "--dst", dst).returncode == 0
    x = images(spec, seed=3)
    other = str(folder / "other.pth.tar")
    official_release(other, spec, official_state_dict(spec, np.random.default_rng(6)))
    return out, dst, x, converted_logits(dst, x), other


def test_a_conversion_that_fails_part_way_keeps_the_previous_one(good_conversion):
    out, dst, x, logits, other = good_conversion
    before = snapshot(out)
    limit = len(before["dvt_tiny.ckpt"]) // 2  # the checkpoint write stops half-way, as on a full disk
    result = subprocess.run([sys.executable, SCRIPT, "--src", other, "--arch", "dvt_tiny_t2t", "--dst", dst],
                            capture_output=True, text=True, cwd=ROOT, preexec_fn=limit_file_size(limit))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # MindSpore's saver logs its own CRITICAL line; ours is the last, one line
    assert result.stderr.strip().splitlines()[-1] == f"error: cannot write {dst}: [Errno 27] File too large"
    assert snapshot(out) == before  # no temp file left (neither ours nor the saver's .tmp), nothing changed
    for ours, previous in zip(converted_logits(dst, x), logits, strict=True):
        np.testing.assert_array_equal(ours, previous)


def test_a_failed_metadata_write_keeps_the_previous_pair(good_conversion, monkeypatch):
    from src import convert as converter
    from src.atomic import WriteFailed

    out, dst, x, logits, other = good_conversion
    before = snapshot(out)

    def disk_fills(path, obj):
        def half(tmp):
            with open(tmp, "w") as handle:
                handle.write('{"arch": "dvt_t')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        converter.write_atomic(path, half)

    monkeypatch.setattr(converter, "write_json", disk_fills)
    json_path = converter.meta_path(dst)
    with pytest.raises(WriteFailed, match=rf"^cannot write {json_path}: \[Errno 28\] No space left on device$"):
        converter.convert_checkpoint(other, "dvt_tiny_t2t", dst)
    assert snapshot(out) == before  # the new checkpoint was written but never renamed over the old one
    for ours, previous in zip(converted_logits(dst, x), logits, strict=True):
        np.testing.assert_array_equal(ours, previous)


def test_a_converted_checkpoint_names_its_model_to_a_command_without_a_recipe(good_conversion):
    from src.config import resolve
    from src.engine.checkpoint import recipe_from_checkpoint
    from src.engine.inference import load_network

    _, dst, x, logits, _ = good_conversion
    config, _ = resolve([], "t", no_recipe=lambda args: recipe_from_checkpoint(dst, args.model is not None))
    assert (config["model"], config["num_classes"], config["img_size"]) == ("dvt_tiny_t2t", NUM_CLASSES, 32)
    net, _ = load_network(config, dst)
    for got, want in zip(net(ms.Tensor(x)), logits, strict=True):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-6)


def test_a_converted_checkpoint_of_another_model_is_refused_naming_its_model(good_conversion, tmp_path):
    """The mismatch names the converted model, from today's JSON and from one with an older converter's names."""
    from src.engine.checkpoint import check_architecture
    from src.metadata import meta_path, read_meta

    _, dst, *_ = good_conversion
    wanted = model_spec("dvt_tiny_deit", num_classes=NUM_CLASSES).to_dict()
    with pytest.raises(CheckpointMismatch, match=rf"^{dst} holds a dvt_tiny_t2t model, this run builds dvt_tiny_deit"):
        check_architecture(read_meta(dst), wanted, "dvt_tiny_deit", dst)
    meta = json.load(open(meta_path(dst)))
    old = str(tmp_path / "old.ckpt")
    with open(meta_path(old), "w") as handle:
        json.dump({"arch": meta["model"], "analytic_gflops": meta["exit_gflops"],
                   **{k: v for k, v in meta.items() if k not in ("model", "exit_gflops")}}, handle)
    assert read_meta(old) == meta
    with pytest.raises(CheckpointMismatch, match=rf"^{old} holds a dvt_tiny_t2t model"):
        check_architecture(read_meta(old), wanted, "dvt_tiny_deit", old)
