"""Readers for image folders (`root/<label>/*.jpg`) and rank-column CSVs (FungiTastic style), and the
writer that turns what they found into a dataset directory without copying the images by default.
"""
from __future__ import annotations

import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from taxonomist.data.dataset import ANNOTATIONS, TAXONOMY, load_dataset, read_csv_table, write_annotations
from taxonomist.errors import ConfigError, DataError, TaxonomyError
from taxonomist.taxonomy import RANKS, Taxonomy, read_taxonomy, suggest, write_taxonomy
from taxonomist.taxonomy.io import parse_taxonomy
from taxonomist.utils.files import atomic_path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: what an image-path column is usually called, tried in this order (case-insensitive)
IMAGE_COLUMNS = ("path", "image_path", "filepath", "file_path", "filename", "file_name", "image", "image_name",
                 "img_path", "img", "file")
#: cells that mean "no name at this rank" in CSVs written by pandas, R or spreadsheets
NULL_CELLS = frozenset({"", "nan", "none", "null", "na", "n/a", "<na>"})
LINK_MODES = ("relative", "symlink", "copy", "none")
FORMATS = ("imagefolder", "rank-csv")
SPLIT_NAMES = ("train", "val", "test", "ood")


class FlatFolderWarning(UserWarning):
    """An image folder was read without a taxonomy: every label will sit under one root."""


@dataclass
class SourceTable:
    """What a reader found: one row per image, before anything is written.

    Attributes:
        root: the folder the images were found under (the dataset directory for `link="none"`).
        frame: `source` (absolute path of each image file), `label`, and `annotation_id`/`image_id`
            when the source had them.
        taxonomy: the tree the labels live in, or None for a flat dataset (no taxonomy.csv is written).
        origin: where the taxonomy came from, in words ("rank columns of X", "WoRMS", "flat", …).
        notes: one-line remarks on what was skipped or assumed.
    """

    root: Path
    frame: pd.DataFrame
    taxonomy: Taxonomy | None
    origin: str
    notes: list[str] = field(default_factory=list)
    kind: str = "imagefolder"       # "imagefolder" or "rank-csv"
    csv_path: Path | None = None    # the rank CSV read, never to be overwritten
    csv_paths: list[Path] = field(default_factory=list)   # all rank CSVs read (one per split)

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(self.frame["label"]))


@dataclass
class ConvertSummary:
    """The result of `convert_to_dataset`: where the dataset is and how its paths reach the images."""

    out_dir: Path
    n_examples: int
    n_labels: int
    link: str
    origin: str
    n_written: int = 0          # symlinks or copies made by this run
    n_reused: int = 0           # symlinks or copies already in place from an earlier run
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        how = {
            "relative": f"paths relative to {self.out_dir} point at the original files (nothing copied)",
            "symlink": f"images/ holds symlinks to the originals ({self.n_written} made, {self.n_reused} kept)",
            "copy": f"images/ holds copies ({self.n_written} copied, {self.n_reused} already there)",
            "none": "annotations.csv sits beside the original files",
        }[self.link]
        lines = [f"wrote {self.out_dir / ANNOTATIONS}: {self.n_examples} images, {self.n_labels} labels "
                 f"(taxonomy: {self.origin})", f"images: {how}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- ImageFolder
def read_image_folder(root: str | Path, taxonomy: str | Path | Taxonomy | None = None, resolve_worms: bool = False,
                      *, worms_client: Callable | None = None, worms_cache: str | Path | None = None,
                      offline: bool = False, progress: bool = False) -> SourceTable:
    """Read `root/<label>/…/*.{jpg,jpeg,png,bmp,tif,tiff,webp}`: the top folder name is the label.

    Images in nested folders below a label folder belong to that label; hidden entries (`.x`, `__MACOSX`)
    and non-image files are skipped. The taxonomy is, in order: `taxonomy` (a CSV, `fathomnet2025` or a
    Taxonomy; every folder name must be a node, `_` standing for a space is accepted), the folder names
    resolved through WoRMS when `resolve_worms`, or none (flat, with one `FlatFolderWarning`).

    Example:
        >>> table = read_image_folder("photos", taxonomy="fathomnet2025")   # doctest: +SKIP
        >>> table.labels[:2]                                                 # doctest: +SKIP
        ['Sebastes', 'Chionoecetes tanneri']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    if taxonomy is not None and resolve_worms:
        raise ConfigError("give either a taxonomy or resolve_worms=True (--resolve-worms), not both")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith((".", "__")))
    loose = [e.name for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    notes = []
    if loose:
        notes.append(f"{len(loose)} images directly in {root} have no label folder and were skipped "
                     f"(e.g. {sorted(loose)[0]!r})")
    sources: list[str] = []
    folder_of: list[str] = []
    empty = []
    base = os.path.abspath(root)
    for folder in folders:
        found = _image_files(os.path.join(base, folder))
        if not found:
            empty.append(folder)
        sources += found
        folder_of += [folder] * len(found)
    if empty:
        notes.append(f"{len(empty)} folders hold no images and give no label: {', '.join(map(repr, empty[:5]))}"
                     + (" …" if len(empty) > 5 else ""))
    if not sources:
        raise DataError(f"{root}: no images in label folders (expected {root}/<label>/*.jpg; "
                        f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    present = [f for f in folders if f not in empty]

    if taxonomy is not None:
        tax = taxonomy if isinstance(taxonomy, Taxonomy) else read_taxonomy(taxonomy)
        name = "the given taxonomy" if isinstance(taxonomy, Taxonomy) else str(taxonomy)
        label_of = _match_folders(root, present, tax, name)
        origin = name
    elif resolve_worms:
        label_of, tax = _resolve_folders(root, present, worms_client, worms_cache, offline, progress)
        origin = "WoRMS"
    else:
        warnings.warn(f"{root}: no taxonomy given; the {len(present)} folder names become a flat taxonomy "
                      "(pass --taxonomy FILE or --resolve-worms for a tree)", FlatFolderWarning, stacklevel=2)
        label_of, tax, origin = {f: f for f in present}, None, "flat (no taxonomy.csv)"
    frame = pd.DataFrame({"source": sources, "label": [label_of[f] for f in folder_of]})
    return SourceTable(root, frame, tax, origin, notes)


def _image_files(folder: str) -> list[str]:
    """Image files below `folder`, sorted, hidden entries skipped; symlinked folders are followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames)
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _match_folders(root: Path, folders: list[str], tax: Taxonomy, name: str) -> dict[str, str]:
    """Folder name → node name; `Chionoecetes_tanneri` matches `Chionoecetes tanneri`."""
    label_of, unknown = {}, []
    for folder in folders:
        if folder in tax:
            label_of[folder] = folder
        elif folder.replace("_", " ") in tax:
            label_of[folder] = folder.replace("_", " ")
        else:
            unknown.append(folder)
    if unknown:
        more = f" ({len(unknown) - 1} more unknown folders)" if len(unknown) > 1 else ""
        raise DataError(f"{root / unknown[0]}: folder name {unknown[0]!r} is not a node of taxonomy {name}"
                        f"{suggest(unknown[0], tax.names)}{more}")
    return label_of


def _resolve_folders(root: Path, folders: list[str], client, cache, offline: bool, progress: bool):
    from taxonomist.taxonomy.worms import resolve_names
    names = {f: f.replace("_", " ").strip() for f in folders}
    result = resolve_names(list(names.values()), client=client, cache_dir=cache, offline=offline, progress=progress)
    missing = [f for f in folders if names[f] not in result.lineages]
    if missing:
        reason = result.unresolved.get(names[missing[0]], "not resolved")
        more = f"; {len(missing) - 1} more folders unresolved" if len(missing) > 1 else ""
        raise DataError(f"{root / missing[0]}: folder name {names[missing[0]]!r} could not be resolved through "
                        f"WoRMS ({reason}){more}; fix the folder name or pass --taxonomy FILE")
    try:
        tax = result.to_taxonomy()
    except TaxonomyError as e:
        raise TaxonomyError(f"{root}: the WoRMS lineages of the folder names disagree: {e}") from None
    return names, tax


# --------------------------------------------------------------------------------------------- rank CSV
def read_rank_csv(csv_path: str | Path, image_column: str | None = None, image_root: str | Path | None = None,
                  *, rank_columns: Mapping[str, str] | None = None, skip_missing: bool = False) -> SourceTable:
    """Read a CSV with an image-path column and one column per rank (FungiTastic, DF20, GBIF exports).

    The image column is `image_column` or the first of `IMAGE_COLUMNS` present; paths are relative to
    `image_root` (default: the CSV's folder) unless absolute. Rank columns are found by name,
    case-insensitively (`kingdom` … `species`, FungiTastic's own names), or given as
    `rank_columns={"species": "scientificName"}`. A row's label is its deepest non-empty rank, so a row
    identified only to genus gets the genus as its label. The taxonomy is built from the rank columns
    and checked row by row: a name under two different parents, or at two ranks, is an error naming
    both rows. `image_id` (or FungiTastic's `observationID`, several photos of one observation) and
    `annotation_id` columns are kept, so that splits keep one observation's photos together.

    Example:
        >>> table = read_rank_csv("FungiTastic-Mini-Train.csv",                  # doctest: +SKIP
        ...                       image_root="FungiTastic-Mini/train/300p")
        >>> table.taxonomy.lineage(table.labels[0])                             # doctest: +SKIP
        ['Fungi', 'Basidiomycota', 'Agaricomycetes', 'Agaricales', 'Amanitaceae', 'Amanita', 'Amanita muscaria']
    """
    csv_path = Path(csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    return _read_rank_parts([(csv_path, None, root)], image_column, rank_columns, skip_missing)


def read_split_csvs(csvs: Mapping[str, str | Path], image_column: str | None = None,
                    image_root: str | Path | None = None, *, rank_columns: Mapping[str, str] | None = None,
                    skip_missing: bool = False) -> SourceTable:
    """Read one rank CSV per split (FungiTastic ships `…-Train.csv`, `…-Val.csv`, `…-Test.csv`) into one
    table with a `split` column, checked as one: a taxon has one parent across all the files.

    `csvs` maps split names (`train`, `val`, `test`, `ood`) to CSV files. `image_root` is one folder for
    all, or a template with `{split}` (`FungiTastic/{split}/300p`); default: each CSV's folder. Columns
    are matched per file, so a file may lack a rank column (its rows then have no name at that rank).

    Example:
        >>> table = read_split_csvs({"train": "FungiTastic-Train.csv", "val": "FungiTastic-Val.csv",   # doctest: +SKIP
        ...                          "test": "FungiTastic-Test.csv"}, image_root="FungiTastic/{split}/300p")
        >>> table.frame["split"].value_counts()                                                        # doctest: +SKIP
    """
    unknown = [k for k in csvs if k not in SPLIT_NAMES]
    if unknown:
        raise ConfigError(f"unknown split {unknown[0]!r}{suggest(unknown[0], SPLIT_NAMES)}; "
                          f"splits are {', '.join(SPLIT_NAMES)}")
    if not csvs:
        raise ConfigError("no CSV given (--train A.csv [--val B.csv] [--test C.csv])")
    paths = [Path(p) for p in csvs.values()]
    if len({os.path.abspath(p) for p in paths}) < len(paths):
        raise ConfigError("the same CSV is given for two splits")
    parts = []
    for split, path in zip(csvs, paths):
        if image_root is None:
            root = path.parent
        else:
            root = Path(str(image_root).replace("{split}", split))
        parts.append((path, split, root))
    return _read_rank_parts(parts, image_column, rank_columns, skip_missing)


def _columns_of(csv_path: Path, frame: pd.DataFrame, image_column: str | None,
                rank_columns: Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
    """The image column and rank → column of one CSV."""
    lower = {c.lower(): c for c in frame.columns}
    if image_column:
        col = lower.get(image_column.lower())
        if col is None:
            raise DataError(f"{csv_path}: no image column {image_column!r}{suggest(image_column, frame.columns)} "
                            f"(header: {','.join(frame.columns)})")
    else:
        col = next((lower[c] for c in IMAGE_COLUMNS if c in lower), None)
        if col is None:
            raise DataError(f"{csv_path}: no image path column (looked for {', '.join(IMAGE_COLUMNS)}); "
                            f"pass --image-column NAME (header: {','.join(frame.columns)})")
    mapping = {}
    for rank, name in (rank_columns or {}).items():
        if rank not in RANKS:
            raise ConfigError(f"unknown rank {rank!r} in rank columns{suggest(rank, RANKS)}; "
                              f"ranks are {', '.join(RANKS)}")
        if name.lower() not in lower:
            raise DataError(f"{csv_path}: no column {name!r} for rank {rank}{suggest(name, frame.columns)}")
        mapping[rank] = lower[name.lower()]
    for rank in RANKS:
        if rank not in mapping and rank in lower:
            mapping[rank] = lower[rank]
    if not mapping:
        raise DataError(f"{csv_path}: no rank columns (looked for {', '.join(RANKS)}, any case; "
                        f"header: {','.join(frame.columns)})")
    if col in mapping.values():
        raise DataError(f"{csv_path}: column {col!r} cannot be both the image path and a rank")
    return col, mapping


def _read_rank_parts(parts: list[tuple[Path, str | None, Path]], image_column: str | None,
                     rank_columns: Mapping[str, str] | None, skip_missing: bool) -> SourceTable:
    """Read rank CSVs (path, split or None, image root) as one table; errors name the file and row."""
    frames, maps, cols = [], [], []
    for csv_path, _, _ in parts:
        frame = read_csv_table(csv_path)
        col, mapping = _columns_of(csv_path, frame, image_column, rank_columns)
        frames.append(frame)
        maps.append(mapping)
        cols.append(col)
    ranks = [r for r in RANKS if any(r in m for m in maps)]
    file_of = np.concatenate([np.full(len(f), k) for k, f in enumerate(frames)]).astype(int)
    row_of = np.concatenate([np.arange(len(f)) for f in frames]).astype(int)

    def where(i: int) -> str:
        return f"{parts[file_of[i]][0]}: row {row_of[i] + 2}"

    def ref(i: int, j: int) -> str:  # row i seen from an error about row j
        return f"row {row_of[i] + 2}" if file_of[i] == file_of[j] else f"{parts[file_of[i]][0]} row {row_of[i] + 2}"

    paths = np.concatenate([f[c].to_numpy(dtype=object) for f, c in zip(frames, cols)])
    no_path = np.flatnonzero(paths == "")
    if len(no_path):
        raise DataError(f"{where(no_path[0])}: empty {cols[file_of[no_path[0]]]!r} (image path)")
    cells = np.stack([np.concatenate([f[m[r]].to_numpy(dtype=object) if r in m else np.full(len(f), "", dtype=object)
                                      for f, m in zip(frames, maps)]) for r in ranks], axis=1)
    cells[np.isin(np.char.lower(cells.astype(str)), list(NULL_CELLS))] = ""
    named = cells != ""
    unnamed = np.flatnonzero(~named.any(axis=1))
    if len(unnamed):
        k = file_of[unnamed[0]]
        more = f" ({len(unnamed) - 1} more such rows)" if len(unnamed) > 1 else ""
        raise DataError(f"{where(unnamed[0])}: no name in any rank column "
                        f"({', '.join(maps[k][r] for r in ranks if r in maps[k])}){more}")
    column_names = [next(m[r] for m in maps if r in m) for r in ranks]
    _check_lineages(where, ref, cells, named, ranks, column_names)

    # the label is the deepest named rank of the row
    deepest = named.shape[1] - 1 - np.argmax(named[:, ::-1], axis=1)
    labels = cells[np.arange(len(cells)), deepest]

    sources = np.empty(len(paths), dtype=object)
    for k, (csv_path, _, root) in enumerate(parts):
        if not root.is_dir():
            raise DataError(f"{root}: image root not found (the folder the {cols[k]!r} paths of {csv_path.name} "
                            "are relative to)")
        base = os.path.abspath(root)
        mine = np.flatnonzero(file_of == k)
        sources[mine] = [os.path.normpath(os.path.join(base, p)) for p in paths[mine]]
    exists = np.array([os.path.isfile(s) for s in sources], dtype=bool)
    notes = []
    if not exists.all():
        missing = np.flatnonzero(~exists)
        first, root = missing[0], parts[file_of[missing[0]]][2]
        if not skip_missing:
            more = f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise DataError(f"{where(first)}: image {paths[first]!r} not found under {root}"
                            f"{more}; pass --image-root DIR, or --skip-missing to leave such rows out")
        notes.append(f"{len(missing)} rows whose image is missing were left out (first: {where(first)}, "
                     f"{paths[first]!r})")
        if len(missing) == len(paths):
            raise DataError(f"{parts[0][0]}: none of the {len(paths)} images exists under {root}")

    out = pd.DataFrame({"source": sources, "label": labels})
    for target, candidates in (("annotation_id", ("annotation_id",)), ("image_id", ("image_id", "observationid"))):
        values, found_any = [], False
        for f in frames:
            lower = {c.lower(): c for c in f.columns}
            found = next((lower[c] for c in candidates if c in lower), None)
            found_any |= found is not None
            values.append(f[found].to_numpy(dtype=object) if found is not None else np.full(len(f), "", dtype=object))
        if found_any:
            out[target] = np.concatenate(values)
    if any(split is not None for _, split, _ in parts):
        out["split"] = np.array([parts[k][1] for k in file_of], dtype=object)
        if "image_id" in out:  # one observation's photos in two splits: the files leak into each other
            ids = out["image_id"].astype(str)
            spread = out["split"].groupby(ids).transform("nunique").to_numpy() > 1
            spread &= (ids != "").to_numpy()
            if spread.any():
                notes.append(f"{ids[spread].nunique()} image_id values (e.g. {ids[spread].iloc[0]!r}) have rows "
                             "in more than one split CSV")
    out = out[exists].reset_index(drop=True)

    # one taxonomy row per label, from the first row that carries it (the checks made lineages unique)
    kept = np.flatnonzero(exists)
    first = pd.Series(kept).groupby(labels[kept], sort=False).first()
    rows = [{"concept_name": lab, **{r: cells[i, k] for k, r in enumerate(ranks)}} for lab, i in first.items()]
    names = ", ".join(p.name for p, _, _ in parts)
    tax = parse_taxonomy(["concept_name", *ranks], rows, f"{names} (rank columns)")
    root = Path(os.path.commonpath([os.path.abspath(r) for *_, r in parts])) if len(parts) > 1 else parts[0][2]
    return SourceTable(root, out, tax, f"rank columns of {names}", notes, kind="rank-csv", csv_path=parts[0][0],
                       csv_paths=[p for p, _, _ in parts])


def _check_lineages(where: Callable[[int], str], ref: Callable[[int, int], str], cells: np.ndarray,
                    named: np.ndarray, ranks: list[str], columns: list[str]) -> None:
    """Every name sits at one rank and under one parent; otherwise name the two rows that disagree."""
    n, r = cells.shape
    row_idx, rank_idx = np.nonzero(named)
    names = cells[row_idx, rank_idx]
    long = pd.DataFrame({"row": row_idx, "rank": rank_idx, "name": names})
    ranks_per_name = long.groupby("name", sort=False)["rank"].nunique()
    if (ranks_per_name > 1).any():
        name = ranks_per_name.index[np.argmax(ranks_per_name.to_numpy() > 1)]
        hits = long[long["name"] == name].drop_duplicates("rank")
        a, b = hits.iloc[0], hits.iloc[1]
        raise TaxonomyError(f"{where(b['row'])}: {name!r} is a {ranks[b['rank']]} here but a "
                            f"{ranks[a['rank']]} in {ref(a['row'], b['row'])} "
                            f"(columns {columns[a['rank']]}, {columns[b['rank']]})")
    # parent of each cell = the nearest named cell to its left (a missing rank in between is skipped)
    filled = np.where(named, np.arange(r)[None, :], -1)
    nearest = np.maximum.accumulate(filled, axis=1)
    parent_pos = np.concatenate([np.full((n, 1), -1), nearest[:, :-1]], axis=1)[row_idx, rank_idx]
    parents = np.where(parent_pos >= 0, cells[row_idx, np.maximum(parent_pos, 0)], "")
    long["parent"] = parents
    long = long.sort_values("row", kind="stable")
    first = long.groupby("name", sort=False)[["parent", "row"]].transform("first")
    bad = np.flatnonzero((long["parent"] != first["parent"]).to_numpy())
    if len(bad):
        k = bad[0]  # rows are sorted, so this is the first row that contradicts an earlier one
        rec, earlier = long.iloc[k], first.iloc[k]
        def show(p):
            return repr(p) if p else "no parent"
        raise TaxonomyError(f"{where(rec['row'])}: {ranks[rec['rank']]} {rec['name']!r} is under "
                            f"{show(rec['parent'])} here but under {show(earlier['parent'])} in "
                            f"{ref(earlier['row'], rec['row'])} (a taxon has one parent)")


# --------------------------------------------------------------------------------------------- writing
def convert_to_dataset(source: SourceTable | str | Path | None, out_dir: str | Path | None = None, *,
                       format: str = "imagefolder", link: str = "relative",
                       taxonomy: str | Path | Taxonomy | None = None, resolve_worms: bool = False,
                       image_column: str | None = None, image_root: str | Path | None = None,
                       rank_columns: Mapping[str, str] | None = None, skip_missing: bool = False,
                       splits: Mapping[str, str | Path] | None = None,
                       worms_client: Callable | None = None, worms_cache: str | Path | None = None,
                       offline: bool = False, progress: bool = False) -> ConvertSummary:
    """Write a dataset directory (annotations.csv, taxonomy.csv) for an image folder or a rank CSV.

    `source` is a `SourceTable` from a reader, or a path read with `format` ("imagefolder" or
    "rank-csv") and the reader options. `link` says how the dataset reaches the images:

    - `relative` (default): nothing is copied or linked; `path` is relative to OUT_DIR and points at the
      original file (`../photos/Sebastes/001.jpg`). Instant for 100k images; keep OUT_DIR and the
      originals where they are relative to each other.
    - `symlink`: OUT_DIR/images/… holds symlinks to the originals (absolute targets), so OUT_DIR can move
      on the same machine; needs a file system with symlinks.
    - `copy`: OUT_DIR/images/… holds copies: self-contained and portable, costs the disk space. A re-run
      keeps copies already there.
    - `none`: annotations.csv (and taxonomy.csv) are written into the image root itself, paths relative
      to it; `out_dir` must then be None or that folder.

    `splits` ({"train": A.csv, "val": B.csv, "test": C.csv}) reads one rank CSV per split instead of
    `source` (which must then be None) and writes their rows with a `split` column (`read_split_csvs`).

    Example:
        >>> convert_to_dataset("photos", "data/photos", taxonomy="fathomnet2025")   # doctest: +SKIP
        >>> load_dataset("data/photos").labels[:1]                                    # doctest: +SKIP
        ['Sebastes']
    """
    if link not in LINK_MODES:
        raise ConfigError(f"unknown link mode {link!r}{suggest(link, LINK_MODES)}; "
                          f"expected one of {', '.join(LINK_MODES)}")
    if splits:
        if source is not None:
            raise ConfigError("give either SOURCE or per-split CSVs (--train/--val/--test), not both")
        if format != "rank-csv":
            raise ConfigError("--train/--val/--test take rank CSVs: use --format rank-csv")
        if taxonomy is not None or resolve_worms:
            raise ConfigError("rank CSVs carry their own taxonomy; --taxonomy and --resolve-worms apply to "
                              "--format imagefolder only")
        table = read_split_csvs(splits, image_column, image_root, rank_columns=rank_columns,
                                skip_missing=skip_missing)
    elif source is None:
        raise ConfigError("no SOURCE given (an image folder or a rank CSV; or --train/--val/--test CSVs)")
    elif isinstance(source, SourceTable):
        table = source
    else:
        if format not in FORMATS:
            raise ConfigError(f"unknown source format {format!r}{suggest(format, FORMATS)}; "
                              f"expected one of {', '.join(FORMATS)}")
        if link == "none":  # checked before reading, which may take a while
            _check_in_place(source if format == "imagefolder" else (image_root or Path(source).parent), out_dir)
        if format == "imagefolder":
            if image_column or image_root or rank_columns or skip_missing:
                raise ConfigError("--image-column, --image-root, --rank-column and --skip-missing apply to "
                                  "--format rank-csv only")
            table = read_image_folder(source, taxonomy, resolve_worms, worms_client=worms_client,
                                      worms_cache=worms_cache, offline=offline, progress=progress)
        else:
            if taxonomy is not None or resolve_worms:
                raise ConfigError("a rank CSV carries its own taxonomy; --taxonomy and --resolve-worms apply to "
                                  "--format imagefolder only")
            table = read_rank_csv(source, image_column, image_root, rank_columns=rank_columns,
                                  skip_missing=skip_missing)

    root_abs = os.path.abspath(table.root)
    if link == "none":
        _check_in_place(table.root, out_dir)
        out = Path(table.root)
    elif out_dir is None:
        raise ConfigError("out_dir is required unless link='none'")
    else:
        out = Path(out_dir)
    out_abs = os.path.abspath(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if table.kind == "imagefolder" and out_abs != root_abs and _inside(out_abs, root_abs):
        raise DataError(f"{out}: OUT_DIR is inside the image folder {table.root}, where it would be read as a "
                        "label folder next time; choose a folder beside it")
    if table.taxonomy is None and (out / TAXONOMY).is_file():
        raise DataError(f"{out / TAXONOMY}: exists, but this conversion has no taxonomy; pass "
                        f"--taxonomy {out / TAXONOMY} to use it, or delete it")
    target = out / ANNOTATIONS
    for csv_path in table.csv_paths or ([table.csv_path] if table.csv_path is not None else []):
        if os.path.abspath(csv_path) == os.path.abspath(target):
            raise DataError(f"{target}: would overwrite the source CSV; choose another OUT_DIR")

    sources = table.frame["source"].tolist()
    written = reused = 0
    if link in ("relative", "none"):
        paths = [_relative(s, out_abs) for s in sources]
    else:
        base = _common_base(sources, root_abs)
        rel = [os.path.relpath(s, base) for s in sources]
        paths = [Path("images", r).as_posix() for r in rel]
        written, reused = _materialize(sources, [os.path.join(out_abs, p) for p in paths], link, progress)

    frame = table.frame.drop(columns="source").copy()
    frame.insert(0, "path", paths)
    out.mkdir(parents=True, exist_ok=True)
    write_annotations(frame, target)
    if table.taxonomy is not None:
        write_taxonomy(table.taxonomy, out / TAXONOMY)
    # read back through the one dataset reader: what we wrote must satisfy the contract
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check = load_dataset(out)
    return ConvertSummary(out, len(frame), len(check.labels), link, table.origin, written, reused, list(table.notes))


def _check_in_place(root, out_dir) -> None:
    if out_dir is not None and os.path.abspath(out_dir) != os.path.abspath(root):
        raise ConfigError(f"--link none writes annotations.csv into the image root {root}; pass that "
                          f"folder as OUT_DIR, or use --link relative to write to {out_dir}")


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _relative(path: str, start: str) -> str:
    """`path` seen from `start`, computed on physical paths: `..` is resolved by the OS after symlinks,
    so a lexical relpath through a symlinked folder would point elsewhere."""
    physical = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    try:
        return Path(os.path.relpath(physical, os.path.realpath(start))).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        raise DataError(f"{path}: on another drive than {start}; use --link copy or --link symlink") from None


def _common_base(sources: Sequence[str], root: str) -> str:
    """The folder whose layout images/ mirrors: the source root, or the common folder of all files."""
    if all(_inside(s, root) for s in sources):
        return root
    return os.path.commonpath([os.path.dirname(s) for s in sources])


def _materialize(sources: Sequence[str], targets: Sequence[str], link: str, progress: bool) -> tuple[int, int]:
    """Make each target a symlink to (or a copy of) its source; what an earlier run made is kept."""
    from tqdm import tqdm
    written = reused = 0
    bar = tqdm(zip(sources, targets), total=len(sources), desc="symlinks" if link == "symlink" else "copies",
               unit="file", file=sys.stderr, disable=not progress or not sys.stderr.isatty())
    for src, dst in bar:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if link == "symlink":
            if os.path.islink(dst) and os.readlink(dst) == src:
                reused += 1
                continue
            tmp = f"{dst}.{os.getpid()}.tmp"
            try:
                os.symlink(src, tmp)
            except OSError as e:
                raise DataError(f"{dst}: cannot make a symlink ({e.strerror}); "
                                "use --link relative or --link copy") from None
            os.replace(tmp, dst)  # atomic: an old link or file under this name is swapped, never half-made
        else:
            if os.path.isfile(dst) and not os.path.islink(dst) and os.path.getsize(dst) == os.path.getsize(src):
                reused += 1
                continue
            try:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
                    shutil.copymode(src, tmp)  # the temporary file is private (0600); keep the image's mode
            except OSError as e:
                raise DataError(f"{src}: cannot copy to {dst} ({e.strerror})") from None
        written += 1
    return written, reused


__all__ = ["SourceTable", "ConvertSummary", "read_image_folder", "read_rank_csv", "read_split_csvs",
           "convert_to_dataset", "IMAGE_EXTENSIONS", "IMAGE_COLUMNS", "LINK_MODES", "FORMATS", "SPLIT_NAMES",
           "FlatFolderWarning"]
