"""The dataset directory contract: `annotations.csv` + `taxonomy.csv` + images, read and validated.

`load_dataset` is the one reader every stage uses (explore, split, training, evaluation). No torch here.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.errors import DataError
from taxonomist.taxonomy import Taxonomy, read_taxonomy
from taxonomist.utils.files import atomic_path

ANNOTATIONS = "annotations.csv"
TAXONOMY = "taxonomy.csv"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("annotation_id", "image_id", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "context_path",
                    "split", "fold")
SPLITS = ("train", "val", "test", "ood")


class FlatTaxonomyWarning(UserWarning):
    """The dataset has no taxonomy.csv: every label sits under one root."""


@dataclass
class Dataset:
    """A dataset directory: its annotation table and the taxonomy its labels live in.

    `annotations` keeps the CSV's columns as strings (path, label, …); empty labels are allowed only for
    unlabelled test data (e.g. a COCO test file), where `labelled` is False.
    """

    root: Path
    annotations: pd.DataFrame
    taxonomy: Taxonomy
    flat_taxonomy: bool = False

    @property
    def labelled(self) -> bool:
        return bool((self.annotations["label"] != "").all())

    @property
    def labels(self) -> list[str]:
        """Labels present in the annotations, in taxonomy label order first, then by name."""
        present = set(self.annotations["label"]) - {""}
        ordered = [lab for lab in self.taxonomy.labels if lab in present]
        return ordered + sorted(present - set(ordered))

    def rows(self, split: str | None) -> pd.DataFrame:
        """The rows of one split (all rows when `split` is None or there is no split column)."""
        if split is None:
            return self.annotations
        if "split" not in self.annotations.columns:
            raise DataError(f"{self.root / ANNOTATIONS}: no 'split' column; run `taxonomist data split {self.root}`")
        return self.annotations[self.annotations["split"] == split]

    def image_path(self, relative: str) -> Path:
        return self.root / relative


def read_csv_table(path: str | Path, what: str = "CSV", required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A UTF-8 CSV as a frame of stripped strings (empty cells are ""), with one-line errors for a missing,
    non-UTF-8, empty or malformed file, a missing required column, or no rows below the header."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        # index_col=False: when every row has one cell more than the header, pandas would otherwise quietly
        # take the first column as the index and shift every value one column to the left
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", index_col=False)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed CSV ({str(e).strip().splitlines()[-1]})") from None
    long_rows = any(issubclass(w.category, pd.errors.ParserWarning) for w in caught)
    header, long_row = _header_and_long_row(path, scan=long_rows)
    if long_rows:
        raise DataError(f"{path}: row {long_row or '?'}: more cells than the header has columns")
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DataError(f"{path}: column {repeated[0]!r} appears twice in the header")
    frame.columns = [str(c).strip() for c in frame.columns]
    for col in required:
        if col not in frame.columns:
            raise DataError(f"{path}: no {col!r} column (header: {','.join(frame.columns)})")
    if frame.empty:
        raise DataError(f"{path}: no rows below the header")
    return frame.apply(lambda column: column.str.strip())


def _header_and_long_row(path: Path, scan: bool) -> tuple[list[str], int | None]:
    """The stripped header cells (pandas renames a repeated one), and with `scan` the line of the first row
    with more cells than the header (None when not found)."""
    import csv
    header: list[str] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            for row in reader if scan else ():
                if len(row) > len(header):
                    return header, reader.line_num
        except csv.Error:  # a cell over the csv module's field limit: pandas read it, only the row number is lost
            pass
    return header, None


def read_annotations(path: str | Path) -> pd.DataFrame:
    """Read and check `annotations.csv`: required columns, no empty paths, numeric boxes, known splits."""
    path = Path(path)
    frame = read_csv_table(path, "annotations", REQUIRED_COLUMNS)
    empty = frame.index[frame["path"] == ""]
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2}: empty path")
    for col in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"):
        if col in frame.columns:
            numeric = pd.to_numeric(frame[col].replace("", "nan"), errors="coerce")
            # "nan" and "inf" parse as floats but are no coordinates; a negative width or height is no box
            bad = frame.index[(~np.isfinite(numeric) & (frame[col] != ""))
                              | ((numeric < 0) & (col in ("bbox_w", "bbox_h")))]
            if len(bad):
                value = frame.at[bad[0], col]
                what = "is negative" if np.isfinite(numeric[bad[0]]) else "is not a finite number"
                raise DataError(f"{path}: row {bad[0] + 2}: {col} {value!r} {what}")
    if "split" in frame.columns:
        bad = frame.index[~frame["split"].isin(SPLITS + ("",))]
        if len(bad):
            raise DataError(f"{path}: row {bad[0] + 2}: unknown split {frame.at[bad[0], 'split']!r}; "
                            f"expected one of {', '.join(SPLITS)}")
    if "fold" in frame.columns:
        bad = frame.index[~frame["fold"].str.fullmatch(r"-?\d*")]
        if len(bad):
            raise DataError(f"{path}: row {bad[0] + 2}: fold {frame.at[bad[0], 'fold']!r} is not an integer")
    return frame


def load_dataset(root: str | Path, taxonomy: str | Path | Taxonomy | None = None) -> Dataset:
    """Read a dataset directory.

    The taxonomy is `taxonomy` when given (a path, `fathomnet2025`, or a Taxonomy), else
    `ROOT/taxonomy.csv`, else a flat taxonomy over the labels (with one `FlatTaxonomyWarning`). Every
    label must be a node of the taxonomy; an unknown one is reported with its row and a suggestion.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset directory not found")
    frame = read_annotations(root / ANNOTATIONS)
    labels = [lab for lab in dict.fromkeys(frame["label"]) if lab]
    flat = False
    if isinstance(taxonomy, Taxonomy):
        tax = taxonomy
    elif taxonomy:
        tax = read_taxonomy(taxonomy)
    elif (root / TAXONOMY).is_file():
        tax = read_taxonomy(root / TAXONOMY)
    else:
        warnings.warn(f"{root}: no {TAXONOMY}; using a flat taxonomy (every label under one root), "
                      "so mean hierarchical distance is 2 × the error rate", FlatTaxonomyWarning, stacklevel=2)
        tax = Taxonomy.flat(sorted(labels))
        flat = True
    unknown = [lab for lab in labels if lab not in tax]
    if unknown:
        row = int(frame.index[frame["label"] == unknown[0]][0]) + 2
        from taxonomist.taxonomy import suggest
        more = f" ({len(unknown) - 1} more unknown labels)" if len(unknown) > 1 else ""
        raise DataError(f"{root / ANNOTATIONS}: row {row}: label {unknown[0]!r} is not in the taxonomy"
                        f"{suggest(unknown[0], tax.names)}{more}")
    # the model predicts the labels present in the data, in taxonomy order
    ordered = [lab for lab in tax.labels if lab in set(labels)] + [lab for lab in labels if lab not in set(tax.labels)]
    if labels:
        tax = tax.with_labels(ordered)
    return Dataset(root, frame, tax, flat)


def write_annotations(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write `annotations.csv` atomically (a kill never leaves a half-written table)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)
