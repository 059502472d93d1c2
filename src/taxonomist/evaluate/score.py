"""Score a Kaggle-style submission (`annotation_id,concept_name`) against a solution file.

Validation collects every problem (missing column, duplicate/missing/extra ids, unknown names) and
raises them together, so a user fixes the file in one pass.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxonomist.errors import SubmissionError
from taxonomist.taxonomy import FATHOMNET_MAX_DISTANCE, Taxonomy, distance_matrix, suggest

COLUMNS = ("annotation_id", "concept_name")
MAX_LISTED = 5


@dataclass
class ScoreResult:
    mean_distance: float
    n: int
    distances: np.ndarray          # one per annotation, in solution order
    ids: list[str]
    unknown_predictions: int = 0   # names outside the candidate set, scored the maximum when allowed


def read_submission(path: str | Path, what: str) -> tuple[list[str], list[str], list[str]]:
    """ids, names and the problems found reading an `annotation_id,concept_name` CSV."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError([f"{path}: {what} file not found"])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError([f"{path}: {what} is not UTF-8 text"]) from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise SubmissionError([f"{path}: {what} has no column {c!r} (header: {','.join(header) or 'empty'})"
                               for c in missing])
    reader.fieldnames = header
    ids, names, problems = [], [], []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        aid = (row.get("annotation_id") or "").strip()
        name = (row.get("concept_name") or "").strip()
        if not aid:
            problems.append(f"{path}: row {line}: empty annotation_id")
            continue
        if aid in seen:
            problems.append(f"{path}: row {line}: duplicate annotation_id {aid} (first at row {seen[aid]})")
            continue
        seen[aid] = line
        ids.append(aid)
        names.append(name)
    return ids, names, problems


def _listed(items: list[str]) -> str:
    more = f" … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def score_submission(solution: str | Path, submission: str | Path, taxonomy: Taxonomy, metric: str = "fathomnet2025",
                     allow_unknown: bool = False) -> ScoreResult:
    """Mean taxonomic distance of `submission` against `solution`, both `annotation_id,concept_name`.

    The accepted names are the taxonomy's labels (the 79 for `fathomnet2025`). With `allow_unknown`, a
    name outside them scores the maximum distance (12 for FathomNet, the largest label distance
    otherwise), as Kaggle does; without it, it is an error.
    """
    sol_ids, sol_names, problems = read_submission(solution, "solution")
    sub_ids, sub_names, sub_problems = read_submission(submission, "submission")
    problems += sub_problems
    labels = set(taxonomy.labels)
    bad_truth = [f"row {i + 2}: {n!r}{suggest(n, labels)}" for i, n in enumerate(sol_names) if n not in labels]
    if bad_truth:
        problems.append(f"{solution}: unknown concept_name {_listed(bad_truth)}")
    sol_set, sub_set = set(sol_ids), set(sub_ids)
    missing = [i for i in sol_ids if i not in sub_set]
    extra = [i for i in sub_ids if i not in sol_set]
    if missing:
        problems.append(f"{submission}: {len(missing)} annotation_id(s) of the solution are missing: {_listed(missing)}")
    if extra:
        problems.append(f"{submission}: {len(extra)} annotation_id(s) are not in the solution: {_listed(extra)}")
    unknown = [f"row {i + 2}: {n!r}{suggest(n, labels)}" for i, n in enumerate(sub_names) if n not in labels]
    if unknown and not allow_unknown:
        problems.append(f"{submission}: {len(unknown)} concept_name(s) are not accepted labels: {_listed(unknown)}")
    if problems:
        raise SubmissionError(problems)

    label_list = list(taxonomy.labels)
    pos = {n: i for i, n in enumerate(label_list)}
    D = distance_matrix(taxonomy, metric, label_list, label_list)
    worst = FATHOMNET_MAX_DISTANCE if metric == "fathomnet2025" else float(D.max())
    pred_of = dict(zip(sub_ids, sub_names))
    t = np.array([pos[n] for n in sol_names])
    p_names = [pred_of[i] for i in sol_ids]
    known = np.array([n in pos for n in p_names], dtype=bool)
    p = np.array([pos.get(n, 0) for n in p_names])
    dist = np.where(known, D[t, p], worst)
    return ScoreResult(float(dist.mean()) if len(dist) else 0.0, len(dist), dist, sol_ids, int((~known).sum()))
