"""Learning-rate schedule of the DVT recipe: timm's cosine schedule with linear warmup and cooldown, per step."""

import numpy as np


def cosine_schedule(base_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0,
                    warmup_lr: float = 1e-6, min_lr: float = 1e-5, cooldown_epochs: int = 0,
                    per_step: bool = False) -> np.ndarray:
    """One learning rate per optimizer step for (epochs + cooldown_epochs) epochs, as float32.

    With t the absolute epoch (no warmup offset, as in timm's CosineLRScheduler without warmup_prefix):
    warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs while t < warmup_epochs, then
    min_lr + (base_lr - min_lr) * (1 + cos(pi * t / epochs)) / 2 while t < epochs, then min_lr (cooldown).
    per_step=False holds the value of epoch t for all its steps (the official recipe steps the scheduler once
    per epoch); per_step=True evaluates it at the fractional epoch step / steps_per_epoch.
    The array feeds nn.Optimizer's dynamic learning rate, which indexes it by global_step.
    """
    for name, value in (("epochs", epochs), ("steps_per_epoch", steps_per_epoch)):
        if value <= 0:
            raise ValueError(f"cosine_schedule: {name} must be positive, got {value}")
    for name, value in (("warmup_epochs", warmup_epochs), ("cooldown_epochs", cooldown_epochs)):
        if value < 0:
            raise ValueError(f"cosine_schedule: {name} must be >= 0, got {value}")
    if warmup_epochs >= epochs:
        raise ValueError(f"cosine_schedule: warmup_epochs ({warmup_epochs}) must be below epochs ({epochs})")
    for name, value in (("base_lr", base_lr), ("warmup_lr", warmup_lr), ("min_lr", min_lr)):
        if value < 0:
            raise ValueError(f"cosine_schedule: {name} must be >= 0, got {value}")

    steps = np.arange((epochs + cooldown_epochs) * steps_per_epoch, dtype=np.float64)
    t = steps / steps_per_epoch if per_step else np.floor_divide(steps, steps_per_epoch)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + np.cos(np.pi * t / epochs))
    lr = np.where(t < epochs, cosine, min_lr)
    if warmup_epochs > 0:
        warmup = warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
        lr = np.where(t < warmup_epochs, warmup, lr)
    return lr.astype(np.float32)
