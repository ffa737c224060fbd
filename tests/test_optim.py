"""Cosine schedule, AdamW against torch.optim.AdamW (eager, loss-scaled train cell, resume) and param_groups."""

import math

import mindspore as ms
import numpy as np
import pytest
import torch
from mindspore import nn, ops

from src.engine.optim import AdamW, param_groups
from src.engine.schedule import cosine_schedule
from src.models import create_model


def test_schedule_hand_worked_per_epoch():
    lr = cosine_schedule(1e-3, epochs=10, steps_per_epoch=3, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5,
                         cooldown_epochs=1)
    assert lr.dtype == np.float32 and lr.shape == (33,)
    per_epoch = lr.reshape(11, 3)
    assert (per_epoch == per_epoch[:, :1]).all()          # one value per epoch
    expected = {
        0: 1e-6,                                          # warmup_lr
        1: 5.005e-4,                                      # 1e-6 + 1 * (1e-3 - 1e-6) / 2
        2: 9.05463412e-4,                                 # 1e-5 + 0.5 * 9.9e-4 * (1 + cos(0.2 pi)): no warmup offset
        5: 5.05e-4,                                       # 1e-5 + 0.5 * 9.9e-4 * (1 + cos(0.5 pi))
        9: 3.4227024e-5,                                  # 1e-5 + 0.5 * 9.9e-4 * (1 + cos(0.9 pi))
        10: 1e-5,                                         # cooldown: min_lr
    }
    for epoch, value in expected.items():
        assert per_epoch[epoch, 0] == pytest.approx(value, rel=1e-6), epoch


def test_schedule_per_step_uses_fractional_epochs():
    lr = cosine_schedule(1e-3, epochs=10, steps_per_epoch=3, warmup_epochs=2, per_step=True)
    assert lr[0] == pytest.approx(1e-6)
    assert lr[1] == pytest.approx(1.675e-4, rel=1e-6)     # 1e-6 + (1/3) * (1e-3 - 1e-6) / 2
    assert lr[7] == pytest.approx(1e-5 + 0.495e-3 * (1 + math.cos(math.pi * 7 / 30)), rel=1e-6)
    assert lr.shape == (30,) and lr[-1] > 1e-5


def test_schedule_matches_the_closed_formula_of_the_recipe():
    base, steps = 2e-3, 4
    lr = cosine_schedule(base, epochs=300, steps_per_epoch=steps, warmup_epochs=20, cooldown_epochs=10)
    assert lr.shape == (310 * steps,)
    for step in range(lr.size):
        t = step // steps
        if t < 20:
            want = 1e-6 + t * (base - 1e-6) / 20
        elif t < 300:
            want = 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * t / 300))
        else:
            want = 1e-5
        assert lr[step] == pytest.approx(want, rel=1e-6), step
    assert (np.diff(lr[20 * steps:]) <= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs must be positive"),
    (dict(steps_per_epoch=0), "steps_per_epoch must be positive"),
    (dict(warmup_epochs=10), r"warmup_epochs \(10\) must be below epochs \(10\)"),
    (dict(warmup_epochs=-1), "warmup_epochs must be >= 0"),
    (dict(cooldown_epochs=-1), "cooldown_epochs must be >= 0"),
    (dict(base_lr=-1.0), "base_lr must be >= 0"),
    (dict(min_lr=-1e-5), "min_lr must be >= 0"),
    (dict(warmup_lr=-1e-6), "warmup_lr must be >= 0"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = dict(base_lr=1e-3, epochs=10, steps_per_epoch=3) | kwargs
    with pytest.raises(ValueError, match=match):
        cosine_schedule(**args)


# The fused kernel adds (1 - float32(0.999)) g^2 where torch adds float32(0.001) g^2: its v is this multiple.
V_SCALE = (1.0 - float(np.float32(0.999))) / float(np.float32(0.001))


def _shapes_and_weights(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape).astype(np.float32) for shape in ((4, 3), (1, 1, 5), (4,), (5,))]


def test_adamw_matches_torch_with_two_groups_and_a_changing_lr():
    init = _shapes_and_weights()
    params = [ms.Parameter(ms.Tensor(w), name=f"p{i}") for i, w in enumerate(init)]
    lrs = np.array([1e-2, 3e-2, 2e-2, 5e-3, 1e-2, 4e-2], np.float32)
    opt = AdamW([{"params": params[:2], "weight_decay": 0.05}, {"params": params[2:], "weight_decay": 0.0}],
                learning_rate=lrs)
    tparams = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    topt = torch.optim.AdamW([{"params": tparams[:2], "weight_decay": 0.05},
                              {"params": tparams[2:], "weight_decay": 0.0}], lr=1.0)
    rng = np.random.default_rng(1)
    for step, lr in enumerate(lrs):
        grads = [rng.normal(size=w.shape).astype(np.float32) for w in init]
        opt(tuple(ms.Tensor(g) for g in grads))
        for group in topt.param_groups:
            group["lr"] = float(lr)
        for p, g in zip(tparams, grads, strict=True):
            p.grad = torch.tensor(g)
        topt.step()
        for p, tp in zip(params, tparams, strict=True):
            assert np.abs(p.asnumpy() - tp.detach().numpy()).max() <= 1e-6, (step, p.name)
    for p, m, v, tp in zip(params, opt.moments1, opt.moments2, tparams, strict=True):
        state = topt.state[tp]
        assert m.name == f"adam_m.{p.name}" and v.name == f"adam_v.{p.name}"
        np.testing.assert_allclose(m.asnumpy(), state["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v.asnumpy(), V_SCALE * state["exp_avg_sq"].numpy(), rtol=1e-6, atol=1e-12)
    assert opt.adam_step.asnumpy()[0] == opt.global_step.asnumpy()[0] == len(lrs)


def test_adamw_per_group_learning_rates_match_torch():
    init = _shapes_and_weights(2)
    params = [ms.Parameter(ms.Tensor(w), name=f"q{i}") for i, w in enumerate(init)]
    lr_a, lr_b = np.array([1e-2, 2e-2, 5e-3], np.float32), np.array([3e-2, 1e-3, 2e-2], np.float32)
    opt = AdamW([{"params": params[:2], "weight_decay": 0.1, "lr": lr_a},
                 {"params": params[2:], "weight_decay": 0.0, "lr": lr_b}], learning_rate=lr_a)
    tparams = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    topt = torch.optim.AdamW([{"params": tparams[:2], "weight_decay": 0.1},
                              {"params": tparams[2:], "weight_decay": 0.0}], lr=1.0)
    rng = np.random.default_rng(3)
    for step in range(3):
        grads = [rng.normal(size=w.shape).astype(np.float32) for w in init]
        opt(tuple(ms.Tensor(g) for g in grads))
        topt.param_groups[0]["lr"], topt.param_groups[1]["lr"] = float(lr_a[step]), float(lr_b[step])
        for p, g in zip(tparams, grads, strict=True):
            p.grad = torch.tensor(g)
        topt.step()
    for p, tp in zip(params, tparams, strict=True):
        assert np.abs(p.asnumpy() - tp.detach().numpy()).max() <= 1e-6, p.name


def _dense_and_torch_twin(seed: int = 0) -> tuple[nn.Dense, torch.nn.Linear]:
    rng = np.random.default_rng(seed)
    weight, bias = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)
    net = nn.Dense(3, 2, weight_init=ms.Tensor(weight), bias_init=ms.Tensor(bias))
    twin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        twin.weight.copy_(torch.tensor(weight))
        twin.bias.copy_(torch.tensor(bias))
    return net, twin


def _torch_step(twin: torch.nn.Linear, topt: torch.optim.Optimizer, x: np.ndarray, y: np.ndarray, lr: float) -> None:
    for group in topt.param_groups:
        group["lr"] = lr
    topt.zero_grad()
    torch.nn.functional.mse_loss(twin(torch.tensor(x)), torch.tensor(y)).backward()
    topt.step()


class CPULossScaleCell(nn.TrainOneStepWithLossScaleCell):
    """MindSpore 2.10's cell checks overflow with NPUGetFloatStatusV2 unless the target is GPU: no CPU kernel."""

    def get_overflow_status(self, status, compute_output):
        finite = ops.stack([ops.isfinite(grad).all() for grad in compute_output]).all()
        return ops.logical_not(finite)


def test_loss_scaled_train_cell_in_graph_mode_matches_torch():
    net, twin = _dense_and_torch_twin()
    lrs = cosine_schedule(5e-2, epochs=4, steps_per_epoch=1, warmup_epochs=1, warmup_lr=1e-2, min_lr=1e-3)
    opt = AdamW(param_groups(net, 0.05), learning_rate=lrs)
    assert [len(g["params"]) for g in param_groups(net, 0.05)] == [1, 1]    # weight decayed, bias not
    manager = nn.DynamicLossScaleUpdateCell(loss_scale_value=2.0**10, scale_factor=2, scale_window=1000)
    train = CPULossScaleCell(nn.WithLossCell(net, nn.MSELoss()), opt, scale_sense=manager)
    train.set_train()
    topt = torch.optim.AdamW([{"params": [twin.weight], "weight_decay": 0.05},
                              {"params": [twin.bias], "weight_decay": 0.0}])
    rng = np.random.default_rng(5)
    batches = [(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32))
               for _ in range(4)]
    batches.insert(2, (np.full((8, 3), np.inf, np.float32), batches[0][1]))     # overflows: step skipped
    torch_step = 0
    for x, y in batches:
        _, overflow, scale = train(ms.Tensor(x), ms.Tensor(y))
        if np.isfinite(x).all():
            assert not overflow.asnumpy()
            _torch_step(twin, topt, x, y, float(lrs[torch_step]))
            torch_step += 1
        else:
            assert overflow.asnumpy() and scale.asnumpy() == 2.0**9                 # halved by the manager
            assert opt.adam_step.asnumpy()[0] == opt.global_step.asnumpy()[0] == torch_step
        assert np.abs(net.weight.asnumpy() - twin.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(net.bias.asnumpy() - twin.bias.detach().numpy()).max() <= 1e-6
    assert train.scale_sense.asnumpy() == 2.0**9


def _train_cell(seed: int) -> nn.TrainOneStepCell:
    net, _ = _dense_and_torch_twin(seed)
    lrs = cosine_schedule(5e-2, epochs=4, steps_per_epoch=1, warmup_epochs=1, warmup_lr=1e-2, min_lr=1e-3)
    cell = nn.TrainOneStepCell(nn.WithLossCell(net, nn.MSELoss()), AdamW(param_groups(net, 0.05), lrs))
    cell.set_train()
    return cell


def _state(cell: nn.Cell) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in cell.get_parameters()}


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    rng = np.random.default_rng(7)
    batches = [(ms.Tensor(rng.normal(size=(8, 3)).astype(np.float32)),
                ms.Tensor(rng.normal(size=(8, 2)).astype(np.float32))) for _ in range(4)]
    straight = _train_cell(seed=0)
    for x, y in batches:
        straight(x, y)

    first_half = _train_cell(seed=0)
    for x, y in batches[:2]:
        first_half(x, y)
    path = str(tmp_path / "half.ckpt")
    ms.save_checkpoint(first_half, path)
    saved = ms.load_checkpoint(path)
    assert {"global_step", "adam_step", "learning_rate", "adam_m.weight", "adam_v.bias"} <= set(saved)

    resumed = _train_cell(seed=1)                          # other weights and fresh state, all overwritten
    not_loaded, unused = ms.load_param_into_net(resumed, saved, strict_load=True)
    assert not not_loaded and not unused
    for x, y in batches[2:]:
        resumed(x, y)
    want, got = _state(straight), _state(resumed)
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_param_groups_on_the_tiny_dvt():
    net = create_model("dvt_tiny_t2t")
    trainable = {p.name for p in net.trainable_params()}
    frozen = {p.name for p in net.get_parameters() if not p.requires_grad}
    assert frozen and all(n.endswith(("pos_embed", ".w")) for n in frozen)
    groups = param_groups(net, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    names = [[p.name for p in g["params"]] for g in groups]
    assert sorted(names[0] + names[1]) == sorted(trainable)           # each trainable parameter exactly once
    decayed, kept = set(names[0]), set(names[1])
    assert "stages.0.cls_token" in decayed and "stages.0.blocks.0.attn.qkv.weight" in decayed
    assert {"stages.0.norm.gamma", "stages.0.norm.beta", "stages.0.head.bias",
            "stages.1.relation_reuse.fc1.bias"} <= kept                  # the last one is a 2-D bias
    assert all(len(p.shape) >= 2 for p in groups[0]["params"])

    no_tokens = param_groups(net, 0.05, decay_tokens=False)
    assert "stages.0.cls_token" in {p.name for p in no_tokens[1]["params"]}
    opt = AdamW(groups, learning_rate=1e-3)
    assert {p.name for p in opt.moments1} == {f"adam_m.{n}" for n in trainable}


def test_param_groups_decays_deit_pos_embed_and_drops_empty_groups():
    net = create_model("dvt_tiny_deit")
    decayed = {p.name for p in param_groups(net, 0.05)[0]["params"]}
    assert "stages.2.pos_embed" in decayed
    assert "stages.2.pos_embed" not in {p.name for p in param_groups(net, 0.05, decay_tokens=False)[0]["params"]}
    groups = param_groups(nn.LayerNorm((4,), epsilon=1e-5), 0.05)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 2
