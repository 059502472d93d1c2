"""What every reader of image files agrees on: the frame rule and the pixel budget (torch-free, so that `data
explore` and the service's header check use it without the torch stack; `data.loading` decodes with it).

The frame rule, the same for train, predict, serve and explore: **the first frame is the image**. An animated
GIF, PNG (APNG) or WebP and a multi-page TIFF are read as their first frame (for a PNG, the default image that
a viewer without animation shows), and only that frame is decoded. The pixel budget counts that frame, so a
file with many frames costs what its first frame costs and cannot go round the limit.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

#: Images declaring more pixels than this are refused before decoding: PIL's own decompression-bomb limit
#: (≈ 13,400² px, 0.5 GB as RGB). A forged 60,000² header would otherwise make the decoder allocate ~10 GB.
MAX_IMAGE_PIXELS = 178_956_970
#: The frame rule in words, for messages and documentation.
FRAME_RULE = "the first frame of an animated or multi-page image is used"
GIF_MAGIC = (b"GIF87a", b"GIF89a")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: bytes of a file's start that hold its declared size for every format `declared_size` reads
HEADER_BYTES = 64 * 1024
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8 and CC are not frames
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageTooLarge(ValueError):
    """An image whose first frame has more pixels than the budget (raised before any pixel is decoded)."""

    def __init__(self, width: int | None, height: int | None, limit: int):
        self.width, self.height, self.limit = width, height, limit
        size = f"declares {width}×{height} px, " if width else ""
        super().__init__(f"image too large ({size}more than {limit:,} px; a decompression bomb?)")


def check_pixels(width: int, height: int, limit: int = MAX_IMAGE_PIXELS) -> None:
    """Raise `ImageTooLarge` when a `width × height` frame exceeds `limit` pixels.

    >>> check_pixels(640, 480)
    >>> check_pixels(20_000, 20_000)
    Traceback (most recent call last):
    ...
    taxonomist.data.images.ImageTooLarge: image too large (declares 20000×20000 px, more than 178,956,970 px; a decompression bomb?)
    """
    if width * height > limit:
        raise ImageTooLarge(width, height, limit)


@contextmanager
def open_first_frame(fp: IO[bytes], limit: int = MAX_IMAGE_PIXELS) -> Iterator:
    """A PIL image positioned on its first frame, its size checked against `limit` before any pixel is decoded
    (`ImageTooLarge`). Opening reads headers only; `.convert()`, `.load()` then decode that one frame.

    PIL's `UnidentifiedImageError`, `OSError` and `SyntaxError` for unreadable files pass through.
    """
    from PIL import Image

    with warnings.catch_warnings():
        # PIL warns above its own limit and refuses above twice it; the budget here decides instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError:
            raise ImageTooLarge(None, None, limit) from None
    with im:
        # the size of the frame PIL will decode: a GIF's first frame may enlarge the declared screen
        check_pixels(im.width, im.height, limit)
        yield im


def declared_size(head: bytes, data=None) -> tuple[int, int] | None:
    """(width, height) that a JPEG, PNG, GIF or WebP header declares, read without decoding; None for other
    formats or a header cut short. `head` is the file's first bytes; `data` the whole file (bytes or a uint8
    tensor), for JPEGs whose frame header sits behind large EXIF or ICC segments. For an animated file this is
    the size of the first frame's canvas, which is all that is decoded.

    >>> declared_size(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000280000001e0"))
    (640, 480)
    """
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:6] in GIF_MAGIC and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        if chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
        return None
    if head[:3] == JPEG_MAGIC:
        buf = head if data is None or len(data) <= len(head) else _as_bytes(data)
        pos = 2
        while pos + 9 <= len(buf):
            if buf[pos] != 0xFF:
                return None
            marker = buf[pos + 1]
            if marker == 0xFF:          # fill byte
                pos += 1
                continue
            if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:   # no length field
                pos += 2
                continue
            if marker in _JPEG_SOF:
                return int.from_bytes(buf[pos + 7:pos + 9], "big"), int.from_bytes(buf[pos + 5:pos + 7], "big")
            if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
                return None
            pos += 2 + int.from_bytes(buf[pos + 2:pos + 4], "big")
    return None


def _as_bytes(data) -> bytes:
    return bytes(data.numpy()) if hasattr(data, "numpy") else bytes(data)


__all__ = ["FRAME_RULE", "GIF_MAGIC", "ImageTooLarge", "MAX_IMAGE_PIXELS", "check_pixels", "declared_size",
           "open_first_frame"]
