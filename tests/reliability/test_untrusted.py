"""Files from strangers: checkpoints (safetensors + JSON only, torch files with weights_only=True, metadata that
contradicts the weights), COCO file names and symlinks that aim outside the output folder, and servers that
redirect elsewhere or send endless bodies.

Covered elsewhere and not repeated here: `..`, absolute and drive-letter file names and file:// / ftp:// URLs
(tests/data/test_download.py::test_refused_paths_and_urls, ::test_redirect_to_another_scheme_is_refused),
frames whose file_name escapes the images folder (tests/data/test_coco_prepare.py).
"""
from __future__ import annotations

import ast
import json
import pickle
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

import taxonomist
from taxonomist.data.download import download_coco_images
from taxonomist.errors import ConfigError, ModelError
from taxonomist.train.checkpoint import (load_checkpoint, load_resume_state, metadata_path, read_metadata,
                                         save_checkpoint, taxonomy_to_json)

from .conftest import assert_refused, files_under, run_cli, tiny_overrides

SRC = Path(taxonomist.__file__).parent


def test_every_torch_load_in_the_package_uses_weights_only():
    """A static check of the source: each torch.load call passes weights_only=True (no pickle code runs)."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                calls.append((f"{path.relative_to(SRC)}:{node.lineno}", safe))
    assert calls, "expected the resume state and .pt weights to be read with torch.load"
    assert [where for where, safe in calls if not safe] == []


class _Payload:
    """Unpickling this would create a file: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_state_with_code_in_it_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    state = tmp_path / "last.state.pt"
    with open(state, "wb") as f:
        pickle.dump({"model": {}, "epoch": 0, "trap": _Payload(marker)}, f)
    with pytest.raises(ModelError, match="refused resume state"):
        load_resume_state(state)
    assert not marker.exists()
    torch.save({"epoch": 1, "history": [{"val_mhd": 0.5}], "best": float("inf")}, state)
    assert load_resume_state(state)["best"] == float("inf")       # plain values still load
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(ModelError, match="corrupt resume state"):
        load_resume_state(state)


def test_resume_state_of_a_real_run_loads_with_weights_only(tiny_run):
    state = torch.load(tiny_run / "checkpoints" / "last.state.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "history"} <= set(state)


# ------------------------------------------------------------------------- checkpoints that contradict
@pytest.fixture
def ckpt(tiny_run, tmp_path) -> Path:
    """A copy of tiny_run's best checkpoint (weights + JSON) to tamper with."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("best.safetensors", "best.json"):
        shutil.copyfile(tiny_run / "checkpoints" / name, folder / name)
    return folder / "best.safetensors"


def _edit(path: Path, change) -> None:
    meta = json.loads(metadata_path(path).read_text())
    change(meta)
    metadata_path(path).write_text(json.dumps(meta))


def _swap_labels(meta, both: bool):
    meta["labels"] = meta["labels"][1:] + meta["labels"][:1]
    if both:
        meta["taxonomy"]["labels"] = list(meta["labels"])


def _add_a_node(meta):
    """Add a sibling of the first label (a valid tree with the same labels, but not the trained one); the row
    order is reversed too, which alone must not matter."""
    rows = meta["taxonomy"]["rows"]
    row = next(r for r in rows if r["concept_name"] == meta["labels"][0])
    rows.append({k: ("Addedia nova" if v == row["concept_name"] else v) for k, v in row.items()})
    rows.reverse()


TAMPERING = {
    "labels edited": (lambda m: _swap_labels(m, both=False), "labels"),
    "labels and taxonomy edited together": (lambda m: _swap_labels(m, both=True), "saved for other labels"),
    "taxonomy tree edited": (lambda m: _add_a_node(m), "saved for other taxonomy"),
    "taxonomy hash edited": (lambda m: m.__setitem__("taxonomy_hash", "0" * 64), "saved for other taxonomy_hash"),
    "backbone edited": (lambda m: m["model_config"].__setitem__("backbone", "test_vit"), "backbone"),
    "backbone edited everywhere": (lambda m: (m["model_config"].__setitem__("backbone", "test_vit"),
                                             m.__setitem__("backbone", "test_vit")), "saved for other backbone"),
    "taxonomy removed": (lambda m: m.pop("taxonomy"), "incomplete checkpoint metadata"),
    "image size removed": (lambda m: m.pop("image_size"), "incomplete checkpoint metadata"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_metadata_is_refused(ckpt, case, tmp_path, capsys):
    change, message = TAMPERING[case]
    _edit(ckpt, change)
    with pytest.raises(ModelError, match=message):
        load_checkpoint(ckpt)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    code, _, err = run_cli(["predict", ckpt, "--images", tmp_path / "imgs", "--out", tmp_path / "p.csv",
                            "--workers", "0", "--device", "cpu"], capsys)
    assert_refused(code, err, str(ckpt.parent))
    assert not (tmp_path / "p.csv").exists()


def test_weights_from_another_run_are_refused(ckpt, tmp_path):
    """Same architecture, other labels: the shapes alone would not tell; the safetensors header does."""
    model, meta, taxonomy = load_checkpoint(ckpt)
    other = taxonomy.with_labels(list(reversed(taxonomy.labels)))
    save_checkpoint(tmp_path / "other.safetensors", model,
                    {**meta, "labels": list(other.labels), "taxonomy": taxonomy_to_json(other),
                     "taxonomy_hash": other.hash})
    load_checkpoint(tmp_path / "other.safetensors")                       # consistent on its own
    shutil.copyfile(tmp_path / "other.safetensors", ckpt)                  # …but not with best.json
    with pytest.raises(ModelError, match="saved for other labels"):
        load_checkpoint(ckpt)


def test_weights_of_another_architecture_or_cut_short_are_refused(ckpt, tmp_path):
    from safetensors.torch import save_file
    save_file({"backbone.conv.weight": torch.zeros(4, 3, 3, 3)}, str(ckpt))   # no taxonomist header
    with pytest.raises(ModelError, match="weights do not match the model described"):
        load_checkpoint(ckpt)
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")                # a broken header
    with pytest.raises(ModelError, match="cannot read checkpoint"):
        load_checkpoint(ckpt)
    metadata_path(ckpt).write_text("{ not json")
    with pytest.raises(ModelError, match="corrupt checkpoint metadata"):
        read_metadata(ckpt)


def test_finetuning_from_a_checkpoint_of_another_backbone_is_refused(tiny_run, tiny_data, tmp_path, capsys):
    argv = ["train", "--no-eval", "--no-calibrate"]
    for item in tiny_overrides(tiny_data, tmp_path / "run", "model.backbone=test_vit",
                               f"model.pretrained={tiny_run / 'checkpoints' / 'best.safetensors'}"):
        argv += ["--set", item]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, "best.safetensors", "test_vit")
    assert not (tmp_path / "run").exists()          # refused before the run directory is written


def test_resume_with_another_model_is_refused_and_leaves_the_run_alone(tiny_run, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = files_under(run)
    argv = ["train", "--resume", "--no-eval", "--no-calibrate"]
    for item in tiny_overrides(tiny_data, run, "model.backbone=test_vit", "train.epochs=2"):
        argv += ["--set", item]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, "model.backbone", "test_vit", "test_efficientnet")
    assert files_under(run) == before


# ----------------------------------------------------------------------------- symlinks out of the output
def _png() -> bytes:
    import io
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (40, 80, 120)).save(buf, format="PNG")
    return buf.getvalue()


class _Server:
    """A loopback HTTP server: `/img.png` (a PNG), `/big` (a body past any small cap, with Content-Length),
    `/stream` (the same without Content-Length), `/to-file` (a redirect to file:///etc/passwd)."""

    def __init__(self):
        png = _png()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/to-file":
                    self.send_response(302)
                    self.send_header("Location", "file:///etc/passwd")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = png if self.path == "/img.png" else png + b"\0" * 200_000
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                if self.path != "/stream":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if self.path == "/stream":
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_download_refuses_symlinks_out_oversized_bodies_and_file_redirects(tmp_path):
    outside, out = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "escape").symlink_to(outside, target_is_directory=True)
    with _Server() as server:
        entries = [("escape/a.png", server.url("/img.png")), ("big.png", server.url("/big")),
                   ("stream.png", server.url("/stream")), ("redirect.png", server.url("/to-file")),
                   ("ok/a.png", server.url("/img.png"))]
        coco = tmp_path / "c.json"
        coco.write_text(json.dumps({"images": [{"id": i, "file_name": n, "coco_url": u}
                                               for i, (n, u) in enumerate(entries)]}))
        summary = download_coco_images(coco, out, workers=2, retries=0, timeout=5, max_bytes=50_000,
                                       allow_private_addresses=True)   # the test server is on 127.0.0.1
    reasons = {name: reason for name, _, reason in summary.failures}
    assert reasons["escape/a.png"].startswith("refused: a symlink")
    assert "over the 50000-byte limit" in reasons["big.png"] and "over the 50000-byte limit" in reasons["stream.png"]
    # urllib itself refuses a redirect to file:// (HTTP 302 … not allowed); ftp:// is refused by our handler
    assert "file:///etc/passwd" in reasons["redirect.png"] and "not allowed" in reasons["redirect.png"]
    assert summary.downloaded == 1 and (out / "ok" / "a.png").is_file()
    assert list(outside.iterdir()) == []
    assert not (out / "big.png").exists() and not (out / "stream.png").exists()


def test_prepare_refuses_to_write_through_a_symlink(tmp_path, capsys):
    images, out, outside = tmp_path / "frames", tmp_path / "out", tmp_path / "outside"
    for folder in (images, out, outside):
        folder.mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(images / "f.png")
    (out / "images").symlink_to(outside, target_is_directory=True)    # planted in the output folder
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "f.png", "width": 64, "height": 48}],
                                "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20]}],
                                "categories": [{"id": 1, "name": "Sebastes"}]}))
    code, _, err = run_cli(["data", "prepare", coco, images, out, "--context", "1"], capsys)
    assert_refused(code, err, "refused to write", "symlink")
    assert list(outside.iterdir()) == []
    assert not (out / "annotations.csv").exists()


def test_default_size_cap_is_set():
    from taxonomist.data.download import MAX_IMAGE_BYTES
    assert 10 * 2**20 <= MAX_IMAGE_BYTES <= 1 << 30
    with pytest.raises(ConfigError, match="max_bytes"):
        download_coco_images("unused.json", "unused", max_bytes=0)
