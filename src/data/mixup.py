"""Batch-mode Mixup / CutMix with label smoothing (timm's batch mode, the DVT recipe), in NumPy.

One (lam, mode) is drawn per batch and every sample i is mixed with sample B-1-i, its partner in the reversed
batch. The soft targets feed a soft-target cross-entropy. Every draw comes from the ``numpy.random.Generator``
passed in: the pipeline gives each batch its own, keyed by seed, epoch, batch and rank.
"""

import numpy as np


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float) -> np.ndarray:
    """Label-smoothed one-hot targets (B, C) float32: off = smoothing / C, on = 1 - smoothing + off."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    off = smoothing / num_classes
    targets = np.full((labels.size, num_classes), off, dtype=np.float64)
    targets[np.arange(labels.size), labels] = 1.0 - smoothing + off
    return targets.astype(np.float32)


class MixupCutmix:
    """Mix a batch by Mixup or CutMix (one choice per batch) and return images with smoothed soft targets.

    With probability ``prob`` the batch is mixed, otherwise only the labels are smoothed. CutMix is chosen
    with probability ``switch_prob`` when both alphas are positive, else whichever alpha is positive; with
    both alphas 0 nothing is ever mixed. lam ~ Beta(alpha, alpha). The batch size must be even, as in timm.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not 0.0 <= alpha < float("inf"):
                raise ValueError(f"{name} must be finite and >= 0, got {alpha!r}")
        for name, p in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)

    def sample_params(self, rng: np.random.Generator) -> tuple[float, bool]:
        """Draw this batch's (lam, use_cutmix); lam 1.0 means no mixing."""
        if not rng.random() < self.prob or (self.mixup_alpha == 0 and self.cutmix_alpha == 0):
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    @staticmethod
    def cutmix_box(lam: float, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """Draw a CutMix box (y0, y1, x0, x1) of side ratio sqrt(1 - lam), centred uniformly, clipped to the image.

        As in timm the box spans cut // 2 pixels on each side of the centre, cut = int(side * sqrt(1 - lam)).
        """
        ratio = np.sqrt(1.0 - lam)
        half_h, half_w = int(height * ratio) // 2, int(width * ratio) // 2
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        return (max(cy - half_h, 0), min(cy + half_h, height), max(cx - half_w, 0), min(cx + half_w, width))

    def mix(
        self, images: np.ndarray, labels: np.ndarray, lam: float, use_cutmix: bool = False,
        rng: np.random.Generator | None = None, in_place: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mix a (B, C, H, W) batch with its reverse at a given lam; CutMix draws its box from `rng` and
        recomputes lam from the box area. `in_place` overwrites a float32 `images` with the same values
        instead of allocating the mixed batch (the loader's workers own their batch)."""
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels)
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be ({images.shape[0]},) for {images.shape[0]} images, got {labels.shape}")
        if images.shape[0] % 2 and (use_cutmix or lam < 1.0):
            raise ValueError(f"batch-mode Mixup/CutMix needs an even batch size, got {images.shape[0]}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam!r}")
        if use_cutmix:
            if rng is None:
                raise ValueError("CutMix needs an rng to place its box")
            height, width = images.shape[2:]
            y0, y1, x0, x1 = self.cutmix_box(lam, height, width, rng)
            mixed = images if in_place else images.copy()
            mixed[:, :, y0:y1, x0:x1] = images[::-1, :, y0:y1, x0:x1].copy()  # the box may overlap its source
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
        elif lam < 1.0 and in_place:
            mixed = _blend_reversed(images, np.float32(lam), np.float32(1.0 - lam))
        elif lam < 1.0:
            mixed = images * np.float32(lam) + images[::-1] * np.float32(1.0 - lam)
        else:
            mixed = images
        smooth = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        targets = smooth * np.float32(lam) + smooth[::-1] * np.float32(1.0 - lam)
        return mixed.astype(np.float32, copy=False), targets.astype(np.float32, copy=False)

    def __call__(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 in_place: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Mix a (B, C, H, W) float batch and its (B,) integer labels; returns images and (B, classes) targets.
        `in_place`: see `mix`."""
        lam, use_cutmix = self.sample_params(rng)
        return self.mix(images, labels, lam, use_cutmix, rng, in_place)


def _blend_reversed(images: np.ndarray, lam: np.float32, rest: np.float32) -> np.ndarray:
    """images * lam + images[::-1] * rest, in place, pair by pair (i, B-1-i) through two image-sized buffers:
    the same float32 products and sums as the whole-batch expression, without its three batch-sized arrays."""
    first, second = np.empty_like(images[0]), np.empty_like(images[0])
    size = images.shape[0]
    for i in range(size // 2):
        a, b = images[i], images[size - 1 - i]
        np.multiply(a, lam, out=first)
        np.multiply(b, rest, out=second)
        first += second  # the new a: a * lam + b * rest
        np.multiply(b, lam, out=second)
        np.multiply(a, rest, out=b)
        b += second  # the new b: a * rest + b * lam (float addition commutes exactly)
        a[...] = first
    return images
