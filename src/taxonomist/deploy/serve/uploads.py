"""Uploaded bytes → a uint8 RGB image tensor, decoded exactly as `data.loading.read_image` decodes a file.

Every way an upload can be wrong becomes an `UploadError` with the HTTP status the service answers: empty or
truncated → 400, not an image at all → 415, decompression-bomb dimensions → 400 (checked from the header,
before any pixel is decoded).
"""
from __future__ import annotations

import io
import re
import warnings

#: Largest image accepted (width × height), read from the header before decoding: 100 megapixels decode to
#: 300 MB of RGB, the most a shared service should spend on one upload; a bomb claims far more.
MAX_IMAGE_PIXELS = 100_000_000


class UploadError(Exception):
    """An upload the service refuses; `status` is the HTTP status code of the answer."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def check_image_header(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) from the image header; raises `UploadError` for an empty file, a file PIL does not
    recognise as an image (415) or dimensions above `max_pixels` (400)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, f"{filename}: empty file")
    try:
        # PIL reads only the header here; its own bomb check would raise at 2 × MAX_IMAGE_PIXELS, ours comes first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as e:  # far beyond our limit: PIL refuses it from the header alone
        raise UploadError(400, f"{filename}: image dimensions exceed the limit of {max_pixels:,} pixels "
                               f"(a decompression bomb: {e})") from None
    except UnidentifiedImageError:
        raise UploadError(415, f"{filename}: not an image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UploadError(400, f"{filename}: cannot read the image header ({e})") from None
    if width <= 0 or height <= 0:
        raise UploadError(400, f"{filename}: image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise UploadError(400, f"{filename}: {width}×{height} pixels exceeds the limit of {max_pixels:,} pixels "
                               "(a decompression bomb or an image too large to serve)")
    return width, height


def decode_upload(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode uploaded bytes to a uint8 RGB tensor (3, H, W), as `read_image` decodes a file (torchvision
    first, EXIF orientation applied, PIL for the formats torchvision lacks) so that the service and
    `taxonomist predict` see the same pixels."""
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    check_image_header(data, filename, max_pixels)
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
    except RuntimeError as e:
        image = _decode_with_pil(data, filename, re.sub(r"^.*\.cpp:\d+, ", "", str(e).strip()).split("\n")[0])
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(data: bytes, filename: str, torch_reason: str):
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # truncated data, broken chunks
        reason = str(e) if "Unsupported image file" in torch_reason else torch_reason
        raise UploadError(400, f"{filename}: cannot decode image: {reason}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
