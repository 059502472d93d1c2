"""Device-side decoding and batch transforms: nvJPEG batch decode on CUDA (CPU decoding elsewhere) and the
resize, normalisation and flips of a whole batch on the device, for input pipelines that keep images on the GPU
(`taxonomist benchmark` measures them as `gpu_decode_img_s`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms.v2 import functional as F

from taxonomist.data.images import HEADER_BYTES, JPEG_MAGIC, MAX_IMAGE_PIXELS, declared_size
from taxonomist.data.loading import UnreadableImageError, read_image
from taxonomist.data.transforms import eval_resize_size, to_square
from taxonomist.errors import ConfigError, DataError

__all__ = ["batch_random_flips", "batch_resize_normalize", "decode_jpeg_batch_cuda"]

def decode_jpeg_batch_cuda(paths: Sequence[str | Path], device: str | torch.device = "cuda",
                           strict: bool = True) -> list[torch.Tensor | None]:
    """Decode images to uint8 RGB CHW tensors on `device`; JPEGs in one nvJPEG batch when it is a CUDA device.

    Other formats, and every image when CUDA is not available, are decoded on the CPU (`read_image`) and
    moved. A corrupt image raises `UnreadableImageError`, or with `strict=False` comes back as None.

    >>> decode_jpeg_batch_cuda(["a.jpg", "b.png"], "cpu")[0].dtype     # doctest: +SKIP
    torch.uint8
    """
    device = torch.device(device)
    out: list[torch.Tensor | None] = [None] * len(paths)
    on_gpu: list[int] = []
    datas: list[torch.Tensor] = []
    if device.type == "cuda" and torch.cuda.is_available():
        for i, path in enumerate(paths):
            try:
                data = read_file(str(path))
            except RuntimeError:
                continue  # read_image below reports why
            size = declared_size(bytes(data[:HEADER_BYTES].numpy()), data)
            # a JPEG over the pixel budget is left to read_image below, which refuses it before decoding
            if bytes(data[:3].tolist()) == JPEG_MAGIC and size is not None and size[0] * size[1] <= MAX_IMAGE_PIXELS:
                on_gpu.append(i)
                datas.append(data)
        if datas:
            try:
                decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
                for i, image in zip(on_gpu, decoded):
                    out[i] = image
            except RuntimeError:
                on_gpu = []  # one bad file fails the whole nvJPEG batch: decode these one by one below
    done = set(on_gpu)
    for i, path in enumerate(paths):
        if i in done:
            continue
        try:
            out[i] = read_image(path).to(device, non_blocking=True)
        except UnreadableImageError:
            if strict:
                raise
    return out


def batch_resize_normalize(images: Sequence[torch.Tensor], image_size: int, mean: Sequence[float],
                           std: Sequence[float], resize: str = "stretch", crop_pct: float = 1.0,
                           interpolation: str = "bilinear") -> torch.Tensor:
    """The eval transform for a list of decoded uint8 CHW images on any device: square each (stretch or
    pad) to image_size / crop_pct, centre-crop, stack, scale to float and normalise in one batched op.

    >>> batch_resize_normalize([torch.zeros(3, 20, 30, dtype=torch.uint8)], 16, [0.5] * 3, [0.5] * 3).shape
    torch.Size([1, 3, 16, 16])
    """
    if not images:
        raise DataError("batch_resize_normalize: no images")
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"augment.crop_pct {crop_pct}: must lie in (0, 1]")
    side = eval_resize_size(image_size, crop_pct)
    squared = [to_square(im, side, resize, interpolation) for im in images]
    batch = torch.stack(squared)
    if side != image_size:
        batch = F.center_crop(batch, [image_size, image_size])
    device = batch.device
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255
    return (batch.float() - mean_t) / std_t


def batch_random_flips(batch: torch.Tensor, hflip: float = 0.5, vflip: float = 0.5, rotate90: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random flips and 90° turns of a square (B, C, H, W) batch, without a Python loop over
    samples (for augmenting on the GPU after `decode_jpeg_batch_cuda`).

    >>> batch_random_flips(torch.zeros(4, 3, 8, 8)).shape
    torch.Size([4, 3, 8, 8])
    """
    if batch.ndim != 4:
        raise DataError(f"batch_random_flips: expected a (B, C, H, W) batch, got shape {tuple(batch.shape)}")
    n = batch.shape[0]
    draw = torch.rand((3, n), generator=generator, device=generator.device if generator else "cpu")
    draw = draw.to(batch.device)
    view = (n, 1, 1, 1)
    batch = torch.where((draw[0] < hflip).view(view), batch.flip(-1), batch)
    batch = torch.where((draw[1] < vflip).view(view), batch.flip(-2), batch)
    if rotate90:
        if batch.shape[-1] != batch.shape[-2]:
            raise DataError(f"batch_random_flips: rotate90 needs square images, got {tuple(batch.shape[-2:])}")
        k = (draw[2] * 4).long().clamp_(max=3).view(view)
        rotated = batch
        for turns in (1, 2, 3):
            rotated = torch.where(k == turns, torch.rot90(batch, turns, dims=(-2, -1)), rotated)
        batch = rotated
    return batch
