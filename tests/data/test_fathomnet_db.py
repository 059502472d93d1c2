"""`data fathomnet scan|select|fetch` offline: fathomnet-py talks to a fake HTTP session that answers with
responses shaped as database.fathomnet.org sends them (the DTO fields fathomnet-py parses)."""
from __future__ import annotations

import json
import re
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image
from requests.structures import CaseInsensitiveDict

from taxonomist.cli.main import main
from taxonomist.data import load_dataset
from taxonomist.data.coco import prepare_coco, read_coco
from taxonomist.data.fathomnet_db import (COCO_JSON, CONCEPT_CACHE, SCAN_JSON, SCAN_PNG, FathomNetAPI,
                                          FathomNetError, fetch_coco, read_counts, scan_database, select_concepts)
from taxonomist.errors import ConfigError, UnknownLabelError

fathomnet_api = pytest.importorskip("fathomnet.api")


def _box(uuid, concept, x, y, w, h, rejected=False):
    return {"id": abs(hash(uuid)) % 10_000, "uuid": uuid, "concept": concept, "x": x, "y": y, "width": w,
            "height": h, "rejected": rejected, "observer": "tester", "occluded": False, "truncated": False,
            "groupOf": False, "userDefinedKey": None, "altConcept": None, "reviewState": None}


def _image(uuid, boxes, url=True, width=120, height=90):
    return {"id": abs(hash(uuid)) % 10_000, "uuid": uuid, "valid": True, "width": width, "height": height,
            "url": f"https://database.fathomnet.org/static/m3/{uuid}.png" if url else None,
            "imagingType": "ROV", "depthMeters": 812.5, "timestamp": "2019-05-01T10:00:00Z",
            "boundingBoxes": boxes, "tags": [], "sha256": "0" * 64, "mediaType": "image"}


# Sebastes: 4 images, 5 usable boxes (one rejected box, one image shared with Chionoecetes tanneri)
SEBASTES = [
    _image("img-a", [_box("b1", "Sebastes", 10, 10, 30, 20), _box("b2", "Sebastes", 50, 40, 20, 20),
                     _box("b9", "Chionoecetes tanneri", 5, 60, 25, 20)]),
    _image("img-b", [_box("b3", "Sebastes", 0, 0, 40, 30), _box("b4", "Sebastes", 60, 10, 10, 10, rejected=True)]),
    _image("img-c", [_box("b5", "Sebastes", 30, 30, 30, 30)]),
    _image("img-d", [_box("b6", "Sebastes", 70, 50, 40, 30)]),
    _image("img-x", [_box("b7", "Sebastes", 1, 1, 10, 10)], url=False),   # no URL: cannot be downloaded
]
CRAB = [SEBASTES[0], _image("img-e", [_box("b10", "Chionoecetes tanneri", 20, 20, 50, 40)])]

RECORDED = {
    "api/boundingboxes/list/concepts": ["Sebastes", "Chionoecetes tanneri", "Bathochordaeus", "Actinopterygii",
                                        "Nanomia bijuga", "Sebastolobus"],
    "api/boundingboxes/list/counts": [{"concept": "Sebastes", "count": 5},
                                      {"concept": "Chionoecetes tanneri", "count": 2},
                                      {"concept": "Bathochordaeus", "count": 1500},
                                      {"concept": "Actinopterygii", "count": 40},
                                      {"concept": "Nanomia bijuga", "count": 12}],   # Sebastolobus: no count → 0
    "api/images/count": {"objectType": "Image", "count": 1200},
    "api/boundingboxes/count": {"objectType": "BoundingBox", "count": 1559},
    "api/images/query/concept/Sebastes": SEBASTES,
    "api/images/query/concept/Chionoecetes tanneri": CRAB,
    "api/images/query/concept/Bathochordaeus": [],
    "worms/descendants/Actinopterygii": ["Actinopterygii", "Scorpaeniformes", "Sebastidae", "Sebastes",
                                         "Sebastolobus"],
}


class FakeSession:
    """Stands in for `fathomnet.api.SESSION`: answers GETs from `answers` (path → JSON, HTTP status or
    exception) and records each request with its timeout."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls: list[tuple[str, float | None]] = []

    def request(self, method, url, **kwargs):
        path = unquote(re.sub(r"/+", "/", urlsplit(url).path)).lstrip("/")
        self.calls.append((path, kwargs.get("timeout")))
        answer = self.answers.get(path, 404)
        if isinstance(answer, BaseException):
            raise answer
        response = requests.Response()
        response.status_code, response.url = (answer, url) if isinstance(answer, int) else (200, url)
        response._content = json.dumps({"message": "nope"} if isinstance(answer, int) else answer).encode()
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
        response.request = requests.Request(method, url).prepare()
        return response


@pytest.fixture
def session(monkeypatch):
    fake = FakeSession(dict(RECORDED))
    monkeypatch.setattr(fathomnet_api, "SESSION", fake)
    return fake


def client():
    return FathomNetAPI(timeout=5, retries=1, backoff=0)


def test_scan_reports_database_figures_and_writes_json_png_counts(tmp_path, session):
    scan = scan_database(tmp_path / "scan", client=client())
    figures = json.loads((tmp_path / "scan" / SCAN_JSON).read_text())
    assert figures["concepts"] == 6 and figures["images"] == 1200 and figures["boxes"] == 1559
    counts = np.array([5, 2, 1500, 40, 12, 0])
    assert figures["boxes_per_concept"]["mean"] == pytest.approx(counts.mean())
    assert figures["boxes_per_concept"]["median"] == pytest.approx(np.median(counts))   # 8.5
    assert figures["histogram"]["0"] == 1 and figures["histogram"]["1-9"] == 2
    assert figures["histogram"]["10-99"] == 2 and figures["histogram"]["1000-9999"] == 1
    assert sum(figures["histogram"].values()) == 6
    assert figures["concepts_with_at_least"]["10"] == 3
    assert list(figures["top_concepts"])[0] == "Bathochordaeus"
    assert (tmp_path / "scan" / SCAN_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_counts(tmp_path / "scan") == scan.counts and scan.counts["Sebastolobus"] == 0
    # fathomnet-py sends no timeout of its own; ours reaches every request, and is taken off afterwards
    assert session.calls and all(t == 5 for _, t in session.calls)
    assert "request" not in vars(session)


def test_select_by_counts_classes_and_taxon(tmp_path, session):
    scan_database(tmp_path / "scan", client=client())
    sel = select_concepts(min_count=5, max_count=1000, counts=tmp_path / "scan", out=tmp_path / "c.txt")
    assert list(sel.concepts) == ["Actinopterygii", "Nanomia bijuga", "Sebastes"]   # most boxes first
    assert (tmp_path / "c.txt").read_text().splitlines() == list(sel.concepts)
    assert list(select_concepts(min_count=1, classes=2, counts=tmp_path / "scan").concepts) == \
        ["Bathochordaeus", "Actinopterygii"]
    under = select_concepts(min_count=1, under="Actinopterygii", counts=tmp_path / "scan", client=client())
    assert list(under.concepts) == ["Actinopterygii", "Sebastes"]   # Sebastolobus has no box; no jellies, no crabs
    live = select_concepts(min_count=100, client=client())          # without a scan: asks the service
    assert list(live.concepts) == ["Bathochordaeus"]
    with pytest.raises(ConfigError, match="below --min"):
        select_concepts(min_count=10, max_count=5, counts={"a": 1})
    session.answers["worms/descendants/Fishes"] = []
    with pytest.raises(UnknownLabelError, match="no FathomNet concept lies under 'Fishes'"):
        select_concepts(under="Fishes", counts={"Sebastes": 3}, client=client())


def test_fetch_caps_per_class_and_writes_coco_that_prepare_takes(tmp_path, session):
    summary = fetch_coco(["Sebastes", "Chionoecetes tanneri"], tmp_path / "out", max_per_class=3, seed=1,
                         client=client())
    coco = read_coco(tmp_path / "out" / COCO_JSON)   # the checks `data download` and `data prepare` make
    names = {k: v for k, v in coco.categories.items()}
    per = {}
    for ann in coco.annotations:
        per[names[str(ann["category_id"])]] = per.get(names[str(ann["category_id"])], 0) + 1
    assert per == {"Sebastes": 3, "Chionoecetes tanneri": 2}
    assert summary.available == {"Sebastes": 5, "Chionoecetes tanneri": 2}   # rejected and URL-less boxes left out
    uuids = [a["fathomnet_uuid"] for a in coco.annotations]
    assert "b4" not in uuids and "b7" not in uuids and len(set(uuids)) == len(uuids)
    # img-a carries boxes of both concepts: listed once
    files = [im["file_name"] for im in coco.images]
    assert len(files) == len(set(files)) and all(re.fullmatch(r"img-[a-e]\.png", f) for f in files)
    assert all(im["coco_url"].endswith(im["file_name"]) for im in coco.images)
    # the same seed keeps the same boxes; another seed may not, and a cap of 0 keeps all
    again = fetch_coco(["Sebastes", "Chionoecetes tanneri"], tmp_path / "out2", max_per_class=3, seed=1,
                       client=client())
    assert json.loads(again.out.read_text())["annotations"] == json.loads(summary.out.read_text())["annotations"]
    assert sum(fetch_coco(["Sebastes"], tmp_path / "out3", client=client()).boxes.values()) == 5

    # frames named as download would name them → prepare makes one crop per box
    frames = tmp_path / "frames"
    frames.mkdir()
    for im in coco.images:
        Image.new("RGB", (im["width"], im["height"]), (40, 90, 160)).save(frames / im["file_name"])
    prepare_coco(tmp_path / "out" / COCO_JSON, frames, tmp_path / "ds", context="1")
    with pytest.warns(UserWarning, match="flat taxonomy"):   # no --taxonomy given: flat, as DESIGN says
        ds = load_dataset(tmp_path / "ds")
    assert sorted(ds.annotations["label"].value_counts().items()) == [("Chionoecetes tanneri", 2), ("Sebastes", 3)]


def test_fetch_resumes_after_a_server_error_and_reports_one_line(tmp_path, session):
    session.answers["api/images/query/concept/Chionoecetes tanneri"] = 503
    with pytest.raises(FathomNetError) as err:
        fetch_coco(["Sebastes", "Chionoecetes tanneri", "Bathochordaeus"], tmp_path / "out", client=client())
    message = str(err.value)
    assert "\n" not in message and "HTTP 503" in message and "2 tries" in message
    assert "1 of 3 concepts are kept" in message
    assert len(list((tmp_path / "out" / CONCEPT_CACHE).glob("*.json"))) == 1
    assert not (tmp_path / "out" / COCO_JSON).exists()

    session.answers["api/images/query/concept/Chionoecetes tanneri"] = CRAB
    session.calls.clear()
    summary = fetch_coco(["Sebastes", "Chionoecetes tanneri", "Bathochordaeus"], tmp_path / "out", client=client())
    asked = [p for p, _ in session.calls if p.startswith("api/images/query/concept/")]
    assert asked == ["api/images/query/concept/Chionoecetes tanneri", "api/images/query/concept/Bathochordaeus"]
    assert summary.fetched == 2 and summary.cached == 1
    assert summary.boxes == {"Sebastes": 5, "Chionoecetes tanneri": 2, "Bathochordaeus": 0}
    assert any("no usable box" in n for n in summary.notes)


def test_timeouts_are_retried_then_reported(tmp_path, session):
    session.answers["api/images/query/concept/Sebastes"] = requests.ReadTimeout("read timed out")
    with pytest.raises(FathomNetError, match=r"no answer within 5 s; 0 of 1 concepts are kept"):
        fetch_coco(["Sebastes"], tmp_path / "out", client=client())
    assert [p for p, _ in session.calls].count("api/images/query/concept/Sebastes") == 2   # 1 retry
    session.answers["api/images/count"] = requests.ConnectionError("no route")
    with pytest.raises(FathomNetError, match="cannot reach"):
        scan_database(client=client())


def test_unknown_concept_is_refused_before_any_download(tmp_path, session):
    with pytest.raises(UnknownLabelError, match=r"'Sebastes  sp' is not a FathomNet concept \(did you mean"):
        fetch_coco(["Sebastes", "Sebastes  sp"], tmp_path / "out", client=client())
    assert not any(p.startswith("api/images/") for p, _ in session.calls)
    # a concept the list knows but the image query answers with 404 for
    session.answers["api/boundingboxes/list/concepts"] = RECORDED["api/boundingboxes/list/concepts"] + ["Ghost"]
    with pytest.raises(UnknownLabelError, match="FathomNet does not know 'Ghost'"):
        fetch_coco(["Ghost"], tmp_path / "out", client=client())


def test_cli_scan_select_fetch_and_error_line(tmp_path, session, capsys):
    assert main(["data", "fathomnet", "scan", str(tmp_path / "scan")]) == 0
    assert "6 concepts, 1200 images, 1559 boxes" in capsys.readouterr().out
    assert main(["data", "fathomnet", "select", "--min", "2", "--max", "100", "--counts", str(tmp_path / "scan"),
                 "--out", str(tmp_path / "c.txt")]) == 0
    assert "selected 4 of 6 concepts" in capsys.readouterr().out
    (tmp_path / "c.txt").write_text("Sebastes\nChionoecetes tanneri\n")
    assert main(["data", "fathomnet", "fetch", str(tmp_path / "c.txt"), str(tmp_path / "out"),
                 "--max-per-class", "2"]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "out" / COCO_JSON).is_file()
    session.answers["api/images/query/concept/Bathochordaeus"] = 500
    rc = main(["data", "fathomnet", "fetch", "Bathochordaeus", str(tmp_path / "out"), "--retries", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: FathomNet: the images of concept 'Bathochordaeus'")
