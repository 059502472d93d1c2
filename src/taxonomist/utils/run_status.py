"""RUN/run.json and RUN/errors.log: the state a run directory is in (training, trained, finished, or a step
after training that failed, with the command that redoes it) and the tracebacks of the steps that failed.

A later command reads the state to know what is left to do; a person reads errors.log to know what went wrong.
"""
from __future__ import annotations

import datetime as _dt
import json
import traceback
from pathlib import Path

from taxonomist.utils.files import atomic_write_text

STATUS_FILE = "run.json"
ERRORS_LOG = "errors.log"
FORMAT_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir: str | Path) -> dict:
    """The run's state, or {} when it has none (a run of an older version, another folder) or it is unreadable:
    the file is data from disk, so anything but a JSON object counts as no state."""
    path = Path(run_dir) / STATUS_FILE
    try:
        if path.stat().st_size > 1_000_000:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested a thousand levels deep
        return {}
    return value if isinstance(value, dict) else {}


def update_status(run_dir: str | Path, **fields) -> dict:
    """Merge `fields` into RUN/run.json (a field set to None is removed) and write it atomically."""
    from taxonomist import __version__

    status = read_status(run_dir)
    status.update({"format_version": FORMAT_VERSION, "taxonomist": __version__, "updated": _now()})
    for key, value in fields.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    atomic_write_text(Path(run_dir) / STATUS_FILE, json.dumps(status, indent=2, default=str) + "\n")
    return status


def log_error(run_dir: str | Path, step: str, error: BaseException) -> Path:
    """Append `error`'s traceback to RUN/errors.log under a header naming the step and the time."""
    path = Path(run_dir) / ERRORS_LOG
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {_now()}  step {step!r} failed ===\n{text}\n")
    return path


__all__ = ["STATUS_FILE", "ERRORS_LOG", "read_status", "update_status", "log_error"]
