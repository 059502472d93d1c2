"""The page of `taxonomist serve` in a real browser: a real server (the CLI, uvicorn) on a free port, headless
Chromium driven over the DevTools protocol (`--remote-debugging-pipe`, no websocket library needed) uploads an
image through the page's file input, and the decision, lineage and top 5 appear — with no script error and no
request to any other host. Skipped only when Chromium is absent (`./run test` installs it)."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; "
                                                          "./run test installs it)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--disable-extensions"]


class DevTools:
    """A minimal Chrome DevTools Protocol client over `--remote-debugging-pipe` (fd 3 in, fd 4 out, JSON
    messages ending in NUL). `call` sends a command and waits for its answer; events are kept in `events`."""

    def __init__(self, profile: Path):
        to_chrome, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome = os.pipe()

        def wire():  # in the child: the pipe ends become fds 3 and 4 (via fds ≥ 10 so the two cannot collide)
            a, b = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                      "about:blank"], preexec_fn=wire, close_fds=False,  # keep fds 3 and 4
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._next, self._answers, self.events = 0, {}, []
        self._lock = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._lock:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._answers[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._lock.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        with self._lock:
            self._next += 1
            key = self._next
        msg = {"id": key, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._lock:
            if not self._lock.wait_for(lambda: key in self._answers, timeout):
                raise TimeoutError(f"no answer to {method}")
            answer = self._answers.pop(key)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.evaluate(session, expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied {expression}")

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_chrome)
        self._reader.join(10)  # Chromium gone: the reader has seen the end of its pipe
        os.close(self._from_chrome)


def open_page(tools: DevTools, url: str, width: int = 1280, height: int = 800) -> str:
    """Open `url` in a new tab with network, runtime and log events on; returns the session id."""
    target = tools.call("Target.createTarget", url="about:blank")["targetId"]
    session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Network", "Log", "DOM"):
        tools.call(f"{domain}.enable", session)
    tools.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
               mobile=False)
    tools.call("Page.navigate", session, url=url)
    tools.wait_for(session, "document.readyState === 'complete' && !!document.getElementById('files')")
    return session


def upload(tools: DevTools, session: str, files: list[Path]) -> None:
    """Choose `files` in the page's file input, as a user would in the file dialog."""
    root = tools.call("DOM.getDocument", session)["root"]["nodeId"]
    node = tools.call("DOM.querySelector", session, nodeId=root, selector="#files")["nodeId"]
    tools.call("DOM.setFileInputFiles", session, nodeId=node, files=[str(f) for f in files])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, *extra: str) -> subprocess.Popen:
    """`taxonomist serve MODEL --port PORT` in a subprocess; returns once /health answers."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "taxonomist.cli.main", "serve", str(model), "--port", str(port),
                             "--device", "cpu", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve did not answer /health within 90 s")


@pytest.fixture(scope="module")
def served(served_run):
    run, data = served_run
    port = free_port()
    proc = start_server(run, port, "--ood", "energy")
    yield f"http://127.0.0.1:{port}", data
    proc.terminate()
    proc.wait(30)


def test_page_uploads_an_image_and_shows_the_decision(served, tmp_path):
    import httpx

    base, data = served
    images = sorted((data / "images").rglob("*.jpg"))[:2]
    expected = httpx.post(f"{base}/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg"))
                                                      for p in images], timeout=60).json()["predictions"]
    tools = DevTools(tmp_path / "profile")
    try:
        session = open_page(tools, base + "/")
        assert "Model run/checkpoints/best.safetensors" in tools.wait_for(
            session, "document.getElementById('model').textContent.startsWith('Model') && "
                     "document.getElementById('model').textContent")
        upload(tools, session, images)
        tools.wait_for(session, "document.querySelectorAll('.card.done').length === 2")
        cards = tools.evaluate(session, """Array.from(document.querySelectorAll('.card.done')).map(c => ({
            file: c.querySelector('.filename').textContent, decision: c.querySelector('.decision').textContent,
            levels: c.querySelectorAll('.lineage tr').length, bars: c.querySelectorAll('.bar[role=meter]').length,
            top: c.querySelectorAll('.top li').length, image: c.querySelector('img').naturalWidth,
            unknownShown: !c.querySelector('.unknown').hidden}))""")
        by_file = {c["file"]: c for c in cards}
        for answer in expected:
            card = by_file[answer["filename"]]
            assert card["decision"] == answer["decision"]
            assert card["levels"] == card["bars"] == len(answer["lineage"]) > 1
            assert card["top"] == 5 and card["image"] > 0
            assert card["unknownShown"] == answer["ood"]["unknown"]

        shot = base64.b64decode(tools.call("Page.captureScreenshot", session, format="png")["data"])
        from io import BytesIO

        import numpy as np
        from PIL import Image
        pixels = np.asarray(Image.open(BytesIO(shot)).convert("L"), dtype=np.float64)
        assert pixels.shape == (800, 1280) and pixels.std() > 20   # images, text and bars, not a blank page

        errors = [e for e in tools.events if e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
        assert errors == []
        urls = [e["params"]["request"]["url"] for e in tools.events if e["method"] == "Network.requestWillBeSent"]
        assert any(u.endswith("/predict") for u in urls)
        assert all(u.startswith((base + "/", "blob:", "data:")) for u in urls), urls
    finally:
        tools.close()


# ---------------------------------------------------------------------------------------------- boxes on frames
@pytest.fixture(scope="module")
def served_two_stream(two_stream_run):
    run, _, frames, _ = two_stream_run
    port = free_port()
    proc = start_server(run, port)
    yield f"http://127.0.0.1:{port}", frames
    proc.terminate()
    proc.wait(30)


def drag(tools: DevTools, session: str, selector: str, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Press, move in steps and release the left mouse button from `start` to `end` (pixels of the element
    `selector`): Chromium turns these into the pointerdown/move/up events a user's mouse makes."""
    left, top = tools.evaluate(session, f"(() => {{ const r = document.querySelector({selector!r})"
                                        ".getBoundingClientRect(); return [r.left, r.top]; })()")
    (x0, y0), (x1, y1) = (left + start[0], top + start[1]), (left + end[0], top + end[1])
    tools.call("Input.dispatchMouseEvent", session, type="mousePressed", x=x0, y=y0, button="left", buttons=1,
               clickCount=1)
    for k in range(1, 5):
        tools.call("Input.dispatchMouseEvent", session, type="mouseMoved", x=x0 + (x1 - x0) * k / 4,
                   y=y0 + (y1 - y0) * k / 4, button="left", buttons=1)
    tools.call("Input.dispatchMouseEvent", session, type="mouseReleased", x=x1, y=y1, button="left", buttons=0,
               clickCount=1)


def test_page_draws_a_box_on_a_frame_and_identifies_the_organism(served_two_stream, tmp_path):
    import httpx

    base, frames = served_two_stream
    frame = frames / "dive0" / "frame00.png"            # 112×84: shown at its own size (scale 1)
    tools = DevTools(tmp_path / "profile")
    try:
        session = open_page(tools, base + "/")
        assert "draw a box around it" in tools.wait_for(
            session, "document.getElementById('model').textContent.includes('3× the box') && "
                     "document.getElementById('model').textContent")
        assert tools.evaluate(session, "[document.getElementById('use-box').checked, "
                                       "document.getElementById('use-box').disabled]") == [True, True]
        # the geometry on a frame shown at half size: display pixels → whole frame pixels, clamped to the frame
        assert tools.evaluate(session, """(() => { const B = window.TaxonomistBox; return [
            B.fit(1920, 1080, 720, 480), B.fromDrag(10, 10, 20.5, 30, 0.5, 100, 100),
            B.fromDrag(-5, -5, 300, 20, 0.5, 100, 100), B.fromDrag(7, 7, 7.2, 9, 0.5, 100, 100),
            B.parse('[3 4 5.5 6]', 100, 100), B.parse('1,2,0,4', 100, 100), B.parse('100,2,3,4', 100, 100),
            B.visible({x: -3, y: 6, w: 38, h: 39}, 112, 84)]; })()""") == [
            0.375, {"x": 20, "y": 20, "w": 21, "h": 40}, {"x": 0, "y": 0, "w": 100, "h": 40}, None,
            {"x": 3, "y": 4, "w": 5.5, "h": 6}, None, None, {"x": 0, "y": 6, "w": 35, "h": 39}]
        upload(tools, session, [frame])
        tools.wait_for(session, "document.querySelectorAll('.frame.loaded').length === 1")
        assert tools.evaluate(session, "[document.querySelector('.frame-canvas').width, "
                                       "document.querySelector('.frame-canvas').height, "
                                       "document.querySelector('.identify').disabled]") == [112, 84, True]
        # drag from the lower right to the upper left: the box is the same rectangle
        drag(tools, session, ".frame-canvas", (105, 80), (70, 44))
        assert tools.evaluate(session, "document.querySelector('.box-field').value") == "70,44,35,36"
        drag(tools, session, ".frame-canvas", (20, 20), (21, 20))    # a click, not a box: the box stays
        assert tools.evaluate(session, "document.querySelector('.box-field').value") == "70,44,35,36"
        # the box is drawn: its outline is yellow, the frame outside it dimmed
        outline, outside = tools.evaluate(session, """(() => { const c = document.querySelector('.frame-canvas')
            .getContext('2d'); return [Array.from(c.getImageData(71, 60, 1, 1).data),
                                       Array.from(c.getImageData(20, 70, 1, 1).data)]; })()""")
        assert outline[:3] == [255, 212, 0] and max(outside[:3]) < 90 * 0.65 + 1
        tools.evaluate(session, "document.querySelector('.identify').click()")
        # a second organism's box typed by hand, in the same frame
        tools.evaluate(session, """(() => { const f = document.querySelector('.box-field'); f.value = '-3,6,38,39';
            f.dispatchEvent(new Event('input')); document.querySelector('.identify').click(); })()""")
        tools.wait_for(session, "document.querySelectorAll('.card.done').length === 2")
        cards = tools.evaluate(session, """Array.from(document.querySelectorAll('.card.done')).map(c => ({
            bbox: c.getAttribute('data-bbox'), decision: c.querySelector('.decision').textContent,
            caption: c.querySelector('.filename').textContent, levels: c.querySelectorAll('.lineage tr').length,
            thumb: [c.querySelector('img').naturalWidth, c.querySelector('img').naturalHeight]}))""")
        by_box = {c["bbox"]: c for c in cards}
        for bbox, thumb in (("70,44,35,36", [35, 36]), ("-3,6,38,39", [35, 39])):
            expected = httpx.post(f"{base}/predict", files=[("file", (frame.name, frame.read_bytes(), "image/png")),
                                                            ("bbox", (None, bbox))], timeout=60).json()
            answer = expected["predictions"][0]
            card = by_box[bbox]
            assert card["decision"] == answer["decision"] and card["levels"] == len(answer["lineage"]) > 1
            assert card["caption"] == f"frame00.png · box {bbox}" and card["thumb"] == thumb   # the ROI, clipped

        errors = [e for e in tools.events if e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
                  or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
        assert errors == []
        urls = [e["params"]["request"]["url"] for e in tools.events if e["method"] == "Network.requestWillBeSent"]
        assert sum(u.endswith("/predict") for u in urls) == 2
        assert all(u.startswith((base + "/", "blob:", "data:")) for u in urls), urls
    finally:
        tools.close()


# ---------------------------------------------------------------------------------------------- context priors
def test_page_sends_the_context_and_shows_the_answer_without_the_priors(served_run, tmp_path):
    """Started with --priors, the page offers the file's contexts, sends the typed one with each image, and says
    what the answer would be without it — the same answers the API gives for that context."""
    import httpx

    from taxonomist.inference.model_file import read_card

    run, data = served_run
    taxonomy = read_card(run).taxonomy
    leaf = [name for name in taxonomy.labels if not taxonomy.descendants(name)][0]
    priors = tmp_path / "priors.csv"
    priors.write_text(f"context,taxon,weight\nsite=A,{leaf},1\n")
    port = free_port()
    proc = start_server(run, port, "--priors", str(priors), "--prior-floor", "0")
    base = f"http://127.0.0.1:{port}"
    tools = DevTools(tmp_path / "profile")
    try:
        images = sorted((data / "images").rglob("*.jpg"))[:2]
        expected = httpx.post(f"{base}/predict", files=[("file", (p.name, p.read_bytes(), "image/jpeg"))
                                                          for p in images], data={"context": "site=A"},
                              timeout=60).json()["predictions"]
        session = open_page(tools, base + "/")
        tools.wait_for(session, "!document.getElementById('context-line').hidden")
        assert tools.evaluate(session, "Array.from(document.querySelectorAll('#contexts option')).map(o => o.value)"
                              ) == ["site=A"]
        tools.evaluate(session, "document.getElementById('context').value = 'site=A'")
        upload(tools, session, images)
        tools.wait_for(session, "document.querySelectorAll('.card.done').length === 2")
        cards = tools.evaluate(session, """Array.from(document.querySelectorAll('.card.done')).map(c => ({
            file: c.querySelector('.filename').textContent, decision: c.querySelector('.decision').textContent,
            priors: c.querySelector('.priors').textContent}))""")
        by_file = {c["file"]: c for c in cards}
        for answer in expected:
            card = by_file[answer["filename"]]
            assert card["decision"] == answer["decision"] == leaf   # the only label site A allows
            assert card["priors"].startswith("Reweighted by the context “site=A”.")
            assert (answer["raw"]["decision"] in card["priors"]) or "the same" in card["priors"]
    finally:
        tools.close()
        proc.terminate()
        proc.wait(30)
