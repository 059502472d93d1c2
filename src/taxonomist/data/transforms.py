"""Image transforms for training and evaluation, on uint8 CHW tensors (torchvision.transforms.v2).

Geometry (stretch or letterbox to a square), the training augmentations of `cfg.augment` and the eval
resize + centre crop, ending in a float32 tensor normalised with the backbone's mean and std.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from taxonomist.config import Config
from taxonomist.data.augment_presets import resolve_augment
from taxonomist.errors import ConfigError

RESIZE_MODES = ("stretch", "pad")
INTERPOLATIONS = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
                  "bicubic": InterpolationMode.BICUBIC}
#: timm's RandAugment magnitudes run 0‥10 (10 = the op's maximum); torchvision picks a bin index, so
#: 101 bins give timm's scale in steps of 0.1 with the same maxima (shear 0.3, rotate 30°, translate 0.45, …)
_MAGNITUDE_BINS = 101


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Letterbox a CHW image to a square, filling with the mean colour of the edges that get padded.

    Elongated organisms (plankton, eels, siphonophores) keep their shape instead of being squashed, and the
    fill matches the background they were photographed on.

    >>> img = torch.zeros(3, 10, 40, dtype=torch.uint8)
    >>> pad_to_square(img).shape
    torch.Size([3, 40, 40])
    """
    if image.ndim != 3:
        raise ValueError(f"pad_to_square expects a CHW tensor, got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    if height == width:
        return image
    side = max(height, width)
    if height < width:  # padding above and below: the fill is the mean of the top and bottom rows
        edges = torch.cat([image[:, 0, :], image[:, -1, :]], dim=1)
    else:
        edges = torch.cat([image[:, :, 0], image[:, :, -1]], dim=1)
    fill = edges.float().mean(dim=1).round().to(image.dtype)
    canvas = fill.view(channels, 1, 1).expand(channels, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top:top + height, left:left + width] = image
    return canvas


class PadToSquare:
    """Transform form of `pad_to_square` (a class, so that DataLoader workers can pickle it)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return pad_to_square(image)

    def __repr__(self) -> str:
        return "PadToSquare()"


def to_square(image: torch.Tensor, size: int, resize: str = "stretch",
              interpolation: str = "bilinear") -> torch.Tensor:
    """Bring a uint8 CHW image to `size`×`size` by stretching or by letterboxing first (`resize='pad'`).

    >>> to_square(torch.zeros(3, 10, 40, dtype=torch.uint8), 16, "pad").shape
    torch.Size([3, 16, 16])
    """
    _check_choice(resize, RESIZE_MODES, "data.resize")
    if resize == "pad":
        image = pad_to_square(image)
    if tuple(image.shape[-2:]) == (size, size):
        return image
    return F.resize(image, [size, size], interpolation=_interpolation(interpolation), antialias=True)


class RandomRotate90:
    """Rotate by a random multiple of 90° (plankton and ROIs have no "up")."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image

    def __repr__(self) -> str:
        return "RandomRotate90()"


class TimmRandAugment(v2.RandAugment):
    """torchvision's uint8 RandAugment driven by a timm spec such as `rand-m7-mstd0.5` (or `-n3`, `-mmax10`).

    Chosen over timm's PIL implementation because it works on the uint8 tensors the loader already holds
    (no tensor → PIL → tensor round trip). torchvision's op set is timm's "increasing" one (`inc1`); with
    `mstd` > 0 the magnitude is drawn from N(m, mstd), clipped to [0, mmax], once per image (timm draws
    once per op — the same spread at a fraction of the bookkeeping).
    """

    def __init__(self, spec: str, interpolation: InterpolationMode = InterpolationMode.BILINEAR,
                 fill: Sequence[int] | int | None = None):
        params = parse_randaugment(spec)
        self.spec = spec
        self.m, self.mstd, self.mmax = params["m"], params["mstd"], params["mmax"]
        super().__init__(num_ops=params["n"], magnitude=self._bin(self.m), num_magnitude_bins=_MAGNITUDE_BINS,
                         interpolation=interpolation, fill=fill)

    def _bin(self, magnitude: float) -> int:
        return int(round(min(max(magnitude, 0.0), self.mmax) * 10))

    def forward(self, *inputs):
        if self.mstd > 0:
            self.magnitude = self._bin(self.m + self.mstd * float(torch.randn(())))
        return super().forward(*inputs)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def parse_randaugment(spec: str) -> dict[str, float]:
    """Read a timm RandAugment spec into its parameters.

    >>> parse_randaugment("rand-m7-mstd0.5")
    {'m': 7.0, 'n': 2, 'mstd': 0.5, 'mmax': 10.0, 'inc': 1}
    """
    params: dict[str, float] = {"m": 9.0, "n": 2, "mstd": 0.0, "mmax": 10.0, "inc": 1}
    parts = spec.strip().split("-")
    if parts[0] != "rand":
        raise ConfigError(f"augment.randaugment {spec!r}: expected a timm spec starting with 'rand-', "
                          "e.g. rand-m7-mstd0.5 (empty = off)")
    for part in parts[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n)(\d+(?:\.\d*)?)", part)
        if not match:
            raise ConfigError(f"augment.randaugment {spec!r}: cannot read {part!r}; "
                              "known keys are m<magnitude>, n<ops>, mstd<std>, mmax<max>, inc<0|1>")
        key, value = match.groups()
        params[key] = int(value) if key in ("n", "inc") else float(value)
    if not 0 <= params["mmax"] <= 10:
        raise ConfigError(f"augment.randaugment {spec!r}: mmax must lie in 0‥10")
    if not 0 <= params["m"] <= params["mmax"]:
        raise ConfigError(f"augment.randaugment {spec!r}: magnitude m must lie in 0‥{params['mmax']:g}")
    return params


def eval_resize_size(image_size: int, crop_pct: float) -> int:
    """The side the eval path resizes to before centre-cropping `image_size` (timm's rule: floor(size / crop_pct)).

    >>> eval_resize_size(224, 0.875)
    256
    """
    return int(math.floor(image_size / crop_pct))


def build_transforms(cfg: Config, train: bool, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5), interpolation: str = "bicubic") -> Callable:
    """The transform from a uint8 CHW image (any size) to a normalised float32 CHW tensor of `cfg.data.image_size`.

    Train: [letterbox] → random-resized crop → h/v flips → random 90° turns → small rotation → colour
    jitter → RandAugment → [grey]. Eval: [letterbox] → resize to image_size / crop_pct (square) → centre
    crop → [grey]. Geometry runs first so the costly per-pixel ops see only `image_size`² pixels. Fills
    (rotation, RandAugment) use the normalisation mean, which becomes 0 after normalising. Strength fields
    left unset take `augment.preset`'s values (`resolve_augment`; `auto` = `default` here, where no training
    budget is known; `train()` resolves with its budget before calling this).

    >>> from taxonomist.config import Config
    >>> t = build_transforms(Config(), train=False)
    >>> t(torch.zeros(3, 50, 80, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
    """
    data, aug = cfg.data, resolve_augment(cfg.augment)
    size = _check_size(data.image_size)
    mean, std = _check_stats(mean, "mean"), _check_stats(std, "std")
    if any(s <= 0 for s in std):
        raise ConfigError(f"std {tuple(std)}: every value must be > 0")
    interp = _interpolation(interpolation)
    _check_choice(data.resize, RESIZE_MODES, "data.resize")
    if not 0 < aug.crop_pct <= 1:
        raise ConfigError(f"augment.crop_pct {aug.crop_pct}: must lie in (0, 1]")
    fill = [int(round(255 * m)) for m in mean]

    steps: list[Callable] = [PadToSquare()] if data.resize == "pad" else []
    if train:
        lo, hi = aug.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"augment.scale {tuple(aug.scale)}: need 0 < min ≤ max ≤ 1")
        if not 0 < aug.ratio[0] <= aug.ratio[1]:
            raise ConfigError(f"augment.ratio {tuple(aug.ratio)}: need 0 < min ≤ max")
        for key in ("hflip", "vflip"):
            if not 0 <= getattr(aug, key) <= 1:
                raise ConfigError(f"augment.{key} {getattr(aug, key)}: a probability must lie in [0, 1]")
        if aug.rotation < 0 or aug.color_jitter < 0:
            raise ConfigError(f"augment.rotation {aug.rotation} / augment.color_jitter {aug.color_jitter}: "
                              "must be ≥ 0")
        steps.append(v2.RandomResizedCrop(size, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                                          interpolation=interp, antialias=True))
        if aug.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(aug.hflip))
        if aug.vflip > 0:
            steps.append(v2.RandomVerticalFlip(aug.vflip))
        if aug.rotate90:
            steps.append(RandomRotate90())
        if aug.rotation > 0:
            steps.append(v2.RandomRotation(aug.rotation, interpolation=InterpolationMode.BILINEAR, fill=fill))
        if aug.color_jitter > 0:
            cj = aug.color_jitter
            steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
        if aug.randaugment:
            steps.append(TimmRandAugment(aug.randaugment, interpolation=InterpolationMode.BILINEAR, fill=fill))
    else:
        resized = eval_resize_size(size, aug.crop_pct)
        steps += [v2.Resize([resized, resized], interpolation=interp, antialias=True), v2.CenterCrop(size)]
    if data.grayscale:
        steps.append(v2.Grayscale(num_output_channels=3))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def _interpolation(name: str | InterpolationMode) -> InterpolationMode:
    if isinstance(name, InterpolationMode):
        return name
    _check_choice(name, tuple(INTERPOLATIONS), "interpolation")
    return INTERPOLATIONS[name]


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} {value!r}: expected one of {', '.join(choices)}")


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.image_size {size!r}: must be a positive integer")
    return size


def _check_stats(values: Sequence[float], name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ConfigError(f"{name} {values}: expected 3 values (one per RGB channel)")
    return values
