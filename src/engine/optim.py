"""AdamW with torch.optim.AdamW's update, and the DVT recipe's weight-decay parameter groups.

MindSpore's nn.AdamWeightDecay has no bias correction, so it drifts from the official recipe's torch AdamW.
This optimizer keeps nn.Optimizer's machinery (parameter groups, per-step learning-rate arrays indexed by
global_step) and does torch's update: the decoupled decay as its own multiply, then MindSpore's fused Adam
kernel with the bias corrections folded into its step size and epsilon.
"""

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops import composite as C
from mindspore.ops import operations as P

_corrected_lr = C.MultitypeFuncGraph("adamw_corrected_lr")
_adamw_update = C.MultitypeFuncGraph("adamw_update")


@_corrected_lr.register("Tensor", "Tensor")
def _lr_times_correction(correction: Tensor, lr: Tensor) -> Tensor:
    """lr * sqrt(c (1 - b2^t)) / (1 - b1^t) in float64, rounded once to float32."""
    return ops.cast(ops.cast(lr, ms.float64) * correction, ms.float32)


@_adamw_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool",
                        "Tensor", "Tensor", "Tensor", "Tensor")
def _update(apply_adam: P.Adam, zero: Tensor, beta1: Tensor, beta2: Tensor, eps_t: Tensor, lr: Tensor,
            lr_t: Tensor, weight_decay: Tensor, decay: bool, param: Parameter, m: Parameter, v: Parameter,
            grad: Tensor) -> Tensor:
    """One parameter's step: param *= 1 - lr * wd (factor formed in float64, as torch), then fused Adam.

    The kernel gets beta powers of zero, so its own correction factor is 1 and lr_t, eps_t carry torch's.
    """
    if decay:
        factor = ops.cast(1.0 - ops.cast(lr, ms.float64) * weight_decay, param.dtype)
        param = ops.depend(param, ops.assign(param, param * factor))
    return apply_adam(param, m, v, zero, zero, lr_t, beta1, beta2, eps_t, ops.cast(grad, param.dtype))


class AdamW(nn.Optimizer):
    """torch.optim.AdamW on nn.Optimizer: decoupled weight decay, then Adam with bias corrections.

    param *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). The kernel computes the last line as
    param -= lr_t * m / (sqrt(v) + eps_t) with lr_t = lr sqrt(c (1 - b2^t)) / (1 - b1^t) and
    eps_t = eps sqrt(c (1 - b2^t)), formed in float64: the same value up to float32 rounding. c undoes the
    kernel's float32 1 - b2 (1.3e-5 off 1e-3 for b2 = 0.999), which makes its v c times torch's exp_avg_sq.
    `params` is a list of Parameters or nn.Optimizer group dicts ('params', 'weight_decay', 'lr'); a plain
    list decays every parameter, as torch does (`param_groups` makes the recipe's split).
    `learning_rate` is a float or a per-step array/Tensor, indexed by global_step.
    State, all Parameters so that a checkpoint of the train cell restores it: `adam_m.<param>` and
    `adam_v.<param>` (the moments), `adam_step` (t, the steps taken), and nn.Optimizer's `global_step` and
    `learning_rate` (the schedule).
    """

    def __init__(self, params: list, learning_rate: float | Tensor | np.ndarray = 1e-3, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(learning_rate, params, weight_decay)
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"AdamW: {name} must be in [0, 1), got {beta}")
        if eps <= 0.0:
            raise ValueError(f"AdamW: eps must be positive, got {eps}")
        if self.dynamic_weight_decay:
            raise TypeError("AdamW: weight_decay must be a number per group, not a schedule Cell")
        decays = self.group_weight_decay if self.is_group else [float(weight_decay)] * len(self._parameters)
        self.param_weight_decay = tuple(Tensor(wd, ms.float64) for wd in decays)
        self.param_decay_flags = tuple(wd > 0.0 for wd in decays)
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.beta1_f64 = Tensor(beta1, ms.float64)
        self.beta2_f64 = Tensor(beta2, ms.float64)
        self.eps_f64 = Tensor(eps, ms.float64)
        v_scale = (1.0 - float(np.float32(beta2))) / float(np.float32(1.0 - beta2))
        self.v_scale_f64 = Tensor(v_scale, ms.float64)
        self.zero = Tensor(0.0, ms.float32)
        self.moments1 = self._parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self._parameters.clone(prefix="adam_v", init="zeros")
        self.adam_step = Parameter(Tensor([0], ms.int32), name="adam_step")
        self.apply_adam = P.Adam()

    def construct(self, gradients: tuple) -> tuple:
        """Apply one step to every parameter; advances global_step (the lr index) and adam_step (t)."""
        lr = self.get_lr()
        step = self.adam_step + 1
        step = ops.depend(step, ops.assign(self.adam_step, step))
        step = ops.depend(step, self.assignadd(self.global_step, self.global_step_increase_tensor))
        t = ops.cast(step, ms.float64).reshape(())
        bias_correction1 = 1.0 - ops.pow(self.beta1_f64, t)
        v_correction = ops.sqrt(self.v_scale_f64 * (1.0 - ops.pow(self.beta2_f64, t)))
        eps_t = ops.cast(self.eps_f64 * v_correction, ms.float32)
        correction = v_correction / bias_correction1
        if self.is_group_lr:
            lr_t = self.hyper_map(ops.partial(_corrected_lr, correction), lr)
            update = ops.partial(_adamw_update, self.apply_adam, self.zero, self.beta1, self.beta2, eps_t)
            return self.hyper_map(update, lr, lr_t, self.param_weight_decay, self.param_decay_flags,
                                  self._parameters, self.moments1, self.moments2, gradients)
        update = ops.partial(_adamw_update, self.apply_adam, self.zero, self.beta1, self.beta2, eps_t, lr,
                             _lr_times_correction(correction, lr))
        return self.hyper_map(update, self.param_weight_decay, self.param_decay_flags,
                              self._parameters, self.moments1, self.moments2, gradients)


def param_groups(net: nn.Cell, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
    """Split net's trainable parameters into a decayed and an undecayed group for AdamW.

    Not decayed, as in the official recipe: 1-D parameters (LayerNorm gamma/beta, biases) and any `.bias`
    (relationship reuse has 2-D biases). decay_tokens=False also exempts `cls_token` and `pos_embed`; the
    official DVT recipe decays them (its model has no no_weight_decay list), so True is its behaviour.
    Frozen parameters are left out, and so are empty groups.
    """
    decay, no_decay = [], []
    for param in net.trainable_params():
        name = param.name
        exempt = len(param.shape) <= 1 or name == "bias" or name.endswith(".bias")
        if not decay_tokens and (name.endswith("cls_token") or name.endswith("pos_embed")):
            exempt = True
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
