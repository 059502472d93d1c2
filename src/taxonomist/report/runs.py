"""What a report reads of one evaluated run: metrics.json and predictions.csv (required), and when present
metrics.csv, config.yaml, taxonomy.csv, the dataset's annotations and exploration plots.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from taxonomist.errors import DataError
from taxonomist.taxonomy import Taxonomy
from taxonomist.utils.safe_parse import parse_json

#: predictions.csv columns holding numbers; every other column is text (names, paths, ids).
NUMERIC_PREFIXES = ("confidence", "distance", "argmax_confidence", "argmax_distance")

#: Where exploration output (`taxonomist data explore DATASET --out DIR`) is looked for, relative to the run
#: folder and to the dataset.
EXPLORE_DIRS = ("explore", "reports/explore")


@dataclass
class RunResults:
    """One evaluated run as the report sees it."""

    name: str
    path: Path                       # the folder holding metrics.json
    metrics: dict
    predictions: pd.DataFrame
    history: list[dict] = field(default_factory=list)
    config_text: str | None = None
    taxonomy: Taxonomy | None = None
    data_root: Path | None = None    # the dataset directory, when it still exists
    explore_dir: Path | None = None  # a folder with exploration summary.json + PNGs
    notes: list[str] = field(default_factory=list)

    @property
    def levels(self) -> list[str]:
        return list(self.metrics.get("per_rank", {}))


def _read_predictions(path: Path) -> pd.DataFrame:
    try:
        header = pd.read_csv(path, nrows=0).columns
        dtypes = {c: (float if c.startswith(NUMERIC_PREFIXES) else str) for c in header}
        return pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values={c: [""] for c in header
                                                                                   if dtypes[c] is float})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: unreadable predictions file ({str(e).strip().splitlines()[-1]})") from None


def _first_file(name: str, *folders: Path | None) -> Path | None:
    for folder in folders:
        if folder is not None and (folder / name).is_file():
            return folder / name
    return None


def load_run(path: str | Path, name: str | None = None) -> RunResults:
    """Read an evaluated run: a run directory or an `evaluate --out` folder (with metrics.json and
    predictions.csv). Missing optional parts become notes, never errors."""
    from taxonomist.taxonomy import read_taxonomy
    from taxonomist.train.loop import load_history

    folder = Path(path)
    if folder.is_file() and folder.name == "metrics.json":
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{folder}: not found (give a run directory or an evaluation folder)")
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        hint = (f"; run `taxonomist evaluate {folder} --data DATASET` first"
                if (folder / "checkpoints").is_dir() else "")
        raise DataError(f"{folder}: no metrics.json{hint}")
    metrics = parse_json(metrics_file.read_bytes(), str(metrics_file), DataError)
    if not isinstance(metrics, dict):
        raise DataError(f"{metrics_file}: expected a JSON object, got a {type(metrics).__name__}")
    for key in ("mhd", "top1", "n", "per_rank"):
        if key not in metrics:
            raise DataError(f"{metrics_file}: no {key!r} entry (written by an older taxonomist? re-run evaluate)")
    from taxonomist.evaluate.run import check_evaluation
    check_evaluation(folder)  # predictions.csv and taxonomy.csv must be the ones this metrics.json describes
    pred_file = folder / "predictions.csv"
    if not pred_file.is_file():
        raise DataError(f"{folder}: no predictions.csv beside metrics.json; re-run `taxonomist evaluate`")
    predictions = _read_predictions(pred_file)
    for col in ("path", "label", "prediction", "confidence", "distance"):
        if col not in predictions.columns:
            raise DataError(f"{pred_file}: no {col!r} column")

    run_dir = Path(metrics["run_dir"]) if metrics.get("run_dir") else None
    if run_dir is not None and not run_dir.is_dir():
        run_dir = None
    notes = []
    run = RunResults(name or _run_name(folder), folder, metrics, predictions, notes=notes)
    history_dir = folder if (folder / "metrics.csv").is_file() else run_dir
    run.history = load_history(history_dir) if history_dir is not None else []
    config = _first_file("config.yaml", folder, run_dir)
    run.config_text = config.read_text(encoding="utf-8", errors="replace") if config else None
    tax_file = _first_file("taxonomy.csv", folder, run_dir)
    if tax_file is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run.taxonomy = read_taxonomy(tax_file)
        except Exception as e:  # a damaged taxonomy costs the lineages, not the report
            notes.append(f"{tax_file}: unreadable ({e}); lineages are not shown")
    else:
        notes.append("no taxonomy.csv beside the run: lineages are not shown")
    data = Path(metrics["data"]) if metrics.get("data") else None
    if data is not None and data.is_dir():
        run.data_root = data
    elif data is not None:
        notes.append(f"the dataset {data} is not on this machine: galleries show names without images")
    for base in (folder, run_dir, run.data_root):
        for sub in EXPLORE_DIRS:
            if base is not None and (base / sub / "summary.json").is_file():
                run.explore_dir = base / sub
                break
        if run.explore_dir is not None:
            break
    return run


def _run_name(folder: Path) -> str:
    """The evaluation folder's name (`min-risk` for `evaluate --out runs/a/min-risk`), the run's for a run."""
    return folder.resolve().name


__all__ = ["RunResults", "load_run"]
