"""Scoring a Kaggle-style submission: per-annotation distances, the mean, and every validation problem."""
from __future__ import annotations

import numpy as np
import pytest

from taxonomist.errors import SubmissionError, TaxonomyError
from taxonomist.evaluate.score import max_label_distance, read_submission, score_submission
from taxonomist.taxonomy import Taxonomy, builtin_taxonomy

# the worked examples of the FathomNet 2025 README: (truth, prediction, distance)
EXAMPLES = [("Sebastolobus", "Sebastolobus", 0), ("Sebastolobus", "Sebastes", 2), ("Funiculina", "Umbellula", 4),
            ("Ophiuroidea", "Funiculina", 7), ("Actinopterygii", "Sebastolobus", 5), ("Tunicata", "Ophiuroidea", 4)]


def write_csv(path, rows, header="annotation_id,concept_name"):
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows), encoding="utf-8")
    return path


@pytest.fixture
def solution(tmp_path):
    return write_csv(tmp_path / "solution.csv", [(i + 1, t) for i, (t, _, _) in enumerate(EXAMPLES)])


def test_score_of_the_worked_examples(tmp_path, solution):
    # submission rows in another order than the solution: matched by id
    rows = [(i + 1, p) for i, (_, p, _) in enumerate(EXAMPLES)][::-1]
    res = score_submission(solution, write_csv(tmp_path / "sub.csv", rows), builtin_taxonomy())
    assert res.distances.tolist() == [0, 2, 4, 7, 5, 4]
    assert res.ids == ["1", "2", "3", "4", "5", "6"]
    assert res.n == 6 and res.unknown_predictions == 0
    assert res.mean_distance == pytest.approx(22 / 6)


def test_perfect_submission_scores_zero(solution):
    assert score_submission(solution, solution, builtin_taxonomy()).mean_distance == 0.0


def test_unknown_names_score_twelve_when_allowed(tmp_path, solution):
    rows = [(1, "Sebastes"), (2, "Sebastes"), (3, "Umbellula"), (4, "Banana"), (5, "Sebastolobus"), (6, "")]
    sub = write_csv(tmp_path / "sub.csv", rows)
    with pytest.raises(SubmissionError) as info:
        score_submission(solution, sub, builtin_taxonomy())
    assert info.value.problems == [f"{sub}: 2 concept_name(s) are not accepted labels: row 5: 'Banana', row 7: ''"]
    res = score_submission(solution, sub, builtin_taxonomy(), allow_unknown=True)
    assert res.distances.tolist() == [2, 2, 4, 12, 5, 12]
    assert res.unknown_predictions == 2 and res.mean_distance == pytest.approx(37 / 6)


def test_every_problem_is_reported_once_with_its_row(tmp_path, solution):
    sub = write_csv(tmp_path / "sub.csv", [(1, "Sebastes"), (1, "Umbellula"), ("", "Sebastes"), (4, "Sebastolobuss"),
                                           (9, "Porifera"), (10, "Porifera")])
    with pytest.raises(SubmissionError) as info:
        score_submission(solution, sub, builtin_taxonomy())
    assert info.value.problems == [
        f"{sub}: row 3: duplicate annotation_id 1 (first at row 2)",
        f"{sub}: row 4: empty annotation_id",
        f"{sub}: 4 annotation_id(s) of the solution are missing: 2, 3, 5, 6",
        f"{sub}: 2 annotation_id(s) are not in the solution: 9, 10",
        f"{sub}: 1 concept_name(s) are not accepted labels: row 5: 'Sebastolobuss' "
        "(did you mean 'Sebastolobus' or 'Sebastes'?)",
    ]
    assert all("\n" not in p for p in info.value.problems)


def test_long_lists_are_cut(tmp_path, solution):
    sub = write_csv(tmp_path / "sub.csv", [(i, "Sebastes") for i in range(100, 110)])
    with pytest.raises(SubmissionError) as info:
        score_submission(solution, sub, builtin_taxonomy())
    assert f"{sub}: 10 annotation_id(s) are not in the solution: 100, 101, 102, 103, 104 … and 5 more" \
        in info.value.problems


def test_solution_problems_are_reported_too(tmp_path):
    sol = write_csv(tmp_path / "solution.csv", [(1, "Sebastes"), (2, "Sebastez")])
    sub = write_csv(tmp_path / "sub.csv", [(1, "Sebastes"), (2, "Sebastes")])
    with pytest.raises(SubmissionError) as info:
        score_submission(sol, sub, builtin_taxonomy(), allow_unknown=True)  # allowed in submissions only
    assert info.value.problems == [f"{sol}: 1 concept_name(s) are not accepted labels: row 3: 'Sebastez' "
                                   "(did you mean 'Sebastes' or 'Sebastolobus'?)"]
    empty = write_csv(tmp_path / "empty_solution.csv", [])
    with pytest.raises(SubmissionError, match="solution has no rows below the header"):
        score_submission(empty, sub, builtin_taxonomy())


@pytest.mark.parametrize("content, message", [
    (b"", "submission is an empty file; expected the header annotation_id,concept_name"),
    (b"id,concept_name\n1,Sebastes\n", "submission has no column 'annotation_id' (header: id,concept_name)"),
    (b"annotation_id,name\n1,Sebastes\n",
     "submission has no column 'concept_name' (header: annotation_id,name)"),
    ("annotation_id,concept_name\n1,S\u00e9bastes\n".encode("latin-1"),
     "submission is not UTF-8 text (invalid byte at line 2)"),
    (b"annotation_id,concept_name\n1,Sebastes,0.9\n", "row 2: more cells than the header has columns"),
])
def test_unreadable_submissions(tmp_path, solution, content, message):
    sub = tmp_path / "sub.csv"
    sub.write_bytes(content)
    with pytest.raises(SubmissionError) as info:
        score_submission(solution, sub, builtin_taxonomy())
    assert any(p == f"{sub}: {message}" for p in info.value.problems), info.value.problems


def test_missing_files(tmp_path, solution):
    with pytest.raises(SubmissionError, match="nope.csv: submission file not found"):
        score_submission(solution, tmp_path / "nope.csv", builtin_taxonomy())
    with pytest.raises(SubmissionError, match="is not a file, expected the solution CSV"):
        score_submission(tmp_path, solution, builtin_taxonomy())
    with pytest.raises(TaxonomyError, match="taxonomy must be a Taxonomy"):
        score_submission(solution, solution, "fathomnet2025")


def test_read_submission_keeps_lines_and_extra_columns(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("\ufeffannotation_id , concept_name,score\n7, Sebastes ,0.5\n\n8,Tunicata,0.1\n", encoding="utf-8")
    table = read_submission(path)
    assert (table.ids, table.names, table.lines, table.problems) == (["7", "8"], ["Sebastes", "Tunicata"], [2, 4], [])


def test_lca_scoring_with_unknown_names_uses_the_largest_label_distance(tmp_path):
    tax = Taxonomy.from_parents({"Life": None, "A": "Life", "B": "Life", "a1": "A", "a2": "A", "b1": "B"})
    assert max_label_distance(tax, "lca") == 4.0 == max_label_distance(tax, "lca", chunk=1)
    sol = write_csv(tmp_path / "sol.csv", [(1, "a1"), (2, "a2"), (3, "b1")])
    sub = write_csv(tmp_path / "sub.csv", [(1, "a2"), (2, "a2"), (3, "zz")])
    res = score_submission(sol, sub, tax, metric="lca", allow_unknown=True)
    assert res.distances.tolist() == [2.0, 0.0, 4.0]
    np.testing.assert_allclose(res.mean_distance, 2.0)
