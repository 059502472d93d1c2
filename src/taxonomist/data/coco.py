"""COCO JSON (FathomNet) → the dataset format: one ROI crop per box plus context crops at other scales.

`read_coco` parses and checks a COCO file for both `data download` and `data prepare`; `prepare_coco`
decodes each frame once, cuts all of its boxes, and writes `annotations.csv` (+ `taxonomy.csv`).
"""
from __future__ import annotations

import csv
import io
import math
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from taxonomist.data.dataset import write_annotations
from taxonomist.errors import ConfigError, DataError, UnknownLabelError
from taxonomist.taxonomy import read_taxonomy, suggest, write_taxonomy
from taxonomist.utils.files import atomic_path, atomic_write_text
from taxonomist.utils.safe_parse import parse_json

SKIPPED_CSV = "prepare_skipped.csv"
IMAGE_FORMATS = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png")}
BBOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_DRIVE = re.compile(r"^[A-Za-z]:")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]")
#: `data prepare` shrinks the `full` context (the whole frame) to this longer side by default.
FULL_MAX_SIDE = 1024


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class CocoFile:
    """A checked COCO file: `images` and `annotations` as in the JSON, `categories` as id → name.

    Ids are compared as strings (`"7"` and `7` are the same image), the way they end up in annotations.csv.
    """

    path: Path
    images: list[dict]
    annotations: list[dict]
    categories: dict[str, str]

    def image_by_id(self) -> dict[str, dict]:
        return {str(im["id"]): im for im in self.images}


def read_coco(path: str | Path) -> CocoFile:
    """Read a COCO JSON file and check its structure, failing with one line naming the file and entry.

    Every image needs a `file_name` and an `id`; every annotation an `id`, an `image_id` of the file and
    a `bbox` of four numbers; a `category_id` may be null (unlabelled test files) or one of `categories`.

    >>> coco = read_coco("dataset_test.json")                   # doctest: +SKIP
    >>> len(coco.images), len(coco.annotations), len(coco.categories)   # doctest: +SKIP
    (325, 788, 79)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: COCO file not found" if not path.exists() else f"{path}: is not a file")
    data = parse_json(path.read_bytes(), str(path), DataError)  # one line for bad JSON, bad UTF-8, deep nesting
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with an 'images' list, got a {type(data).__name__}")
    if not isinstance(data.get("images"), list):
        raise DataError(f"{path}: no 'images' list (keys: {', '.join(map(str, data)) or 'none'})")

    images = data["images"]
    seen: dict[str, int] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict):
            raise DataError(f"{path}: images[{i}] is not an object")
        if "id" not in im or not isinstance(im["id"], (int, str)) or isinstance(im["id"], bool):
            raise DataError(f"{path}: images[{i}] has no id")
        name = im.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}: images[{i}] (id {im['id']}) has no file_name")
        key = str(im["id"])
        if key in seen:
            raise DataError(f"{path}: images[{i}]: duplicate image id {im['id']} (first at images[{seen[key]}])")
        seen[key] = i

    categories: dict[str, str] = {}
    raw_categories = data.get("categories", [])
    if not isinstance(raw_categories, list):
        raise DataError(f"{path}: 'categories' is not a list")
    for i, cat in enumerate(raw_categories):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str) or not cat["name"]:
            raise DataError(f"{path}: categories[{i}] needs an id and a name")
        if str(cat["id"]) in categories:
            raise DataError(f"{path}: categories[{i}]: duplicate category id {cat['id']}")
        categories[str(cat["id"])] = cat["name"].strip()

    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{path}: 'annotations' is not a list")
    ann_seen: dict[str, int] = {}
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or "id" not in ann:
            raise DataError(f"{path}: annotations[{i}] has no id")
        where = f"{path}: annotations[{i}] (id {ann['id']})"
        key = str(ann["id"])
        if key in ann_seen:
            raise DataError(f"{where}: duplicate annotation id (first at annotations[{ann_seen[key]}])")
        ann_seen[key] = i
        if str(ann.get("image_id")) not in seen:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not an image of the file")
        box = ann.get("bbox")
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise DataError(f"{where}: bbox {box!r} is not four numbers [x, y, width, height]")
        cat = ann.get("category_id")
        if cat is not None and str(cat) not in categories:
            raise DataError(f"{where}: category_id {cat!r} is not one of the file's categories")
    return CocoFile(path, images, annotations, categories)


def safe_relative_path(file_name: str) -> PurePosixPath | None:
    """`file_name` as a relative path that stays inside its folder, or None when it would escape it.

    Refused: absolute paths, drive letters, `..` components, backslash tricks and NUL bytes.

    >>> safe_relative_path("a/b.png"), safe_relative_path("../x.png"), safe_relative_path("/etc/x.png")
    (PurePosixPath('a/b.png'), None, None)
    """
    if not isinstance(file_name, str) or not file_name or "\x00" in file_name:
        return None
    if file_name.startswith(("/", "\\")) or _DRIVE.match(file_name):
        return None
    parts = [p for p in re.split(r"[\\/]", file_name) if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*parts)


def stays_inside(folder: str | Path, target: str | Path) -> bool:
    """True when `target`'s folder, with every symlink among its existing parts followed, lies inside `folder`:
    a symlink planted in an output folder must not carry writes elsewhere.

    >>> stays_inside("out", "out/images/a.png"), stays_inside("out", "elsewhere/a.png")
    (True, False)
    """
    try:
        return Path(target).parent.resolve().is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


# ---------------------------------------------------------------------------------------------- geometry
def parse_context(context: str | list) -> list[str]:
    """The context scales other than the ROI itself, in order, as canonical names.

    >>> parse_context("1,3,full"), parse_context("1, 1.5, 5")
    (['3', 'full'], ['1.5', '5'])
    """
    tokens = context.split(",") if isinstance(context, str) else [str(t) for t in context]
    scales: list[str] = []
    for raw in tokens:
        tok = raw.strip().lower()
        if not tok:
            continue
        if tok == "full":
            name = "full"
        else:
            try:
                value = float(tok)
            except ValueError:
                value = float("nan")
            if not math.isfinite(value) or value < 1:
                raise ConfigError(f"context scale {raw.strip()!r} is not a number >= 1 or 'full' (e.g. --context 1,3,full)")
            name = f"{value:g}"
        if name != "1" and name not in scales:
            scales.append(name)
    if not tokens or not any(t.strip() for t in tokens):
        raise ConfigError("context: no scales given (e.g. --context 1,3,full)")
    return scales


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """COCO boxes `[x, y, w, h]` (N, 4) clipped to a `width × height` frame; a box outside gets w or h ≤ 0.

    >>> clip_boxes(np.array([[-5., 10., 20., 20.]]), 100, 25).tolist()
    [[0.0, 10.0, 15.0, 15.0]]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0 = np.clip(boxes[:, 0], 0, width)
    y0 = np.clip(boxes[:, 1], 0, height)
    with np.errstate(over="ignore"):  # x + w beyond 1.8e308 is +inf, which the clip brings back to the frame
        x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
        y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)


def crop_windows(boxes: np.ndarray, scale: float, width: int, height: int) -> np.ndarray:
    """Integer pixel windows `[left, top, right, bottom]` (N, 4) for clipped boxes at a context scale.

    Scale 1 is the box itself (every pixel it touches); scale s is a square of s × the box's longer side
    centred on the box, clipped to the frame (so it is no longer square at a border).

    >>> crop_windows(np.array([[10., 20., 4., 2.]]), 1, 100, 100).tolist()
    [[10, 20, 14, 22]]
    >>> crop_windows(np.array([[10., 20., 4., 2.]]), 3, 100, 100).tolist()
    [[6, 15, 18, 27]]
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if scale == 1:
        lo = boxes[:, :2]
        hi = boxes[:, :2] + boxes[:, 2:]
    else:
        centre = boxes[:, :2] + boxes[:, 2:] / 2
        half = scale * boxes[:, 2:].max(axis=1, keepdims=True) / 2
        lo, hi = centre - half, centre + half
    # the tolerance keeps float noise (19.999999) from adding or dropping a pixel row
    lo = np.floor(lo + 1e-6)
    hi = np.ceil(hi - 1e-6)
    limit = np.array([width, height], dtype=np.float64)
    lo = np.clip(lo, 0, limit)
    hi = np.clip(hi, 0, limit)
    return np.concatenate([lo, hi], axis=1).astype(np.int64)


def box_windows(box, scale: str, width: int, height: int) -> tuple[list[int], list[int]]:
    """The ROI window and the context window `[left, top, right, bottom]` that `prepare_coco` cuts from a
    `width × height` frame for one COCO box `[x, y, w, h]` at context scale `scale` (a `parse_context` name:
    "3", "1.5", … or "full", the whole frame, which prepare also shrinks with `shrink_frame`).

    The box is clipped to the frame first, as prepare clips it; a box with no pixel inside the frame raises
    ValueError. The service (`taxonomist serve`, a frame and a box) cuts its crops here so that they are the
    crops `data prepare` writes.

    >>> box_windows([10, 20, 4, 2], "3", 100, 100)
    ([10, 20, 14, 22], [6, 15, 18, 27])
    >>> box_windows([90, 95, 20, 20], "full", 100, 100)
    ([90, 95, 100, 100], [0, 0, 100, 100])
    """
    boxes = clip_boxes(np.asarray(box, dtype=np.float64).reshape(1, 4), width, height)
    if not (boxes[0, 2] > 0 and boxes[0, 3] > 0):
        raise ValueError(f"box {list(box)} has no pixel inside the {width}×{height} frame")
    roi = crop_windows(boxes, 1, width, height)[0].tolist()
    context = [0, 0, int(width), int(height)] if scale == "full" else \
        crop_windows(boxes, float(scale), width, height)[0].tolist()
    return roi, context


_CONTEXT_FOLDER = re.compile(r"^context/([^/]+)/")


def context_scale(paths) -> str | None:
    """The context scale of a `context_path` column laid out as `data prepare` writes it (`context/<scale>/…`),
    or None when the paths do not all follow that layout with one scale (`data synth`'s scenes, other tools).
    Empty cells are ignored.

    >>> context_scale(["context/3/a_1.jpg", "context/3/sub/b_2.jpg"]), context_scale(["context/full/a.jpg"])
    ('3', 'full')
    >>> context_scale(["context/Aurelia/0001.jpg"]), context_scale(["context/3/a.jpg", "context/5/b.jpg"])
    (None, None)
    """
    found: set[str] = set()
    for path in paths:
        text = "" if path is None or (isinstance(path, float) and math.isnan(path)) else str(path).strip()
        if not text:
            continue
        match = _CONTEXT_FOLDER.match(text.replace("\\", "/"))
        if match is None:
            return None
        try:
            names = parse_context(match.group(1))
        except ConfigError:
            return None
        if names != [match.group(1)]:  # "1" or a spelling prepare never writes ("3.0")
            return None
        found.add(match.group(1))
    return found.pop() if len(found) == 1 else None


# ---------------------------------------------------------------------------------------------- prepare
@dataclass
class PrepareSummary:
    """What `prepare_coco` wrote and what it skipped (with reasons, also in `prepare_skipped.csv`)."""

    out_dir: Path
    scales: list[str]
    rois: int = 0
    frames: int = 0
    degenerate: list[tuple[str, str]] = field(default_factory=list)          # (annotation_id, reason)
    missing_images: list[str] = field(default_factory=list)                  # file_name
    unreadable_images: list[tuple[str, str]] = field(default_factory=list)   # (file_name, reason)
    refused_images: list[str] = field(default_factory=list)                  # file_name escaping the folder
    skipped_annotations: int = 0
    size_mismatches: int = 0
    taxonomy_written: bool = False
    skipped_csv: Path | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        scales = ", ".join(["1", *self.scales])
        lines = [f"prepared {self.rois} ROIs from {self.frames} frames → {self.out_dir} "
                 f"(scales {scales}) in {self.seconds:.1f} s"]
        if self.degenerate:
            lines.append(f"skipped {len(self.degenerate)} degenerate boxes (e.g. annotation "
                         f"{self.degenerate[0][0]}: {self.degenerate[0][1]})")
        for what, names in (("missing", self.missing_images), ("unreadable", [n for n, _ in self.unreadable_images]),
                            ("refused (path escapes the folder)", self.refused_images)):
            if names:
                shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
                lines.append(f"{len(names)} images {what}: {shown}")
        if self.size_mismatches:
            lines.append(f"{self.size_mismatches} frames differ in size from the COCO width/height; "
                         "boxes were clipped to the real frame")
        if self.skipped_csv:
            lines.append(f"{self.skipped_annotations} annotations skipped in all; listed in {self.skipped_csv}")
        if self.taxonomy_written:
            lines.append(f"taxonomy → {self.out_dir / 'taxonomy.csv'}")
        return "\n".join(lines)


def prepare_coco(coco_json: str | Path, images_dir: str | Path, out_dir: str | Path, context: str = "1,3,full",
                 taxonomy: str | Path | None = None, min_size: float = 2.0, full_max_side: int = FULL_MAX_SIDE,
                 image_format: str = "jpeg", workers: int = 4, progress: bool = False) -> PrepareSummary:
    """Turn a COCO file and its frames into a dataset directory (DESIGN.md, "Dataset").

    Per annotation: the box clipped to the frame → `images/<frame>_<annotation_id>.jpg`; each other scale N
    → `context/N/<frame>_<annotation_id>.jpg` (a square of N × the box's longer side centred on the box,
    clipped to the frame); `full` → `context/full/<frame>.jpg` (the whole frame, one file per frame, its
    longer side shrunk to `full_max_side`; 0 keeps the size). Crops are JPEG quality 95 without chroma
    subsampling (`image_format="png"` for lossless). Boxes narrower or shorter than `min_size` px after
    clipping, and images missing or unreadable on disk, are skipped and listed in `prepare_skipped.csv`.
    `annotations.csv` gets `path, label` (the category name, empty when the annotation has none),
    `annotation_id, image_id, bbox_*` (the clipped box), `context_path` (first context scale) and
    `context_path_<scale>` for the others. `taxonomy` (a CSV or `fathomnet2025`) is checked against every
    category name and copied to `taxonomy.csv`.

    >>> s = prepare_coco("train.json", "fathomnet/images", "data/fathomnet", taxonomy="fathomnet2025")  # doctest: +SKIP
    >>> s.rois, s.frames                                                                     # doctest: +SKIP
    (23699, 8981)
    """
    start = time.monotonic()
    coco_json, images_dir, out_dir = Path(coco_json), Path(images_dir), Path(out_dir)
    scales = parse_context(context)
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
    if not isinstance(min_size, (int, float)) or not math.isfinite(min_size) or min_size < 0:
        raise ConfigError(f"min_size {min_size!r} must be a number >= 0 (pixels)")
    if not isinstance(full_max_side, int) or full_max_side < 0:
        raise ConfigError(f"full_max_side {full_max_side!r} must be an integer >= 0 (0 = keep the frame size)")
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers {workers!r} must be an integer >= 1")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: images folder not found")
    coco = read_coco(coco_json)
    if not coco.annotations:
        raise DataError(f"{coco_json}: no annotations to crop")

    # check the taxonomy before cutting anything: a typo should cost seconds, not an hour of crops
    tax = None
    if taxonomy:
        tax = read_taxonomy(taxonomy)
        for cat_id, name in coco.categories.items():
            if name not in tax:
                raise UnknownLabelError(f"{coco_json}: category {cat_id} {name!r} is not a node of the taxonomy "
                                        f"{taxonomy}{suggest(name, tax.names)}")

    fmt, ext = IMAGE_FORMATS[image_format]
    summary = PrepareSummary(out_dir=out_dir, scales=scales)
    images = coco.image_by_id()
    by_image: dict[str, list[int]] = {}
    for i, ann in enumerate(coco.annotations):
        by_image.setdefault(str(ann["image_id"]), []).append(i)
    tasks = [_FrameTask(images[key], idx, np.array([coco.annotations[i]["bbox"] for i in idx], dtype=np.float64))
             for key, idx in by_image.items()]

    cut = _FrameCutter(coco, images_dir, out_dir, scales, min_size, full_max_side, fmt, ext)
    rows: dict[int, dict] = {}
    skipped: list[dict] = []
    bar = tqdm(total=len(tasks), desc="prepare", unit="frame", file=sys.stderr,
               disable=not progress or not sys.stderr.isatty())
    try:
        if workers == 1:
            results = map(cut, tasks)
        else:
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prepare")
            results = pool.map(cut, tasks)
        for task, result in zip(tasks, results):
            bar.update(1)
            file_name = task.image["file_name"]
            if result.problem is not None:
                kind, reason = result.problem
                if kind == "missing":
                    summary.missing_images.append(file_name)
                elif kind == "refused":
                    summary.refused_images.append(file_name)
                else:
                    summary.unreadable_images.append((file_name, reason))
                skipped += [_skip_row(coco.annotations[i], file_name, reason) for i in task.indices]
                continue
            summary.frames += 1
            summary.size_mismatches += result.size_mismatch
            rows.update(result.rows)
            for i, reason in result.degenerate:
                summary.degenerate.append((str(coco.annotations[i]["id"]), reason))
                skipped.append(_skip_row(coco.annotations[i], file_name, reason))
    finally:
        bar.close()
        if workers > 1:
            pool.shutdown(wait=True, cancel_futures=True)

    summary.rois = len(rows)
    summary.skipped_annotations = len(skipped)
    if not rows:
        raise DataError(f"{coco_json}: no annotation could be cropped from {images_dir} "
                        f"({len(summary.missing_images)} images missing, {len(summary.degenerate)} degenerate boxes)")
    frame = pd.DataFrame([rows[i] for i in sorted(rows)])
    context_cols = (["context_path"] + [f"context_path_{s}" for s in scales[1:]]) if scales else []
    frame = frame[["path", "label", "annotation_id", "image_id", *BBOX_COLUMNS, *context_cols]]
    write_annotations(frame, out_dir / "annotations.csv")
    if tax is not None:
        write_taxonomy(tax, out_dir / "taxonomy.csv")
        summary.taxonomy_written = True
    summary.skipped_csv = _write_skipped(out_dir / SKIPPED_CSV, skipped)
    summary.seconds = time.monotonic() - start
    return summary


@dataclass
class _FrameTask:
    image: dict
    indices: list[int]      # positions in coco.annotations
    boxes: np.ndarray       # (N, 4) COCO boxes


@dataclass
class _FrameResult:
    rows: dict[int, dict] = field(default_factory=dict)
    degenerate: list[tuple[int, str]] = field(default_factory=list)
    problem: tuple[str, str] | None = None
    size_mismatch: bool = False


class _FrameCutter:
    """Cuts every box of one frame; called from worker threads, so it holds no mutable state."""

    def __init__(self, coco: CocoFile, images_dir: Path, out_dir: Path, scales: list[str], min_size: float,
                 full_max_side: int, fmt: str, ext: str):
        self.coco, self.images_dir, self.out_dir = coco, images_dir, out_dir
        self.scales, self.min_size, self.full_max_side = scales, float(min_size), full_max_side
        self.fmt, self.ext = fmt, ext

    def __call__(self, task: _FrameTask) -> _FrameResult:
        file_name = task.image["file_name"]
        rel = safe_relative_path(file_name)
        if rel is None:
            return _FrameResult(problem=("refused", f"file_name {file_name!r} escapes the images folder"))
        src = self.images_dir / rel
        if not src.is_file():
            return _FrameResult(problem=("missing", f"image not found: {src}"))
        try:
            with Image.open(src) as im:
                im.load()
                frame = _to_8bit(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return _FrameResult(problem=("unreadable", f"cannot decode {src}: {e}"))

        width, height = frame.size
        result = _FrameResult()
        result.size_mismatch = (task.image.get("width"), task.image.get("height")) not in ((width, height), (None, None))
        boxes = clip_boxes(task.boxes, width, height)
        # below one pixel after clipping there is nothing to cut, whatever min_size says (a 0-px crop would fail)
        keep = (boxes[:, 2] > self.min_size) & (boxes[:, 3] > self.min_size) & (boxes[:, 2:] >= 1).all(axis=1)
        for j in np.flatnonzero(~keep):
            w, h = boxes[j, 2:]
            reason = ("box has no area" if min(task.boxes[j, 2:]) <= 0 else
                      "box outside the frame" if w <= 0 or h <= 0 else
                      f"box {w:g}×{h:g} px after clipping is below one pixel" if min(w, h) < 1 else
                      f"box {w:g}×{h:g} px after clipping is not larger than min_size {self.min_size:g}")
            result.degenerate.append((task.indices[j], f"{reason} (bbox {task.boxes[j].tolist()}, "
                                                       f"frame {width}×{height})"))
        kept = np.flatnonzero(keep)
        if not len(kept):
            return result

        stem = str(rel.with_suffix(""))
        ids = [_UNSAFE_ID.sub("_", str(self.coco.annotations[task.indices[j]]["id"])) for j in kept]
        columns: dict[str, list[str]] = {}
        for scale in ["1", *self.scales]:
            if scale == "full":
                path = f"context/full/{stem}{self.ext}"
                self._save(shrink_frame(frame, self.full_max_side), path)
                columns[scale] = [path] * len(kept)
                continue
            windows = crop_windows(boxes[kept], float(scale), width, height)
            folder = "images" if scale == "1" else f"context/{scale}"
            paths = [f"{folder}/{stem}_{ann_id}{self.ext}" for ann_id in ids]
            for window, path in zip(windows.tolist(), paths):
                self._save(frame.crop(tuple(window)), path)
            columns[scale] = paths

        for k, j in enumerate(kept):
            i = task.indices[j]
            ann = self.coco.annotations[i]
            cat = ann.get("category_id")
            row = {"path": columns["1"][k], "label": "" if cat is None else self.coco.categories[str(cat)],
                   "annotation_id": str(ann["id"]), "image_id": str(ann["image_id"])}
            row.update({col: f"{v:g}" for col, v in zip(BBOX_COLUMNS, boxes[j].tolist())})
            for n, scale in enumerate(self.scales):
                row["context_path" if n == 0 else f"context_path_{scale}"] = columns[scale][k]
            result.rows[i] = row
        return result

    def _save(self, image: Image.Image, relative: str) -> None:
        target = self.out_dir / relative
        if not stays_inside(self.out_dir, target):
            raise DataError(f"{target}: refused to write: a symlink in its folder leads outside {self.out_dir}")
        options = {"quality": 95, "subsampling": 0} if self.fmt == "JPEG" else {"compress_level": 1}
        buf = io.BytesIO()
        image.save(buf, format=self.fmt, **options)
        with atomic_path(target) as tmp:
            tmp.write_bytes(buf.getvalue())


def _to_8bit(im: Image.Image) -> Image.Image:
    """RGB or L, which both JPEG and PNG store; 16-bit and float frames are scaled to 0–255 first."""
    if im.mode in ("RGB", "L"):
        return im.copy()  # the caller closes `im`, which frees its pixels
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def shrink_frame(frame: Image.Image, max_side: int = FULL_MAX_SIDE) -> Image.Image:
    """The whole frame as the `full` context: its longer side shrunk to `max_side` (0 or a smaller frame: as is)."""
    if not max_side or max(frame.size) <= max_side:
        return frame
    ratio = max_side / max(frame.size)
    size = (max(1, round(frame.width * ratio)), max(1, round(frame.height * ratio)))
    return frame.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _skip_row(ann: dict, file_name: str, reason: str) -> dict:
    return {"annotation_id": str(ann["id"]), "image_id": str(ann["image_id"]), "file_name": file_name,
            "reason": reason}


def _write_skipped(path: Path, rows: list[dict]) -> Path | None:
    """Write the skipped annotations, or remove a stale list from an earlier run when nothing was skipped."""
    if not rows:
        path.unlink(missing_ok=True)
        return None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["annotation_id", "image_id", "file_name", "reason"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
