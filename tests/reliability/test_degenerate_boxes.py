"""Degenerate boxes in `data prepare` (issue 19): a box entirely outside its frame, or below one pixel once clipped
to it, is listed as skipped (prepare_skipped.csv and the summary), never an exception; every other box is cut.
The service answers the same boxes with a 400 (tests/deploy/test_serve_hostile.py)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from taxonomist.data.coco import SKIPPED_CSV, prepare_coco

WIDTH, HEIGHT = 40, 30
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
value = st.one_of(finite, st.floats(-5, 50), st.sampled_from([0.0, 0.3, 0.999, 1.0, 1e308, -1e308, 5e-324]))
box = st.tuples(value, value, value, value)


def clipped(b) -> tuple[float, float]:
    x, y, w, h = b
    with np.errstate(over="ignore"):
        cw = float(np.clip(np.float64(x) + w, 0, WIDTH) - np.clip(x, 0, WIDTH))
        ch = float(np.clip(np.float64(y) + h, 0, HEIGHT) - np.clip(y, 0, HEIGHT))
    return cw, ch


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boxes=st.lists(box, min_size=1, max_size=4))
def test_prepare_cuts_or_lists_every_box(tmp_path, boxes):
    root = tmp_path / "case"
    shutil.rmtree(root, ignore_errors=True)
    (root / "frames").mkdir(parents=True)
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 30)).save(root / "frames" / "f.png")
    annotations = [{"id": k + 1, "image_id": 1, "bbox": list(b), "category_id": 1} for k, b in enumerate(boxes)]
    # one good box keeps the output non-empty, so that every fuzzed box is judged on its own
    annotations.append({"id": 99, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1})
    coco = {"images": [{"id": 1, "file_name": "f.png", "width": WIDTH, "height": HEIGHT}],
            "annotations": annotations, "categories": [{"id": 1, "name": "Aurelia"}]}
    (root / "coco.json").write_text(json.dumps(coco))
    summary = prepare_coco(root / "coco.json", root / "frames", root / "out", context="1,3", min_size=0,
                           image_format="png", workers=1)
    kept = set(pd.read_csv(root / "out" / "annotations.csv")["annotation_id"].astype(str))
    skipped = dict(summary.degenerate)
    for k, b in enumerate(boxes, start=1):
        cw, ch = clipped(b)
        whole_pixel = b[2] > 0 and b[3] > 0 and cw >= 1 and ch >= 1
        assert (str(k) in kept) == whole_pixel, (b, cw, ch)
        assert (str(k) in skipped) != whole_pixel, (b, skipped)
        if not whole_pixel:
            assert any(w in skipped[str(k)] for w in ("no area", "outside the frame", "below one pixel")), skipped
    assert "99" in kept
    if skipped:
        listed = pd.read_csv(root / "out" / SKIPPED_CSV, keep_default_na=False)
        assert set(listed["annotation_id"].astype(str)) >= set(skipped)
    for path in (root / "out" / "images").rglob("*.png"):
        assert min(Image.open(path).size) >= 1


@pytest.mark.parametrize("bbox, words", [([50, 10, 5, 5], "outside the frame"), ([10, 10, 0.4, 5], "below one pixel"),
                                         ([39.8, 10, 5, 5], "below one pixel"), ([10, 10, 0, 5], "no area")])
def test_degenerate_box_is_listed_with_its_reason(tmp_path, bbox, words):
    (tmp_path / "frames").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT)).save(tmp_path / "frames" / "f.png")
    coco = {"images": [{"id": 1, "file_name": "f.png"}], "categories": [{"id": 1, "name": "Aurelia"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": bbox, "category_id": 1},
                            {"id": 2, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 1}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    summary = prepare_coco(tmp_path / "coco.json", tmp_path / "frames", tmp_path / "out", context="1", min_size=0,
                           workers=1)
    assert [k for k, _ in summary.degenerate] == ["1"] and words in summary.degenerate[0][1]
    assert math.isclose(summary.rois, 1)
