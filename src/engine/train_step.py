"""The DVT training step: summed per-exit loss, loss scaling, mean gradients over ranks, clipping, EMA.

`TrainStep` is MindSpore's loss-scale training cell with three additions: optional clipping by global
norm, an EMA update of a shadow model after every applied step, and gradient accumulation. An overflowed
step (fp16) is skipped whole: no update, no EMA, but the learning-rate schedule still advances one step, so
a run's schedule depends on its step count only.

With `accum_steps` N > 1, `AccumulateGrads` runs the first N-1 micro-batches of an update (forward,
backward, add to the accumulators; no communication) and `TrainStep` the last: it adds the accumulated
gradients, divides by N (the mean over micro-batches equals the gradient of the N-times larger batch),
reduces over ranks once, and updates. A non-finite gradient in any micro-batch makes the sum non-finite,
so the whole update is skipped. Both return device tensors; the host reads them only when it must.
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


_accumulate = ops.MultitypeFuncGraph("accumulate")


@_accumulate.register("Tensor", "Tensor")
def _accumulate_tensor(accumulated, grad):
    return ops.assign_add(accumulated, grad.astype(accumulated.dtype))


_take_accumulated = ops.MultitypeFuncGraph("take_accumulated")


@_take_accumulated.register("Tensor", "Tensor")
def _take_accumulated_tensor(accumulated, grad):
    """The accumulated gradient plus this micro-batch's; the accumulator is cleared for the next update."""
    total = accumulated + grad.astype(accumulated.dtype)
    return ops.depend(total, ops.assign(accumulated, ops.zeros_like(accumulated)))


_grad_scale = ops.MultitypeFuncGraph("grad_scale")


@_grad_scale.register("Tensor", "Tensor")
def _grad_scale_tensor(scale, grad):
    return grad * ops.cast(ops.reciprocal(scale), ops.dtype(grad))


_not_finite = ops.MultitypeFuncGraph("not_finite")


@_not_finite.register("Tensor")
def _not_finite_tensor(grad):
    return ops.logical_not(ops.isfinite(grad).all()).astype(ms.float32)


ACCUMULATOR_PREFIX = "accum."  # accumulators are zero between updates, so checkpoints leave them out


class TrainStep(nn.TrainOneStepWithLossScaleCell):
    """One optimisation step (the last micro-batch of an update). Returns the float32 vector
    (loss of the update, overflowed, loss scale) as a device tensor, for the host to read when it must."""

    def __init__(self, network_with_loss: nn.Cell, optimizer: nn.Optimizer, scale_sense,
                 clip_grad: float | None = None, ema: ModelEMA | None = None, accum_steps: int = 1):
        super().__init__(network_with_loss, optimizer, scale_sense)
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {accum_steps}")
        self.clip = clip_grad is not None
        self.clip_norm = float(clip_grad or 0.0)
        self.ema = ema
        self.use_ema = ema is not None
        self.skipped_step = Tensor(1, ms.int32)
        self.accumulate = accum_steps > 1
        self.accum_steps = Tensor(float(accum_steps), ms.float32)
        if self.accumulate:
            self.accumulated = self.weights.clone(prefix=ACCUMULATOR_PREFIX.rstrip("."), init="zeros")
            self.accumulated_loss = ms.Parameter(Tensor(0.0, ms.float32), name=ACCUMULATOR_PREFIX + "loss",
                                                 requires_grad=False)
        # Ascend's float-status registers see overflows of this graph only, not of the accumulated micro-batches.
        self.status_registers = ms.get_context("device_target") == "Ascend" and not self.accumulate

    def get_overflow_status(self, status, compute_output):
        """Ascend reads its float-status registers (MindSpore's way); elsewhere, and for accumulated gradients,
        the gradients are checked for non-finite values."""
        if self.status_registers:
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
        unscale = scaling_sens
        if self.accumulate:
            grads = self.hyper_map(_take_accumulated, self.accumulated, grads)
            unscale = scaling_sens * self.accum_steps.astype(scaling_sens.dtype)
            loss = (loss.astype(ms.float32) + self.accumulated_loss) / self.accum_steps
            loss = ops.depend(loss, ops.assign(self.accumulated_loss, ops.zeros_like(self.accumulated_loss)))
        grads = self.hyper_map(ops.partial(_grad_scale, unscale), grads)
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
        return ops.stack([loss.astype(ms.float32), overflowed.astype(ms.float32),
                          scaling_sens.astype(ms.float32).reshape(())])


class AccumulateGrads(nn.Cell):
    """One of the first accum_steps - 1 micro-batches of an update: add its scaled gradients and loss to the
    step's accumulators. Returns nothing the host needs."""

    def __init__(self, step: TrainStep):
        super().__init__(auto_prefix=False)
        if not step.accumulate:
            raise ValueError("AccumulateGrads needs a TrainStep built with accum_steps > 1")
        self.network = step.network
        self.weights = step.weights
        self.accumulated = step.accumulated
        self.accumulated_loss = step.accumulated_loss
        self.scale_sense = step.scale_sense
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.hyper_map = ops.HyperMap()

    def construct(self, images, targets):
        loss = self.network(images, targets)
        sens = ops.ones_like(loss) * ops.cast(self.scale_sense, ops.dtype(loss))
        grads = self.grad(self.network, self.weights)(images, targets, sens)
        loss = ops.depend(loss, self.hyper_map(_accumulate, self.accumulated, grads))
        return ops.assign_add(self.accumulated_loss, loss.astype(ms.float32))


def loss_scale_sense(kind: str, value: float, window: int):
    """What TrainOneStepWithLossScaleCell takes: an update cell (dynamic) or a constant tensor."""
    if kind == "dynamic":
        return nn.DynamicLossScaleUpdateCell(loss_scale_value=value, scale_factor=2, scale_window=window)
    return Tensor(value if kind == "fixed" else 1.0, ms.float32)

