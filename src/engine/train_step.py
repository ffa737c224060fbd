"""The DVT training step: summed per-exit loss, loss scaling, mean gradients over ranks, clipping, EMA.

`TrainStep` is MindSpore's loss-scale training cell with two additions: optional clipping by global
norm, and an EMA update of a shadow model after every applied step. An overflowed step (fp16) is
skipped whole: no update, no EMA, but the learning-rate schedule still advances one step, so a run's
schedule depends on its step count only.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from ..models import DVT


class SoftTargetCrossEntropy(nn.Cell):
    """Mean over the batch of -sum(target * log_softmax(logits)); targets are soft (mixup, smoothing)."""

    def construct(self, logits, targets):
        logits = logits.astype(ms.float32)
        return (-targets * ops.log_softmax(logits, -1)).sum(-1).mean()


class DVTWithLoss(nn.Cell):
    """The DVT loss: the sum, with equal weights, of every exit's soft-target cross-entropy."""

    def __init__(self, net: DVT):
        super().__init__(auto_prefix=False)
        self.net = net
        self.criterion = SoftTargetCrossEntropy()

    def construct(self, images, targets):
        exits = self.net(images)
        loss = self.criterion(exits[0], targets)
        for logits in exits[1:]:
            loss = loss + self.criterion(logits, targets)
        return loss


_ema_update = ops.MultitypeFuncGraph("ema_update")


@_ema_update.register("Tensor", "Tensor", "Tensor")
def _ema_update_tensor(decay, shadow, weight):
    return ops.assign(shadow, shadow * decay + weight.astype(shadow.dtype) * (1.0 - decay))


class ModelEMA(nn.Cell):
    """An exponential moving average of every parameter of `net`, held by the twin network `shadow`.

    The shadow's parameters are renamed `ema.<name>` so both fit in one checkpoint; being a whole
    network, the shadow is evaluated directly, without swapping weights in and out.
    """

    def __init__(self, net: nn.Cell, shadow: nn.Cell, decay: float):
        super().__init__(auto_prefix=False)
        names = [name for name, _ in net.parameters_and_names()]
        shadow_names = [name for name, _ in shadow.parameters_and_names()]
        if names != shadow_names:
            raise ValueError("the EMA shadow must be a network of the same architecture")
        shadow.update_parameters_name("ema.")
        for param in shadow.get_parameters():
            param.requires_grad = False
        self.shadow = shadow
        self.weights = ParameterTuple(net.get_parameters())
        self.shadow_weights = ParameterTuple(shadow.get_parameters())
        self.decay = Tensor(decay, ms.float32)
        self.hyper_map = ops.HyperMap()
        self.copy_from(net)

    def copy_from(self, net: nn.Cell) -> None:
        """Start the average at the network's current weights (after any pretrained load)."""
        for shadow, weight in zip(self.shadow_weights, net.get_parameters(), strict=True):
            shadow.set_data(weight.data.copy())

    def construct(self):
        return self.hyper_map(ops.partial(_ema_update, self.decay), self.shadow_weights, self.weights)


_grad_scale = ops.MultitypeFuncGraph("grad_scale")


@_grad_scale.register("Tensor", "Tensor")
def _grad_scale_tensor(scale, grad):
    return grad * ops.cast(ops.reciprocal(scale), ops.dtype(grad))


_not_finite = ops.MultitypeFuncGraph("not_finite")


@_not_finite.register("Tensor")
def _not_finite_tensor(grad):
    return ops.logical_not(ops.isfinite(grad).all()).astype(ms.float32)


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimisation step. Returns (loss, overflowed, loss scale) for the host to log and check."""

    def __init__(self, network_with_loss: nn.Cell, optimizer: nn.Optimizer, scale_sense,
                 clip_grad: float | None = None, ema: ModelEMA | None = None):
        super().__init__(network_with_loss, optimizer, scale_sense)
        self.clip = clip_grad is not None
        self.clip_norm = float(clip_grad or 0.0)
        self.ema = ema
        self.use_ema = ema is not None
        self.skipped_step = Tensor(1, ms.int32)
        self.on_ascend = ms.get_context("device_target") == "Ascend"

    def get_overflow_status(self, status, compute_output):
        """Ascend reads its float-status registers (MindSpore's way); CPU and GPU check the gradients."""
        if self.on_ascend:
            return super().get_overflow_status(status, compute_output)
        flags = ops.addn(self.hyper_map(_not_finite, compute_output)).reshape(())
        if self.is_distributed:
            flags = self.allreduce(flags)
        return flags >= 1.0

    def construct(self, images, targets):
        weights = self.weights
        loss = self.network(images, targets)
        scaling_sens = self.scale_sense
        status, scaling_sens = self.start_overflow_check(loss, scaling_sens)
        scaling_sens_filled = ops.ones_like(loss) * ops.cast(scaling_sens, ops.dtype(loss))
        grads = self.grad(self.network, weights)(images, targets, scaling_sens_filled)
        grads = self.hyper_map(ops.partial(_grad_scale, scaling_sens), grads)
        grads = self.grad_reducer(grads)
        overflowed = self.get_overflow_status(status, grads)
        overflow = self.process_loss_scale(overflowed)
        if self.clip:
            grads = ops.clip_by_global_norm(grads, self.clip_norm)
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
            if self.use_ema:
                loss = ops.depend(loss, self.ema())
        else:
            loss = ops.depend(loss, ops.assign_add(self.optimizer.global_step, self.skipped_step))
        return loss, overflowed, scaling_sens


def loss_scale_sense(kind: str, value: float, window: int):
    """What TrainOneStepWithLossScaleCell takes: an update cell (dynamic) or a constant tensor."""
    if kind == "dynamic":
        return nn.DynamicLossScaleUpdateCell(loss_scale_value=value, scale_factor=2, scale_window=window)
    return Tensor(value if kind == "fixed" else 1.0, ms.float32)

