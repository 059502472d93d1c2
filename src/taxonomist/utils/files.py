"""Atomic file output: write to a temporary file beside the target, then rename over it.

A crash or a kill never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it is renamed to `path`.

    >>> with atomic_path("out.csv") as tmp:      # doctest: +SKIP
    ...     frame.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the final file the permissions an ordinary open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_value(value):
    """`json.dumps` default for the values our outputs hold: numpy scalars and arrays, tuples, sets, paths."""
    import numpy as np
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def atomic_write_json(path: str | Path, data, indent: int = 1) -> Path:
    """Write `data` as JSON atomically, converting numpy values on the way."""
    import json
    return atomic_write_text(path, json.dumps(data, indent=indent, default=json_value) + "\n")


def refuse_output_over_inputs(out: str | Path, inputs, option: str = "--out") -> None:
    """Raise a ConfigError when `out` is one of `inputs` (paths, or (path, what) pairs), compared as the same file
    on disk (resolved path, or `os.path.samefile` for hard links), so that no command writes over what it reads.

    >>> refuse_output_over_inputs("data/annotations.csv", [("data/../data/annotations.csv", "the images CSV")])
    Traceback (most recent call last):
    taxonomist.errors.ConfigError: --out data/annotations.csv is the images CSV (data/../data/annotations.csv): refusing to write over an input; choose another output
    """
    from taxonomist.errors import ConfigError

    out = Path(out).expanduser()
    target = out.resolve()
    for item in inputs:
        path, what = item if isinstance(item, tuple) else (item, "an input")
        if path is None:
            continue
        path = Path(path).expanduser()
        same = path.resolve() == target
        if not same and out.exists() and path.exists():
            try:
                same = os.path.samefile(out, path)
            except OSError:
                same = False
        if same:
            raise ConfigError(f"{option} {out} is {what} ({path}): refusing to write over an input; choose another "
                              "output")


@contextlib.contextmanager
def file_set(targets, remove_first=()) -> Iterator[dict[Path, Path]]:
    """Replace several files that belong together so that a kill never leaves old and new ones side by side.

    Yields {target: a temporary path beside it} for the caller to write. After the block, each `remove_first`
    file is removed (the one readers need to accept the set, and files that describe the old set), then every
    temporary file is renamed over its target in the order of `targets`. The readers' key file goes in both
    lists, last in `targets`: until it is back, a reader finds no set, never a mix. An exception in the block
    leaves the old files as they were and removes the temporaries.

    >>> with file_set(["out/a.csv", "out/meta.json"], remove_first=["out/meta.json"]) as tmp:   # doctest: +SKIP
    ...     tmp[Path("out/a.csv")].write_text("…"); tmp[Path("out/meta.json")].write_text("…")
    """
    targets = [Path(t) for t in targets]
    staged: dict[Path, Path] = {}
    umask = os.umask(0)
    os.umask(umask)
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
            staged[target] = Path(tmp)
        yield dict(staged)
        for tmp in staged.values():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path in remove_first:
            Path(path).unlink(missing_ok=True)
        for target in targets:
            os.replace(staged[target], target)
            del staged[target]
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
