"""`taxonomist score`: the mean on the last line; one `error:` line per problem, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from taxonomist.cli.main import main

# the worked examples of the FathomNet 2025 README: distances 0, 2, 4, 7, 5, 4 → mean 22/6
SOLUTION = "annotation_id,concept_name\n1,Sebastolobus\n2,Sebastolobus\n3,Funiculina\n4,Ophiuroidea\n" \
           "5,Actinopterygii\n6,Tunicata\n"
SUBMISSION = "annotation_id,concept_name\n6,Ophiuroidea\n5,Sebastolobus\n4,Funiculina\n3,Umbellula\n2,Sebastes\n" \
             "1,Sebastolobus\n"


@pytest.fixture
def files(tmp_path):
    sol, sub = tmp_path / "solution.csv", tmp_path / "submission.csv"
    sol.write_text(SOLUTION, encoding="utf-8")
    sub.write_text(SUBMISSION, encoding="utf-8")
    return sol, sub


def test_score_prints_the_mean_on_its_last_line(files, capsys):
    sol, sub = files
    assert main(["score", str(sol), str(sub)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "3.6667"
    assert lines[-2] == "annotations: 6  metric: fathomnet2025"
    assert main(["score", str(sol), str(sub), "--taxonomy", "fathomnet2025", "--metric", "fathomnet2025"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3.6667"


def test_score_with_lca_and_a_custom_taxonomy(tmp_path, capsys):
    tax = tmp_path / "taxonomy.csv"
    tax.write_text("concept_name,parent\nLife,\nA,Life\nB,Life\na1,A\na2,A\nb1,B\n", encoding="utf-8")
    sol, sub = tmp_path / "sol.csv", tmp_path / "sub.csv"
    sol.write_text("annotation_id,concept_name\n1,a1\n2,a2\n3,b1\n", encoding="utf-8")
    sub.write_text("annotation_id,concept_name\n1,a2\n2,a2\n3,a1\n", encoding="utf-8")
    assert main(["score", str(sol), str(sub), "--taxonomy", str(tax)]) == 0  # auto → lca: 2, 0, 4
    assert capsys.readouterr().out.strip().splitlines()[-2:] == ["annotations: 3  metric: lca", "2.0000"]


def test_allow_unknown_scores_twelve(files, capsys):
    sol, sub = files
    sub.write_text(SUBMISSION.replace("6,Ophiuroidea", "6,Kraken"), encoding="utf-8")
    assert main(["score", str(sol), str(sub)]) == 2
    assert capsys.readouterr().err == f"error: {sub}: 1 concept_name(s) are not accepted labels: row 2: 'Kraken'\n"
    assert main(["score", str(sol), str(sub), "--allow-unknown"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "1 prediction(s) outside the accepted labels scored the maximum"
    assert out[-1] == f"{(0 + 2 + 4 + 7 + 5 + 12) / 6:.4f}" == "5.0000"


def test_names_of_another_taxonomy_get_a_hint_to_pass_it(tmp_path, capsys):
    """Issue 23: a dataset's own names scored against the default fathomnet2025 listed every row as unknown and
    never said that --taxonomy exists."""
    sol, sub = tmp_path / "solution.csv", tmp_path / "submission.csv"
    sol.write_text("annotation_id,concept_name\n1,Miodorium nira\n2,Glocreiformes\n", encoding="utf-8")
    sub.write_text("annotation_id,concept_name\n1,Miodorium nira\n2,Miodorium nira\n", encoding="utf-8")
    assert main(["score", str(sol), str(sub)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith(f"error: {sol}: 2 concept_name(s) are not accepted labels")
    assert err[-1].startswith(f"error: {sol}: the names are not those of this taxonomy (79 labels, e.g. ")
    assert err[-1].endswith("--taxonomy TAXONOMY_CSV, e.g. the dataset's taxonomy.csv (the default is fathomnet2025)")


@pytest.mark.parametrize("content, messages", [
    ("annotation_id,label\n1,Sebastes\n", ["submission has no column 'concept_name' (header: annotation_id,label)"]),
    ("id,concept_name\n1,Sebastes\n", ["submission has no column 'annotation_id' (header: id,concept_name)"]),
    (SUBMISSION + "6,Sebastes\n", ["row 8: duplicate annotation_id 6 (first at row 2)"]),
    (SUBMISSION.replace("2,Sebastes\n", ""), ["1 annotation_id(s) of the solution are missing: 2"]),
    (SUBMISSION + "7,Sebastes\n8,Sebastes\n", ["2 annotation_id(s) are not in the solution: 7, 8"]),
    (SUBMISSION.replace("3,Umbellula", "3,Umbelula"),
     ["1 concept_name(s) are not accepted labels: row 5: 'Umbelula' (did you mean 'Umbellula'?)"]),
    (SUBMISSION.replace("1,Sebastolobus\n", "") + "9,Zebra\n",
     ["1 annotation_id(s) of the solution are missing: 1", "1 annotation_id(s) are not in the solution: 9",
      "1 concept_name(s) are not accepted labels: row 7: 'Zebra'"]),
    ("", ["submission is an empty file; expected the header annotation_id,concept_name"]),
])
def test_malformed_submission_one_error_line_per_problem(files, capsys, content, messages):
    sol, sub = files
    sub.write_text(content, encoding="utf-8")
    assert main(["score", str(sol), str(sub)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"error: {sub}: {m}" for m in messages]


def test_non_utf8_and_missing_files(files, capsys):
    sol, sub = files
    sub.write_bytes(SUBMISSION.replace("Sebastes", "S\u00e9bastes").encode("latin-1"))
    assert main(["score", str(sol), str(sub)]) == 2
    assert capsys.readouterr().err == f"error: {sub}: submission is not UTF-8 text (invalid byte at line 6)\n"
    assert main(["score", str(sol) + ".missing", str(sub)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {sol}.missing: solution file not found\n")
    assert main(["score", str(sol), str(sol), "--taxonomy", str(sol.parent / "tax.csv")]) == 2
    assert capsys.readouterr().err == f"error: {sol.parent / 'tax.csv'}: taxonomy file not found\n"


def test_the_installed_command_prints_no_traceback(files):
    sol, sub = files
    sub.write_text("annotation_id,concept_name\n1,Sebastes\n1,Sebastes\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "taxonomist.cli.main", "score", str(sol), str(sub)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: {sub}: row 3: duplicate annotation_id 1 (first at row 2)",
                                        f"error: {sub}: 5 annotation_id(s) of the solution are missing: 2, 3, 4, 5, 6"]
