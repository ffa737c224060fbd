"""RandAugment with the semantics of timm's ``rand-m9-mstd0.5-inc1`` policy (the DVT training recipe).

Each call draws ``num_ops`` operations uniformly with replacement from the "increasing" op list and applies
each with probability ``prob``. Per application the magnitude is drawn from Normal(m, mstd) and clipped to
[0, 10]; signed ops (rotate, shear, translate, enhance deltas) flip sign with probability 0.5, and the
geometric ops resample bilinear or bicubic at random and fill with the ImageNet mean. Every random draw comes
from the ``numpy.random.Generator`` passed in, so an image's augmentation depends only on its own key (see
``src/data/stream.py``), never on which thread or process ran it.
"""

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from . import affine

MAX_MAGNITUDE = 10.0
IMAGENET_MEAN_FILL = (124, 116, 104)
INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
_SOLARIZE_ADD_THRESHOLD = 128

Fill = tuple[int, int, int]
Op = Callable[[Image.Image, float, Fill, np.random.Generator], Image.Image]


class _Enhancer(Protocol):
    def enhance(self, factor: float) -> Image.Image: ...


def _level(magnitude: float, maximum: float) -> float:
    """Map a magnitude in [0, 10] linearly onto [0, maximum]."""
    return magnitude / MAX_MAGNITUDE * maximum


def _signed(value: float, rng: np.random.Generator) -> float:
    """Negate with probability 0.5: rotate, shear, translate and the enhance deltas act both ways."""
    return -value if rng.random() < 0.5 else value


def _resample(rng: np.random.Generator) -> Image.Resampling:
    return _RESAMPLE[int(rng.integers(len(_RESAMPLE)))]


def _affine(img: Image.Image, matrix: affine.Matrix, fill: Fill, rng: np.random.Generator) -> Image.Image:
    """`img.transform(img.size, AFFINE, matrix, resample, fillcolor=fill)`, computed by `affine.py`."""
    return Image.fromarray(affine.transform(img, matrix, _resample(rng), fill))


def _rotate(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    """`img.rotate(degrees, resample, fillcolor=fill)`, computed by `affine.py`."""
    degrees = _signed(_level(magnitude, 30.0), rng)
    return Image.fromarray(affine.rotate(img, degrees, _resample(rng), fill))


def _shear_x(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    return _affine(img, (1.0, _signed(_level(magnitude, 0.3), rng), 0.0, 0.0, 1.0, 0.0), fill, rng)


def _shear_y(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, _signed(_level(magnitude, 0.3), rng), 1.0, 0.0), fill, rng)


def _translate_x(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    pixels = _signed(_level(magnitude, 0.45), rng) * img.width
    return _affine(img, (1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill, rng)


def _translate_y(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    pixels = _signed(_level(magnitude, 0.45), rng) * img.height
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill, rng)


def _posterize_increasing(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    """Keep the 4 - int(4*m/10) high bits; a LUT, as recent Pillow refuses 0 bits (magnitude 10: black)."""
    mask = (0xFF << (8 - (4 - int(_level(magnitude, 4.0))))) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_increasing(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    return ImageOps.solarize(img, 256 - int(_level(magnitude, 256.0)))


def _solarize_add(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
    add = int(_level(magnitude, 110.0))
    lut = [min(255, i + add) if i < _SOLARIZE_ADD_THRESHOLD else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance_increasing(enhancer: Callable[[Image.Image], _Enhancer]) -> Op:
    """An enhance op whose factor is 1 ± 0.9*m/10: stronger magnitude means a stronger change either way."""

    def op(img: Image.Image, magnitude: float, fill: Fill, rng: np.random.Generator) -> Image.Image:
        return enhancer(img).enhance(1.0 + _signed(_level(magnitude, 0.9), rng))

    return op


OPS: dict[str, Op] = {
    "AutoContrast": lambda img, magnitude, fill, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, magnitude, fill, rng: ImageOps.equalize(img),
    "Invert": lambda img, magnitude, fill, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize_increasing,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance_increasing(ImageEnhance.Color),
    "ContrastIncreasing": _enhance_increasing(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance_increasing(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance_increasing(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def _to_pil(image: np.ndarray) -> Image.Image:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"RandAugment expects an HWC uint8 RGB array, got shape {shape} and dtype {dtype}")
    return Image.fromarray(image)


def apply_op(image: np.ndarray, name: str, magnitude: float, rng: np.random.Generator,
             fill: Fill = IMAGENET_MEAN_FILL) -> np.ndarray:
    """Apply one named op at a fixed magnitude to an HWC uint8 RGB array (no probability, no magnitude noise);
    `rng` draws only the op's sign and resampling filter."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {', '.join(OPS)}")
    return np.array(OPS[name](_to_pil(image), float(magnitude), tuple(fill), rng))


class RandAugment:
    """timm-style RandAugment on RGB images; picklable, so it runs in MindSpore worker processes."""

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        fill: Sequence[int] = IMAGENET_MEAN_FILL,
        ops: Sequence[str] = INCREASING_OPS,
    ) -> None:
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {', '.join(OPS)}")
        if not ops:
            raise ValueError("RandAugment needs at least one op to draw from")
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
            raise ValueError(f"num_ops must be a non-negative int, got {num_ops!r}")
        if not 0.0 <= magnitude < float("inf"):
            raise ValueError(f"magnitude must be finite and >= 0, got {magnitude!r}")
        if not 0.0 <= magnitude_std < float("inf"):
            raise ValueError(f"magnitude_std must be finite and >= 0, got {magnitude_std!r}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if len(fill) != 3 or not all(0 <= int(c) <= 255 for c in fill):
            raise ValueError(f"fill must be three values in 0..255, got {fill!r}")
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.prob = float(prob)
        self.fill: Fill = (int(fill[0]), int(fill[1]), int(fill[2]))
        self.ops = tuple(ops)

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """Draw one op application's magnitude: Normal(magnitude, magnitude_std) clipped to [0, 10]."""
        magnitude = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
        return min(max(magnitude, 0.0), MAX_MAGNITUDE)

    def augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Augment one RGB PIL image with the draws of `rng`."""
        for index in rng.integers(len(self.ops), size=self.num_ops):
            if rng.random() < self.prob:
                img = OPS[self.ops[index]](img, self.sample_magnitude(rng), self.fill, rng)
        return img

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one HWC uint8 RGB array; returns a new array of the same shape and dtype."""
        return np.array(self.augment(_to_pil(image), rng))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
                f"magnitude_std={self.magnitude_std}, prob={self.prob}, fill={self.fill}, ops={len(self.ops)})")


_POLICY_VALUES = {"mstd": r"\d+(?:\.\d*)?|\.\d+", "inc": r"[01]", "m": r"\d+(?:\.\d*)?|\.\d+", "n": r"\d+"}


def rand_augment_from_string(policy: str) -> RandAugment:
    """Build a RandAugment from a timm policy string such as ``rand-m9-mstd0.5-inc1`` or ``rand-m7-n3-mstd0-inc1``.

    Keys: m (magnitude), n (number of ops), mstd (magnitude std), inc (1: increasing ops). As in timm, inc
    defaults to 0, the original op variants, which this port does not implement: a policy must say inc1.
    """
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment policy {policy!r} must start with 'rand', got {parts[0]!r}")
    values: dict[str, str] = {}
    for part in parts[1:]:
        key = next((k for k, pattern in _POLICY_VALUES.items()
                    if part.startswith(k) and re.fullmatch(pattern, part[len(k):])), None)
        if key is None:
            raise ValueError(f"RandAugment policy {policy!r}: bad part {part!r} "
                             "(expected m<number>, n<int>, mstd<number> or inc<0|1>)")
        if key in values:
            raise ValueError(f"RandAugment policy {policy!r}: key {key!r} given twice (part {part!r})")
        values[key] = part[len(key):]
    if values.get("inc", "0") != "1":
        raise ValueError(f"RandAugment policy {policy!r}: only the increasing ops (inc1) are supported")
    kwargs: dict[str, float | int] = {}
    if "m" in values:
        kwargs["magnitude"] = float(values["m"])
    if "n" in values:
        kwargs["num_ops"] = int(values["n"])
    if "mstd" in values:
        kwargs["magnitude_std"] = float(values["mstd"])
    return RandAugment(**kwargs)
