"""`taxonomist serve` with boxes and two-stream models: a frame and a box, or an (ROI, context) pair, answer as
`taxonomist predict` answers the dataset `data prepare` cut from the same frames (checkpoint and ONNX), the context
scale travels in the metadata, micro-batches carry the context, and every malformed pairing is a JSON 400."""
from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from fastapi.testclient import TestClient  # noqa: E402

from taxonomist.cli.main import main  # noqa: E402
from taxonomist.deploy.serve import ServeOptions, create_app  # noqa: E402
from taxonomist.deploy.serve.boxes import canonical_scale, cut_crops, parse_bbox  # noqa: E402
from taxonomist.deploy.serve.uploads import UploadError  # noqa: E402
from taxonomist.errors import ConfigError  # noqa: E402
from taxonomist.inference.predict import predict  # noqa: E402

torch.set_num_threads(1)
FAST = dict(device="cpu", num_workers=0, progress=False)


@pytest.fixture(scope="module")
def two(two_stream_run):
    return two_stream_run


@pytest.fixture(scope="module")
def client(two):
    run = two[0]
    with TestClient(create_app(run, ServeOptions(device="cpu"), max_batch=16, max_wait_ms=2)) as c:
        yield c


@pytest.fixture(scope="module")
def held_rows(two) -> pd.DataFrame:
    _, data, _, _ = two
    rows = pd.read_csv(data / "annotations.csv", keep_default_na=False, dtype=str)
    return rows[rows["split"] == "test"].reset_index(drop=True)


def offline(model: Path, data: Path, out: Path) -> pd.DataFrame:
    """`taxonomist predict` over the prepared test rows, indexed by the ROI path."""
    predict(model, data, out, split="test", batch_size=4, **FAST)
    return pd.read_csv(out, keep_default_na=False).set_index("path")


def frame_upload(two, rows: pd.DataFrame) -> list:
    """The multipart parts of (b): each row's whole frame in `file` and its COCO box in `bbox`."""
    _, _, frames, boxes = two
    parts = []
    for ann in rows["annotation_id"]:
        file_name, bbox = boxes[ann]
        parts.append(("file", (f"{ann}:{file_name}", (frames / file_name).read_bytes(), "image/png")))
        parts.append(("bbox", (None, ",".join(f"{v:g}" for v in bbox))))
    return parts


def pair_upload(data: Path, rows: pd.DataFrame) -> list:
    """The multipart parts of (a): each row's ROI crop in `file` and its context crop in `context`."""
    parts = []
    for row in rows.itertuples():
        parts.append(("file", (row.path, (data / row.path).read_bytes(), "image/png")))
        parts.append(("context", (row.context_path, (data / row.context_path).read_bytes(), "image/png")))
    return parts


def assert_same(answers: list[dict], table: pd.DataFrame, rows: pd.DataFrame, tol: float = 1e-5) -> None:
    assert len(answers) == len(rows) == 8
    for answer, row in zip(answers, rows.itertuples()):
        expected = table.loc[row.path]
        assert answer["decision"] == expected["prediction"], row.path
        assert answer["confidence"] == pytest.approx(expected["confidence"], abs=tol), row.path


# ---------------------------------------------------------------------------------------------- metadata
def test_training_records_the_context_scale_and_the_service_reports_it(two, client, served_run):
    run, _, _, _ = two
    assert json.loads((run / "checkpoints" / "best.json").read_text())["data"]["context"] == "3"
    # a flat model on ROIs (synthetic data, no `context/<scale>/` layout) saw no context
    assert json.loads((served_run[0] / "checkpoints" / "best.json").read_text())["data"]["context"] is None
    inputs = client.get("/health").json()["inputs"]
    assert inputs == {"two_stream": True, "context": "required", "bbox": "required", "crop": "roi",
                      "context_scale": "3", "context_scale_from": "model"}
    assert client.get("/metadata").json()["service"]["inputs"] == inputs


def test_context_scale_is_read_from_the_paths_prepare_writes():
    from taxonomist.data.coco import box_windows, context_scale

    assert context_scale(["context/3/a_1.jpg", "", "context/3/sub/b_2.jpg"]) == "3"
    assert context_scale(["context/1.5/a_1.png"]) == "1.5" and context_scale(["context/full/a.jpg"]) == "full"
    for paths in (["context/Aurelia/0001.jpg"], ["context/3/a.jpg", "context/5/b.jpg"], ["scenes/3/a.jpg"],
                  ["context/3.0/a.jpg"], ["context/1/a.jpg"], ["context/a.jpg"], []):
        assert context_scale(paths) is None, paths
    # the ROI is the clipped box; the context a square of 3 × its longer side, clipped to the frame
    assert box_windows([-3, 6, 38, 39], "3", 112, 84) == ([0, 6, 35, 45], [0, 0, 76, 84])
    assert box_windows([10, 20, 4, 2], "1.5", 100, 100) == ([10, 20, 14, 22], [9, 18, 15, 24])
    with pytest.raises(ValueError, match="no pixel inside"):
        box_windows([120, 10, 5, 5], "3", 112, 84)


# ---------------------------------------------------------------------------------------------- parity
def test_pairs_and_frames_with_boxes_answer_like_predict(two, client, held_rows, tmp_path):
    run, data, _, _ = two
    table = offline(run, data, tmp_path / "p.csv")
    pairs = client.post("/predict", files=pair_upload(data, held_rows))
    assert pairs.status_code == 200, pairs.text
    answers = pairs.json()["predictions"]
    assert [a["context"] for a in answers] == held_rows["context_path"].tolist() and "bbox" not in answers[0]
    assert_same(answers, table, held_rows)

    frames = client.post("/predict", files=frame_upload(two, held_rows))
    assert frames.status_code == 200, frames.text
    answers = frames.json()["predictions"]
    _, _, _, boxes = two
    assert [a["bbox"] for a in answers] == [boxes[ann][1] for ann in held_rows["annotation_id"]]  # echoed as sent
    assert_same(answers, table, held_rows)
    # the answers depend on the context: cut at another scale, the same boxes answer otherwise
    with TestClient(create_app(run, ServeOptions(device="cpu", context_scale="5"))) as other:
        wider = other.post("/predict", files=frame_upload(two, held_rows)).json()["predictions"]
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(answers, wider)) > 1e-3


def test_crops_cut_from_the_frame_are_the_prepared_files(two, held_rows):
    from taxonomist.data.loading import read_image
    from taxonomist.deploy.serve.uploads import decode_upload

    _, data, frames, boxes = two
    for row in held_rows.itertuples():
        file_name, bbox = boxes[row.annotation_id]
        frame = decode_upload((frames / file_name).read_bytes(), file_name)
        roi, context = cut_crops(frame, bbox, "3", "bbox")
        assert torch.equal(roi, read_image(data / row.path))
        assert torch.equal(context, read_image(data / row.context_path))


def test_full_frame_context_is_shrunk_as_prepare_shrinks_it(tmp_path):
    from PIL import Image

    from taxonomist.data.coco import prepare_coco
    from taxonomist.data.loading import read_image

    rng = np.random.default_rng(1)
    (tmp_path / "frames").mkdir()
    pixels = rng.integers(0, 256, (700, 1300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "frames" / "big.png")
    coco = {"images": [{"id": 1, "file_name": "big.png"}], "categories": [{"id": 1, "name": "Aurelia"}],
            "annotations": [{"id": 7, "image_id": 1, "bbox": [1250, 600, 80, 120], "category_id": 1}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    prepare_coco(tmp_path / "coco.json", tmp_path / "frames", tmp_path / "out", context="1,full", image_format="png",
                 workers=1)
    roi, context = cut_crops(torch.from_numpy(pixels).permute(2, 0, 1), (1250, 600, 80, 120), "full", "bbox")
    assert tuple(context.shape) == (3, 551, 1024)
    assert torch.equal(roi, read_image(tmp_path / "out" / "images" / "big_7.png"))
    assert torch.equal(context, read_image(tmp_path / "out" / "context" / "full" / "big.png"))


@pytest.mark.slow
def test_onnx_two_stream_model_answers_frames_and_boxes_like_predict(two, held_rows, tmp_path):
    pytest.importorskip("onnxruntime")
    from taxonomist.deploy.export import export_model

    run, data, _, _ = two
    onnx_file = tmp_path / "two.onnx"
    export_model(run, onnx_file, check=False)
    table = offline(onnx_file, data, tmp_path / "onnx.csv")
    with TestClient(create_app(onnx_file, ServeOptions(device="cpu"))) as c:
        assert c.get("/health").json()["inputs"]["context_scale"] == "3"   # the scale travels in the file
        response = c.post("/predict", files=frame_upload(two, held_rows))
        assert response.status_code == 200, response.text
        assert_same(response.json()["predictions"], table, held_rows)
        pairs = c.post("/predict", files=pair_upload(data, held_rows))
        assert pairs.status_code == 200, pairs.text
        assert_same(pairs.json()["predictions"], table, held_rows)


def test_an_older_checkpoint_without_a_context_scale_loads_and_takes_one(two, client, held_rows, tmp_path):
    run, data, _, _ = two
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta_file = old / "checkpoints" / "best.json"
    meta = json.loads(meta_file.read_text())
    del meta["data"]["context"]
    meta_file.write_text(json.dumps(meta))
    rows = held_rows[:3]
    with TestClient(create_app(old, ServeOptions(device="cpu"))) as c:
        assert c.get("/health").json()["inputs"]["context_scale"] is None
        assert c.post("/predict", files=pair_upload(data, rows)).status_code == 200   # pairs need no scale
        refused = c.post("/predict", files=frame_upload(two, rows))
        assert refused.status_code == 400 and "--context-scale" in refused.json()["error"]
        assert "field 'bbox'" in refused.json()["error"]
    with TestClient(create_app(old, ServeOptions(device="cpu", context_scale="3.0"))) as c:
        assert c.get("/health").json()["inputs"]["context_scale_from"] == "--context-scale"
        answers = c.post("/predict", files=frame_upload(two, rows)).json()["predictions"]
    expected = client.post("/predict", files=frame_upload(two, rows)).json()["predictions"]
    assert [a["decision"] for a in answers] == [a["decision"] for a in expected]
    assert [a["confidence"] for a in answers] == pytest.approx([a["confidence"] for a in expected], abs=1e-6)


def test_concurrent_two_stream_requests_share_batches(two, held_rows):
    run, data, _, _ = two
    with TestClient(create_app(run, ServeOptions(device="cpu"), max_batch=8, max_wait_ms=200)) as c:
        single = {row.path: c.post("/predict", files=pair_upload(data, held_rows[k:k + 1])).json()["predictions"][0]
                  for k, row in enumerate(held_rows.itertuples())}
        before = c.app.state.batcher.stats.batches
        results: dict[str, dict] = {}

        def post(k: int) -> None:
            answer = c.post("/predict", files=pair_upload(data, held_rows[k:k + 1])).json()["predictions"][0]
            results[answer["filename"]] = answer

        threads = [threading.Thread(target=post, args=(k,)) for k in range(len(held_rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = c.app.state.batcher.stats
        assert sorted(results) == sorted(single)
        assert stats.batches - before < len(held_rows) and stats.largest_batch > 1
        for name, answer in single.items():   # each ROI got its own context inside the shared batch
            assert results[name]["decision"] == answer["decision"]
            assert results[name]["confidence"] == pytest.approx(answer["confidence"], abs=1e-5)


# ---------------------------------------------------------------------------------------------- single stream
def test_a_single_stream_model_takes_a_frame_and_a_box(served_run):
    from PIL import Image

    run, data = served_run
    crop = Image.open(min((data / "images").rglob("*.jpg"))).convert("RGB")
    frame = Image.new("RGB", (120, 90), (30, 60, 90))
    frame.paste(crop, (50, 20))
    as_png = io.BytesIO()
    frame.save(as_png, "PNG")
    roi_png = io.BytesIO()
    frame.crop((47, 18, 50 + crop.width, 20 + crop.height)).save(roi_png, "PNG")
    with TestClient(create_app(run, ServeOptions(device="cpu"))) as c:
        assert c.get("/health").json()["inputs"] == {"two_stream": False, "context": "refused", "bbox": "optional",
                                                     "crop": "roi", "context_scale": None,
                                                     "context_scale_from": None}
        boxed = c.post("/predict", files=[("file", ("frame.png", as_png.getvalue(), "image/png")),
                                          ("bbox", (None, f"47.5 18.2 {crop.width + 2.5} {crop.height + 1.8}"))])
        cropped = c.post("/predict", files={"file": ("roi.png", roi_png.getvalue(), "image/png")})
        whole = c.post("/predict", files={"file": ("frame.png", as_png.getvalue(), "image/png")})
    a, b, w = boxed.json()["predictions"][0], cropped.json()["predictions"][0], whole.json()["predictions"][0]
    assert a["bbox"] == [47.5, 18.2, crop.width + 2.5, crop.height + 1.8]
    assert a["decision"] == b["decision"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
    assert a["top"] == b["top"] and a["top"] != w["top"]   # the box was cut: not the whole frame's answer


def test_a_model_trained_on_context_crops_gets_the_context_of_the_box(served_run, two, tmp_path):
    """A single-stream model with `data.input: context` (its metadata says so) is fed the context cut at its
    scale, not the ROI."""
    _, _, frames, boxes = two
    run = tmp_path / "ctx_run"
    shutil.copytree(served_run[0], run)
    meta_file = run / "checkpoints" / "best.json"
    meta = json.loads(meta_file.read_text())
    meta["data"].update(input="context_path", context="3")
    meta_file.write_text(json.dumps(meta))
    file_name, bbox = boxes["101"]
    frame_png = (frames / file_name).read_bytes()
    with TestClient(create_app(run, ServeOptions(device="cpu"))) as c:
        assert c.get("/health").json()["inputs"]["crop"] == "context"
        boxed = c.post("/predict", files=[("file", ("f.png", frame_png, "image/png")),
                                          ("bbox", (None, ",".join(map(str, bbox))))]).json()["predictions"][0]
        from PIL import Image

        from taxonomist.deploy.serve.uploads import decode_upload
        _, context = cut_crops(decode_upload(frame_png, "f.png"), bbox, "3", "bbox")
        buf = io.BytesIO()
        Image.fromarray(context.permute(1, 2, 0).numpy()).save(buf, "PNG")
        direct = c.post("/predict", files={"file": ("c.png", buf.getvalue(), "image/png")}).json()["predictions"][0]
    assert boxed["top"] == direct["top"] and boxed["decision"] == direct["decision"]


# ---------------------------------------------------------------------------------------------- bad input
def png(size=(64, 48)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 40)).save(buf, "PNG")
    return buf.getvalue()


F = ("file", ("frame.png", png(), "image/png"))
C = ("context", ("ctx.png", png(), "image/png"))


def B(value: str):  # reads like the field it makes
    return ("bbox", (None, value))


@pytest.mark.parametrize("parts, words", [
    ([F, B("1,2,3")], "field 'bbox' of 'frame.png' (image 1): '1,2,3' is not 4 numbers x,y,w,h"),
    ([F, B("1,2,three,4")], "'1,2,three,4' is not 4 numbers"),
    ([F, B("1,2,3,nan")], "'1,2,3,nan' is not 4 numbers"),
    ([F, B("")], "'' is not 4 numbers"),
    ([F, B("1,2,0,5")], "'1,2,0,5' has width 0 and height 5; both must be > 0"),
    ([F, B("1,2,5,-3")], "height -3"),
    ([F, B("64,10,5,5")], "field 'bbox' of 'frame.png': box 64,10,5,5 lies outside the 64×48 frame"),
    ([F, B("-20,-20,10,10")], "lies outside the 64×48 frame"),
    ([F, F, B("1,2,3,4")], "field 'bbox': 1 given for 2 files in 'file'"),
    ([F, B("1,2,3,4"), B("1,2,3,4")], "field 'bbox': 2 given for 1 files"),
    ([F, F, C], "field 'context': 1 given for 2 files in 'file'"),
    ([F, C, C], "field 'context': 2 given for 1 files"),
    ([F], "this two-stream model needs each image's context"),
    ([F, C, B("1,2,3,4")], "either 'context' files (crops) or 'bbox' fields (full frames), not both"),
    # text in 'context' is the priors' context: refused by a service started without --priors
    ([F, ("context", (None, "ctx.png"))], "this service was started without --priors"),
    ([F, ("bbox", ("box.txt", b"1,2,3,4", "text/plain"))], "the field 'bbox' must be text x,y,w,h"),
    ([F, ("context", ("ctx.png", b"", "image/png"))], "field 'context': ctx.png: empty file"),
    ([F, ("context", ("ctx.png", b"not an image", "image/png"))], "field 'context': ctx.png: not an image"),
])
def test_bad_boxes_and_pairings_are_json_400s(client, parts, words):
    response = client.post("/predict", files=parts)
    assert response.status_code in (400, 415), response.text
    assert response.status_code == (415 if "not an image" in words else 400)
    assert words in response.json()["error"], response.json()["error"]


def test_a_single_stream_model_refuses_a_context_file(served_run):
    with TestClient(create_app(served_run[0])) as c:
        response = c.post("/predict", files=[F, C])
        assert response.status_code == 400
        assert response.json()["error"].startswith("field 'context': this model takes one image per example")
        bad = c.post("/predict", files=[F, B("10,10,0,4")])
        assert bad.status_code == 400 and "field 'bbox'" in bad.json()["error"]


def test_context_scale_option_is_checked(two, capsys):
    assert canonical_scale("3.0") == "3" and canonical_scale("Full") == "full" and canonical_scale(1.5) == "1.5"
    for bad in ("1", "0.5", "x", "3,5", ""):
        with pytest.raises(ConfigError, match="--context-scale"):
            canonical_scale(bad)
    with pytest.raises(ConfigError, match="--context-scale"):
        create_app(two[0], ServeOptions(context_scale="wide"))
    assert main(["serve", str(two[0]), "--context-scale", "0.5", "--port", "8124"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --context-scale '0.5'")


def test_parse_bbox_reports_the_value():
    assert parse_bbox(" [3, 4, 5.5, 6] ", "bbox") == (3.0, 4.0, 5.5, 6.0)
    with pytest.raises(UploadError) as e:
        parse_bbox("1;2;3;4", "field 'bbox' of 'a.jpg'")
    assert e.value.status == 400 and e.value.message.startswith("field 'bbox' of 'a.jpg': '1;2;3;4' is not 4")
