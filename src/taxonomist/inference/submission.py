"""Kaggle submissions (`predict --format kaggle`): one `annotation_id,concept_name` row per input row, validated
before it is written, and the answer for an image that could not be read (`--fill-unreadable`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from taxonomist.errors import DataError, SubmissionError
from taxonomist.inference.images import ImageInput
from taxonomist.taxonomy import Taxonomy, distance_matrix, suggest


def check_kaggle_submission(frame: pd.DataFrame, expected_ids: Sequence[str], candidates: Sequence[str]) -> None:
    """Raise `SubmissionError` listing every problem of an `annotation_id,concept_name` table: other columns,
    an expected id missing or repeated, an id not expected, an empty name or one outside `candidates`."""
    problems: list[str] = []
    if list(frame.columns) != ["annotation_id", "concept_name"]:
        problems.append(f"submission columns are {','.join(map(str, frame.columns))}; "
                        "expected annotation_id,concept_name")
    else:
        ids = frame["annotation_id"].astype(str).to_numpy()
        names = frame["concept_name"].astype(str).to_numpy()
        expected = set(map(str, expected_ids))
        counts = pd.Series(ids).value_counts()
        repeated = counts[counts > 1]
        if len(repeated):
            problems.append(f"annotation_id {repeated.index[0]!r} appears {int(repeated.iloc[0])} times "
                            f"({len(repeated)} repeated ids)")
        missing = sorted(expected - set(ids))
        if missing:
            problems.append(f"{len(missing)} annotation id(s) have no answer, e.g. {missing[0]!r}")
        extra = sorted(set(ids) - expected)
        if extra:
            problems.append(f"{len(extra)} annotation id(s) are not in the input, e.g. {extra[0]!r}")
        allowed = set(candidates)
        bad = [k for k, n in enumerate(names) if n not in allowed]
        if bad:
            k = bad[0]
            problems.append(f"row {k + 2}: concept_name {names[k]!r} (annotation_id {ids[k]!r}) is not in the "
                            f"candidate set of {len(allowed)} names{suggest(names[k], allowed)} "
                            f"({len(bad)} such rows)")
    if problems:
        raise SubmissionError(problems)


def annotation_ids(images: ImageInput) -> np.ndarray:
    if "annotation_id" not in images.rows.columns:
        raise DataError(f"{images.source}: --format kaggle needs an annotation_id column "
                        f"(columns: {','.join(images.rows.columns)}); give a CSV or a prepared dataset that has one")
    ids = images.rows["annotation_id"].astype(str).str.strip().to_numpy()
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise DataError(f"{images.source}: row {empty[0] + 2}: empty annotation_id")
    seen: dict[str, int] = {}
    for k, value in enumerate(ids):
        if value in seen:
            raise DataError(f"{images.source}: row {k + 2}: annotation_id {value!r} repeats row {seen[value] + 2}")
        seen[value] = k
    return ids


def fill_answer(taxonomy: Taxonomy, metric: str, candidates: list[str]) -> str:
    """The candidate with the least mean distance to the labels: min-risk under a uniform label prior."""
    d = distance_matrix(taxonomy, metric, rows=taxonomy.labels, cols=candidates)
    return candidates[int(d.mean(axis=0).argmin())]


__all__ = ["check_kaggle_submission", "annotation_ids", "fill_answer"]
