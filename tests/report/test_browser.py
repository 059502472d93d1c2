"""The report in a real browser: headless Chromium loads it with no console error, every image decodes, and
the screenshot is not blank. Skipped only when Chromium is absent (`./run test` installs it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; "
                                                          "./run test installs it)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]

# Injected first into a copy of the report: records script errors and resources that fail to load (capture
# phase: an <img> error does not bubble), and at load writes them, with the images that did not decode, into
# the DOM that --dump-dom prints.
PROBE = """<script>
window.__problems = [];
window.addEventListener("error", function (e) {
  var t = e.target;
  window.__problems.push(t && t.tagName ? "failed to load " + t.tagName + " " + String(t.src || "").slice(0, 40)
                                        : "error: " + e.message);
}, true);
var original = console.error;
console.error = function () { window.__problems.push("console.error: " + Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); };
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({problems: window.__problems, images: images.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def chromium(profile, *args, timeout=120):
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_report_opens_without_errors_and_renders(reports, tmp_path):
    report = reports.run / "report.html"
    probed = tmp_path / "probed.html"
    probed.write_text(reports.single.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")

    dom = chromium(tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the probe did not run: " + dom.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["problems"] == []
    assert probe["images"] >= 8 and probe["broken"] == 0
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)]
    assert console == []

    shot = tmp_path / "shot.png"
    run = chromium(tmp_path / "profile-shot", "--window-size=1280,2000", f"--screenshot={shot}", report.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20            # text, tables and figures, not an empty page
    assert (pixels < 128).mean() > 0.01  # some dark ink
