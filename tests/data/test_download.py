"""`data download` against a loopback HTTP server that injects faults: retries, refusals, resume after a kill."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data.download import FAILURES_CSV, _retry_after, download_coco_images, image_problem
from taxonomist.errors import ConfigError, DataError

#: the test servers listen on 127.0.0.1, which downloads refuse unless told otherwise (SSRF)
FAST = {"backoff": 0.01, "max_backoff": 2.0, "allow_private_addresses": True}


def png_bytes(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class FaultyServer:
    """Serves `images[path]`; `plan[path]` lists what the 1st, 2nd, … request gets, then plain success.

    Faults: 500, 429 (Retry-After: 1), reset (RST after a few bytes), truncated (Content-Length larger
    than the body), html (a 200 error page), slow (silent for `slow_s`, beyond the client's timeout),
    404, drip (the body in small pieces over `drip_s`, for the kill test).
    """

    def __init__(self, images: dict[str, bytes], plan: dict[str, list[str]] | None = None,
                 slow_s: float = 1.0, drip_s: float = 0.0):
        self.images, self.plan = images, plan or {}
        self.slow_s, self.drip_s = slow_s, drip_s
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with owner.lock:
                    n = owner.counts[path]
                    owner.counts[path] += 1
                    owner.times[path].append(time.monotonic())
                steps = owner.plan.get(path, [])
                try:
                    owner.respond(self, path, steps[n] if n < len(steps) else "ok")
                except OSError:
                    pass  # the client gave up (timeout) or we reset the connection on purpose

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(self, h: BaseHTTPRequestHandler, path: str, action: str) -> None:
        body = self.images.get(path)
        if action == "404" or body is None:
            h.send_error(404)
        elif action == "500":
            h.send_error(500)
        elif action == "429":
            h.send_response(429)
            h.send_header("Retry-After", "1")
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif action == "slow":
            time.sleep(self.slow_s)
            self._send(h, body)
        elif action == "html":
            self._send(h, b"<!doctype html><html><body>Service temporarily unavailable</body></html>", "text/html")
        elif action == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(body) + 500))
            h.end_headers()
            h.wfile.write(body)
            h.wfile.flush()
            h.close_connection = True
        elif action == "reset":
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:20])
            h.wfile.flush()
            # SO_LINGER 0: close() sends a TCP RST instead of a clean FIN
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            h.connection.close()
        elif action == "drip":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            pieces = np.array_split(np.frombuffer(body, np.uint8), 4)
            for piece in pieces:
                time.sleep(self.drip_s / len(pieces))
                h.wfile.write(piece.tobytes())
                h.wfile.flush()
        else:
            self._send(h, body)

    @staticmethod
    def _send(h, body: bytes, content_type: str = "image/png") -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def coco_from_fixture(fixtures_dir: Path, tmp_path: Path, server: FaultyServer, paths: list[str]) -> tuple[Path, dict]:
    """The real FathomNet test file cut to len(paths) images whose coco_url points at the loopback server."""
    data = json.loads((fixtures_dir / "fathomnet2025_test.json").read_text())
    images = data["images"][: len(paths)]
    for image, path in zip(images, paths):
        image["coco_url"] = server.url(path)
        image["flickr_url"] = server.url(path)
    keep = {im["id"] for im in images}
    data["images"] = images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    out = tmp_path / "coco.json"
    out.write_text(json.dumps(data))
    return out, {path: image["file_name"] for image, path in zip(images, paths)}


def read_failures(out_dir: Path) -> dict[str, list[str]]:
    with open(out_dir / FAILURES_CSV, newline="") as f:
        return {row["file_name"]: [row["url"], row["reason"]] for row in csv.DictReader(f)}


def test_faults_are_retried_and_reported(fixtures_dir, tmp_path):
    plan = {"/ok1.png": [], "/ok2.png": [], "/e500.png": ["500"], "/e429.png": ["429"], "/reset.png": ["reset"],
            "/trunc.png": ["truncated"], "/slow.png": ["slow"], "/html.png": ["html"] * 10, "/e404.png": ["404"] * 10}
    images = {path: png_bytes(i) for i, path in enumerate(plan)}
    # timeouts are generous so that a busy CI machine does not turn a good request into a retry
    with FaultyServer(images, plan, slow_s=3.0) as server:
        coco_json, names = coco_from_fixture(fixtures_dir, tmp_path, server, list(plan))
        out = tmp_path / "images"
        summary = download_coco_images(coco_json, out, workers=4, retries=3, timeout=1.5, **FAST)

        good = [p for p in plan if p not in ("/html.png", "/e404.png")]
        for path in good:
            target = out / names[path]
            assert target.read_bytes() == images[path], path
            assert image_problem(target.read_bytes()) is None
        assert summary.downloaded == len(good) and summary.skipped == 0 and not summary.ok
        failures = {name: reason for name, _, reason in summary.failures}
        assert set(failures) == {names["/html.png"], names["/e404.png"]}
        assert failures[names["/e404.png"]] == "HTTP 404 Not Found"
        assert failures[names["/html.png"]] == "not an image (cannot identify image file) (after 4 attempts)"
        assert not (out / names["/html.png"]).exists() and not (out / names["/e404.png"]).exists()

        # each fault cost exactly one extra request; 404 is permanent, the HTML page was retried to the limit
        counts = dict(server.counts)
        assert {p: counts[p] for p in good} == {"/ok1.png": 1, "/ok2.png": 1, "/e500.png": 2, "/e429.png": 2,
                                                "/reset.png": 2, "/trunc.png": 2, "/slow.png": 2}
        assert counts["/e404.png"] == 1 and counts["/html.png"] == 4
        t429 = server.times["/e429.png"]
        assert t429[1] - t429[0] >= 0.95  # Retry-After: 1 was honoured, not the 10 ms backoff

        on_disk = read_failures(out)
        assert on_disk[names["/e404.png"]] == [server.url("/e404.png"), "HTTP 404 Not Found"]
        assert set(on_disk) == set(failures)
        text = str(summary)
        assert f"{len(plan)} images" in text and f"{len(good)} downloaded" in text and "2 failed" in text
        assert FAILURES_CSV in text

        # a re-run fetches nothing it already has; once the server is fixed the failures CSV goes away
        server.plan.clear()
        again = download_coco_images(coco_json, out, workers=4, retries=3, timeout=1.5, **FAST)
        assert again.ok and again.skipped == len(good) and again.downloaded == 2
        assert all(server.counts[p] == counts[p] for p in good)
        assert not (out / FAILURES_CSV).exists() and again.failures_csv is None
        assert not list(out.glob(".*.tmp"))


def test_refused_paths_and_urls(tmp_path):
    images = {"/a.png": png_bytes(1)}
    with FaultyServer(images) as server:
        entries = [("../x.png", server.url("/a.png")), ("/etc/x.png", server.url("/a.png")),
                   ("sub/../../y.png", server.url("/a.png")), ("C:\\z.png", server.url("/a.png")),
                   ("file.png", "file:///etc/passwd"), ("ftp.png", "ftp://127.0.0.1/a.png"),
                   ("nourl.png", None), ("sub/good.png", server.url("/a.png"))]
        coco = {"images": [{"id": i, "file_name": name, **({"coco_url": url} if url else {})}
                           for i, (name, url) in enumerate(entries)]}
        coco_json = tmp_path / "c.json"
        coco_json.write_text(json.dumps(coco))
        out = tmp_path / "deep" / "out"
        summary = download_coco_images(coco_json, out, workers=2, retries=1, timeout=2, **FAST)
        reasons = {name: reason for name, _, reason in summary.failures}
        for name in ("../x.png", "/etc/x.png", "sub/../../y.png", "C:\\z.png"):
            assert reasons[name] == "refused: file_name would escape the output folder"
        assert reasons["file.png"] == "refused: URL scheme 'file' is not http(s)"
        assert reasons["ftp.png"] == "refused: URL scheme 'ftp' is not http(s)"
        assert "has no coco_url" in reasons["nourl.png"]
        assert summary.downloaded == 1 and (out / "sub" / "good.png").read_bytes() == images["/a.png"]
        assert server.counts["/a.png"] == 1   # nothing refused ever reached the network
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["good.png"]
    assert len(read_failures(out)) == 7


def test_redirect_to_another_scheme_is_refused(tmp_path):
    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/secret.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        coco_json = tmp_path / "c.json"
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        coco_json.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "coco_url": url}]}))
        summary = download_coco_images(coco_json, tmp_path / "out", retries=2, timeout=2, **FAST)
    finally:
        server.shutdown()
        server.server_close()
    assert summary.failures[0][2].startswith("redirect to a refused URL scheme 'ftp'")


def test_malformed_coco_and_bad_arguments(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("<html>")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        download_coco_images(bad, tmp_path / "out")
    bad.write_text('{"info": {}}')
    with pytest.raises(DataError, match=r"bad.json: no 'images' list"):
        download_coco_images(bad, tmp_path / "out")
    bad.write_text('{"images": [{"id": 3, "coco_url": "http://127.0.0.1/x.png"}]}')
    with pytest.raises(DataError, match=r"bad.json: images\[0\] \(id 3\) has no file_name"):
        download_coco_images(bad, tmp_path / "out")
    for kwargs in ({"workers": 0}, {"retries": -1}, {"timeout": 0}, {"backoff": -1.0}):
        with pytest.raises(ConfigError):
            download_coco_images(bad, tmp_path / "out", **kwargs)
    assert main(["data", "download", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: images[0] (id 3) has no file_name"]


def test_cli_exit_status(fixtures_dir, tmp_path, capsys):
    images = {"/a.png": png_bytes(1), "/b.png": png_bytes(2)}
    with FaultyServer(images, {"/b.png": ["404"]}) as server:
        coco_json, names = coco_from_fixture(fixtures_dir, tmp_path, server, ["/a.png", "/b.png"])
        out = tmp_path / "out"
        assert main(["data", "download", str(coco_json), str(out), "--workers", "2", "--retries", "0",
                     "--allow-private-addresses"]) == 1
        assert "1 downloaded" in capsys.readouterr().out
        assert main(["data", "download", str(coco_json), str(out), "--workers", "2", "--retries", "0",
                     "--allow-private-addresses"]) == 0
        assert "1 downloaded" in capsys.readouterr().out and server.counts["/a.png"] == 1


def test_retry_after_header():
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0   # a date in the past: go now


def test_kill_and_resume(fixtures_dir, tmp_path):
    """SIGKILL a slow download part-way; the re-run completes and does not fetch finished files again."""
    paths = [f"/img{i:02d}.png" for i in range(12)]
    images = {p: png_bytes(i, size=(64, 48)) for i, p in enumerate(paths)}
    plan = {p: ["drip"] for p in paths}
    with FaultyServer(images, plan, drip_s=0.4) as server:
        coco_json, names = coco_from_fixture(fixtures_dir, tmp_path, server, paths)
        out = tmp_path / "out"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        proc = subprocess.Popen([sys.executable, "-m", "taxonomist.cli.main", "data", "download", str(coco_json),
                                 str(out), "--workers", "2", "--retries", "0", "--allow-private-addresses"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        try:
            # kill once a few files are in place and another body is still arriving
            while time.monotonic() < deadline:
                done = [p for p in paths if (out / names[p]).exists()]
                if len(done) >= 3 and sum(server.counts.values()) > len(done):
                    break
                time.sleep(0.02)
            time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        finished = [p for p in paths if (out / names[p]).exists()]
        assert 3 <= len(finished) < len(paths)
        for p in finished:  # nothing partial sits under a final name
            assert (out / names[p]).read_bytes() == images[p]
        before = dict(server.counts)
        assert sum(before.values()) > len(finished)   # the kill interrupted at least one transfer

        # a kill during the write itself leaves a temporary beside the final name; the re-run clears it
        stale = out / f".{names[paths[-1]]}.k1ll3d.tmp"
        stale.write_bytes(images[paths[-1]][:40])
        server.plan.clear()
        summary = download_coco_images(coco_json, out, workers=4, retries=1, timeout=5, **FAST)
        assert summary.ok and summary.skipped == len(finished)
        assert summary.downloaded == len(paths) - len(finished)
        for p in paths:
            assert (out / names[p]).read_bytes() == images[p]
        for p in finished:
            assert server.counts[p] == 1, p
        assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ SSRF and file-name limits
def _coco(tmp_path: Path, entries: list[tuple[str, str]]) -> Path:
    coco_json = tmp_path / "c.json"
    coco_json.write_text(json.dumps({"images": [{"id": i, "file_name": name, "coco_url": url}
                                                for i, (name, url) in enumerate(entries)]}))
    return coco_json


def test_private_addresses_are_refused_by_default(tmp_path, capsys):
    """Without --allow-private-addresses no request reaches loopback, link-local or private addresses; the
    refusals are failure rows, and the one server that could answer (127.0.0.1) sees no request at all."""
    with FaultyServer({"/a.png": png_bytes(1)}) as server:
        port = server.port
        entries = [("loop.png", server.url("/a.png")), ("localhost.png", f"http://localhost:{port}/a.png"),
                   ("v6.png", f"http://[::1]:{port}/a.png"), ("mapped.png", f"http://[::ffff:127.0.0.1]:{port}/a.png"),
                   ("zero.png", f"http://0.0.0.0:{port}/a.png"), ("ten.png", "http://10.1.2.3/a.png"),
                   ("home.png", "http://192.168.0.1/a.png"),
                   ("metadata.png", "http://169.254.169.254/latest/meta-data/"),
                   ("decimal.png", f"http://2130706433:{port}/a.png")]   # 127.0.0.1 written as one number
        coco_json = _coco(tmp_path, entries)
        summary = download_coco_images(coco_json, tmp_path / "out", workers=2, retries=2, timeout=2,
                                       backoff=0.01)
        reasons = {name: reason for name, _, reason in summary.failures}
        assert summary.downloaded == 0 and set(reasons) == {name for name, _ in entries}
        for name in ("loop.png", "localhost.png", "v6.png", "mapped.png", "decimal.png"):
            assert reasons[name].startswith("refused: ") and "loopback address" in reasons[name], reasons[name]
        assert "private address" in reasons["ten.png"] and "private address" in reasons["home.png"]
        assert "link-local address" in reasons["metadata.png"]
        assert "address" in reasons["zero.png"] and reasons["zero.png"].startswith("refused: ")
        assert all("--allow-private-addresses" in r for r in reasons.values())
        assert "after" not in "".join(reasons.values())          # refused at once, never retried
        assert sum(server.counts.values()) == 0
        assert len(read_failures(tmp_path / "out")) == len(entries)

        # the CLI: refused by default (exit 1, the reason printed); the opt-in fetches from the local server
        one = _coco(tmp_path, entries[:1])
        assert main(["data", "download", str(one), str(tmp_path / "cli"), "--retries", "0"]) == 1
        assert "loopback address" in capsys.readouterr().out and sum(server.counts.values()) == 0
        assert main(["data", "download", str(one), str(tmp_path / "cli"), "--retries", "0",
                     "--allow-private-addresses"]) == 0
        assert server.counts["/a.png"] == 1 and (tmp_path / "cli" / "loop.png").is_file()


def test_redirect_to_a_private_address_is_refused(tmp_path, monkeypatch):
    """A public URL that redirects into the private network is refused at the redirect. 127.0.0.1 plays the public
    server here (the only address the test may use); the redirect target 127.0.0.2 stays private and is never
    contacted."""
    import taxonomist.data.download as download

    real = download._address_kind
    monkeypatch.setattr(download, "_address_kind", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    hits = []

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{self.server.server_address[1]}/secret.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        summary = download_coco_images(_coco(tmp_path, [("a.png", url)]), tmp_path / "out", retries=2, timeout=2,
                                       backoff=0.01)
    finally:
        server.shutdown()
        server.server_close()
    (name, _, reason), = summary.failures
    assert reason.startswith("refused: 127.0.0.2 is a loopback address"), reason
    assert hits == ["/a.png"]                                   # one request, the redirect itself; no retry


def test_over_long_file_names_are_failure_rows(tmp_path):
    """A file_name the file system cannot hold (a name over 255 bytes, a file name over 241 with its temporary
    suffix, a lone surrogate) is one failure row; the other images still download."""
    images = {"/a.png": png_bytes(1)}
    with FaultyServer(images) as server:
        url = server.url("/a.png")
        names = ["a" * 300 + ".png", "é" * 130 + ".png", "b" * 238 + ".png", ("c" * 256) + "/x.png",
                 "\ud800.png", "fits/" + "d" * 237 + ".png", "ok.png"]
        summary = download_coco_images(_coco(tmp_path, [(n, url) for n in names]), tmp_path / "out", workers=2,
                                       retries=0, timeout=5, **FAST)
    reasons = {name: reason for name, _, reason in summary.failures}
    assert set(reasons) == set(names[:5]), reasons
    assert "304 bytes, over the 241-byte limit of a file name" in reasons[names[0]]
    assert "264 bytes" in reasons[names[1]]                                  # UTF-8 bytes, not characters
    assert "242 bytes" in reasons[names[2]]
    assert "256 bytes, over the 255-byte limit of a folder name" in reasons[names[3]]
    assert "cannot hold" in reasons[names[4]]
    assert all(len(r) < 200 for r in reasons.values())                      # the name is cut in the reason
    assert summary.downloaded == 2 and (tmp_path / "out" / "ok.png").is_file()
    assert (tmp_path / "out" / names[5]).read_bytes() == images["/a.png"]   # 241 bytes: the longest that fits
    assert len(read_failures(tmp_path / "out")) == 5
    assert server.counts["/a.png"] == 2
