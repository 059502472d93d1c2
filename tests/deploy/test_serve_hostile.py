"""`taxonomist serve` under hostile and careless use (issue 19): multi-frame uploads, a failing batch, the decode
budget, degenerate boxes, the Host check, CORS, option validation, a dead batching thread, and the uvicorn
guards of the real server (keep-alive and body timeouts)."""
from __future__ import annotations

import io
import math
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from fastapi.testclient import TestClient
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.deploy.serve import MicroBatcher, Predictor, ServeOptions, create_app
from taxonomist.deploy.serve.app import LOOPBACK_HOSTS, READ_TIMEOUT_S
from taxonomist.deploy.serve.uploads import MAX_DECODES, MAX_IMAGE_PIXELS, DecodeBudget

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client(served_run):
    run, _ = served_run
    with TestClient(create_app(run, ServeOptions(device="cpu"), max_batch=16, max_wait_ms=300)) as c:
        yield c


def image_bytes(fmt: str, frames: int = 1, size=(40, 30), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(frames)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    if frames == 1:
        images[0].save(buf, fmt, **extra)
    else:
        images[0].save(buf, fmt, save_all=True, append_images=images[1:], **extra)
    return buf.getvalue()


def post_together(c: TestClient, uploads: list[tuple[str, bytes]], data=None) -> list:
    """Post each upload from its own thread at once (the batcher waits 300 ms, so they share a batch)."""
    out: list = [None] * len(uploads)

    def one(k: int) -> None:
        name, raw = uploads[k]
        out[k] = c.post("/predict", files={"file": (name, raw, "application/octet-stream")}, data=data)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# ---------------------------------------------------------------------------------------------- frames, batches
def test_animated_uploads_share_a_batch_with_good_ones(client):
    """An animated GIF in a micro-batch failed every request of the batch with 500; now each animated format is
    answered as its first frame, and the other clients get their answers."""
    uploads = [(f"good{k}.jpg", image_bytes("JPEG", seed=k)) for k in range(4)]
    uploads += [(f"anim.{ext}", image_bytes(fmt, frames=5, seed=9)) for fmt, ext in
                (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif"))]
    before = client.app.state.batcher.stats.batches
    responses = post_together(client, uploads)
    assert [r.status_code for r in responses] == [200] * len(uploads), [r.text for r in responses]
    assert client.app.state.batcher.stats.batches - before < len(uploads)      # they did share batches
    first = image_bytes("PNG", frames=1, seed=9)                                 # the first frame, alone
    alone = client.post("/predict", files={"file": ("first.png", first, "image/png")}).json()["predictions"][0]
    for r in responses[5:]:                                                      # lossless formats: same pixels
        answer = r.json()["predictions"][0]
        assert answer["decision"] == alone["decision"]
        assert answer["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)


def test_a_failing_request_fails_alone(served_run):
    """If a batch still fails, its requests run again one by one: only the one at fault gets an error (422,
    JSON naming its file), every other client of the batch gets its answer."""
    run, _ = served_run
    predictor = Predictor.load(run, ServeOptions(device="cpu"))
    real = predictor.predict_images

    def model(inputs):                      # a fault injected into the model: it chokes on all-black images
        if any(float(x.flatten(1).std(1).max()) == 0.0 for x in inputs):
            raise RuntimeError("the model choked")
        return real(inputs)

    predictor.predict_images = model
    with TestClient(create_app(predictor, max_batch=16, max_wait_ms=300)) as c:
        uploads = [(f"good{k}.jpg", image_bytes("JPEG", seed=k)) for k in range(5)]
        black = io.BytesIO()
        Image.new("RGB", (40, 30)).save(black, "PNG")
        uploads.insert(2, ("black.png", black.getvalue()))
        responses = post_together(c, uploads)
        codes = [r.status_code for r in responses]
        assert codes == [200, 200, 422, 200, 200, 200], [r.text for r in responses]
        assert responses[2].json()["error"].startswith("'black.png': the model could not process")
        assert c.app.state.batcher.stats.retried >= 1
        assert c.get("/health").json()["batching"]["retried"] >= 1


def test_micro_batcher_retries_members_one_by_one():
    def fn(xs):
        if "bad" in xs:
            raise ValueError("bad item")
        return [x.upper() for x in xs]

    gate = threading.Event()
    with MicroBatcher(lambda xs: (gate.wait(5), fn(xs))[1], max_batch=8, max_wait_ms=0) as b:
        first = b.submit(["a"])                 # holds the worker while the others queue into one batch
        time.sleep(0.05)
        jobs = [b.submit(["b", "c"]), b.submit(["bad"]), b.submit(["d"])]
        gate.set()
        assert first.result(5) == ["A"]
        assert jobs[0].result(5) == ["B", "C"] and jobs[2].result(5) == ["D"]
        assert isinstance(jobs[1].exception(5), ValueError)
        assert b.stats.retried == 1 and b.alive


# ---------------------------------------------------------------------------------------------- decode budget
def test_decode_budget_bounds_pixels_in_flight():
    import asyncio

    budget = DecodeBudget(100)
    inside: list[int] = []

    async def decode(pixels: int) -> None:
        async with budget.reserve(pixels):
            inside.append(budget.in_flight)
            await asyncio.sleep(0.01)

    async def flood() -> None:
        await asyncio.gather(*(decode(p) for p in [60, 60, 30, 10, 100, 500, 1, 45] * 5))

    asyncio.run(flood())
    assert max(inside) <= 100 and budget.peak <= 100 and budget.in_flight == 0
    assert 60 + 30 + 10 in inside or 60 + 30 in inside          # small ones ran beside a large one


def test_large_uploads_decode_within_the_budget(served_run):
    """Concurrent uploads of the per-upload budget: never more than --max-decodes of them decode at once; one
    pixel over the budget is a 400 naming the file and the option."""
    run, _ = served_run
    side = 300
    with TestClient(create_app(run, max_image_pixels=side * side, max_decodes=1, max_wait_ms=50)) as c:
        uploads = [(f"big{k}.png", image_bytes("PNG", size=(side, side), seed=k)) for k in range(4)]
        uploads.append(("over.png", image_bytes("PNG", size=(side + 1, side), seed=7)))
        responses = post_together(c, uploads)
        assert [r.status_code for r in responses] == [200, 200, 200, 200, 400]
        assert "over.png: 301×300 pixels exceeds the limit of 90,000 pixels" in responses[4].json()["error"]
        assert "--max-image-pixels" in responses[4].json()["error"]
        assert c.app.state.decode_budget.peak == side * side       # one decode at a time
        assert c.get("/metadata").json()["limits"]["max_decodes"] == 1


# ---------------------------------------------------------------------------------------------- boxes
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
box_values = st.one_of(finite, st.floats(-2, 50), st.sampled_from([0.0, 0.3, 0.999, 1.0, -1e308, 1e308, 5e-324]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(x=box_values, y=box_values, w=box_values, h=box_values)
def test_any_box_is_answered_or_refused_with_a_400(client, x, y, w, h):
    """Box values, fuzzed: a box with at least one whole pixel inside the 40×30 frame is answered; any other —
    outside, below one pixel once clipped, zero or negative size — is a 400 naming the field, file and box."""
    frame = image_bytes("JPEG", size=(40, 30))
    text = f"{x!r},{y!r},{w!r},{h!r}"
    response = client.post("/predict", files={"file": ("frame.jpg", frame, "image/jpeg")}, data={"bbox": text})
    with np.errstate(over="ignore"):
        cw = min(x + w, 40) - min(max(x, 0), 40) if w > 0 else 0
        ch = min(y + h, 30) - min(max(y, 0), 30) if h > 0 else 0
    inside = w > 0 and h > 0 and cw >= 1 and ch >= 1 and math.isfinite(x + w) and math.isfinite(y + h)
    if inside:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        error = response.json()["error"]
        assert error.startswith("field 'bbox' of 'frame.jpg'"), error
        assert not inside, error


@pytest.mark.parametrize("box, words", [("50,10,5,5", "lies outside the 40×30 frame"),
                                        ("10,10,0.4,5", "covers 0.4×5 px"),
                                        ("39.8,10,5,5", "covers 0.2×5 px"),
                                        ("10,10,-3,5", "both must be > 0"),
                                        ("10,10,nan,5", "is not 4 numbers")])
def test_degenerate_boxes_are_a_400_naming_the_box(client, box, words):
    frame = image_bytes("JPEG", size=(40, 30))
    response = client.post("/predict", files={"file": ("frame.jpg", frame, "image/jpeg")}, data={"bbox": box})
    assert response.status_code == 400 and words in response.json()["error"], response.text


# ---------------------------------------------------------------------------------------------- host, CORS
def test_host_header_is_checked_when_bound_to_loopback(served_run):
    run, _ = served_run
    app = create_app(run, allowed_hosts=[*LOOPBACK_HOSTS, "taxa.example.org"])
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "TAXA.example.org"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "127.0.0.1.nip.io:8000", "localhost.evil"):
            response = c.get("/taxonomy", headers={"Host": host})
            assert response.status_code == 400 and "DNS rebinding" in response.json()["error"], host
            assert repr(host) in response.json()["error"]


def test_no_cors_headers(client):
    """CORS is off: no Access-Control-Allow-Origin, so a page of another origin cannot read an answer."""
    origin = {"Origin": "https://attacker.example"}
    for response in (client.get("/health", headers=origin), client.get("/taxonomy", headers=origin),
                     client.options("/predict", headers={**origin, "Access-Control-Request-Method": "POST"})):
        assert not any(k.lower().startswith("access-control-") for k in response.headers), response.headers


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("flag, value", [("--max-wait-ms", "inf"), ("--max-wait-ms", "nan"), ("--max-wait-ms", "-1"),
                                         ("--max-upload-mb", "inf"), ("--max-upload-mb", "0"),
                                         ("--max-upload-mb", "nan"), ("--read-timeout", "inf"),
                                         ("--max-image-pixels", "0"), ("--max-image-pixels", "10000000000"),
                                         ("--max-decodes", "0"), ("--max-connections", "0"),
                                         ("--timeout-keep-alive", "-5"), ("--allowed-host", "http://x/")])
def test_bad_serve_options_are_one_line_errors(served_run, capsys, flag, value):
    run, _ = served_run
    assert main(["serve", str(run), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} ") and "Traceback" not in err[0], err


def test_cli_defaults_match_the_service(served_run):
    from taxonomist.cli import serve as cli

    assert (cli.MAX_IMAGE_PIXELS, cli.MAX_DECODES, cli.READ_TIMEOUT_S) == (MAX_IMAGE_PIXELS, MAX_DECODES,
                                                                           READ_TIMEOUT_S)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_batcher_shows_in_health_and_fails_fast(served_run):
    run, _ = served_run
    with TestClient(create_app(run, max_wait_ms=0)) as c:
        upload = {"file": ("a.jpg", image_bytes("JPEG"), "image/jpeg")}
        assert c.post("/predict", files=upload).status_code == 200
        batcher = c.app.state.batcher

        def broken():                       # a fault injected into the worker loop: the thread dies
            raise OverflowError("timeout value is too large")

        batcher._take = broken
        # the worker dies on its next call of _take: this request is either run first (200) or refused (503)
        assert c.post("/predict", files=upload).status_code in (200, 503)
        batcher._thread.join(5)
        health = c.get("/health")
        assert health.status_code == 503 and "OverflowError" in health.json()["error"]
        start = time.perf_counter()
        response = c.post("/predict", files=upload)
        assert response.status_code == 503 and "batching thread stopped" in response.json()["error"]
        assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------- the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, raw: bytes, wait: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(raw)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in raw:
                break
        return b"".join(chunks)


def test_real_server_guards(served_run):
    """`taxonomist serve` on loopback: a foreign Host gets 400, an idle keep-alive connection is closed, a body
    that does not arrive within --read-timeout gets 408 (all on 127.0.0.1, bounded waits)."""
    run, _ = served_run
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "taxonomist.cli.main", "serve", str(run), "--port", str(port),
                             "--device", "cpu", "--timeout-keep-alive", "1", "--read-timeout", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                if b" 200 " in http(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("serve did not start")
        assert b" 400 " in http(port, b"GET /health HTTP/1.1\r\nHost: rebind.attacker.example\r\n"
                                      b"Connection: close\r\n\r\n").split(b"\r\n")[0]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:      # keep-alive, then idle
            s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            start, received = time.monotonic(), b""
            while chunk := s.recv(65536):                                        # until the server closes it
                received += chunk
            assert b" 200 " in received.split(b"\r\n")[0] and b'"status":"ok"' in received
            assert time.monotonic() - start < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:      # a body that never comes
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 5000\r\n\r\n--b\r\n")
            s.settimeout(10)
            answer = b""
            while b"--read-timeout" not in answer and (chunk := s.recv(65536)):
                answer += chunk
            assert b" 408 " in answer.split(b"\r\n")[0] and b"--read-timeout" in answer, answer[:300]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
