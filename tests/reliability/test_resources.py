"""The machine says no: a folder that cannot be written (permission denied, read-only file system) and a full
disk (ENOSPC in the middle of a write). Each gives one `error:` line, exit 2, and leaves no half-written file
under a final name and no temporary behind. And large datasets: the loaders hold paths, not pixels.

The permission cases run for real with chmod when the tests do not run as root (root ignores the mode bits);
as root, and for the full disk, the failing system call is simulated with monkeypatch at the point where the OS
reports it (mkstemp for a folder that cannot be written, the write or fsync for a full disk).
"""
from __future__ import annotations

import errno
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import taxonomist.utils.files as files
from taxonomist.data.dataset import load_dataset

from .conftest import assert_refused, files_under, run_cli, tiny_overrides

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _deny(folder_errno: int):
    def mkstemp(*args, dir=None, **kwargs):
        raise OSError(folder_errno, os.strerror(folder_errno), str(dir))
    return mkstemp


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders; the simulated variant below runs instead")
def test_read_only_output_folder_for_real(tiny_data, tmp_path, capsys):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run_cli(["data", "explore", tiny_data, "--out", out / "explore"], capsys)
    finally:
        out.chmod(0o755)
    assert_refused(code, err, "locked", "Permission denied")
    assert files_under(out) == {}


@pytest.mark.parametrize("code_", [errno.EACCES, errno.EROFS])
def test_folder_that_cannot_be_written(tiny_data, tmp_path, capsys, monkeypatch, code_):
    monkeypatch.setattr(files.tempfile, "mkstemp", _deny(code_))
    code, _, err = run_cli(["data", "explore", tiny_data, "--out", tmp_path / "explore"], capsys)
    assert_refused(code, err, str(tmp_path / "explore"), os.strerror(code_))
    assert [p for p in files_under(tmp_path / "explore")] == []       # no summary.json, no half a plot set


def test_disk_full_while_saving_a_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the first checkpoint: a clear error, no .safetensors under its name, no
    temporary left, and nothing that makes the next attempt refuse the folder."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:         # what a full disk leaves: a cut-off file
            f.truncate(os.path.getsize(filename) // 2)
        _no_space()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    run = tmp_path / "run"
    argv = ["train", "--no-eval", "--no-calibrate"]
    for item in tiny_overrides(tiny_data, run):
        argv += ["--set", item]
    code, _, err = run_cli(argv, capsys)
    assert_refused(code, err, "No space left on device")
    assert not list((run / "checkpoints").glob("*.safetensors")) and _temporaries(run) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)        # space again: the same command succeeds
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (run / "checkpoints" / "last.safetensors").is_file()


def test_disk_full_while_writing_predictions(tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    real = pd.DataFrame.to_csv

    def half_then_full(self, path=None, *args, **kwargs):
        real(self.iloc[: len(self) // 2], path, *args, **kwargs)
        _no_space()

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", tiny_run, "--images", tiny_data / "images", "--out", out,
                            "--workers", "0", "--device", "cpu"], capsys)
    assert_refused(code, err, "No space left on device")
    assert not out.exists() and _temporaries(tmp_path) == []


def test_disk_full_while_writing_json_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.atomic_write_json(target, {"mhd": 1.0})
    monkeypatch.setattr(files.os, "fsync", _no_space)
    with pytest.raises(OSError) as info:
        files.atomic_write_json(target, {"mhd": 2.0})
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == '{\n "mhd": 1.0\n}\n' and _temporaries(tmp_path) == []


def test_disk_full_during_download_is_listed_per_image(tmp_path, monkeypatch, capsys):
    """The downloader reports a write failure per image (the failures CSV, exit 1) instead of stopping."""
    import json
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    import functools
    import threading

    from PIL import Image

    import taxonomist.data.download as download

    served = tmp_path / "served"
    served.mkdir()
    Image.new("RGB", (8, 8)).save(served / "a.png")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        coco = tmp_path / "c.json"
        url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
        coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "coco_url": url}]}))
        monkeypatch.setattr(download, "atomic_write_bytes", lambda *a, **k: _no_space())
        code, out, err = run_cli(["data", "download", coco, tmp_path / "out", "--retries", "0",
                                  "--allow-private-addresses"], capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert code == 1 and "Traceback" not in err
    assert "No space left on device" in out + err
    assert not (tmp_path / "out" / "a.png").exists()


# ------------------------------------------------------------------------------------- large datasets
def test_loaders_hold_paths_not_pixels(tmp_path, monkeypatch):
    """A 200,000-row dataset: building the Dataset, TaxonDataset and DataLoader decodes no image and costs
    tens of MB (paths as fixed-width numpy strings); one batch decodes exactly one batch of images."""
    import taxonomist.data.loading as loading
    from taxonomist.data.loading import TaxonDataset, build_loader, build_transforms
    from taxonomist.config import load_config

    n = 200_000
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "images" / "x.png")
    pd.DataFrame({"path": ["images/x.png"] * n, "label": np.where(np.arange(n) % 2, "a", "b")}) \
        .to_csv(root / "annotations.csv", index=False)
    (root / "taxonomy.csv").write_text("concept_name,parent\nroot,\na,root\nb,root\n")
    decoded = []
    real = loading.read_image
    monkeypatch.setattr(loading, "read_image", lambda p: decoded.append(p) or real(p))

    cfg = load_config(None, ["data.image_size=16", "augment.randaugment="])
    transform = build_transforms(cfg, False, [0.5] * 3, [0.5] * 3)
    tracemalloc.start()       # numpy and pandas report their buffers to tracemalloc too
    try:
        dataset = load_dataset(root)
        ds = TaxonDataset(dataset, dataset.annotations, transform)
        loader = build_loader(ds, batch_size=32, train=True, num_workers=0)
        peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    assert decoded == [] and len(ds) == n
    # the decoded images would take 16·16·3 B × 200k = 147 MB here, and 224²·3 B × 200k = 28 GiB at 224 px
    assert peak_mb < 120, peak_mb
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 3, 16, 16) and len(decoded) == 32
