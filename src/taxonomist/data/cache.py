"""A pre-resized uint8 image cache: every image decoded once into one memory-mapped (N, S, S, 3) array.

Later epochs read S×S pixels from the page cache instead of decoding full frames; a JSON index maps each
image path to its row and remembers the source file's mtime and size, so a changed file is decoded again.
"""
from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from taxonomist.data.dataset import Dataset
from taxonomist.data.transforms import RESIZE_MODES, INTERPOLATIONS, eval_resize_size, to_square
from taxonomist.errors import ConfigError, DataError
from taxonomist.utils.files import atomic_write_text

INDEX = "index.json"
VERSION = 1
#: annotation columns whose images a cache holds when `columns` is not given
IMAGE_COLUMNS = ("path", "context_path")


def default_cache_size(image_size: int, crop_pct: float = 0.875) -> int:
    """The cache side for a network input of `image_size`: the eval path's resize side, so evaluation reads
    cached pixels without resampling them again and random-resized crops keep a margin of pixels.

    >>> default_cache_size(224)
    256
    """
    return eval_resize_size(image_size, crop_pct)


class ResizedCache:
    """Images of one dataset, squared (stretched or letterboxed) to `size` and stored as uint8 HWC rows.

    Build it once with `ResizedCache.build(...)` (a no-op when it is already fresh); give it to
    `TaxonDataset(cache=...)`. The array is opened lazily and not pickled, so DataLoader workers each map
    the same file instead of receiving a copy.

    >>> cache = ResizedCache.build(dataset, dataset.annotations, "cache/", size=256)   # doctest: +SKIP
    >>> cache.get("images/a.jpg").shape                                                # doctest: +SKIP
    torch.Size([3, 256, 256])
    """

    def __init__(self, folder: str | Path, index: dict):
        self.folder = Path(folder)
        self.size: int = int(index["size"])
        self.resize: str = index["resize"]
        self.interpolation: str = index["interpolation"]
        self.root: str = index["root"]
        self.array_name: str = index["array"]
        #: path → [row, mtime_ns, bytes]
        self.entries: dict[str, list[int]] = index["entries"]
        #: path → [mtime_ns | None, bytes | None, reason]: images that could not be decoded at build time
        self.failed: dict[str, list] = index["failed"]
        self._array: np.ndarray | None = None

    # --- reading ---------------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> ResizedCache:
        """Open a built cache (no freshness check; `build` does that)."""
        folder = Path(folder)
        index_path = folder / INDEX
        if not index_path.is_file():
            raise DataError(f"{index_path}: no image cache here; build it with ResizedCache.build")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise DataError(f"{index_path}: not a valid cache index (delete the folder to rebuild it)") from None
        keys = ("version", "size", "resize", "interpolation", "root", "array", "entries", "failed")
        if not isinstance(index, dict) or any(k not in index for k in keys) or index["version"] != VERSION:
            raise DataError(f"{index_path}: cache index of another version (delete the folder to rebuild it)")
        cache = cls(folder, index)
        if not (folder / cache.array_name).is_file():
            raise DataError(f"{folder / cache.array_name}: cache array missing (delete the folder to rebuild it)")
        return cache

    @property
    def array(self) -> np.ndarray:
        """The (N, S, S, 3) uint8 array, memory-mapped read-only on first use in each process."""
        if self._array is None:
            self._array = np.load(self.folder / self.array_name, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: str) -> bool:
        return path in self.entries

    def row(self, path: str) -> int:
        """The array row of `path`, or -1 when the cache does not hold it."""
        entry = self.entries.get(path)
        return entry[0] if entry else -1

    def read_row(self, row: int) -> torch.Tensor:
        """Row `row` as a contiguous uint8 CHW tensor (a copy: the map is read-only)."""
        return torch.from_numpy(np.ascontiguousarray(self.array[row].transpose(2, 0, 1)))

    def get(self, path: str) -> torch.Tensor | None:
        """The cached uint8 CHW image of `path` (relative to the dataset root), or None."""
        row = self.row(path)
        return self.read_row(row) if row >= 0 else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None  # pickling a memmap copies its data; each worker maps the file instead
        return state

    # --- building --------------------------------------------------------------------------------------

    @classmethod
    def build(cls, dataset: Dataset, rows: pd.DataFrame, folder: str | Path, size: int,
              workers: int | None = None, *, resize: str = "stretch", interpolation: str = "bilinear",
              columns: Iterable[str] | None = None, progress: bool = True) -> ResizedCache:
        """Decode the images of `rows` into the cache in `folder`, reusing every row that is still fresh.

        A cache made with another size, resize mode, interpolation or dataset root is rebuilt from scratch;
        otherwise only new images and images whose file changed (mtime or size) are decoded, and entries
        for other rows stay (so train and val can share one folder). Unreadable images are recorded in
        `failed` with their reason instead of stopping the build. The new array and index are written
        under new names and the index is swapped in last, so a kill leaves the previous cache intact.
        Build from one process only (e.g. rank 0 under DDP, then a barrier).

        `columns` defaults to `path` plus `context_path` when the rows have it. `workers` threads decode in
        parallel (default: all CPUs).

        >>> cache = ResizedCache.build(ds, ds.rows("train"), "cache", 256, workers=2)   # doctest: +SKIP
        """
        folder = Path(folder)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"cache size {size!r}: must be a positive integer")
        size = int(size)
        if resize not in RESIZE_MODES:
            raise ConfigError(f"data.resize {resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        if not isinstance(dataset, Dataset):
            raise DataError(f"cache: expected a taxonomist Dataset, got {type(dataset).__name__}")
        if not isinstance(rows, pd.DataFrame):
            raise DataError(f"cache rows: expected a pandas DataFrame, got {type(rows).__name__}")
        if columns is None:
            columns = [c for c in IMAGE_COLUMNS if c in rows.columns]
        columns = list(columns)
        missing = [c for c in columns if c not in rows.columns]
        if missing:
            raise DataError(f"cache rows: no {missing[0]!r} column (columns: {', '.join(rows.columns)})")
        workers = int(workers) if workers and workers > 0 else (os.cpu_count() or 1)
        root = str(Path(dataset.root).resolve())

        wanted = list(dict.fromkeys(p for c in columns for p in rows[c].astype(str) if p))
        if not wanted:
            raise DataError(f"{dataset.root}: no image paths to cache in column(s) {', '.join(columns)}")
        stats = {p: _stat(Path(root) / p) for p in wanted}

        old = _open_compatible(folder, size, resize, interpolation, root)
        keep: dict[str, list[int]] = {}      # path → [old row, mtime, bytes]
        failed: dict[str, list] = {}
        if old is not None:
            for path, entry in old.entries.items():
                if path not in stats or stats[path] == (entry[1], entry[2]):
                    keep[path] = entry
            for path, entry in old.failed.items():
                if path not in stats or stats[path] == (entry[0], entry[1]):
                    failed[path] = entry
        todo = [p for p in wanted if p not in keep and p not in failed]
        if old is not None and not todo:
            return old

        folder.mkdir(parents=True, exist_ok=True)
        array_name = f"images-{uuid.uuid4().hex[:12]}.npy"
        array_path = folder / array_name
        total = len(keep) + len(todo)
        out = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(total, size, size, 3))
        try:
            entries: dict[str, list[int]] = {}
            # copy kept rows in old-row order: sequential reads of the old map
            for new_row, (path, entry) in enumerate(sorted(keep.items(), key=lambda kv: kv[1][0])):
                out[new_row] = old.array[entry[0]]
                entries[path] = [new_row, entry[1], entry[2]]
            first = len(keep)
            decoded = _decode_into(out, todo, first, root, size, resize, interpolation, workers, progress)
            # an image that fails leaves its row unused (zeros): failures are rare, compaction is not worth a copy
            for offset, path in enumerate(todo):
                mtime, nbytes = stats[path]
                if decoded[offset] is None:
                    entries[path] = [first + offset, mtime, nbytes]
                else:
                    failed[path] = [mtime, nbytes, decoded[offset]]
            out.flush()
            del out
            index = {"version": VERSION, "size": size, "resize": resize, "interpolation": interpolation,
                     "root": root, "array": array_name, "entries": entries, "failed": failed}
            atomic_write_text(folder / INDEX, json.dumps(index))   # the commit point
        except BaseException:
            array_path.unlink(missing_ok=True)
            raise
        for stale in folder.glob("images-*.npy"):
            if stale.name != array_name:
                stale.unlink(missing_ok=True)
        return cls.open(folder)


def _stat(path: Path) -> tuple[int | None, int | None]:
    try:
        st = path.stat()
    except OSError:
        return (None, None)
    return (st.st_mtime_ns, st.st_size)


def _open_compatible(folder: Path, size: int, resize: str, interpolation: str, root: str) -> ResizedCache | None:
    """The existing cache in `folder` when it was made with the same settings, else None."""
    try:
        cache = ResizedCache.open(folder)
    except DataError:
        return None
    same = (cache.size, cache.resize, cache.interpolation, cache.root) == (size, resize, interpolation, root)
    return cache if same else None


def _decode_into(out: np.ndarray, paths: list[str], first: int, root: str, size: int, resize: str,
                 interpolation: str, workers: int, progress: bool) -> list[str | None]:
    """Decode `paths` into rows first, first+1, … of `out` on a thread pool; return a failure reason or None
    per path. Threads suffice: decoding and resizing run in C++ without the GIL, and each thread writes
    its own rows of the map."""
    from taxonomist.data.loading import UnreadableImageError, read_image

    def work(offset: int) -> str | None:
        try:
            image = read_image(Path(root) / paths[offset])
        except UnreadableImageError as e:
            return e.reason
        out[first + offset] = to_square(image, size, resize, interpolation).permute(1, 2, 0).numpy()
        return None

    reasons: list[str | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc="caching images", unit="img", disable=None if progress else True)
    # torch's own intra-op threads would compete with the pool's
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(work, i): i for i in range(len(paths))}
            for future in as_completed(futures):
                reasons[futures[future]] = future.result()
                bar.update(1)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return reasons
