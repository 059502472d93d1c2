"""`data prepare`: COCO + frames → ROI and context crops, with exact geometry, skips and taxonomy checks."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data import load_dataset
from taxonomist.data.coco import (clip_boxes, crop_windows, parse_context, prepare_coco, read_coco,
                                  safe_relative_path)
from taxonomist.errors import ConfigError, DataError, UnknownLabelError
from taxonomist.taxonomy import read_taxonomy


def coordinate_frame(width: int, height: int) -> np.ndarray:
    """Pixels that name their own position (R = x, G = y), so a crop shows exactly where it came from."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x % 256, y % 256, (7 * x + 3 * y) % 256], axis=-1).astype(np.uint8)


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def small_coco(tmp_path):
    """Two frames on disk (100×80 and 60×40), one missing; boxes inside, across the border, outside, thin."""
    frames = tmp_path / "frames"
    (frames / "sub").mkdir(parents=True)
    Image.fromarray(coordinate_frame(100, 80)).save(frames / "a.png")
    Image.fromarray(coordinate_frame(60, 40)).save(frames / "sub" / "b.png")
    images = [
        {"id": 7, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 9, "file_name": "sub/b.png", "width": 60, "height": 40},
        {"id": 11, "file_name": "gone.png", "width": 50, "height": 50},
    ]
    annotations = [
        {"id": 501, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 15]},
        {"id": 502, "image_id": 7, "category_id": 2, "bbox": [90, 70, 20, 20]},     # crosses the corner
        {"id": 503, "image_id": 7, "category_id": 1, "bbox": [200, 200, 10, 10]},   # outside
        {"id": 504, "image_id": 7, "category_id": 1, "bbox": [5, 5, 1.5, 30]},      # too thin
        {"id": 505, "image_id": 9, "category_id": None, "bbox": [0, 0, 12, 8]},
        {"id": 506, "image_id": 11, "category_id": 2, "bbox": [1, 1, 10, 10]},      # its frame is missing
        {"id": 507, "image_id": 9, "category_id": 2, "bbox": [20.5, 10.25, 9.5, 9.75]},  # sub-pixel box
    ]
    categories = [{"id": 1, "name": "Sebastes"}, {"id": 2, "name": "Scorpaeniformes"}]
    taxonomy = tmp_path / "tax.csv"
    taxonomy.write_text("concept_name,parent\nAnimalia,\nScorpaeniformes,Animalia\nSebastes,Scorpaeniformes\n")
    return write_coco(tmp_path / "coco.json", images, annotations, categories), frames, taxonomy


def test_parse_context():
    assert parse_context("1,3,full") == ["3", "full"]
    assert parse_context("1, 5, 3.0, 3, FULL") == ["5", "3", "full"]
    assert parse_context("1") == []
    for bad in ("0.5", "x", "", "1,-3", "nan"):
        with pytest.raises(ConfigError, match="context"):
            parse_context(bad)


def test_clip_and_windows_exact():
    boxes = clip_boxes(np.array([[10, 20, 30, 15], [90, 70, 20, 20], [200, 200, 10, 10], [-4, -6, 10, 10]]), 100, 80)
    np.testing.assert_array_equal(boxes, [[10, 20, 30, 15], [90, 70, 10, 10], [100, 80, 0, 0], [0, 0, 6, 4]])
    np.testing.assert_array_equal(crop_windows(boxes[:2], 1, 100, 80), [[10, 20, 40, 35], [90, 70, 100, 80]])
    # 3×: a square of side 3 × 30 = 90 around the centre (25, 27.5), clipped at the top-left corner
    np.testing.assert_array_equal(crop_windows(boxes[:1], 3, 100, 80), [[0, 0, 70, 73]])
    # a box in the middle keeps a full square: side 3 × 4 = 12 around (52, 41)
    np.testing.assert_array_equal(crop_windows(np.array([[50, 40, 4, 2]]), 3, 100, 80), [[46, 35, 58, 47]])
    # sub-pixel boxes take every pixel they touch
    np.testing.assert_array_equal(crop_windows(np.array([[20.5, 10.25, 9.5, 9.75]]), 1, 60, 40), [[20, 10, 30, 20]])


def test_safe_relative_path():
    assert str(safe_relative_path("a/./b.png")) == "a/b.png"
    for bad in ("../x.png", "/etc/x.png", "a/../../x.png", "C:\\x.png", "c:x.png", "..\\x.png", "\\\\host\\x.png",
                "", "a\x00.png"):
        assert safe_relative_path(bad) is None, bad


def test_prepare_geometry_labels_and_skips(small_coco, tmp_path):
    coco_json, frames, taxonomy = small_coco
    out = tmp_path / "out"
    summary = prepare_coco(coco_json, frames, out, context="1,3,full", taxonomy=taxonomy, min_size=2.0,
                           full_max_side=50, image_format="png", workers=2)
    frame_a, frame_b = coordinate_frame(100, 80), coordinate_frame(60, 40)

    table = pd.read_csv(out / "annotations.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["path", "label", "annotation_id", "image_id", "bbox_x", "bbox_y", "bbox_w",
                                   "bbox_h", "context_path", "context_path_full"]
    assert table["annotation_id"].tolist() == ["501", "502", "505", "507"]
    assert table["image_id"].tolist() == ["7", "7", "9", "9"]
    assert table["label"].tolist() == ["Sebastes", "Scorpaeniformes", "", "Scorpaeniformes"]
    # the bbox columns hold the box clipped to the frame
    assert table.loc[1, ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].tolist() == ["90", "70", "10", "10"]
    assert table.loc[3, ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].tolist() == ["20.5", "10.25", "9.5", "9.75"]
    assert table["path"].tolist() == ["images/a_501.png", "images/a_502.png", "images/sub/b_505.png",
                                      "images/sub/b_507.png"]

    def pixels(rel):
        return np.asarray(Image.open(out / rel))

    np.testing.assert_array_equal(pixels("images/a_501.png"), frame_a[20:35, 10:40])
    np.testing.assert_array_equal(pixels("images/a_502.png"), frame_a[70:80, 90:100])
    np.testing.assert_array_equal(pixels("images/sub/b_505.png"), frame_b[0:8, 0:12])
    np.testing.assert_array_equal(pixels("images/sub/b_507.png"), frame_b[10:20, 20:30])
    # 3× context squares, clipped: 501 → [0, 0, 70, 73]; 502 (clipped 10×10 at the corner) → [80, 60, 100, 80]
    assert table.loc[0, "context_path"] == "context/3/a_501.png"
    np.testing.assert_array_equal(pixels("context/3/a_501.png"), frame_a[0:73, 0:70])
    np.testing.assert_array_equal(pixels("context/3/a_502.png"), frame_a[60:80, 80:100])
    np.testing.assert_array_equal(pixels("context/3/sub/b_505.png"), frame_b[0:22, 0:24])
    # the full frame is written once per frame, its longer side shrunk to 50
    assert table["context_path_full"].tolist() == ["context/full/a.png"] * 2 + ["context/full/sub/b.png"] * 2
    assert Image.open(out / "context/full/a.png").size == (50, 40)
    assert Image.open(out / "context/full/sub/b.png").size == (50, 33)

    assert summary.rois == 4 and summary.frames == 2
    assert summary.missing_images == ["gone.png"]
    assert sorted(a for a, _ in summary.degenerate) == ["503", "504"]
    assert "outside the frame" in dict(summary.degenerate)["503"]
    assert "1.5×30" in dict(summary.degenerate)["504"]
    with open(out / "prepare_skipped.csv") as f:
        skipped = {row["annotation_id"]: row for row in csv.DictReader(f)}
    assert sorted(skipped) == ["503", "504", "506"]
    assert skipped["506"]["file_name"] == "gone.png" and "not found" in skipped["506"]["reason"]
    text = str(summary)
    assert "prepared 4 ROIs from 2 frames" in text and "1 images missing: gone.png" in text

    # the taxonomy is copied and the result loads as a dataset
    assert read_taxonomy(out / "taxonomy.csv").names == read_taxonomy(taxonomy).names
    dataset = load_dataset(out)
    assert not dataset.labelled and sorted(dataset.labels) == ["Scorpaeniformes", "Sebastes"]


def test_prepare_jpeg_default_and_rerun_removes_stale_skip_list(small_coco, tmp_path):
    coco_json, frames, _ = small_coco
    out = tmp_path / "out"
    prepare_coco(coco_json, frames, out, context="1,2", workers=1)
    table = pd.read_csv(out / "annotations.csv", dtype=str, keep_default_na=False)
    assert list(table.columns)[-1] == "context_path" and "context_path_full" not in table.columns
    roi = Image.open(out / "images/a_501.jpg")
    assert roi.format == "JPEG" and roi.size == (30, 15)
    # quality 95, no chroma subsampling: close to the source pixels
    assert np.abs(np.asarray(roi, dtype=int) - coordinate_frame(100, 80)[20:35, 10:40]).mean() < 3
    assert Image.open(out / "context/2/a_501.jpg").size == (55, 58)   # [-5, -2.5, 55, 57.5] → [0, 0, 55, 58]
    assert (out / "prepare_skipped.csv").exists()

    # once the missing frame and the bad boxes are gone, a re-run leaves no stale skip list behind
    data = json.loads(coco_json.read_text())
    data["images"] = data["images"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["id"] in (501, 502, 505, 507)]
    coco_json.write_text(json.dumps(data))
    summary = prepare_coco(coco_json, frames, out, context="1,2", workers=1)
    assert summary.skipped_csv is None and not (out / "prepare_skipped.csv").exists()


def test_each_frame_is_decoded_once(tmp_path, monkeypatch):
    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(coordinate_frame(120, 90)).save(frames / "many.png")
    anns = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [i * 5, i * 3, 10, 8]} for i in range(20)]
    coco_json = write_coco(tmp_path / "c.json", [{"id": 1, "file_name": "many.png"}], anns,
                           [{"id": 1, "name": "Sebastes"}])
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        if str(fp).endswith("many.png"):
            opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    summary = prepare_coco(coco_json, frames, tmp_path / "out", context="1,3,full", workers=1)
    assert summary.rois == 20 and len(opened) == 1


def test_unknown_category_is_refused_before_cropping(small_coco, tmp_path):
    coco_json, frames, _ = small_coco
    data = json.loads(coco_json.read_text())
    data["categories"][0]["name"] = "Sebastess"
    coco_json.write_text(json.dumps(data))
    with pytest.raises(UnknownLabelError, match=r"category 1 'Sebastess' is not a node.*did you mean 'Sebastes'"):
        prepare_coco(coco_json, frames, tmp_path / "out", taxonomy="fathomnet2025")
    assert not (tmp_path / "out").exists()


def test_unreadable_and_escaping_frames_are_reported(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "broken.png").write_bytes(b"<html>not a picture</html>")
    Image.fromarray(coordinate_frame(40, 30)).save(frames / "ok.png")
    (tmp_path / "x.png").write_bytes(b"")
    images = [{"id": 1, "file_name": "broken.png"}, {"id": 2, "file_name": "../x.png"}, {"id": 3, "file_name": "ok.png"}]
    anns = [{"id": 10 + i, "image_id": i, "category_id": None, "bbox": [0, 0, 10, 10]} for i in (1, 2, 3)]
    coco_json = write_coco(tmp_path / "c.json", images, anns, [])
    summary = prepare_coco(coco_json, frames, tmp_path / "out", context="1", workers=1)
    assert summary.rois == 1
    assert [name for name, _ in summary.unreadable_images] == ["broken.png"]
    assert summary.refused_images == ["../x.png"]
    assert not (tmp_path / "images").exists()


def test_real_fathomnet_test_file(fixtures_dir, tmp_path):
    """The official test JSON (no labels), with generated frames of the real sizes for four of its images."""
    coco_json = fixtures_dir / "fathomnet2025_test.json"
    coco = read_coco(coco_json)
    per_image = pd.Series([a["image_id"] for a in coco.annotations]).value_counts()
    chosen = [int(per_image.index[0]), 2, 3, 5]        # the busiest frame (23 ROIs) and three small ones
    by_id = coco.image_by_id()
    frames = tmp_path / "frames"
    frames.mkdir()
    for image_id in chosen:
        image = by_id[str(image_id)]
        canvas = np.zeros((image["height"], image["width"], 3), np.uint8)
        canvas[..., 0] = np.linspace(0, 255, image["width"], dtype=np.uint8)
        canvas[..., 1] = image_id
        Image.fromarray(canvas).save(frames / image["file_name"], compress_level=1)

    out = tmp_path / "out"
    summary = prepare_coco(coco_json, frames, out, taxonomy="fathomnet2025", workers=2)
    expected = [a for a in coco.annotations if a["image_id"] in chosen]
    assert summary.frames == 4 and summary.rois == len(expected) >= 26
    assert len(summary.missing_images) == len(coco.images) - 4
    assert summary.degenerate == []
    dataset = load_dataset(out)
    table = dataset.annotations
    assert table["annotation_id"].tolist() == [str(a["id"]) for a in expected]
    assert set(table["label"]) == {""} and not dataset.labelled
    assert len(dataset.taxonomy.labels) == 79
    for row, ann in zip(table.itertuples(), expected):
        x, y, w, h = ann["bbox"]
        assert Image.open(out / row.path).size == (int(np.ceil(x + w)) - int(x), int(np.ceil(y + h)) - int(y))
        assert (out / row.context_path).is_file() and row.context_path.startswith("context/3/")
    busiest = by_id[str(chosen[0])]
    assert Image.open(out / f"context/full/{Path(busiest['file_name']).stem}.jpg").size == (1024, 576)


def test_read_coco_errors(tmp_path):
    bad = tmp_path / "bad.json"
    cases = [
        ("{not json", r"bad.json: not valid JSON \(line 1"),
        ('{"annotations": []}', r"bad.json: no 'images' list"),
        ('{"images": [{"id": 1, "file_name": "a.png"}, {"id": 2}]}', r"images\[1\] \(id 2\) has no file_name"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 4, "image_id": 3, "bbox": [0,0,1,1]}]}',
         r"annotations\[0\] \(id 4\): image_id 3 is not an image"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 4, "image_id": 1, "bbox": [0,0,1]}]}',
         r"annotations\[0\] \(id 4\): bbox \[0, 0, 1\] is not four numbers"),
        ('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 4, "image_id": 1, "bbox": [0,0,1,1],'
         ' "category_id": 9}]}', r"category_id 9 is not one of the file's categories"),
    ]
    for text, message in cases:
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            read_coco(bad)
    with pytest.raises(DataError, match="COCO file not found"):
        read_coco(tmp_path / "nope.json")


def test_cli_prepare(small_coco, tmp_path, capsys):
    coco_json, frames, taxonomy = small_coco
    out = tmp_path / "cli"
    assert main(["data", "prepare", str(coco_json), str(frames), str(out), "--context", "1,3",
                 "--taxonomy", str(taxonomy), "--workers", "1"]) == 0
    assert "prepared 4 ROIs from 2 frames" in capsys.readouterr().out
    assert (out / "context/3/a_501.jpg").is_file() and (out / "taxonomy.csv").is_file()
    assert main(["data", "prepare", str(coco_json), str(frames), str(out), "--context", "1,0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: context scale '0.5'")
