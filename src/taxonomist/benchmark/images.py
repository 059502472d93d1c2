"""The image files a benchmark reads: pre-cropped ROI JPEGs of varied, realistic sizes, and the dataset
directory (annotations.csv + a small parent taxonomy) that the project's readers take."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: the two kinds of files a benchmark reads: pre-cropped ROIs of varied size, and full HD video frames
IMAGE_KINDS = {"rois": "pre-cropped ROI JPEGs, sides 256–640 px, quality 90",
               "frames": "1920×1080 frame JPEGs (whole frames as inputs), quality 90"}


def write_roi_dataset(root: str | Path, n_images: int, n_labels: int = 8, seed: int = 0,
                      min_side: int = 256, max_side: int = 640, quality: int = 90,
                      frame_size: tuple[int, int] | None = None) -> Path:
    """Write `n_images` ROI JPEGs (each side drawn in [min_side, max_side], or all `frame_size` = (width,
    height) for video frames) with smooth colour fields and grain, so that they compress and decode like
    camera images rather than flat or pure-noise ones."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [f"Species {i}" for i in range(n_labels)]
    rows = ["path,label"]
    for i in range(n_images):
        if frame_size is not None:
            w, h = frame_size
        else:
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        grain = rng.integers(-12, 13, size=(h, w, 1), dtype=np.int16)
        image = np.clip(field + grain, 0, 255).astype(np.uint8)
        rel = f"images/roi_{i:05d}.jpg"
        Image.fromarray(image).save(root / rel, quality=quality)
        rows.append(f"{rel},{labels[i % n_labels]}")
    (root / "annotations.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    # two genera under one family: min-risk has internal nodes to choose from
    tax = ["concept_name,parent", "Familia,", "Genus A,Familia", "Genus B,Familia"]
    tax += [f"{lab},{'Genus A' if i % 2 == 0 else 'Genus B'}" for i, lab in enumerate(labels)]
    (root / "taxonomy.csv").write_text("\n".join(tax) + "\n", encoding="utf-8")
    return root
