"""The training step and checkpoints, checked against NumPy: loss, EMA, skipped overflow, AMP, files."""

import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from src.atomic import WriteFailed, remove_partials
from src.engine.checkpoint import CheckpointManager, load_model_weights, load_train_state, restore_newest
from src.engine.optim import AdamW, param_groups
from src.engine.train_step import AccumulateGrads, DVTWithLoss, ModelEMA, TrainStep, loss_scale_sense
from src.engine.trainer import apply_amp
from src.models import create_model
from src.models.tokenizers import TokenPerformer

BATCH, CLASSES, SIZE = 4, 3, 16


def tiny(seed: int = 0):
    ms.set_seed(seed)
    return create_model("dvt_tiny_deit", num_classes=CLASSES, img_size=SIZE, drop_path_rate=0.0)


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(BATCH, 3, SIZE, SIZE)).astype(np.float32)
    targets = rng.dirichlet(np.ones(CLASSES), BATCH).astype(np.float32)
    return images, targets


def numpy_loss(exits, targets) -> float:
    total = 0.0
    for logits in exits:
        shifted = logits - logits.max(1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        total += float((-(targets * log_probs).sum(1)).mean())
    return total


@pytest.fixture(scope="module")
def step_parts():
    """One compiled train step (dynamic loss scaling, EMA 0.9) and the net it trains."""
    net = tiny()
    shadow = tiny(seed=1)
    ema = ModelEMA(net, shadow, 0.9)
    optimizer = AdamW(param_groups(net, 0.05), learning_rate=ms.Tensor(np.full(10, 1e-2, np.float32)))
    step = TrainStep(DVTWithLoss(net), optimizer, loss_scale_sense("dynamic", 1024.0, 1000), ema=ema)
    step.set_train(True)
    return net, ema, optimizer, step


def test_loss_is_the_sum_of_every_exits_soft_cross_entropy():
    net = tiny()
    net.set_train(False)
    images, targets = batch()
    exits = [o.asnumpy() for o in net(ms.Tensor(images))]
    loss = DVTWithLoss(net)
    loss.set_train(False)
    value = float(loss(ms.Tensor(images), ms.Tensor(targets)).asnumpy())
    assert value == pytest.approx(numpy_loss(exits, targets), rel=1e-5)


def test_step_updates_weights_and_the_ema(step_parts):
    net, ema, optimizer, step = step_parts
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    images, targets = batch()
    loss, overflowed, scale = step(ms.Tensor(images), ms.Tensor(targets)).asnumpy()
    assert np.isfinite(loss) and not overflowed
    assert scale == 1024.0
    cls = "stages.0.cls_token"
    after = dict((p.name, p.asnumpy()) for p in net.get_parameters())
    assert not np.allclose(after[cls], before[cls])
    shadow = dict((p.name, p.asnumpy()) for p in ema.shadow.get_parameters())
    # the shadow started at the net's weights (copy_from) and moved 10% of the way to the new ones
    np.testing.assert_allclose(shadow["ema." + cls], 0.9 * before[cls] + 0.1 * after[cls], rtol=1e-5, atol=1e-7)
    frozen = [p.name for p in net.get_parameters() if not p.requires_grad]
    for name in frozen:
        np.testing.assert_array_equal(shadow["ema." + name], before[name])


def test_overflow_skips_the_update_but_advances_the_schedule(step_parts):
    net, ema, optimizer, step = step_parts
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    shadow_before = {p.name: p.asnumpy().copy() for p in ema.shadow.get_parameters()}
    global_step = int(optimizer.global_step.asnumpy().reshape(-1)[0])
    adam_step = int(optimizer.adam_step.asnumpy().reshape(-1)[0])
    images, targets = batch(1)
    images[0, 0, 0, 0] = np.inf
    _, overflowed, scale = step(ms.Tensor(images), ms.Tensor(targets)).asnumpy()
    assert overflowed
    assert scale == float(step.scale_sense.asnumpy()) == 512.0  # halved for the next step
    for p in net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])
    for p in ema.shadow.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), shadow_before[p.name])
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == global_step + 1
    assert int(optimizer.adam_step.asnumpy().reshape(-1)[0]) == adam_step


def three_states(step_parts, folder: str, keep: int) -> CheckpointManager:
    """A manager keeping `keep` states that has saved the states of epochs 1, 2 and 3 (steps 10, 20, 30)."""
    net, _, _, step = step_parts
    manager = CheckpointManager(folder, "dvt_tiny_deit", keep=keep)
    meta = {"model": "dvt_tiny_deit", "spec": net.spec.to_dict()}
    for epoch in (1, 2, 3):
        manager.save_train_state(step, epoch, dict(meta, step=10 * epoch))
    return manager


def test_checkpoint_manager_keeps_the_last_k_and_restores(step_parts, tmp_path):
    net, ema, optimizer, step = step_parts
    manager = three_states(step_parts, str(tmp_path), keep=2)
    assert [s for s, _ in manager.train_states()] == [20, 30]
    # a checkpoint without its JSON is incomplete and never picked; stale temp files are removed
    open(os.path.join(str(tmp_path), "dvt_tiny_deit-e0009.ckpt"), "wb").close()
    open(os.path.join(str(tmp_path), ".dvt_tiny_deit-e0004.partial-123.ckpt"), "wb").close()
    latest = manager.train_states()[-1][1]
    assert latest.endswith("e0003.ckpt")
    assert [os.path.basename(p) for p in remove_partials(str(tmp_path))] == [".dvt_tiny_deit-e0004.partial-123.ckpt"]
    saved = {p.name: p.asnumpy().copy() for p in step.get_parameters()}
    for p in net.get_parameters():
        p.set_data(ms.Tensor(np.zeros(p.shape, np.float32)))
    restored = load_train_state(step, latest, net.spec.to_dict(), "dvt_tiny_deit")
    assert restored["epoch"] == 3 and restored["step"] == 30
    for p in step.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), saved[p.name], err_msg=p.name)
    best = manager.save_best(ema.shadow, {"model": "dvt_tiny_deit", "spec": net.spec.to_dict(), "epoch": 3})
    with open(best.replace(".ckpt", ".json")) as handle:
        assert json.load(handle)["kind"] == "model"
    fresh = tiny(seed=5)
    load_model_weights(fresh, best)
    np.testing.assert_array_equal(fresh.stages[1].cls_token.asnumpy(), ema.shadow.stages[1].cls_token.asnumpy())
    from_state = tiny(seed=6)
    load_model_weights(from_state, latest, prefer_ema=False)  # model weights out of a training state
    np.testing.assert_array_equal(from_state.stages[1].cls_token.asnumpy(), net.stages[1].cls_token.asnumpy())


def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_state(step_parts, tmp_path, monkeypatch):
    """Disk full in the middle of a save: no file of the new state remains, and the last good one restores."""
    net, _, _, step = step_parts
    manager = CheckpointManager(str(tmp_path), "dvt_tiny_deit", keep=1)
    meta = {"model": "dvt_tiny_deit", "spec": net.spec.to_dict()}
    good = manager.save_train_state(step, 1, dict(meta, step=10))
    saved = {p.name: p.asnumpy().copy() for p in step.get_parameters()}
    real_save = ms.save_checkpoint

    def fill_the_disk(save_obj, path, *args, **kwargs):
        real_save(save_obj, path, *args, **kwargs)
        with open(path, "r+b") as handle:  # what a full disk leaves: the first bytes only
            handle.truncate(os.path.getsize(path) // 3)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ms, "save_checkpoint", fill_the_disk)
    for p in net.get_parameters():
        p.set_data(ms.Tensor(np.full(p.shape, 7.0, np.float32)))
    with pytest.raises(WriteFailed) as failed:
        manager.save_train_state(step, 2, dict(meta, step=20))
    assert str(failed.value) == (f"cannot write {tmp_path}/dvt_tiny_deit-e0002.ckpt: "
                                 "[Errno 28] No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["dvt_tiny_deit-e0001.ckpt", "dvt_tiny_deit-e0001.json"]
    monkeypatch.undo()
    assert load_train_state(step, good, net.spec.to_dict(), "dvt_tiny_deit")["step"] == 10
    for p in step.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), saved[p.name], err_msg=p.name)


def test_resume_skips_damaged_states_and_names_them(step_parts, tmp_path):
    net, _, _, step = step_parts
    manager = three_states(step_parts, str(tmp_path), keep=3)
    newest, middle = (os.path.join(str(tmp_path), f"dvt_tiny_deit-e000{e}.ckpt") for e in (3, 2))
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    with open(middle[:-5] + ".json", "w") as handle:
        handle.write('{"step": 2')
    candidates = [path for _, path in reversed(manager.train_states())]
    assert candidates[0] == newest and candidates[-1] == middle  # a damaged JSON is tried last
    path, restored, skipped = restore_newest(step, candidates, net.spec.to_dict(), "dvt_tiny_deit")
    assert path.endswith("e0001.ckpt") and restored["step"] == 10
    assert list(skipped) == [newest] and skipped[newest].startswith(f"cannot read checkpoint {newest}")
    path, restored, skipped = restore_newest(step, [newest, middle], net.spec.to_dict(), "dvt_tiny_deit")
    assert path is None and restored is None and list(skipped) == [newest, middle]
    assert skipped[middle].startswith(f"cannot read {middle[:-5]}.json")
    assert manager.set_aside(newest) == newest + ".damaged"  # kept, but no longer a training state
    assert [p for _, p in manager.train_states()] == [middle, os.path.join(str(tmp_path), "dvt_tiny_deit-e0001.ckpt")]


@pytest.mark.parametrize("level,model", [("O2", "dvt_tiny_t2t"), ("auto", "dvt_tiny_t2t"), ("auto", "dvt_tiny_deit")])
def test_mixed_precision_keeps_norms_and_performer_fp32(level, model):
    """fp16 where amp puts it, and only there: the fp32 kernels that add a MatMul's bias must see that "auto" ran
    the MatMul in fp16 (they read garbage otherwise)."""
    ms.set_seed(0)
    reference = create_model(model, drop_path_rate=0.0)
    reference.set_train(False)
    images = ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32))
    expected = [o.asnumpy() for o in reference(images)]
    net = create_model(model, drop_path_rate=0.0)
    ms.load_param_into_net(net, {p.name: p for p in reference.get_parameters()})
    apply_amp(net, level)
    net.set_train(False)
    kept = [cell for _, cell in net.cells_and_names() if isinstance(cell, (nn.LayerNorm, TokenPerformer))]
    assert kept and all(cell.get_flags().get("fp32") for cell in kept)
    outputs = [o.asnumpy().astype(np.float32) for o in net(images)]
    for got, want in zip(outputs, expected, strict=True):
        assert np.abs(got - want).max() < 5e-3  # fp16 compute, not fp32 (which would be ~1e-7)


def test_gradient_clipping_bounds_the_first_step():
    """Adam's first step moves a weight by lr * g / (|g| + eps): about lr without clipping; clipped to a global
    norm of 1e-9, every |g| is far below eps = 1e-8 and the step is below 0.1 lr."""
    lr = 1e-3
    moved = {}
    for clip in (None, 1e-9):
        net = tiny()
        optimizer = AdamW(param_groups(net, 0.0), learning_rate=lr)
        step = TrainStep(DVTWithLoss(net), optimizer, loss_scale_sense("none", 1.0, 1), clip_grad=clip)
        step.set_train(True)
        before = net.stages[2].head.weight.asnumpy().copy()
        images, targets = batch(2)
        step(ms.Tensor(images), ms.Tensor(targets))
        moved[clip] = np.abs(net.stages[2].head.weight.asnumpy() - before).max()
    assert moved[None] > 0.5 * lr
    assert 0 < moved[1e-9] < 0.1 * lr


def test_mid_epoch_states_are_ordered_by_step(step_parts, tmp_path):
    net, _, _, step = step_parts
    manager = CheckpointManager(str(tmp_path), "dvt_tiny_deit", keep=3)
    meta = {"model": "dvt_tiny_deit", "spec": net.spec.to_dict()}
    manager.save_train_state(step, 1, dict(meta, step=40))
    manager.save_train_state(step, 1, dict(meta, step=55), mid_epoch=True)
    manager.save_train_state(step, 1, dict(meta, step=70), mid_epoch=True)
    names = [os.path.basename(p) for _, p in manager.train_states()]
    assert names == ["dvt_tiny_deit-e0001.ckpt", "dvt_tiny_deit-e0002-s00000055.ckpt",
                     "dvt_tiny_deit-e0002-s00000070.ckpt"]
    manager.save_train_state(step, 2, dict(meta, step=80))
    assert [s for s, _ in manager.train_states()] == [55, 70, 80]


def trained_weights(accum_steps: int, micro_batch: int, updates: int = 2) -> dict:
    """Weights after `updates` AdamW updates of the same start on the same images, each update made of
    accum_steps micro-batches of micro_batch images."""
    net = tiny(seed=3)
    # Adam turns a near-zero gradient into an update of about lr * sign(g): a larger eps keeps the float32 rounding
    # of such gradients (summed in another order) from deciding the comparison. At eps 1e-4 one weight in 5,120 was
    # 1.1e-6 off on an AMD EPYC host; at 1e-3 the largest difference is 1.7e-7 there, and an accumulation that
    # forgets to divide by N is still caught (losses 1.8e-3 apart).
    optimizer = AdamW(param_groups(net, 0.05), learning_rate=ms.Tensor(np.full(10, 1e-2, np.float32)), eps=1e-3)
    step = TrainStep(DVTWithLoss(net), optimizer, loss_scale_sense("dynamic", 1024.0, 1000), accum_steps=accum_steps)
    step.set_train(True)
    accumulate = AccumulateGrads(step) if accum_steps > 1 else None
    rng = np.random.default_rng(7)
    images = rng.normal(size=(updates * BATCH, 3, SIZE, SIZE)).astype(np.float32)
    targets = rng.dirichlet(np.ones(CLASSES), updates * BATCH).astype(np.float32)
    losses = []
    for chunk in range(0, updates * BATCH, micro_batch):
        micro = (ms.Tensor(images[chunk:chunk + micro_batch]), ms.Tensor(targets[chunk:chunk + micro_batch]))
        if (chunk // micro_batch + 1) % accum_steps:
            accumulate(*micro)
        else:
            losses.append(float(step(*micro).asnumpy()[0]))
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == updates
    return {"losses": losses, **{p.name: p.asnumpy() for p in net.get_parameters()}}


def test_gradient_accumulation_equals_one_step_on_the_larger_batch():
    whole = trained_weights(accum_steps=1, micro_batch=BATCH)
    for accum in (2, 4):
        accumulated = trained_weights(accum_steps=accum, micro_batch=BATCH // accum)
        np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-6)
        for name, value in whole.items():
            np.testing.assert_allclose(accumulated[name], value, atol=1e-6, err_msg=name)


def test_an_overflow_in_any_micro_batch_skips_the_update():
    net = tiny(seed=3)
    optimizer = AdamW(param_groups(net, 0.05), learning_rate=ms.Tensor(np.full(10, 1e-2, np.float32)))
    step = TrainStep(DVTWithLoss(net), optimizer, loss_scale_sense("dynamic", 1024.0, 1000), accum_steps=2)
    step.set_train(True)
    accumulate = AccumulateGrads(step)
    before = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    images, targets = batch(2)
    poisoned = images.copy()
    poisoned[0, 0, 0, 0] = np.inf
    accumulate(ms.Tensor(poisoned[:2]), ms.Tensor(targets[:2]))  # the first micro-batch overflows
    _, overflowed, _ = step(ms.Tensor(images[2:]), ms.Tensor(targets[2:])).asnumpy()
    assert overflowed and float(step.scale_sense.asnumpy()) == 512.0
    for p in net.get_parameters():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name], err_msg=p.name)
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == 1
    # the accumulators were cleared: the next update is a clean one
    accumulate(ms.Tensor(images[:2]), ms.Tensor(targets[:2]))
    _, overflowed, _ = step(ms.Tensor(images[2:]), ms.Tensor(targets[2:])).asnumpy()
    assert not overflowed
    assert not np.array_equal(net.stages[0].cls_token.asnumpy(), before["stages.0.cls_token"])
