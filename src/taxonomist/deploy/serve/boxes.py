"""A frame and a box → the crops a model takes, cut exactly as `taxonomist data prepare` cuts them.

`parse_bbox` reads the `bbox` form field (`x,y,w,h` in pixels of the frame); `cut_crops` cuts the ROI (the box
clipped to the frame) and the context at the model's scale with `data.coco.box_windows`, the geometry prepare
uses, so that a model answers a frame and a box as it answers the prepared dataset.
"""
from __future__ import annotations

import math
import re

from taxonomist.deploy.serve.uploads import UploadError

_SEPARATORS = re.compile(r"[,\s]+")


def canonical_scale(value: str | float) -> str:
    """A context scale as `data prepare` names it ("3", "1.5", "full"); a `ConfigError` naming --context-scale
    otherwise.

    >>> canonical_scale("3.0"), canonical_scale(" FULL "), canonical_scale(1.5)
    ('3', 'full', '1.5')
    """
    from taxonomist.data.coco import parse_context
    from taxonomist.errors import ConfigError

    try:
        scales = parse_context(str(value))
    except ConfigError:
        scales = []
    if len(scales) != 1:
        raise ConfigError(f"--context-scale {value!r}: give one context scale > 1 (the 3 of `data prepare "
                          "--context 1,3,full`) or 'full'")
    return scales[0]


def parse_bbox(text: str, where: str) -> tuple[float, float, float, float]:
    """`"x,y,w,h"` (commas or spaces; brackets allowed) → four finite numbers with w, h > 0; an `UploadError`
    (400) naming `where` (the field and image) and the value otherwise.

    >>> parse_bbox("10, 20.5,30,40", "bbox")
    (10.0, 20.5, 30.0, 40.0)
    >>> parse_bbox("[1 2 3 4]", "bbox")
    (1.0, 2.0, 3.0, 4.0)
    """
    shown = text if len(text) <= 80 else text[:77] + "…"
    parts = [p for p in _SEPARATORS.split(text.strip().strip("[]()").strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise UploadError(400, f"{where}: {shown!r} is not 4 numbers x,y,w,h (the box in pixels of the frame)")
    x, y, w, h = values
    if w <= 0 or h <= 0:
        raise UploadError(400, f"{where}: {shown!r} has width {w:g} and height {h:g}; both must be > 0")
    return x, y, w, h


def cut_crops(frame, bbox: tuple[float, float, float, float], scale: str | None, where: str):
    """(ROI, context) uint8 CHW tensors cut from `frame` (uint8 CHW) for `bbox` at context `scale`, as `data
    prepare` writes them (the `full` context shrunk to its longer side of 1024 px); the context is None when
    `scale` is None. A degenerate box — entirely outside the frame, or below one pixel once clipped to it, the
    boxes `data prepare` lists as skipped — is an `UploadError` (400) naming `where` and the box."""
    import numpy as np

    from taxonomist.data.coco import box_windows, clip_boxes

    height, width = int(frame.shape[-2]), int(frame.shape[-1])
    shown = ",".join(f"{v:g}" for v in bbox)
    w, h = clip_boxes(np.asarray(bbox, dtype=np.float64), width, height)[0, 2:]
    if not (w > 0 and h > 0):
        raise UploadError(400, f"{where}: box {shown} lies outside the {width}×{height} frame")
    if w < 1 or h < 1:
        raise UploadError(400, f"{where}: box {shown} covers {w:g}×{h:g} px of the {width}×{height} frame; a box "
                               "needs at least one whole pixel inside the frame")
    (l0, t0, r0, b0), (l1, t1, r1, b1) = box_windows(bbox, scale or "full", width, height)
    roi = frame[:, t0:b0, l0:r0].contiguous()
    if scale is None:
        return roi, None
    if scale == "full":
        return roi, _full_context(frame)
    return roi, frame[:, t1:b1, l1:r1].contiguous()


def _full_context(frame):
    """The whole frame, shrunk as `data prepare` shrinks its `full` context (PIL Lanczos, longer side 1024)."""
    import numpy as np
    import torch
    from PIL import Image

    from taxonomist.data.coco import FULL_MAX_SIDE, shrink_frame

    if max(frame.shape[-2:]) <= FULL_MAX_SIDE:
        return frame
    image = Image.fromarray(frame.permute(1, 2, 0).numpy())
    return torch.from_numpy(np.asarray(shrink_frame(image)).copy()).permute(2, 0, 1).contiguous()
