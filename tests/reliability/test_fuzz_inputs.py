"""Malformed user files, generated with hypothesis: annotations.csv, taxonomy.csv, COCO JSON, YAML configs and
Kaggle submissions, each broken in one known way (missing/extra/repeated columns, wrong types, NaN/inf,
duplicate ids, unknown labels, cycles and conflicting parents, non-UTF-8, empty files, huge fields).

Every case must be refused by the CLI (run in-process) with one `error:` line that names the file and the row
or field, exit status 2, no traceback, and no output written. `derandomize=True` makes the examples the same on
every run; `max_examples` keeps the whole module to a few seconds per hundred cases.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxonomist.config import Config
from taxonomist.taxonomy import builtin_taxonomy

from .conftest import LABELS, TAXONOMY_CSV, assert_refused, files_under, run_cli, run_subprocess

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
#: examples per way of breaking a file (each kind below is a pytest parameter): 277 cases in all
N_ANNOTATIONS, N_TAXONOMY, N_COCO, N_YAML, N_SUBMISSION = 5, 4, 4, 5, 4

# text a user might type into a cell: letters, digits, spaces, punctuation, accents, CJK; no line breaks
CELL = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=24)
BAD_BYTES = st.sampled_from([b"\xff", b"\xfe\xff", b"\xe9", b"\xc3\x28", b"\x80abc", b"\xed\xa0\x80"])
HUGE = st.integers(140_000, 600_000)


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _with_bad_byte(data: bytes, bad: bytes, where: int) -> bytes:
    """`data` with `bad` inserted in a data row (after the header line)."""
    start = data.index(b"\n") + 1
    pos = start + where % max(1, len(data) - start - 1)
    return data[:pos] + bad + data[pos:]


#: (file kind, way of breaking it) → examples run; written to $TAXONOMIST_FUZZ_COUNTS (JSON) for the docs
TRIED: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    target = os.environ.get("TAXONOMIST_FUZZ_COUNTS")
    if target:
        Path(target).write_text(json.dumps({f"{a}/{b}": n for (a, b), n in sorted(TRIED.items())}, indent=1))


def _workdir(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


# ------------------------------------------------------------------------------------------ annotations.csv
ANNOTATION_KINDS = ["drop_column", "rename_column", "empty", "header_only", "non_utf8", "unknown_label",
                    "bad_number", "negative_size", "bad_split", "bad_fold", "huge_field", "extra_cells",
                    "unterminated_quote", "repeated_column", "empty_path"]


@st.composite
def broken_annotations(draw, kind: str) -> tuple[bytes, list[str]]:
    """(annotations.csv bytes, fragments the error must contain) for one way of breaking a valid table."""
    n = draw(st.integers(1, 6))
    header = ["path", "label", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "split", "fold"]
    rows = [[f"images/{k}.png", draw(st.sampled_from(LABELS)), "1", "2", "10", "12",
             draw(st.sampled_from(["train", "val", "test", ""])), str(k % 3)] for k in range(n)]
    i = draw(st.integers(0, n - 1))
    row_no = f"row {i + 2}"
    TRIED["annotations", kind] += 1
    if kind in ("drop_column", "rename_column"):
        col = draw(st.sampled_from(["path", "label"]))
        j = header.index(col)
        if kind == "drop_column":
            header, rows = header[:j] + header[j + 1:], [r[:j] + r[j + 1:] for r in rows]
        else:
            header = header[:j] + [draw(st.sampled_from([col.upper(), col + "s", col[:-1], " " + col + "_"]))] + \
                header[j + 1:]
        return _csv(header, rows), [f"no {col!r} column"]
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\n", b"\xef\xbb\xbf"])), ["empty file"]
    if kind == "header_only":
        return _csv(header, []), ["no rows below the header"]
    if kind == "non_utf8":
        return _with_bad_byte(_csv(header, rows), draw(BAD_BYTES), draw(st.integers(0, 10_000))), ["not UTF-8"]
    if kind == "unknown_label":
        rows[i][1] = draw(CELL.filter(lambda t: t.strip() and t.strip() not in LABELS))
        return _csv(header, rows), [row_no, "is not in the taxonomy"]
    if kind == "bad_number":
        col = draw(st.integers(2, 5))
        rows[i][col] = draw(st.sampled_from(["nan", "NaN", "inf", "-inf", "abc", "1,5", "1e999", "0x10", "--1"]))
        return _csv(header, rows), [row_no, header[col]]
    if kind == "negative_size":
        col = draw(st.sampled_from([4, 5]))
        rows[i][col] = str(-draw(st.integers(1, 10_000)))
        return _csv(header, rows), [row_no, header[col], "negative"]
    if kind == "bad_split":
        rows[i][6] = draw(CELL.filter(lambda t: t.strip() not in ("train", "val", "test", "ood", "")))
        return _csv(header, rows), [row_no, "unknown split"]
    if kind == "bad_fold":
        rows[i][7] = draw(st.sampled_from(["1.5", "x", "one", "2a", "nan"]))
        return _csv(header, rows), [row_no, "fold"]
    if kind == "huge_field":
        rows[i][1] = "Sebastes " * (draw(HUGE) // 9)
        return _csv(header, rows), [row_no, "is not in the taxonomy"]
    if kind == "extra_cells":
        if draw(st.booleans()):   # every row one cell longer: pandas alone would shift the columns silently
            return _csv(header, [r + ["extra"] for r in rows]), ["row 2", "more cells than the header"]
        rows[i] = rows[i] + ["x", "y"]
        # the first row sets pandas' field count; a later long row is a tokenizer error naming its line
        return _csv(header, rows), ["row 2", "more cells than the header"] if i == 0 else \
            ["malformed CSV", f"line {i + 2}"]
    if kind == "unterminated_quote":
        data = _csv(header, rows) + b'"images/x.png,' + LABELS[0].encode() + b"\n"
        return data, ["malformed CSV"]
    if kind == "repeated_column":
        col = draw(st.sampled_from(header))
        return _csv(header + [col], [r + [r[header.index(col)]] for r in rows]), [f"{col!r} appears twice"]
    rows[i][0] = draw(st.sampled_from(["", " ", "\t"]))
    return _csv(header, rows), [row_no, "empty path"]


@pytest.mark.parametrize("kind", ANNOTATION_KINDS)
@settings(FUZZ, max_examples=N_ANNOTATIONS)
@given(data=st.data(), command=st.sampled_from(["explore", "split"]))
def test_broken_annotations_are_refused(kind, data, command, tmp_path, capsys):
    case = data.draw(broken_annotations(kind))
    data, fragments = case
    work = _workdir(tmp_path)
    root = work / "dataset"
    root.mkdir()
    (root / "annotations.csv").write_bytes(data)
    (root / "taxonomy.csv").write_text(TAXONOMY_CSV, encoding="utf-8")
    before = files_under(root)
    argv = ["data", "explore", root, "--out", work / "explore"] if command == "explore" else \
        ["data", "split", root, "--val", "0.3", "--seed", "1"]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, root / "annotations.csv", *fragments)
    assert not (work / "explore").exists()
    assert files_under(root) == before          # `data split` rewrites annotations.csv only on success


# ------------------------------------------------------------------------------------------- taxonomy.csv
TAXONOMY_KINDS = ["cycle", "own_parent", "two_parents", "duplicate_name", "unknown_parent", "empty_name",
                  "no_name_column", "unknown_column", "non_utf8", "empty", "huge_field", "extra_cells"]


@st.composite
def broken_taxonomy(draw, kind: str) -> tuple[bytes, list[str]]:
    names = draw(st.lists(st.text("abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=10), min_size=3, max_size=7,
                          unique=True))
    TRIED["taxonomy", kind] += 1
    parents = [[names[0], ""]] + [[n, draw(st.sampled_from(names[:k]))] for k, n in enumerate(names[1:], 1)]
    if kind == "cycle":
        k = draw(st.integers(2, len(names)))
        ring = names[-k:]
        rows = [r for r in parents if r[0] not in ring] + [[a, b] for a, b in zip(ring, ring[1:] + ring[:1])]
        return _csv(["concept_name", "parent"], rows), ["cycle"]
    if kind == "own_parent":
        j = draw(st.integers(0, len(names) - 1))
        parents[j][1] = parents[j][0]
        return _csv(["concept_name", "parent"], parents), [f"row {j + 2}", "its own parent"]
    if kind == "two_parents":
        # a rank table where one genus sits under two families
        fams = ["Sebastidae", "Octopodidae"]
        rows = [["Animalia", "Animalia", "", "", "", "", "", ""],
                [f"{names[0].title()} {names[1]}", "Animalia", "Chordata", "C", "O", fams[0], names[0].title(),
                 f"{names[0].title()} {names[1]}"],
                [f"{names[0].title()} {names[2]}", "Animalia", "Chordata", "C", "O", fams[1], names[0].title(),
                 f"{names[0].title()} {names[2]}"]]
        return _csv(["concept_name", "kingdom", "phylum", "class", "order", "family", "genus", "species"],
                    rows), ["row 4", "two different parents"]
    if kind == "duplicate_name":
        j = draw(st.integers(1, len(names) - 1))
        rows = parents + [[names[j], names[0]]]
        return _csv(["concept_name", "parent"], rows), [f"row {len(rows) + 1}", "duplicate concept_name"]
    if kind == "unknown_parent":
        j = draw(st.integers(1, len(names) - 1))
        parents[j][1] = names[j] + "_missing"
        return _csv(["concept_name", "parent"], parents), [f"row {j + 2}", "is not a concept_name"]
    if kind == "empty_name":
        j = draw(st.integers(0, len(names) - 1))
        parents[j][0] = ""
        return _csv(["concept_name", "parent"], parents), [f"row {j + 2}", "empty concept_name"]
    if kind == "no_name_column":
        return _csv([draw(st.sampled_from(["name", "Concept_Name", "concept"])), "parent"], parents), \
            ["no 'concept_name' column"]
    if kind == "unknown_column":
        extra = draw(st.sampled_from(["genera", "Kingdom", "rank_x", "notes"]))
        return _csv(["concept_name", "parent", extra], [r + [""] for r in parents]), [f"unknown column {extra!r}"]
    if kind == "non_utf8":
        return _with_bad_byte(_csv(["concept_name", "parent"], parents), draw(BAD_BYTES),
                              draw(st.integers(0, 1000))), ["not UTF-8"]
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n\n", b"  "])), ["empty file"]
    if kind == "huge_field":
        j = draw(st.integers(0, len(names) - 1))
        parents[j][0] = names[j] * (draw(HUGE) // len(names[j]))
        return _csv(["concept_name", "parent"], parents), [f"row {j + 2}", "malformed CSV"]
    j = draw(st.integers(0, len(names) - 1))
    parents[j] = parents[j] + ["surplus"]
    return _csv(["concept_name", "parent"], parents), [f"row {j + 2}", "more cells than the header"]


@pytest.mark.parametrize("kind", TAXONOMY_KINDS)
@settings(FUZZ, max_examples=N_TAXONOMY)
@given(data=st.data(), through_dataset=st.booleans())
def test_broken_taxonomies_are_refused(kind, data, through_dataset, tmp_path, capsys):
    case = data.draw(broken_taxonomy(kind))
    data, fragments = case
    work = _workdir(tmp_path)
    if through_dataset:   # the dataset reader (explore, split, train) reads taxonomy.csv the same way
        root = work / "dataset"
        root.mkdir()
        (root / "annotations.csv").write_text("path,label\nimages/a.png,Animalia\n", encoding="utf-8")
        taxonomy = root / "taxonomy.csv"
        argv = ["data", "explore", root, "--out", work / "out"]
    else:
        taxonomy = work / "taxonomy.csv"
        argv = ["taxonomy", "distances", taxonomy, "--metric", "lca", "--out", work / "out" / "matrix.csv"]
    taxonomy.write_bytes(data)
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, taxonomy, *fragments)
    assert not (work / "out").exists()


# ---------------------------------------------------------------------------------------------- COCO JSON
COCO_KINDS = ["missing_key", "wrong_container", "image_without_id", "duplicate_image_id",
              "duplicate_annotation_id", "bad_bbox", "unknown_category", "unknown_image",
              "category_without_name", "duplicate_category", "file_name_not_text", "not_object", "truncated",
              "empty", "non_utf8"]


@st.composite
def broken_coco(draw, kind: str) -> tuple[bytes, list[str]]:
    n_img, n_ann = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    coco = {"images": [{"id": k + 1, "file_name": f"f{k}.png", "width": 64, "height": 48,
                        "coco_url": f"http://127.0.0.1:9/f{k}.png"} for k in range(n_img)],
            "annotations": [{"id": 100 + k, "image_id": 1 + k % n_img, "category_id": 1 + k % 2,
                             "bbox": [1, 2, 20, 10]} for k in range(n_ann)],
            "categories": [{"id": 1, "name": "Sebastes"}, {"id": 2, "name": "Octopus rubescens"}]}
    i, a = draw(st.integers(0, n_img - 1)), draw(st.integers(0, n_ann - 1))
    TRIED["coco", kind] += 1
    where: list[str] = []
    if kind == "missing_key":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        del coco[key]
        where = [key]
    elif kind == "wrong_container":
        key = draw(st.sampled_from(["images", "annotations", "categories"]))
        coco[key] = draw(st.sampled_from([{}, "x", 3, None]))
        where = [key]
    elif kind == "image_without_id":
        coco["images"][i]["id"] = draw(st.sampled_from([None, 1.5, [1], {"a": 1}, True]))
        where = [f"images[{i}]"]
    elif kind == "duplicate_image_id":
        coco["images"].append(dict(coco["images"][i], file_name="other.png"))
        where = [f"images[{n_img}]", "duplicate image id"]
    elif kind == "duplicate_annotation_id":
        coco["annotations"].append(dict(coco["annotations"][a]))
        where = [f"annotations[{n_ann}]", "duplicate annotation id"]
    elif kind == "bad_bbox":
        coco["annotations"][a]["bbox"] = draw(st.sampled_from([
            "1,2,3,4", [1, 2], [1, 2, 3, 4, 5], [float("nan"), 1, 2, 3], [1, float("inf"), 2, 3], [True, 1, 2, 3],
            None, {"x": 1}, ["1", "2", "3", "4"]]))
        where = [f"annotations[{a}]", "bbox"]
    elif kind == "unknown_category":
        coco["annotations"][a]["category_id"] = draw(st.integers(3, 10**6))
        where = [f"annotations[{a}]", "category_id"]
    elif kind == "unknown_image":
        coco["annotations"][a]["image_id"] = draw(st.integers(n_img + 1, 10**6))
        where = [f"annotations[{a}]", "image_id"]
    elif kind == "category_without_name":
        j = draw(st.integers(0, 1))
        coco["categories"][j].pop(draw(st.sampled_from(["name", "id"])))
        where = [f"categories[{j}]"]
    elif kind == "duplicate_category":
        coco["categories"].append({"id": 2, "name": draw(CELL)})
        where = ["categories[2]", "duplicate category id"]
    elif kind == "file_name_not_text":
        coco["images"][i]["file_name"] = draw(st.sampled_from([None, 5, ["a.png"], ""]))
        where = [f"images[{i}]", "file_name"]
    elif kind == "not_object":
        return json.dumps(draw(st.sampled_from([[coco], "coco", 3, None]))).encode(), ["expected a JSON object"]
    elif kind == "truncated":
        text = json.dumps(coco)
        return text[:draw(st.integers(0, len(text) - 1))].encode(), ["not valid JSON"]
    elif kind == "empty":
        return draw(st.sampled_from([b"", b"  \n"])), ["not valid JSON"]
    else:
        return json.dumps(coco, ensure_ascii=False).replace("Sebastes", "S\xe9bastes").encode("latin-1"), \
            ["not UTF-8"]
    return json.dumps(coco).encode(), where


@pytest.mark.parametrize("kind", COCO_KINDS)
@settings(FUZZ, max_examples=N_COCO)
@given(data=st.data(), command=st.sampled_from(["prepare", "download"]))
def test_broken_coco_files_are_refused(kind, data, command, tmp_path, capsys):
    case = data.draw(broken_coco(kind))
    data, fragments = case
    work = _workdir(tmp_path)
    coco = work / "dataset.json"
    coco.write_bytes(data)
    (work / "images").mkdir()
    argv = ["data", "prepare", coco, work / "images", work / "out"] if command == "prepare" else \
        ["data", "download", coco, work / "out", "--retries", "0"]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, coco, *fragments)
    assert not (work / "out").exists()


# -------------------------------------------------------------------------------------------- YAML config
def _typed_keys() -> dict[type, list[str]]:
    """Dotted config keys by type (int, float, bool), read from the Config dataclasses."""
    out: dict[type, list[str]] = {int: [], float: [], bool: []}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, prefix + f.name + ".")
            elif hint in out:
                out[hint].append(prefix + f.name)
    walk(Config, "")
    return out


TYPED = _typed_keys()
ALL_KEYS = [k for keys in TYPED.values() for k in keys]
WORDS = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12)


def _nested(key: str, value: str) -> str:
    section, name = key.rsplit(".", 1)
    lines, indent = [], ""
    for part in section.split("."):
        lines.append(f"{indent}{part}:")
        indent += "  "
    return "\n".join(lines) + f"\n{indent}{name}: {value}\n"


CONFIG_KINDS = ["unknown_key", "int_field", "float_field", "bool_field", "section_scalar", "not_mapping",
                "syntax", "duplicate_key", "non_utf8", "python_tag"]


@st.composite
def broken_config(draw, kind: str) -> tuple[bytes, list[str]]:
    TRIED["config", kind] += 1
    if kind == "unknown_key":
        key = draw(st.sampled_from(ALL_KEYS))
        section, name = key.rsplit(".", 1)
        typo = draw(st.sampled_from([name + "s", name[:-1], name.upper(), "x" + name, name.replace("_", "-")]))
        if typo == name:
            typo += "z"
        return _nested(f"{section}.{typo}", "1").encode(), [f"{section}.{typo}"]
    if kind == "int_field":
        key = draw(st.sampled_from(TYPED[int]))
        value = draw(st.one_of(WORDS, st.sampled_from(["1.5", "[1, 2]", "{a: 1}", "true", "null", "3 apples"])))
        return _nested(key, value).encode(), [key]
    if kind == "float_field":
        key = draw(st.sampled_from(TYPED[float]))
        value = draw(st.one_of(WORDS, st.sampled_from([".nan", ".inf", "-.inf", "nan", "[0.1]", "true", "1e999"])))
        return _nested(key, value).encode(), [key]
    if kind == "bool_field":
        key = draw(st.sampled_from(TYPED[bool]))
        value = draw(st.one_of(WORDS.filter(lambda w: w not in ("true", "false", "yes", "no", "on", "off")),
                               st.sampled_from(["2", "-1", "0.5", "[true]"])))
        return _nested(key, value).encode(), [key]
    if kind == "section_scalar":
        section = draw(st.sampled_from(["data", "model", "loss", "train", "augment", "decide"]))
        return f"{section}: {draw(st.sampled_from(['5', 'abc', '[1, 2]']))}\n".encode(), [f"'{section}'"]
    if kind == "not_mapping":
        return draw(st.sampled_from([b"- a\n- b\n", b"3\n", b"just text\n"])), ["expected a mapping"]
    if kind == "syntax":
        return draw(st.sampled_from([b"train: {epochs: 3\n", b"train:\n  epochs: [1\n", b"train:\n\tepochs: 3\n",
                                     b"a: b: c\n", b"train:\n  lr: 1\n lr: 2\n"])), ["not valid YAML"]
    if kind == "duplicate_key":
        key = draw(st.sampled_from(TYPED[int]))
        return (_nested(key, "1") + _nested(key, "2")).encode(), ["appears twice"]
    if kind == "non_utf8":
        return _nested("model.backbone", "caf\xe9").encode("latin-1"), ["not UTF-8"]
    return b"!!python/object/apply:os.system ['echo pwned']\n", ["not valid YAML"]


@pytest.mark.parametrize("kind", CONFIG_KINDS)
@settings(FUZZ, max_examples=N_YAML)
@given(data=st.data())
def test_broken_configs_are_refused(kind, data, tmp_path, capsys):
    case = data.draw(broken_config(kind))
    data, fragments = case
    work = _workdir(tmp_path)
    config = work / "config.yaml"
    config.write_bytes(data)
    # data.root does not exist: a config that slipped through fails there, without the file's name
    code, _, err = run_cli(["train", "--config", config, "--set", f"out={work / 'run'}",
                            "--set", f"data.root={work / 'no-data'}"], capsys)
    assert_refused(code, err, config, *fragments)
    assert not (work / "run").exists()


# -------------------------------------------------------------------------------------- Kaggle submission
FATHOMNET = list(builtin_taxonomy().labels)


SUBMISSION_KINDS = ["missing_column", "duplicate_id", "unknown_name", "nan_name", "empty_id", "missing_id",
                    "extra_id", "empty", "non_utf8", "huge_field", "extra_cells"]


@st.composite
def broken_submission(draw, kind: str) -> tuple[bytes, bytes, list[str]]:
    n = draw(st.integers(2, 8))
    ids = [str(i) for i in draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))]
    names = [draw(st.sampled_from(FATHOMNET)) for _ in ids]
    solution = _csv(["annotation_id", "concept_name"], [[a, b] for a, b in zip(ids, names)])
    rows = [[a, draw(st.sampled_from(FATHOMNET))] for a in ids]
    i = draw(st.integers(0, n - 1))
    TRIED["submission", kind] += 1
    header = ["annotation_id", "concept_name"]
    if kind == "missing_column":
        j = draw(st.integers(0, 1))
        renamed = draw(st.sampled_from([["id", "annotation", "Annotation_ID"], ["name", "concept", "label"]][j]))
        return solution, _csv([renamed if k == j else h for k, h in enumerate(header)], rows), \
            [f"no column {header[j]!r}"]
    if kind == "duplicate_id":
        rows.insert(i + 1, list(rows[i]))
        return solution, _csv(header, rows), [f"row {i + 3}", "duplicate annotation_id"]
    if kind == "unknown_name":
        rows[i][1] = draw(CELL.filter(lambda t: t.strip() not in FATHOMNET and "," not in t))
        return solution, _csv(header, rows), [f"row {i + 2}", "not accepted"]
    if kind == "nan_name":
        rows[i][1] = draw(st.sampled_from(["NaN", "nan", "", "None", "null"]))
        return solution, _csv(header, rows), [f"row {i + 2}", "not accepted"]
    if kind == "empty_id":
        rows[i][0] = ""
        return solution, _csv(header, rows), [f"row {i + 2}", "empty annotation_id"]
    if kind == "missing_id":
        del rows[i]
        return solution, _csv(header, rows), ["missing", ids[i]]
    if kind == "extra_id":
        rows.append(["999999999", FATHOMNET[0]])
        return solution, _csv(header, rows), ["not in the solution", "999999999"]
    if kind == "empty":
        return solution, draw(st.sampled_from([b"", b"\n", b"  \n"])), ["empty file"]
    if kind == "non_utf8":
        return solution, _with_bad_byte(_csv(header, rows), draw(BAD_BYTES), draw(st.integers(0, 1000))), \
            ["not UTF-8"]
    if kind == "huge_field":
        rows[i][1] = "x" * draw(HUGE)
        return solution, _csv(header, rows), [f"row {i + 2}", "malformed"]
    rows[i] = rows[i] + ["surplus"]
    return solution, _csv(header, rows), [f"row {i + 2}", "more cells than the header"]


@pytest.mark.parametrize("kind", SUBMISSION_KINDS)
@settings(FUZZ, max_examples=N_SUBMISSION)
@given(data=st.data())
def test_broken_submissions_are_refused(kind, data, tmp_path, capsys):
    case = data.draw(broken_submission(kind))
    solution_bytes, data, fragments = case
    work = _workdir(tmp_path)
    solution, submission = work / "solution.csv", work / "submission.csv"
    solution.write_bytes(solution_bytes)
    submission.write_bytes(data)
    code, out, err = run_cli(["score", solution, submission, "--taxonomy", "fathomnet2025"], capsys)
    assert_refused(code, err, submission, *fragments)
    assert out.strip() == ""                 # no score printed for a broken submission
    assert sorted(p.name for p in work.iterdir()) == ["solution.csv", "submission.csv"]


# ----------------------------------------------------------------------------- the same, as real processes
@pytest.mark.parametrize("kind", ["annotations", "taxonomy", "coco", "config", "submission"])
def test_refusals_from_a_real_process(kind, tmp_path):
    """The in-process runs above hold for the installed `taxonomist` command too (one case per file kind)."""
    if kind == "annotations":
        root = tmp_path / "d"
        root.mkdir()
        (root / "annotations.csv").write_text("path,label\nimages/a.png,Sebastes\nimages/b.png,Octopodus\n")
        (root / "taxonomy.csv").write_text(TAXONOMY_CSV)
        argv, names = ["data", "explore", root, "--out", tmp_path / "out"], [root / "annotations.csv", "row 3"]
    elif kind == "taxonomy":
        (tmp_path / "t.csv").write_text("concept_name,parent\na,b\nb,c\nc,a\n")
        argv, names = ["taxonomy", "distances", tmp_path / "t.csv", "--metric", "lca", "--out",
                       tmp_path / "out" / "m.csv"], [tmp_path / "t.csv", "cycle"]
    elif kind == "coco":
        (tmp_path / "c.json").write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
                                         '[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [NaN, 0, 1, 1]}], '
                                         '"categories": [{"id": 1, "name": "Sebastes"}]}')
        argv, names = ["data", "prepare", tmp_path / "c.json", tmp_path, tmp_path / "out"], \
            [tmp_path / "c.json", "annotations[0]", "bbox"]
    elif kind == "config":
        (tmp_path / "c.yaml").write_text("train:\n  epochs: many\n")
        argv, names = ["train", "--config", tmp_path / "c.yaml", "--set", f"out={tmp_path / 'out'}"], \
            [tmp_path / "c.yaml", "train.epochs"]
    else:
        (tmp_path / "s.csv").write_text("annotation_id,concept_name\n1,Sebastes\n")
        (tmp_path / "b.csv").write_bytes(b"annotation_id,concept_name\n1,S\xe9bastes\n")
        argv, names = ["score", tmp_path / "s.csv", tmp_path / "b.csv"], [tmp_path / "b.csv", "not UTF-8"]
    proc = run_subprocess(argv)
    assert proc.returncode == 2
    assert_refused(proc.returncode, proc.stderr, *names)
    assert not (tmp_path / "out").exists()
