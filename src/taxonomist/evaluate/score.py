"""Score a Kaggle-style submission (`annotation_id,concept_name`) against a solution file.

Validation collects every problem (missing column, duplicate/missing/extra ids, unknown names) and
raises them together, one line each, so a user fixes the file in one pass.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxonomist.errors import SubmissionError, TaxonomyError
from taxonomist.taxonomy import FATHOMNET_MAX_DISTANCE, Taxonomy, distance_matrix, suggest

COLUMNS = ("annotation_id", "concept_name")
MAX_LISTED = 5


@dataclass
class ScoreResult:
    """Mean distance of a submission, and the distance of every annotation (solution order)."""

    mean_distance: float
    n: int
    distances: np.ndarray          # one per annotation, in solution order
    ids: list[str]
    unknown_predictions: int = 0   # names outside the accepted labels, scored the maximum when allowed


@dataclass
class SubmissionTable:
    """An `annotation_id,concept_name` file as read: ids and names with their line numbers, and problems."""

    ids: list[str]
    names: list[str]
    lines: list[int]
    problems: list[str]


def read_submission(path: str | Path, what: str = "submission") -> SubmissionTable:
    """Read an `annotation_id,concept_name` CSV, collecting row problems instead of stopping at the first.

    A file that cannot be read as such a table at all (missing, not UTF-8, empty, no such column) raises
    `SubmissionError` at once. Empty and duplicate ids are listed in `problems`; the first occurrence of
    a duplicate is kept.

    >>> table = read_submission("submission.csv")          # doctest: +SKIP
    >>> table.ids[:2], table.names[:2]                       # doctest: +SKIP
    (['1', '2'], ['Sebastes', 'Funiculina'])
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError([f"{path}: {what} file not found" if not path.exists()
                               else f"{path}: is not a file, expected the {what} CSV"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SubmissionError([f"{path}: {what} is not UTF-8 text (invalid byte at line {line})"]) from None
    if not text.strip():
        raise SubmissionError([f"{path}: {what} is an empty file; expected the header "
                               f"{','.join(COLUMNS)}"])
    reader = csv.DictReader(io.StringIO(text))
    try:
        return _read_rows(reader, path, what)
    except csv.Error as e:  # a cell over the csv module's 128 KiB field limit, a NUL byte, …
        raise SubmissionError([f"{path}: row {reader.line_num + 1}: malformed {what} CSV ({e})"]) from None


def _read_rows(reader: csv.DictReader, path: Path, what: str) -> SubmissionTable:
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise SubmissionError([f"{path}: {what} has no column {c!r}{suggest(c, header)} "
                               f"(header: {','.join(header)})" for c in missing])
    reader.fieldnames = header
    table = SubmissionTable([], [], [], [])
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if None in row:
            table.problems.append(f"{path}: row {line}: more cells than the header has columns")
            continue
        aid = (row["annotation_id"] or "").strip()
        name = (row["concept_name"] or "").strip()
        if not aid:
            table.problems.append(f"{path}: row {line}: empty annotation_id")
            continue
        if aid in seen:
            table.problems.append(f"{path}: row {line}: duplicate annotation_id {aid} (first at row {seen[aid]})")
            continue
        seen[aid] = line
        table.ids.append(aid)
        table.names.append(name)
        table.lines.append(line)
    return table


def _listed(items: list[str]) -> str:
    more = f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def max_label_distance(taxonomy: Taxonomy, metric: str, chunk: int = 1024) -> float:
    """The largest distance between two labels, in row blocks so that memory stays O(chunk × labels).

    >>> tax = Taxonomy.from_parents({"A": None, "B": "A", "C": "A", "D": "B"}, labels=["C", "D"])
    >>> max_label_distance(tax, "lca")
    3.0
    """
    labels = list(taxonomy.labels)
    return max(float(distance_matrix(taxonomy, metric, labels[i:i + chunk], labels).max())
               for i in range(0, len(labels), chunk))


def score_submission(solution: str | Path, submission: str | Path, taxonomy: Taxonomy, metric: str = "fathomnet2025",
                     allow_unknown: bool = False) -> ScoreResult:
    """Mean taxonomic distance of `submission` against `solution`, both `annotation_id,concept_name`.

    The accepted names are the taxonomy's labels (the 79 for `fathomnet2025`). With `allow_unknown`, a
    predicted name outside them scores the maximum distance (12 for FathomNet, the largest label
    distance otherwise), as Kaggle does; without it, it is an error. Every problem of both files is
    raised together in one `SubmissionError`.

    >>> from taxonomist.taxonomy import builtin_taxonomy
    >>> res = score_submission("solution.csv", "submission.csv", builtin_taxonomy())   # doctest: +SKIP
    >>> res.mean_distance, res.n                                                        # doctest: +SKIP
    (3.75, 4)
    """
    if not isinstance(taxonomy, Taxonomy):
        raise TaxonomyError(f"taxonomy must be a Taxonomy (see read_taxonomy), got {type(taxonomy).__name__}")
    sol = read_submission(solution, "solution")
    sub = read_submission(submission, "submission")
    problems = sol.problems + sub.problems
    if not sol.ids and not sol.problems:
        problems.append(f"{solution}: solution has no rows below the header")
    labels = set(taxonomy.labels)
    bad_truth = [f"row {ln}: {n!r}{suggest(n, labels)}" for ln, n in zip(sol.lines, sol.names) if n not in labels]
    if bad_truth:
        problems.append(f"{solution}: {len(bad_truth)} concept_name(s) are not accepted labels: {_listed(bad_truth)}")
    sol_set, sub_set = set(sol.ids), set(sub.ids)
    missing = [i for i in sol.ids if i not in sub_set]
    extra = [i for i in sub.ids if i not in sol_set]
    if missing:
        problems.append(f"{submission}: {len(missing)} annotation_id(s) of the solution are missing: {_listed(missing)}")
    if extra:
        problems.append(f"{submission}: {len(extra)} annotation_id(s) are not in the solution: {_listed(extra)}")
    unknown = [f"row {ln}: {n!r}{suggest(n, labels)}" for ln, n in zip(sub.lines, sub.names) if n not in labels]
    if unknown and not allow_unknown:
        problems.append(f"{submission}: {len(unknown)} concept_name(s) are not accepted labels: {_listed(unknown)}")
    if len(bad_truth) > len(sol.ids) // 2 or (not allow_unknown and len(unknown) > len(sub.ids) // 2):
        # most names unknown (not a typo here and there): the taxonomy is the wrong one
        problems.append(f"{solution}: the names are not those of this taxonomy ({len(labels)} labels, e.g. "
                        f"{_listed(sorted(labels)[:3])}); score them with the taxonomy they come from: "
                        "--taxonomy TAXONOMY_CSV, e.g. the dataset's taxonomy.csv (the default is fathomnet2025)")
    if problems:
        raise SubmissionError(problems)

    pred_of = dict(zip(sub.ids, sub.names))
    p_names = [pred_of[i] for i in sol.ids]
    known = np.array([n in labels for n in p_names], dtype=bool)
    # distances only between the names that occur, so a taxonomy with 10k labels needs no 10k × 10k matrix
    truths = list(dict.fromkeys(sol.names))
    preds = list(dict.fromkeys(n for n, k in zip(p_names, known) if k)) or truths[:1]
    D = distance_matrix(taxonomy, metric, truths, preds)
    worst = FATHOMNET_MAX_DISTANCE if metric == "fathomnet2025" else 0.0
    if metric != "fathomnet2025" and not known.all():
        worst = max_label_distance(taxonomy, metric)
    t_pos = {n: i for i, n in enumerate(truths)}
    p_pos = {n: i for i, n in enumerate(preds)}
    t = np.array([t_pos[n] for n in sol.names], dtype=np.int64)
    p = np.array([p_pos.get(n, 0) for n in p_names], dtype=np.int64)
    dist = np.where(known, D[t, p], worst)
    return ScoreResult(float(dist.mean()), len(dist), dist, list(sol.ids), int((~known).sum()))
