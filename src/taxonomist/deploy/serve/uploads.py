"""Uploaded bytes → a uint8 RGB image tensor, decoded by the decoder `taxonomist predict` uses
(`data.loading.decode_image_data`): the first frame of an animated or multi-page image, nothing more.

Every way an upload can be wrong becomes an `UploadError` with the HTTP status the service answers: empty or
truncated → 400, not an image at all → 415, more pixels than the budget → 400 (checked from the header, before
any pixel is decoded). `DecodeBudget` bounds the pixels being decoded at once across all requests, so that the
memory decoding takes is about `--max-decodes × --max-image-pixels × 5 bytes` however many uploads arrive.
"""
from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from taxonomist.data.images import MAX_IMAGE_PIXELS as FILE_PIXEL_LIMIT
from taxonomist.data.images import HEADER_BYTES, ImageTooLarge, declared_size, open_first_frame

#: Default pixel budget of one upload (width × height of its first frame), read from the header before
#: decoding: 100 megapixels decode to 300 MB of RGB, the most a shared service should spend on one upload.
MAX_IMAGE_PIXELS = 100_000_000
#: Default number of full-budget decodes at once (`--max-decodes`); smaller images share it by pixel count.
MAX_DECODES = 2
#: The largest budget an option may set: PIL refuses images above it whatever the service allows.
MAX_PIXEL_OPTION = FILE_PIXEL_LIMIT


class UploadError(Exception):
    """An upload the service refuses; `status` is the HTTP status code of the answer."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


def _over_budget(filename: str, width: int | None, height: int | None, max_pixels: int) -> UploadError:
    if width is None:
        return UploadError(400, f"{filename}: image dimensions exceed the limit of {max_pixels:,} pixels "
                                "(a decompression bomb)")
    return UploadError(400, f"{filename}: {width}×{height} pixels exceeds the limit of {max_pixels:,} pixels "
                            "(a decompression bomb or an image too large to serve; --max-image-pixels)")


def upload_pixels(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS) -> int | None:
    """The pixels the upload's first frame declares in its header (JPEG, PNG, GIF, WebP), without opening it
    with PIL; None for other formats. An `UploadError` (400) when they exceed `max_pixels`."""
    size = declared_size(data[:HEADER_BYTES], data)
    if size is None:
        return None
    if size[0] * size[1] > max_pixels:
        raise _over_budget(filename, *size, max_pixels)
    return size[0] * size[1]


def check_image_header(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of the upload's first frame, from its header; raises `UploadError` for an empty file, a
    file PIL does not recognise as an image (415) or a first frame above `max_pixels` (400)."""
    from PIL import UnidentifiedImageError

    if not data:
        raise UploadError(400, f"{filename}: empty file")
    upload_pixels(data, filename, max_pixels)   # before PIL: an animated WebP allocates its canvas on opening
    try:
        with open_first_frame(io.BytesIO(data), max_pixels) as im:
            width, height = im.size
    except ImageTooLarge as e:
        raise _over_budget(filename, e.width, e.height, max_pixels) from None
    except UnidentifiedImageError:
        raise UploadError(415, f"{filename}: not an image (JPEG, PNG, WebP, GIF, BMP or TIFF expected)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UploadError(400, f"{filename}: cannot read the image header ({e})") from None
    if width <= 0 or height <= 0:
        raise UploadError(400, f"{filename}: image has no pixels ({width}×{height})")
    return width, height


def decode_upload(data: bytes, filename: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """Decode uploaded bytes to a uint8 RGB tensor (3, H, W) with `data.loading.decode_image_data`, the decoder
    of `taxonomist predict` (first frame, EXIF orientation applied), so that both see the same pixels."""
    import torch

    from taxonomist.data.loading import UnreadableImageError, decode_image_data

    check_image_header(data, filename, max_pixels)
    try:
        return decode_image_data(torch.frombuffer(bytearray(data), dtype=torch.uint8), filename, max_pixels)
    except UnreadableImageError as e:
        raise UploadError(400, f"{filename}: {e.reason}") from None


class DecodeBudget:
    """The pixels being decoded at once, across requests: a decode of `n` pixels waits until `n` more fit
    under `capacity` (`--max-decodes × --max-image-pixels`), so decoding memory stays bounded under a flood of
    large uploads while small images pass beside them. Waiting happens on the event loop, not in a thread.

    >>> budget = DecodeBudget(100)
    >>> async def one():
    ...     async with budget.reserve(60):
    ...         return budget.in_flight
    >>> asyncio.run(one()), budget.in_flight
    (60, 0)
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.in_flight = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` (at most the whole capacity) of the budget while the block runs."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an app served again (a new lifespan) runs on a new loop
            self._cond, self._loop = asyncio.Condition(), loop
        pixels = max(1, min(int(pixels), self.capacity))
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight + pixels <= self.capacity)
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight -= pixels
                self._cond.notify_all()
