"""`split_dataset`: seeded, stratified train/val/test splits, K folds grouped by image, whole taxa held out
as `ood`, and per-class filters for balanced or smoke-test subsets; written as `split`/`fold` columns.
`split_rows` reads them back: the training and validation rows of a config.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.config import Config
from taxonomist.data.dataset import ANNOTATIONS, TAXONOMY, Dataset, load_dataset, write_annotations
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy
from taxonomist.utils.files import atomic_write_bytes

SPLIT_ORDER = ("train", "val", "test", "ood")
DEFAULT_VAL = 0.15
MIN_TRAIN_LABELS = 2   # an OOD hold-out must leave at least this many labels to train on
# independent random streams per step, so that e.g. changing --max-per-class leaves the OOD choice alone
_CAP, _OOD, _SPLIT = 1, 2, 3


@dataclass
class SplitSummary:
    """What `split_dataset` wrote: rows and labels per split, folds, the OOD taxa and the filters' effect."""

    path: Path                     # the annotations.csv written
    counts: pd.DataFrame           # label × split example counts (splits in SPLIT_ORDER that occur)
    folds: list[int] = field(default_factory=list)      # rows per fold (empty without folds)
    ood_taxa: list[str] = field(default_factory=list)   # the taxa held out (names given or chosen)
    ood_labels: list[str] = field(default_factory=list) # the labels they cover
    dropped_rows: int = 0
    dropped_labels: list[str] = field(default_factory=list)
    seed: int = 0

    def rows(self, split: str) -> int:
        return int(self.counts[split].sum()) if split in self.counts.columns else 0

    def __str__(self) -> str:
        lines = [f"{'split':<6} {'rows':>8} {'labels':>7}"]
        for split in self.counts.columns:
            col = self.counts[split]
            lines.append(f"{split:<6} {int(col.sum()):>8} {int((col > 0).sum()):>7}")
        total = self.counts.to_numpy().sum()
        lines.append(f"{'total':<6} {int(total):>8} {int((self.counts.sum(axis=1) > 0).sum()):>7}")
        if self.folds:
            lines.append(f"folds: {len(self.folds)} (rows per fold: {' '.join(map(str, self.folds))}); "
                         f"train on fold k with data.fold=k")
        if self.ood_taxa:
            lines.append(f"held out as ood: {', '.join(self.ood_taxa)} ({len(self.ood_labels)} labels)")
        if self.dropped_rows:
            lines.append(f"filters dropped {self.dropped_rows} rows and {len(self.dropped_labels)} labels")
        lines.append(f"wrote {self.path} (seed {self.seed})")
        return "\n".join(lines)


def split_dataset(root: str | Path, val: float | None = None, test: float = 0.15, folds: int = 0,
                  ood_taxa: str | int | list[str] = "", classes: int = 0, min_per_class: int = 0,
                  max_per_class: int = 0, seed: int = 0, out: str | Path | None = None) -> SplitSummary:
    """Write `split` (train/val/test/ood) and, with `folds`, `fold` columns into the dataset's annotations.

    Steps, in order (each seeded, so the same arguments always give the same table):

    1. `min_per_class` drops labels with fewer examples; `max_per_class` keeps a random N of each label.
    2. `ood_taxa` holds out whole taxa as split `ood`: names (a label, or an internal node and every label
       below it), or a count N of labels chosen by seed, preferring labels with no other label below
       them and never emptying a phylum (or top-level group) while another choice exists.
    3. `classes` keeps the N in-distribution labels with the most examples (ties: more examples before
       the cap, then name); the OOD taxa are kept besides.
    4. Each label's examples go `round(n·test)` to test and `round(n·val)` to val (val defaults to 0.15),
       the rest to train, and at least one always to train: labels with 1–3 examples usually have no
       val or test example. With an `image_id` column whole images move together (ROIs of one frame never
       straddle splits), stratified by each image's most frequent label.
    5. With `folds` K: test is held out first (step 4 without val), the other rows are `train` with a
       `fold` 0..K-1, stratified by label and grouped by `image_id` (training validates on one fold with
       `data.fold`); `val` must then be left unset or 0.

    Filters drop rows, so they need `out`: the subset is written as a new dataset directory (its
    annotations.csv with paths rewritten to reach the same images, and a copy of taxonomy.csv) and the
    original stays whole. Without filters the table is rewritten in place (atomically) unless `out` is
    given. An existing `fold` column is removed when `folds` is 0, since it would describe another split.

    Example:
        >>> s = split_dataset("data/synth", folds=5, ood_taxa=3, seed=0)      # doctest: +SKIP
        >>> s.rows("ood") > 0, len(s.folds)                                     # doctest: +SKIP
        (True, 5)
    """
    val, test = _check_args(val, test, folds, classes, min_per_class, max_per_class, seed)
    root = Path(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flat taxonomy is fine for splitting
        ds = load_dataset(root)
    frame = ds.annotations.copy()
    unlabelled = np.flatnonzero(frame["label"].to_numpy() == "")
    if len(unlabelled):
        raise DataError(f"{root / ANNOTATIONS}: row {unlabelled[0] + 2}: empty label; only labelled rows can be "
                        "split (keep unlabelled test data in a dataset of its own)")
    n_before = len(frame)
    labels_before = set(frame["label"])

    # 1. filters
    counts = frame["label"].value_counts()
    if min_per_class:
        frame = frame[frame["label"].map(counts).to_numpy() >= min_per_class]
        if frame.empty:
            raise DataError(f"{root}: no label has {min_per_class} examples (largest: {counts.iloc[0]}); "
                            "lower --min-per-class")
    if max_per_class:
        order = np.random.default_rng([seed, _CAP]).permutation(len(frame))
        shuffled = frame.iloc[order]
        frame = shuffled[shuffled.groupby("label", sort=False).cumcount().to_numpy() < max_per_class].sort_index()

    # 2. OOD taxa
    ood_names, ood_labels = _choose_ood(ds.taxonomy, frame["label"], ood_taxa, seed, root)

    # 3. the N largest in-distribution labels
    if classes:
        inside = frame[~frame["label"].isin(ood_labels)]
        table = pd.DataFrame({"now": inside["label"].value_counts()})
        table["before"] = counts.reindex(table.index).to_numpy()
        table["name"] = table.index
        keep = table.sort_values(["now", "before", "name"], ascending=[False, False, True]).index[:classes]
        frame = frame[frame["label"].isin(set(keep) | set(ood_labels))]

    dropped = n_before - len(frame)
    out_dir = Path(out) if out is not None else root
    in_place = os.path.abspath(out_dir) == os.path.abspath(root)
    if dropped and in_place:
        raise ConfigError(f"--classes/--min-per-class/--max-per-class drop {dropped} of {n_before} rows; pass "
                          f"--out DIR to write the subset as a new dataset ({root} stays whole)")
    if len(set(frame["label"]) - set(ood_labels)) < 1:
        raise DataError(f"{root}: no in-distribution label is left after the filters and the OOD hold-out")

    # 4./5. splits and folds
    frame = frame.copy()
    is_ood = frame["label"].isin(ood_labels).to_numpy()
    split = np.full(len(frame), "train", dtype=object)
    split[is_ood] = "ood"
    groups = _groups(frame)
    rng = np.random.default_rng([seed, _SPLIT])
    inside = np.flatnonzero(~is_ood)
    lab = frame["label"].to_numpy()
    split[inside] = _allocate(lab[inside], groups[inside], val, test, rng)
    fold_sizes: list[int] = []
    if folds:
        fold = np.full(len(frame), "", dtype=object)
        pool = inside[split[inside] == "train"]
        assigned = _folds(lab[pool], groups[pool], folds, seed, root)
        fold[pool] = assigned.astype(str)
        fold_sizes = np.bincount(assigned, minlength=folds).tolist()
        frame["fold"] = fold
    elif "fold" in frame.columns:
        frame = frame.drop(columns="fold")
    frame["split"] = split

    # write
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    if not in_place:
        for col in frame.columns:
            if col == "path" or col.startswith("context_path"):  # context_path_3, context_path_full, …
                frame[col] = _rebase(frame[col], root, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (root / TAXONOMY).is_file():
            atomic_write_bytes(out_dir / TAXONOMY, (root / TAXONOMY).read_bytes())
    path = write_annotations(frame.reset_index(drop=True), out_dir / ANNOTATIONS)

    table = pd.crosstab(frame["label"], frame["split"])
    table = table[[s for s in SPLIT_ORDER if s in table.columns]]
    table.columns.name = None
    return SplitSummary(path, table, fold_sizes, ood_names, sorted(ood_labels), dropped,
                        sorted(labels_before - set(frame["label"])), seed)


def write_solution(root: str | Path, out: str | Path, split: str = "test") -> int:
    """Write the true names of a split's rows as a Kaggle solution file (`annotation_id,concept_name`), the
    SOLUTION.csv that `taxonomist score` compares a submission with; returns the number of rows.

    >>> split_dataset("data/synth", test=0.15)                      # doctest: +SKIP
    >>> write_solution("data/synth", "solution.csv")                # doctest: +SKIP
    144
    """
    from taxonomist.data.dataset import read_annotations

    root = Path(root)
    source = root / ANNOTATIONS if root.is_dir() else root
    out = Path(out)
    if out.resolve() in {source.resolve(), source.with_name(TAXONOMY).resolve()}:
        raise ConfigError(f"{out}: is the dataset's own {out.name}; give another file for the solution")
    frame = read_annotations(source)
    missing = [c for c in ("annotation_id", "split") if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: a solution file needs the {' and '.join(missing)} column(s) "
                        f"(header: {','.join(frame.columns)})")
    rows = frame[(frame["split"] == split) & (frame["label"] != "")]
    if rows.empty:
        raise DataError(f"{source}: no labelled {split} rows to write a solution from")
    table = pd.DataFrame({"annotation_id": rows["annotation_id"], "concept_name": rows["label"]})
    atomic_write_bytes(out, table.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return len(table)


# --------------------------------------------------------------------------------------------- checks
def _check_args(val, test, folds, classes, min_per_class, max_per_class, seed) -> tuple[float, float]:
    def fraction(name, x):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x < 1:
            raise ConfigError(f"--{name} {x!r}: expected a fraction in [0, 1)")
        return float(x)

    def count(name, x, lo=0):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < lo:
            raise ConfigError(f"--{name} {x!r}: expected an integer >= {lo}")

    count("folds", folds)
    if folds == 1:
        raise ConfigError("--folds 1: K-fold needs K >= 2 (0 = no folds)")
    if folds and val:
        raise ConfigError(f"--val {val} does not apply with --folds {folds}: the held-out fold is the validation set")
    val = fraction("val", DEFAULT_VAL if val is None and not folds else (val or 0.0))
    test = fraction("test", test)
    if val + test >= 1:
        raise ConfigError(f"--val {val} + --test {test} leave nothing to train on")
    for name, x in (("classes", classes), ("min-per-class", min_per_class), ("max-per-class", max_per_class)):
        count(name, x)
    if max_per_class and min_per_class > max_per_class:
        raise ConfigError(f"--min-per-class {min_per_class} is above --max-per-class {max_per_class}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ConfigError(f"--seed {seed!r}: expected an integer in [0, 2^32)")
    return val, test


# --------------------------------------------------------------------------------------------- OOD
def _parse_ood(ood_taxa) -> int | list[str]:
    if isinstance(ood_taxa, (int, np.integer)) and not isinstance(ood_taxa, bool):
        if ood_taxa < 0:
            raise ConfigError(f"--ood-taxa {ood_taxa}: expected a count >= 0 or taxon names")
        return int(ood_taxa)
    if isinstance(ood_taxa, (list, tuple)):
        names = [str(n).strip() for n in ood_taxa if str(n).strip()]
    elif isinstance(ood_taxa, str):
        if ood_taxa.strip().isdigit():
            return int(ood_taxa)
        names = [n.strip() for n in ood_taxa.split(",") if n.strip()]
    else:
        raise ConfigError(f"--ood-taxa {ood_taxa!r}: expected a count or comma-separated taxon names")
    return list(dict.fromkeys(names))


def _choose_ood(tax: Taxonomy, labels: pd.Series, ood_taxa, seed: int, root: Path) -> tuple[list[str], list[str]]:
    """The OOD taxa and the labels they cover, from names or a count chosen by seed."""
    spec = _parse_ood(ood_taxa)
    counts = labels.value_counts()
    present = [lab for lab in tax.labels if lab in counts.index]
    if not spec:
        return [], []
    if isinstance(spec, list):
        tax.check_names(spec, what="--ood-taxa taxon", where=f"the taxonomy of {root}")
        covered: list[str] = []
        for name in spec:
            mine = [lab for lab in [name, *tax.descendants(name)] if lab in counts.index]
            if not mine:
                raise DataError(f"{root}: --ood-taxa {name!r} has no examples in the dataset (after the filters)")
            covered += mine
        covered = list(dict.fromkeys(covered))
        if len(present) - len(covered) < 1:
            raise DataError(f"{root}: --ood-taxa {','.join(spec)} would hold out every label")
        return spec, covered

    n = spec
    if len(present) - n < MIN_TRAIN_LABELS:
        raise DataError(f"{root}: cannot hold out {n} of {len(present)} labels; at least {MIN_TRAIN_LABELS} "
                        "must stay for training")
    from taxonomist.data.explore import top_level_groups
    level = top_level_groups(tax)
    label_pos = {lab: i for i, lab in enumerate(tax.labels)}
    group = {lab: int(level.label_to_node[label_pos[lab]]) if level is not None else -1 for lab in present}
    # a label with another present label below it is a poor "unknown": the model would know its subtree
    anc = tax.ancestor_matrix(rows=present, cols=present)
    np.fill_diagonal(anc, 0)
    has_label_below = anc.any(axis=0)
    rng = np.random.default_rng([seed, _OOD])
    order = rng.permutation(len(present))
    order = np.concatenate([order[~has_label_below[order]], order[has_label_below[order]]])
    left = pd.Series(group).value_counts().to_dict()
    chosen: list[str] = []
    for keep_groups in (True, False):  # second pass only when the groups cannot all be kept
        for i in order:
            lab = present[i]
            if len(chosen) == n:
                break
            if lab in chosen or (keep_groups and group[lab] >= 0 and left[group[lab]] <= 1):
                continue
            chosen.append(lab)
            left[group[lab]] -= 1
    return chosen, chosen


# --------------------------------------------------------------------------------------------- allocation
def _groups(frame: pd.DataFrame) -> np.ndarray:
    """Group id per row: its `image_id` when there is one, else the row itself."""
    n = len(frame)
    if "image_id" not in frame.columns:
        return np.arange(n)
    ids = frame["image_id"].to_numpy(dtype=object)
    own = np.array([f"\0row{i}" for i in range(n)], dtype=object)  # rows without an image_id stand alone
    return pd.factorize(np.where(ids == "", own, ids))[0]


def _allocate(labels: np.ndarray, groups: np.ndarray, val: float, test: float, rng: np.random.Generator) -> np.ndarray:
    """train/val/test per row: whole groups, stratified by each group's most frequent label."""
    out = np.full(len(labels), "train", dtype=object)
    if not len(labels) or (val == 0 and test == 0):
        return out
    lab_code, lab_names = pd.factorize(labels, sort=True)
    grp_code = pd.factorize(groups)[0]
    n_groups = grp_code.max() + 1
    pairs = pd.DataFrame({"g": grp_code, "l": lab_code}).value_counts().reset_index()
    # dominant label: most rows, then the smaller label code (value_counts sorts by count, so sort again)
    pairs = pairs.sort_values(["g", "count", "l"], ascending=[True, False, True], kind="stable")
    dominant = pairs.drop_duplicates("g").set_index("g")["l"].reindex(np.arange(n_groups)).to_numpy()

    shuffle = rng.permutation(n_groups)
    units = pd.DataFrame({"label": dominant, "key": np.argsort(shuffle)})
    units = units.sort_values(["label", "key"])
    rank = units.groupby("label").cumcount().to_numpy()
    size = units.groupby("label")["label"].transform("size").to_numpy()
    n_test = np.floor(size * test + 0.5).astype(int)
    n_val = np.floor(size * val + 0.5).astype(int)
    # keep at least one unit of every label in train: give back val first, then test
    over = np.maximum(n_test + n_val - (size - 1), 0)
    cut = np.minimum(over, n_val)
    n_val -= cut
    n_test -= over - cut
    unit_split = np.full(n_groups, "train", dtype=object)
    unit_split[units.index.to_numpy()] = np.where(rank < n_test, "test",
                                                  np.where(rank < n_test + n_val, "val", "train"))
    out = unit_split[grp_code]

    # a label that is never a group's dominant one may have landed outside train: bring its smallest group back
    in_train = np.zeros(len(lab_names), dtype=bool)
    in_train[lab_code[out == "train"]] = True
    if not in_train.all():
        group_size = np.bincount(grp_code, minlength=n_groups)
        for code in np.flatnonzero(~in_train):
            candidates = np.unique(grp_code[lab_code == code])
            g = candidates[np.argmin(group_size[candidates])]
            out[grp_code == g] = "train"
    return out


def _folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int, root: Path) -> np.ndarray:
    """Fold per row: stratified by label, grouped (a group never spans two folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DataError(f"{root}: {n_groups} images (groups of image_id) outside test/ood, fewer than --folds {k}")
    fold = np.full(len(labels), -1, dtype=np.int64)
    # the grouped splitter loops over groups in Python; rows that are their own group need no grouping
    # (24k PlanktonSet rows: 7 s grouped, well under 1 s plain)
    if n_groups == len(labels):
        splitter, extra = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed), {}
        if np.unique(labels, return_counts=True)[1].max() < k:
            raise DataError(f"{root}: every label has fewer than {k} examples outside test/ood; lower --folds")
    else:
        splitter, extra = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), {"groups": groups}
    with warnings.catch_warnings():
        # labels rarer than K simply miss some folds; sklearn warns about it on every call
        warnings.simplefilter("ignore", UserWarning)
        for i, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, **extra)):
            fold[held] = i
    return fold


def _rebase(paths: pd.Series, root: Path, out_dir: Path) -> pd.Series:
    """Relative paths re-expressed from `out_dir`, so the new dataset reaches the same files."""
    # physical paths: the OS resolves `..` after symlinks, so a lexical relpath could point elsewhere
    start = os.path.realpath(out_dir)
    base = os.path.realpath(root)

    def one(p: str) -> str:
        if not p or os.path.isabs(p):
            return p
        full = os.path.join(base, p)
        physical = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        return Path(os.path.relpath(physical, start)).as_posix()
    return paths.map(one)


# ------------------------------------------------------------------------------------------- reading splits
def split_rows(dataset: Dataset, cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and validation rows of `dataset` as `train` reads them (calibration and evaluation rebuild
    them the same way): the `split` column, a `fold` column with data.fold, or a seeded stratified split of
    the labelled rows (data.val_fraction, train.seed)."""
    frame = dataset.annotations
    frame = frame[frame["label"] != ""]
    fold = cfg.data.fold
    if fold < 0 and "fold" in frame.columns and not ("split" in frame.columns and (frame["split"] == "val").any()):
        # a K-fold dataset has no val rows: validate on its first fold unless told otherwise
        values = sorted({int(v) for v in frame["fold"] if v not in ("", "-1")})
        if values:
            fold = values[0]
            warnings.warn(f"{dataset.root}: no val rows; validating on fold {fold} (set data.fold, or train "
                          "every fold with --kfold)", stacklevel=2)
    if fold >= 0:
        cfg = copy.deepcopy(cfg)
        cfg.data.fold = fold
        if "fold" not in frame.columns:
            raise DataError(f"{dataset.root}: data.fold={cfg.data.fold} but annotations.csv has no 'fold' column; "
                            "run `taxonomist data split --folds K`")
        in_folds = frame[frame["fold"] != ""]
        if "split" in frame.columns:
            in_folds = in_folds[in_folds["split"].isin(["train", "val", ""])]
        val = in_folds[in_folds["fold"] == str(cfg.data.fold)]
        if val.empty:
            raise DataError(f"{dataset.root}: fold {cfg.data.fold} has no rows")
        return in_folds[in_folds["fold"] != str(cfg.data.fold)], val
    if "split" in frame.columns and (frame["split"] == "train").any():
        train, val = frame[frame["split"] == "train"], frame[frame["split"] == "val"]
        if val.empty:
            raise DataError(f"{dataset.root}: annotations.csv has a split column but no 'val' rows")
        return train, val
    rng = np.random.default_rng(cfg.train.seed)
    val_idx = []
    for _, group in frame.groupby("label", sort=True):
        n_val = int(round(len(group) * cfg.data.val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val_idx.extend(rng.choice(group.index.to_numpy(), size=n_val, replace=False).tolist())
    val = frame.loc[sorted(val_idx)]
    return frame.drop(index=val_idx), val


def trainable_labels(dataset: Dataset) -> set[str]:
    """Labels of the rows that training may see (every split but `test` and `ood`)."""
    frame = dataset.annotations
    frame = frame[frame["label"] != ""]
    if "split" in frame.columns:
        frame = frame[~frame["split"].isin(["test", "ood"])]
    return set(frame["label"])


__all__ = ["SplitSummary", "split_dataset", "split_rows", "trainable_labels", "SPLIT_ORDER"]
