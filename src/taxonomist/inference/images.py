"""What `predict` reads: a folder of images (recursively), a CSV with a `path` column, or a dataset directory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.data.dataset import ANNOTATIONS, read_annotations, read_csv_table
from taxonomist.errors import ConfigError, DataError

#: Files a folder of images is searched for (case-insensitive), recursively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class ImageInput:
    """The images to predict: `rows` has a `path` column relative to `root`, plus the input's other columns."""

    root: Path
    rows: pd.DataFrame
    kind: str            # folder | csv | dataset
    source: Path         # the folder, CSV file or annotations.csv, for messages


def read_images(images: str | Path, split: str | None = None) -> ImageInput:
    """Read `--images`: a folder (recursive), a CSV with a `path` column (relative to the CSV's folder), or a
    dataset directory (its annotations.csv; unlabelled rows are fine). `split` keeps one split of a dataset.
    """
    src = Path(images)
    if src.is_dir() and (src / ANNOTATIONS).is_file():
        frame = read_annotations(src / ANNOTATIONS)
        source = src / ANNOTATIONS
        if split:
            if "split" not in frame.columns:
                raise DataError(f"{source}: no 'split' column, so split {split!r} cannot be selected")
            frame = frame[frame["split"] == split]
            if frame.empty:
                raise DataError(f"{source}: no rows with split {split!r}")
        return ImageInput(src, frame.reset_index(drop=True), "dataset", source)
    if split:
        raise ConfigError(f"{src}: --split selects rows of a dataset directory (with annotations.csv)")
    if src.is_dir():
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not files:
            raise DataError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below it")
        return ImageInput(src, pd.DataFrame({"path": files}), "folder", src)
    if src.is_file():
        return ImageInput(src.parent, _read_image_csv(src), "csv", src)
    raise DataError(f"{src}: not found (give a folder of images, a CSV with a 'path' column or a dataset directory)")


def _read_image_csv(path: Path) -> pd.DataFrame:
    frame = read_csv_table(path, "image list", ("path",))
    empty = np.flatnonzero(frame["path"].to_numpy() == "")
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2}: empty path")
    return frame


__all__ = ["IMAGE_EXTENSIONS", "ImageInput", "read_images"]
