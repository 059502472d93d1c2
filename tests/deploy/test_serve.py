"""`taxonomist serve`: the API over a tiny trained model — answers equal to `taxonomist predict`, every bad input
answered 4xx with a JSON error, the token rule, and micro-batching under concurrency."""
from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from fastapi.testclient import TestClient

from taxonomist.cli.main import main
from taxonomist.decide import DecisionOptions  # noqa: E402
from taxonomist.deploy.serve import MicroBatcher, ServeOptions, create_app, decode_upload
from taxonomist.deploy.serve.app import bind_token, is_loopback
from taxonomist.errors import ConfigError, ModelError

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def served(served_run):
    """A tiny calibrated run on synthetic data (6 taxa, one held out as OOD), shared with the browser test."""
    return served_run


@pytest.fixture(scope="module")
def client(served):
    run, _ = served
    app = create_app(run, ServeOptions(DecisionOptions("min-risk", ood="energy"), device="cpu", engine="torch"),
                     max_batch=16, max_wait_ms=2, max_upload_mb=1, max_files=64)
    with TestClient(app) as c:
        yield c


def images_of(data: Path) -> list[Path]:
    return sorted((data / "images").rglob("*.jpg"))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with a few bytes of image data: a decompression bomb."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------- answers
def test_health_taxonomy_metadata(client, served):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == "run/checkpoints/best.safetensors"
    tax = client.get("/taxonomy").json()
    meta = client.get("/metadata").json()
    assert len(tax["labels"]) == meta["service"]["labels"] == 5          # 6 taxa, one held out
    assert {n["name"] for n in tax["nodes"]} >= set(tax["labels"])
    assert meta["model"]["backbone"] == "test_efficientnet" and "taxonomy" not in meta["model"]
    assert meta["service"]["ood"]["method"] == "energy" and meta["limits"]["max_upload_mb"] == 1


def test_multi_file_predict_equals_offline_predict(client, served, tmp_path):
    from taxonomist.inference.predict import predict

    run, data = served
    files = images_of(data)[:40]
    folder = tmp_path / "images"
    for f in files:
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.name / f.name).write_bytes(f.read_bytes())
    predict(run, folder, tmp_path / "p.csv", decision="min-risk", ood="energy", device="cpu",
            num_workers=0, progress=False)
    offline = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("path")

    upload = [("file", (f"{f.parent.name}/{f.name}", f.read_bytes(), "image/jpeg")) for f in files]
    response = client.post("/predict", files=upload)
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    assert [a["filename"] for a in answers] == [f"{f.parent.name}/{f.name}" for f in files]
    for a in answers:
        row = offline.loc[a["filename"]]
        assert a["decision"] == row["prediction"]
        assert a["confidence"] == pytest.approx(row["confidence"], abs=2e-6)
        assert a["ood"]["score"] == pytest.approx(row["ood_score"], abs=1e-4)
        assert a["ood"]["unknown"] == (str(row["unknown"]) == "True")
        for level, item in a["lineage"].items():
            assert item["name"] == row[level]
        # lineage runs from the root down, each level at most as probable as the one above it
        ps = [item["p"] for item in a["lineage"].values()]
        assert ps == sorted(ps, reverse=True)
        assert list(a["lineage"].values())[-1]["name"] == a["decision"]
        assert len(a["top"]) == 5 and a["top"][0]["p"] >= a["top"][-1]["p"]


def test_uploads_decode_like_files(served):
    from taxonomist.data.loading import read_image

    _, data = served
    f = images_of(data)[0]
    assert torch.equal(decode_upload(f.read_bytes(), f.name), read_image(f))


@pytest.mark.slow
def test_onnx_model_serves_the_same_answers(client, served, tmp_path):
    pytest.importorskip("onnxruntime")
    from taxonomist.deploy.export import export_model

    run, data = served
    export_model(run, tmp_path / "m.onnx", check=False)
    upload = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in images_of(data)[:8]]
    with TestClient(create_app(tmp_path / "m.onnx", ServeOptions(DecisionOptions("min-risk", ood="energy")))) as c:
        assert c.get("/health").json()["model"] == "m.onnx"
        onnx = c.post("/predict", files=upload).json()["predictions"]
    torch_answers = client.post("/predict", files=upload).json()["predictions"]
    for a, b in zip(onnx, torch_answers):
        assert a["decision"] == b["decision"] and list(a["lineage"]) == list(b["lineage"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
        assert a["ood"]["score"] == pytest.approx(b["ood"]["score"], abs=1e-3)


# ---------------------------------------------------------------------------------------------- bad input
def jpeg_bytes(size=(40, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("files, status, words", [
    ({"file": ("notes.txt", b"just some text, not an image", "text/plain")}, 415, "not an image"),
    ({"file": ("empty.jpg", b"", "image/jpeg")}, 400, "empty file"),
    ({"file": ("cut.jpg", jpeg_bytes()[:200], "image/jpeg")}, 400, "cut.jpg"),
    ({"file": ("bomb.png", png_header(50_000, 50_000), "image/png")}, 400, "the limit of 100,000,000 pixels"),
    ({"file": ("huge.png", png_header(12_000, 12_000), "image/png")}, 400, "12000×12000 pixels exceeds the limit"),
    ({"other": ("a.jpg", jpeg_bytes(), "image/jpeg")}, 400, "field 'file'"),
])
def test_bad_image_is_a_4xx_json_error(client, files, status, words):
    response = client.post("/predict", files=files)
    assert response.status_code == status
    assert words in response.json()["error"]


def test_bad_requests_are_4xx_json_errors(client):
    cases = [
        (client.post("/predict", json={"file": "/etc/passwd"}), 415, "multipart/form-data"),
        (client.post("/predict", data={"file": "/etc/passwd"}, files={"x": ("a", b"1")}), 400, "not text"),
        (client.post("/predict", content=b"--nope\r\n\r\n", headers={"content-type": "multipart/form-data"}), 400,
         "malformed"),
        (client.post("/predict", content=b"x" * 2_000_000,
                     headers={"content-type": "multipart/form-data; boundary=b"}), 413, "1 MB"),
        # no Content-Length (chunked): the limit is counted on the stream
        (client.post("/predict", content=iter([b"--b\r\n" + b"x" * 600_000, b"x" * 600_000]),
                     headers={"content-type": "multipart/form-data; boundary=b"}), 413, "1 MB"),
        (client.post("/predict", files=[("file", ("a.jpg", jpeg_bytes(), "image/jpeg"))] * 65), 400, "files"),
        (client.get("/predict"), 405, ""),
        (client.get("/no/such/page"), 404, "not found"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert words in response.json()["error"]


def test_one_bad_file_among_good_ones_names_it(client):
    files = [("file", ("good.jpg", jpeg_bytes(), "image/jpeg")),
             ("file", ("bad.jpg", jpeg_bytes()[:300], "image/jpeg"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 400 and response.json()["error"].startswith("bad.jpg")


def test_pixel_limit_is_configurable(served):
    run, _ = served
    with TestClient(create_app(run, max_image_pixels=1000)) as c:
        response = c.post("/predict", files={"file": ("big.jpg", jpeg_bytes((40, 30)), "image/jpeg")})
        assert response.status_code == 400 and "1,000 pixels" in response.json()["error"]
        assert c.post("/predict", files={"file": ("ok.jpg", jpeg_bytes((30, 30)), "image/jpeg")}).status_code == 200


# ---------------------------------------------------------------------------------------------- tokens
def test_bind_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    assert bind_token("127.0.0.1", None, environ={}) is None
    with pytest.raises(ConfigError, match="--token-env"):
        bind_token("0.0.0.0", None, environ={})
    with pytest.raises(ConfigError, match="not set"):
        bind_token("0.0.0.0", "SERVE_TOKEN", environ={})
    with pytest.raises(ConfigError, match="empty"):
        bind_token("0.0.0.0", "SERVE_TOKEN", environ={"SERVE_TOKEN": " "})
    assert bind_token("0.0.0.0", "SERVE_TOKEN", environ={"SERVE_TOKEN": "s3cret"}) == "s3cret"


def test_cli_refuses_a_network_host_without_token(served, capsys, monkeypatch):
    run, _ = served
    assert main(["serve", str(run), "--host", "0.0.0.0", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --host 0.0.0.0 is not a loopback address")
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert main(["serve", str(run), "--host", "0.0.0.0", "--token-env", "NO_SUCH_TOKEN_VAR"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --token-env NO_SUCH_TOKEN_VAR")
    assert main(["serve", str(run), "--max-batch", "0"]) == 2
    assert "--max-batch 0" in capsys.readouterr().err


def test_missing_serve_extra_is_one_install_hint(served, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", str(served[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: taxonomist serve needs FastAPI, uvicorn and python-multipart: "
                   "pip install 'taxonomist[serve]' (missing: uvicorn)"]


def test_token_checked_on_every_request_but_health(served):
    run, _ = served
    with TestClient(create_app(run, token="s3cret")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200                    # the page's files carry no data
        for method, path in (("get", "/taxonomy"), ("get", "/metadata"), ("get", "/openapi.json"),
                             ("post", "/predict")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = getattr(c, method)(path, headers=headers)
                assert response.status_code == 401 and "bearer token" in response.json()["error"], path
                assert response.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/taxonomy", headers=ok).status_code == 200
        response = c.post("/predict", headers=ok, files={"file": ("a.jpg", jpeg_bytes(), "image/jpeg")})
        assert response.status_code == 200 and response.json()["predictions"][0]["decision"]


def test_bad_model_or_option_fails_before_serving(served, tmp_path):
    run, _ = served
    with pytest.raises(ConfigError, match="decision"):
        create_app(run, ServeOptions(DecisionOptions(decision="vote")))
    with pytest.raises(ConfigError, match="OOD method"):
        create_app(run, ServeOptions(DecisionOptions(ood_tpr=0.9)))
    with pytest.raises(ModelError):
        create_app(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- page, docs
def test_page_and_docs_are_served_offline(client, offline_page):
    page = client.get("/")
    assert page.status_code == 200 and 'id="files"' in page.text and "default-src 'self'" in \
        page.headers["content-security-policy"]
    offline_page(page.text, same_origin=True)
    static = Path(__file__).parents[2] / "src/taxonomist/deploy/serve/static"
    wrap = {".html": "{}", ".js": "<script>{}</script>", ".css": "<style>{}</style>"}
    for f in static.iterdir():
        # the page's own files may name paths on its server, never an address elsewhere
        offline_page(wrap[f.suffix].format(f.read_text(encoding="utf-8")), same_origin=True)
        assert client.get(f"/static/{f.name}").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "cdn" not in docs.text


# ---------------------------------------------------------------------------------------------- batching
def test_micro_batcher_groups_splits_and_reports_errors():
    calls, gate = [], threading.Event()

    def double(xs):
        gate.wait(5)
        calls.append(list(xs))
        if "boom" in xs:
            raise ValueError("boom")
        return [x * 2 for x in xs]

    with MicroBatcher(double, max_batch=4, max_wait_ms=0) as b:
        first = b.submit([1])                      # taken alone while the worker is blocked in `double`
        time.sleep(0.05)
        later = [b.submit([k, k]) for k in (2, 3)] + [b.submit(list(range(10, 16)))]
        gate.set()
        assert first.result(5) == [2]
        assert [f.result(5) for f in later] == [[4, 4], [6, 6], [20, 22, 24, 26, 28, 30]]
        assert calls[1] == [2, 2, 3, 3]            # two waiting requests shared one call
        assert calls[2:] == [[10, 11, 12, 13], [14, 15]]  # a request over max_batch is split
        assert b.submit(["boom"]).exception(5).args == ("boom",)
        assert b.submit([7]).result(5) == [14]      # the worker survives a failing batch
        assert b.stats.largest_batch == 4


def test_concurrent_requests_are_batched(served):
    run, data = served
    files = {f"{f.parent.name}/{f.name}": f.read_bytes() for f in images_of(data)[:12]}
    with TestClient(create_app(run, max_batch=8, max_wait_ms=200)) as c:
        def post(name):
            return c.post("/predict", files={"file": (name, files[name], "image/jpeg")}).json()["predictions"][0]

        single = {name: post(name) for name in list(files)[:3]}
        before = c.app.state.batcher.stats.batches
        results: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda n=name: results.__setitem__(n, post(n))) for name in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = c.app.state.batcher.stats
        assert sorted(results) == sorted(files)
        assert stats.batches - before < 12 and stats.largest_batch > 1   # requests shared forward passes
        for name, answer in single.items():                               # and got their own answers
            assert results[name]["filename"] == name and results[name]["decision"] == answer["decision"]
            assert results[name]["confidence"] == pytest.approx(answer["confidence"], abs=1e-5)
        assert c.get("/health").json()["batching"]["largest_batch"] == stats.largest_batch


def test_a_text_context_field_applies_the_priors_as_predict_does(served, tmp_path):
    """With --priors, a text `context` (one per request or one per file) shifts the answers exactly as predict
    shifts an images CSV's rows; the answer without the priors comes back as `raw`."""
    from taxonomist.inference.model_file import read_card
    from taxonomist.inference.predict import predict

    run, data = served
    labels = read_card(run).taxonomy.labels
    priors = tmp_path / "priors.csv"
    priors.write_text("context,taxon,weight\n" + "".join(f"site=A,{name},1\n" for name in labels[:2]))
    files = images_of(data)[:6]
    contexts = ["site=A", "site=B", "site=A", "", "site=A", "site=A;depth=9"]
    csv = tmp_path / "images.csv"
    pd.DataFrame({"path": [str(f) for f in files], "context": contexts}).to_csv(csv, index=False)
    options = DecisionOptions("min-risk", candidates="all", priors=priors)
    offline = pd.read_csv(predict(run, csv, tmp_path / "p.csv", options, device="cpu", num_workers=0,
                                  progress=False, engine="torch").out, keep_default_na=False)
    app = create_app(run, ServeOptions(options, device="cpu", engine="torch"), max_batch=4, max_wait_ms=2)
    with TestClient(app) as c:
        assert c.get("/health").json()["priors"]["contexts"] == ["site=A"]
        upload = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
        response = c.post("/predict", files=upload, data={"context": contexts})
        assert response.status_code == 200, response.text
        answers = response.json()["predictions"]
        assert [a["decision"] for a in answers] == offline["prediction"].tolist()
        assert [a["raw"]["decision"] for a in answers] == offline["raw_prediction"].tolist()
        assert [a["priors"]["applied"] for a in answers] == offline["prior_applied"].tolist()
        assert answers[0]["priors"] == {"context": "site=A", "applied": True, "conflict": False}
        # one context for every file of the request
        one = c.post("/predict", files=upload[:2], data={"context": "site=A"}).json()["predictions"]
        assert [a["priors"]["context"] for a in one] == ["site=A", "site=A"]
        wrong = c.post("/predict", files=upload[:3], data={"context": ["site=A", "site=B"]})
        assert wrong.status_code == 400 and "2 texts for 3 files" in wrong.json()["error"]
