"""Input checks and chunking shared by the decision, calibration, OOD and ensemble functions.

Each check fails with one `TaxonomistError` line that names the argument, as scikit-learn's validators do.
"""
from __future__ import annotations

import numpy as np

from taxonomist.errors import ConfigError, DataError

#: Elements of the largest temporary (chunk rows × columns) a chunked loop builds: 64 MB in float32.
CHUNK_ELEMENTS = 2 ** 24

#: How far a row of probabilities may sum from 1 (float32 softmax over 10,000 labels stays within 1e-4).
ROW_SUM_TOLERANCE = 1e-3


def as_matrix(x, name: str, n_cols: int | None = None, n_rows: int | None = None,
              nonnegative: bool = False) -> np.ndarray:
    """A finite 2-D float array (float32 kept as is, anything else as float64)."""
    try:
        arr = np.asarray(x)
    except Exception:  # ragged lists and the like
        raise DataError(f"{name} must be a 2-D numeric array") from None
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind != "f" or arr.dtype.itemsize < 4:
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name} must be 2-D, got shape {arr.shape}")
    if n_rows is not None and arr.shape[0] != n_rows:
        raise DataError(f"{name} must have {n_rows} rows, got {arr.shape[0]}")
    if n_cols is not None and arr.shape[1] != n_cols:
        raise DataError(f"{name} must have {n_cols} columns, got {arr.shape[1]}")
    if arr.size:
        lo, hi = arr.min(), arr.max()  # NaN propagates into both, so one test covers NaN and inf
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise DataError(f"{name} contains NaN or infinite values")
        if nonnegative and lo < 0:
            raise DataError(f"{name} must be >= 0, got a minimum of {float(lo):g}")
    return arr


def as_probs(x, name: str = "probs", n_cols: int | None = None) -> np.ndarray:
    """An (N, L) matrix of probabilities: values in [0, 1], each row summing to 1."""
    arr = as_matrix(x, name, n_cols=n_cols)
    if arr.shape[1] == 0:
        raise DataError(f"{name} has no columns")
    if arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{name} must hold probabilities in [0, 1], got values in [{lo:g}, {hi:g}]")
        sums = arr.sum(axis=1, dtype=np.float64)
        bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
        if len(bad):
            raise DataError(f"{name} rows must sum to 1; row {bad[0]} sums to {sums[bad[0]]:.6g}"
                            f"{f' ({len(bad)} rows in all)' if len(bad) > 1 else ''}")
    return arr


def as_vector(x, name: str, n: int | None = None, dtype=np.float64) -> np.ndarray:
    """A finite 1-D array (of length `n` when given)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(dtype, copy=False)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and len(arr) != n:
        raise DataError(f"{name} must have {n} entries (one per row), got {len(arr)}")
    if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return arr


def as_targets(x, n: int, n_classes: int, name: str = "targets") -> np.ndarray:
    """(n,) integer class indices in [0, n_classes)."""
    arr = np.asarray(x)
    integral = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)))
    if arr.size and not integral:
        raise DataError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    arr = as_vector(arr, name, n=n, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise DataError(f"{name} must lie in [0, {n_classes}), got values {arr.min()}…{arr.max()}")
    return arr


def chunk_rows(chunk_size: int | None, n_cols: int) -> int:
    """Rows per chunk: `chunk_size` when given, else as many as keep rows × `n_cols` under CHUNK_ELEMENTS."""
    if chunk_size is None:
        return max(1, CHUNK_ELEMENTS // max(1, n_cols))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax (the row maximum is subtracted first); keeps float32 input float32."""
    z = np.asarray(logits)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(softmax(logits)) without the underflow of taking the log of tiny probabilities."""
    z = np.asarray(logits)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))
