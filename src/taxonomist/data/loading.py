"""The torch loading path: decode images (torchvision.io, PIL as fallback), a Dataset of dict items, the
collate function that drops unreadable images, and a seeded DataLoader that lists what it skipped.

Imported on demand (it imports torch); `taxonomist.data` itself stays torch-free.
"""
from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler, default_collate, get_worker_info
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as F

from taxonomist.data.dataset import Dataset
from taxonomist.data.images import (
    GIF_MAGIC,
    HEADER_BYTES,
    MAX_IMAGE_PIXELS,
    PNG_MAGIC,
    ImageTooLarge,
    declared_size,
    open_first_frame,
)
from taxonomist.data.transforms import build_transforms
from taxonomist.errors import ConfigError, DataError
from taxonomist.runtime import auto_num_workers

if TYPE_CHECKING:  # the cache imports this module's decoder
    from taxonomist.data.cache import ResizedCache

__all__ = [
    "SkippedImage", "TaxonDataset", "TaxonLoader", "UnreadableImageError", "build_loader", "build_transforms",
    "class_counts", "collate", "decode_image_data", "declared_size", "make_weighted_sampler", "read_image",
    "MAX_IMAGE_PIXELS",
]

log = logging.getLogger("taxonomist.data")

# MAX_IMAGE_PIXELS and declared_size live in the torch-free `data.images` (with the frame rule); kept importable here


class UnreadableImageError(DataError):
    """An image file is missing, empty, truncated or not an image."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across process boundaries
        return (type(self), (self.path, self.reason))


class SkippedImage(NamedTuple):
    """An item the loader left out: its row position in the rows given to `TaxonDataset`, file, and why."""

    index: int
    path: str
    reason: str


# --- decoding ----------------------------------------------------------------------------------------------

def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W) (`decode_image_data` on its bytes).

    Raises `UnreadableImageError` (a DataError) naming the file when it is missing, empty or corrupt, or when
    its first frame has more than `max_pixels` pixels (checked before any pixel is decoded).

    >>> read_image("images/a.jpg").shape        # doctest: +SKIP
    torch.Size([3, 480, 640])
    """
    path = Path(path)
    try:
        data = read_file(str(path))
    except RuntimeError:
        if not path.exists():
            raise UnreadableImageError(path, "image file not found") from None
        if path.is_dir():
            raise UnreadableImageError(path, "is a folder, not an image file") from None
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file") from None
        raise UnreadableImageError(path, "cannot read the file") from None
    return decode_image_data(data, path, max_pixels)


def decode_image_data(data: torch.Tensor, source: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The bytes of an image file (a uint8 tensor) → uint8 RGB (3, H, W): the one decoder of train, predict and
    serve (`deploy.serve.uploads.decode_upload`), so that they all see the same pixels.

    The first frame is the image (`data.images.FRAME_RULE`) and only it is decoded: the pixel budget
    `max_pixels` counts that frame, read from the header before decoding. torchvision.io decodes JPEG and still
    WebP; PIL decodes the rest: PNG (an APNG's default image; torchvision 0.29 crashes the process on a PNG
    whose image data is corrupt, a bad CRC or filter byte), GIF (torchvision would decode every frame),
    animated WebP, TIFF, BMP. Either way grey and RGBA become RGB, EXIF orientation is applied and 16-bit
    samples are scaled to 8 bits. Raises `UnreadableImageError` naming `source`.

    >>> gif = read_file("animated.gif")                           # doctest: +SKIP
    >>> decode_image_data(gif, "animated.gif").shape               # doctest: +SKIP
    torch.Size([3, 240, 320])
    """
    if data.numel() == 0:
        raise UnreadableImageError(source, "empty file")
    head = bytes(data[:HEADER_BYTES].numpy())
    size = declared_size(head, data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise UnreadableImageError(source, str(ImageTooLarge(*size, max_pixels)))
    if head[:6] in GIF_MAGIC or head[:8] == PNG_MAGIC:
        image = _decode_with_pil(data, source, "", max_pixels)
    else:
        try:
            image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError as e:
            image = _decode_with_pil(data, source, _clean_reason(str(e)), max_pixels)
    if image.dtype != torch.uint8:
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def _decode_with_pil(data: torch.Tensor, source: str | Path, torch_reason: str, max_pixels: int) -> torch.Tensor:
    import io

    from PIL import ImageOps, UnidentifiedImageError

    try:
        with open_first_frame(io.BytesIO(data.numpy()), max_pixels) as im:
            ImageOps.exif_transpose(im, in_place=True)   # in place: no copy of a frame that needs no turn
            array = _rgb_array(im)
    except ImageTooLarge as e:
        raise UnreadableImageError(source, str(e)) from None
    except UnidentifiedImageError:
        reason = torch_reason if torch_reason and "Unsupported image file" not in torch_reason \
            else "not an image (unknown format)"
        raise UnreadableImageError(source, f"cannot decode image: {reason}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL's truncated / broken-header errors
        # when torchvision knew the format, its reason ("Image is incomplete or truncated") reads better
        reason = str(e) if not torch_reason or "Unsupported image file" in torch_reason else torch_reason
        raise UnreadableImageError(source, f"cannot decode image: {reason}") from None
    # a (3, H, W) view of the HWC array, as torchvision's decoders return it: no third copy of a large frame
    return torch.from_numpy(array).permute(2, 0, 1)


def _rgb_array(im) -> np.ndarray:
    """A PIL image → writable uint8 (H, W, 3). Grey, 1-bit and palette images are expanded in numpy, which
    takes ~5 bytes per pixel at the peak where `convert("RGB")` (4 bytes per pixel in PIL) and a copy take 8."""
    mode = im.mode
    if mode in ("1", "L"):
        grey = np.array(im, dtype=np.uint8)
        if mode == "1":
            grey *= 255
    elif mode.startswith("I;16") or mode == "I":   # 16-bit grey: scaled to 8 bits, as torchvision scales it
        grey = np.clip(np.asarray(im, dtype=np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
    elif mode == "P" and im.palette is not None and im.palette.mode == "RGB":
        palette = np.zeros((256, 3), dtype=np.uint8)
        colours = np.frombuffer(bytes(im.getpalette("RGB")), dtype=np.uint8).reshape(-1, 3)[:256]
        palette[:len(colours)] = colours
        return palette[np.asarray(im)]
    else:
        return np.array(im.convert("RGB"))
    return np.repeat(grey[..., None], 3, axis=2)




def _clean_reason(message: str) -> str:
    """torchvision prefixes its errors with `func, file.cpp:LINE, `; keep the sentence a user can act on."""
    return re.sub(r"^.*\.cpp:\d+, ", "", message.strip()).split("\n")[0]


# --- dataset -----------------------------------------------------------------------------------------------

class TaxonDataset(torch.utils.data.Dataset):
    """The rows of a taxonomist `Dataset` as items `{"image", "target", "index"}` (+ `"context"`).

    `image` is `transform(uint8 CHW)`; `target` the label's index in `label_index` (default: the dataset's
    labels in taxonomy order), -1 for an unlabelled row; `index` the row's position in `rows`. With
    `with_context=True` the `context_path` image comes along, through `context_transform` (default:
    `transform`). `path_column` picks the main image (`context_path` trains a single-stream model on the
    context crops). With a `cache`, images it holds are read from it instead of decoded.

    An unreadable image does not stop training: the item comes back as a `{"skipped": SkippedImage}`
    marker that `collate` drops, and `skipped` lists it (via `TaxonLoader`, also for worker processes).
    With `strict=True` it raises `UnreadableImageError` naming the file instead.

    >>> ds = TaxonDataset(data, data.rows("train"), build_transforms(cfg, train=True))   # doctest: +SKIP
    >>> ds[0]["image"].shape                                                             # doctest: +SKIP
    torch.Size([3, 224, 224])
    """

    def __init__(self, dataset: Dataset, rows: pd.DataFrame, transform: Callable,
                 context_transform: Callable | None = None, with_context: bool = False, strict: bool = False,
                 cache: ResizedCache | None = None, label_index: dict[str, int] | None = None,
                 allow_unknown: bool = False, path_column: str = "path"):
        if not isinstance(dataset, Dataset):
            raise DataError(f"TaxonDataset: expected a taxonomist Dataset, got {type(dataset).__name__}")
        if not isinstance(rows, pd.DataFrame):
            raise DataError(f"TaxonDataset: rows must be a pandas DataFrame, got {type(rows).__name__}")
        if not callable(transform) or (context_transform is not None and not callable(context_transform)):
            raise DataError("TaxonDataset: transform and context_transform must be callables")
        for col in (path_column, "label") + (("context_path",) if with_context else ()):
            if col not in rows.columns:
                hint = " (made by `taxonomist data prepare --context`)" if col == "context_path" else ""
                raise DataError(f"{dataset.root / 'annotations.csv'}: no {col!r} column{hint}")
        if len(rows) == 0:
            raise DataError(f"{dataset.root}: no rows to load (is the split empty?)")
        self.root = Path(dataset.root)
        self.rows = rows
        self.transform = transform
        self.context_transform = context_transform or transform
        self.with_context = with_context
        self.strict = strict
        self.cache = cache
        self.label_index = dict(label_index) if label_index is not None else \
            {lab: i for i, lab in enumerate(dataset.labels)}
        # fixed-width numpy string arrays, not lists of str: workers forked from this process then share the
        # pages instead of copying them as Python refcounts change
        self.paths = rows[path_column].to_numpy(dtype=str)
        self.context_paths = rows["context_path"].to_numpy(dtype=str) if with_context else None
        for col, paths in ((path_column, self.paths), ("context_path", self.context_paths)):
            empty = np.flatnonzero(paths == "") if paths is not None else []
            if len(empty):
                raise DataError(f"{self.root / 'annotations.csv'}: row {_csv_row(rows, empty[0])}: empty {col}")
        self.targets = self._targets(rows["label"].to_numpy(dtype=str), allow_unknown)
        self.cache_rows = self._cache_rows(self.paths)
        self.context_cache_rows = self._cache_rows(self.context_paths) if with_context else None
        self._skipped: dict[int, SkippedImage] = {}

    def _targets(self, labels: np.ndarray, allow_unknown: bool) -> np.ndarray:
        targets = pd.Series(labels).map(self.label_index)
        unknown = np.flatnonzero(targets.isna().to_numpy() & (labels != ""))
        if len(unknown) and not allow_unknown:
            raise DataError(f"{self.root / 'annotations.csv'}: row {_csv_row(self.rows, unknown[0])}: label "
                            f"{str(labels[unknown[0]])!r} is not one of the model's {len(self.label_index)} labels")
        return targets.fillna(-1).to_numpy(dtype=np.int64)

    def _cache_rows(self, paths: np.ndarray) -> np.ndarray | None:
        if self.cache is None:
            return None
        if Path(self.cache.root) != self.root.resolve():
            raise DataError(f"{self.cache.folder}: cache was built for {self.cache.root}, not {self.root}")
        # -1: not cached (decode), -2: failed at build time (skip without touching the file again)
        return np.array([self.cache.row(p) if p not in self.cache.failed else -2 for p in paths], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> list[SkippedImage]:
        """Images skipped so far, by row position (filled in the main process, also for worker processes)."""
        return [self._skipped[i] for i in sorted(self._skipped)]

    def note_skipped(self, entries: Sequence[SkippedImage]) -> None:
        """Record items skipped in another process (the loader passes them on from each batch)."""
        for entry in entries:
            if entry.index not in self._skipped:
                log.warning("skipped %s: %s", entry.path, entry.reason)
                self._skipped[entry.index] = entry

    def _load(self, relative: str, cache_row: int) -> torch.Tensor:
        if cache_row >= 0:
            return self.cache.read_row(cache_row)
        path = self.root / relative
        if cache_row == -2:
            raise UnreadableImageError(path, self.cache.failed[relative][2])
        return read_image(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        item: dict[str, Any] = {"target": int(self.targets[index]), "index": index}
        try:
            item["image"] = self.transform(self._load(self.paths[index], self._row(self.cache_rows, index)))
            if self.with_context:
                item["context"] = self.context_transform(
                    self._load(self.context_paths[index], self._row(self.context_cache_rows, index)))
        except UnreadableImageError as e:
            skipped = SkippedImage(index, e.path, e.reason)
            # in a worker, strict mode is enforced by TaxonLoader in the main process, where the error stays
            # one clean line instead of a re-raised worker traceback
            if self.strict and get_worker_info() is None:
                raise
            if get_worker_info() is None:
                self.note_skipped([skipped])
            return {"skipped": skipped}
        return item

    @staticmethod
    def _row(rows: np.ndarray | None, index: int) -> int:
        return -1 if rows is None else int(rows[index])


def _csv_row(rows: pd.DataFrame, position: int) -> int:
    """The annotations.csv line of a row (header = line 1), when `rows` keeps the annotations' index."""
    label = rows.index[position]
    return int(label) + 2 if isinstance(label, (int, np.integer)) else position + 2


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack dict items into a batch, leaving out skipped ones (listed under `"skipped"`).

    Every tensor keeps the shape of one item with a smaller batch dimension, so a skipped image never
    breaks a batch; when every item was skipped, `image` has batch size 0 and `TaxonLoader` drops the batch.

    >>> b = collate([{"image": torch.zeros(3, 4, 4), "target": 1, "index": 0},
    ...              {"skipped": SkippedImage(1, "a.jpg", "empty file")}])
    >>> b["image"].shape, b["target"].tolist(), len(b["skipped"])
    (torch.Size([1, 3, 4, 4]), [1], 1)
    """
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f"collate expects a list of items, got {type(batch).__name__}")
    kept = [item for item in batch if "skipped" not in item]
    skipped = [item["skipped"] for item in batch if "skipped" in item]
    if kept:
        out = default_collate(kept)
    else:
        out = {"image": torch.empty(0), "target": torch.empty(0, dtype=torch.int64),
               "index": torch.empty(0, dtype=torch.int64)}
    out["skipped"] = skipped
    return out


# --- loader ------------------------------------------------------------------------------------------------

class TaxonLoader(DataLoader):
    """A DataLoader that hands skipped-image records from the batches to its dataset, drops empty batches,
    enforces strict mode with a one-line error, and calls `sampler.set_epoch` (DistributedSampler) itself.

    Batches are dicts of tensors only (`"skipped"` is taken out); `loader.skipped` lists skipped images.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = 0

    @property
    def skipped(self) -> list[SkippedImage]:
        return list(getattr(self.dataset, "skipped", []))

    def close(self) -> None:
        """Stop the persistent worker processes now rather than whenever the loader is garbage-collected
        (a collection can come late and then waits on each worker)."""
        iterator = getattr(self, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._iterator = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        strict = getattr(self.dataset, "strict", False)
        note = getattr(self.dataset, "note_skipped", None)
        for batch in super().__iter__():
            skipped = batch.pop("skipped", [])
            if skipped:
                if strict:
                    self.close()
                    raise UnreadableImageError(skipped[0].path, skipped[0].reason)
                if note is not None:
                    note(skipped)
            if len(batch["index"]):
                yield batch


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: seed Python's and NumPy's RNGs from the worker's torch seed (itself derived from the
    loader's generator), so third-party augmentations are reproducible too."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(ds: torch.utils.data.Dataset, batch_size: int, train: bool, num_workers: int = -1, seed: int = 0,
                 sampler: torch.utils.data.Sampler | None = None, drop_last: bool | None = None,
                 pin_memory: bool | None = None, prefetch_factor: int = 4) -> TaxonLoader:
    """A seeded `TaxonLoader` over `ds` with `collate`.

    Train shuffles (unless a `sampler` is given, e.g. DistributedSampler or `make_weighted_sampler`) and
    drops the last partial batch (unless that would leave no batch at all). `num_workers=-1` picks
    `auto_num_workers()`; workers persist across epochs. `pin_memory` defaults to CUDA being available.
    With `num_workers=0`, augmentations draw from torch's global RNG (seed it with `torch.manual_seed`);
    with workers, each worker is seeded from the loader's generator, so `seed` alone fixes the batches.

    >>> loader = build_loader(ds, batch_size=32, train=True, num_workers=0)   # doctest: +SKIP
    >>> next(iter(loader))["image"].shape                                     # doctest: +SKIP
    torch.Size([32, 3, 224, 224])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"train.batch_size {batch_size!r}: must be a positive integer")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < -1:
        raise ConfigError(f"data.num_workers {num_workers!r}: must be -1 (auto), 0 or a positive integer")
    if prefetch_factor < 1:
        raise ConfigError(f"prefetch_factor {prefetch_factor!r}: must be ≥ 1")
    workers = auto_num_workers() if num_workers == -1 else num_workers
    if drop_last is None:
        drop_last = train and len(sampler if sampler is not None else ds) >= batch_size
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    return TaxonLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                       num_workers=workers, collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                       worker_init_fn=seed_worker if workers > 0 else None, generator=generator, **extra)


# --- class balance -----------------------------------------------------------------------------------------

def class_counts(rows: pd.DataFrame, label_index: dict[str, int]) -> np.ndarray:
    """Examples per label index (length `len(label_index)`); unlabelled rows are not counted.

    >>> class_counts(pd.DataFrame({"label": ["a", "b", "a", ""]}), {"a": 0, "b": 1, "c": 2}).tolist()
    [2, 1, 0]
    """
    if not isinstance(rows, pd.DataFrame) or "label" not in rows.columns:
        raise DataError("class_counts: rows must be a DataFrame with a 'label' column")
    if not label_index:
        raise DataError("class_counts: label_index is empty")
    labels = rows["label"].astype(str).to_numpy()
    indices = pd.Series(labels).map(label_index)
    unknown = np.flatnonzero(indices.isna().to_numpy() & (labels != ""))
    if len(unknown):
        raise DataError(f"class_counts: row {_csv_row(rows, unknown[0])}: label {str(labels[unknown[0]])!r} "
                        "is not in label_index")
    known = indices.dropna().to_numpy(dtype=np.int64)
    size = max(label_index.values()) + 1
    return np.bincount(known, minlength=size)


def make_weighted_sampler(rows: pd.DataFrame, label_index: dict[str, int], power: float = 1.0,
                          num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """A sampler drawing rows with probability ∝ 1 / count(label)^power (power 1: every label equally
    often; 0.5: a milder rebalancing). Unlabelled rows are never drawn. An epoch has `num_samples` draws
    (default: the number of rows), with replacement.

    >>> s = make_weighted_sampler(pd.DataFrame({"label": ["a", "a", "a", "b"]}), {"a": 0, "b": 1})
    >>> s.weights.tolist()
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 1.0]
    """
    if power < 0:
        raise ConfigError(f"sampler power {power!r}: must be ≥ 0")
    counts = class_counts(rows, label_index)
    labels = rows["label"].astype(str).to_numpy()
    index = pd.Series(labels).map(label_index).fillna(-1).to_numpy(dtype=np.int64)
    weights = np.zeros(len(rows), dtype=np.float64)
    labelled = index >= 0
    weights[labelled] = counts[index[labelled]].astype(np.float64) ** -power
    if not weights.any():
        raise DataError("make_weighted_sampler: no labelled rows to draw from")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return WeightedRandomSampler(torch.from_numpy(weights), num_samples or len(rows), replacement=True,
                                 generator=generator)
