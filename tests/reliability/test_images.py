"""Odd and broken image files through every decode path: `read_image` (training, evaluation, predict),
`data explore`, a training run, `train --strict`, and `predict` (CSV and Kaggle format).

Converted: CMYK JPEG, 16-bit PNG, greyscale, RGBA, palette PNG/GIF, EXIF-rotated JPEG, 1×1 pixel.
Skipped and listed (or, in strict mode, an error naming the file): truncated JPEG, zero-byte file, text named
.jpg, and JPEG/PNG headers declaring 60,000² / 100,000² pixels (decompression bombs, refused before decoding).
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from taxonomist.data.loading import MAX_IMAGE_PIXELS, UnreadableImageError, declared_size, read_image

from .conftest import assert_refused, run_cli, tiny_overrides

CONVERTED = ["cmyk.jpg", "gray16.png", "grey.jpg", "rgba.png", "palette.png", "palette.gif", "exif_rotated.jpg",
             "one_pixel.png", "one_pixel.jpg"]
BROKEN = {"truncated.jpg": "truncated", "zero.jpg": "empty file", "text.jpg": "not an image",
          "bomb.jpg": "too large", "bomb.png": "too large"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def make_images(folder: Path) -> dict[str, np.ndarray]:
    """Write every case into `folder`; returns the expected RGB pixels (H, W, 3) of the convertible ones."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    smooth = np.kron(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), np.ones((8, 9, 1), np.uint8))
    expected = {}
    Image.fromarray(smooth).save(folder / "base.jpg", quality=95)
    base = (folder / "base.jpg").read_bytes()

    Image.fromarray(smooth).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = np.asarray(Image.open(folder / "cmyk.jpg").convert("RGB"))
    g16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(g16).save(folder / "gray16.png")
    expected["gray16.png"] = np.repeat((g16 / 257.0).round().astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(smooth[..., 0]).save(folder / "grey.jpg", quality=95)
    expected["grey.jpg"] = np.repeat(np.asarray(Image.open(folder / "grey.jpg"))[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (24, 36, 1), dtype=np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    expected["rgba.png"] = rgb
    palette = Image.fromarray(rgb).convert("P")
    palette.save(folder / "palette.png")
    palette.save(folder / "palette.gif")
    expected["palette.png"] = expected["palette.gif"] = np.asarray(palette.convert("RGB"))
    im = Image.fromarray(smooth)
    exif = im.getexif()
    exif[0x0112] = 6                        # "rotate 90° clockwise to display"
    im.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    expected["exif_rotated.jpg"] = np.asarray(ImageOps.exif_transpose(Image.open(folder / "exif_rotated.jpg"))
                                              .convert("RGB"))
    Image.new("RGB", (1, 1), (200, 30, 90)).save(folder / "one_pixel.png")
    Image.new("RGB", (1, 1), (200, 30, 90)).save(folder / "one_pixel.jpg", quality=100)
    expected["one_pixel.png"] = expected["one_pixel.jpg"] = np.array([[[200, 30, 90]]], np.uint8)

    (folder / "truncated.jpg").write_bytes(base[: len(base) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("label,path\nthis is a CSV, not a photo\n")
    bomb = bytearray(base)                  # a valid JPEG whose frame header claims 60,000 × 60,000 px
    sof = bomb.index(b"\xff\xc0")
    bomb[sof + 5:sof + 9] = struct.pack(">HH", 60_000, 60_000)
    (folder / "bomb.jpg").write_bytes(bytes(bomb))
    # a 100,000 × 100,000 RGB PNG header with a few compressed rows (the file is ~1 KB)
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * 100_000) * 4, 9)
    (folder / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                                      + _png_chunk(b"IEND", b""))
    (folder / "base.jpg").unlink()
    return expected


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    folder = tmp_path_factory.mktemp("odd_images") / "images"
    return folder, make_images(folder)


@pytest.mark.parametrize("name", CONVERTED)
def test_odd_images_are_converted_to_rgb(images, name):
    folder, expected = images
    image = read_image(folder / name)
    assert image.dtype.is_floating_point is False and image.shape[0] == 3
    got = image.permute(1, 2, 0).numpy()
    assert got.shape == expected[name].shape
    # the JPEG decoders (libjpeg-turbo in torchvision, PIL's) may round differently; PNG/GIF are exact
    # (16 → 8 bits: torchvision rounds v / 257 slightly differently from numpy, by at most 1)
    tolerance = 12 if name.endswith(".jpg") else 1 if name == "gray16.png" else 0
    assert np.abs(got.astype(int) - expected[name].astype(int)).max() <= tolerance


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_images_raise_one_error_naming_the_file(images, name):
    folder, _ = images
    start = time.perf_counter()
    with pytest.raises(UnreadableImageError) as info:
        read_image(folder / name)
    assert str(folder / name) in str(info.value) and BROKEN[name] in str(info.value)
    assert time.perf_counter() - start < 2.0           # bombs are refused from the header, not by decoding


def test_bomb_is_refused_without_allocating(images):
    """Before the header check, torchvision tried to allocate 10.8 GB for bomb.jpg (30 s, 11 GB peak RSS)."""
    folder, _ = images
    # Peak RSS after importing torch differs between machines (1.2 GB here, 1.9 GB on CI), so the test
    # compares the peak after reading both bombs with the peak before: decoding either would add gigabytes.
    code = ("import resource, sys\nfrom taxonomist.data.loading import read_image, UnreadableImageError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
            "for name in ('bomb.jpg', 'bomb.png'):\n"
            "    try:\n        read_image(sys.argv[1] + '/' + name)\n    except UnreadableImageError:\n        pass\n"
            "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split()[-2:])
    assert after - before < 200, (before, after)         # MB: nothing was decoded


def test_declared_size_reads_headers_only(images):
    folder, _ = images
    assert declared_size((folder / "bomb.jpg").read_bytes()) == (60_000, 60_000)
    assert declared_size((folder / "bomb.png").read_bytes()[:64]) == (100_000, 100_000)
    assert declared_size((folder / "exif_rotated.jpg").read_bytes()) == (36, 24)   # stored, before rotation
    assert declared_size((folder / "palette.gif").read_bytes()) == (36, 24)
    assert declared_size(b"not an image") is None
    assert 60_000 * 60_000 > MAX_IMAGE_PIXELS > 8_000 * 8_000


def test_explore_lists_the_broken_and_reads_the_rest(images, tmp_path, capsys):
    folder, _ = images
    root = tmp_path / "dataset"
    shutil.copytree(folder, root / "images")
    names = CONVERTED + sorted(BROKEN)
    pd.DataFrame({"path": [f"images/{n}" for n in names], "label": "Sebastes"}).to_csv(root / "annotations.csv",
                                                                                      index=False)
    code, out, err = run_cli(["data", "explore", root, "--out", tmp_path / "explore"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "explore" / "summary.json").read_text())
    listed = {Path(entry["path"]).name: entry["reason"] for entry in summary["unreadable"]["list"]}
    assert set(listed) == set(BROKEN)
    # PIL's own message above twice its limit ("… could be decompression bomb …"), ours between once and twice
    assert all(("too large" in listed[b]) or ("decompression bomb" in listed[b]) for b in ("bomb.jpg", "bomb.png"))
    assert f"unreadable files: {len(BROKEN)}" in out


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory, tiny_data, images) -> Path:
    """tiny_data plus one training row per odd image (labels taken from existing rows)."""
    folder, _ = images
    root = tmp_path_factory.mktemp("odd_dataset") / "synth"
    shutil.copytree(tiny_data, root)
    shutil.copytree(folder, root / "odd")
    frame = pd.read_csv(root / "annotations.csv", dtype=str, keep_default_na=False)
    template = frame[frame["split"] == "train"].iloc[0]
    extra = [dict(template, path=f"odd/{n}") for n in CONVERTED + sorted(BROKEN)]
    pd.concat([frame, pd.DataFrame(extra)], ignore_index=True).to_csv(root / "annotations.csv", index=False)
    return root


def test_training_skips_and_lists_broken_images(odd_dataset, tmp_path):
    from taxonomist.config import load_config
    from taxonomist.train import train
    cfg = load_config(None, tiny_overrides(odd_dataset, tmp_path / "run"))
    result = train(cfg, progress=False, log=lambda *_: None)
    skipped = {Path(s.path).name: s.reason for s in result.skipped_images}
    assert set(skipped) == set(BROKEN)
    assert all(BROKEN[name] in reason for name, reason in skipped.items())
    assert np.isfinite(result.history[-1]["train_loss"])


def test_strict_training_fails_naming_the_file(odd_dataset, tmp_path, capsys):
    argv = ["train", "--strict", "--no-eval", "--no-calibrate"]
    for item in tiny_overrides(odd_dataset, tmp_path / "run"):
        argv += ["--set", item]
    code, _, err = run_cli(argv, capsys)
    first = assert_refused(code, err)
    assert any(f"odd/{name}" in first for name in BROKEN), first
    assert not (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()


def test_predict_skips_and_lists_broken_images(tiny_run, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "predictions.csv"
    code, stdout, err = run_cli(["predict", tiny_run, "--images", folder, "--out", out, "--workers", "0",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    frame = pd.read_csv(out)
    assert sorted(Path(p).name for p in frame["path"]) == sorted(CONVERTED)
    assert f"skipped {len(BROKEN)} unreadable image(s)" in stdout + err


def test_strict_predict_fails_naming_the_file(tiny_run, images, tmp_path, capsys):
    folder, _ = images
    out = tmp_path / "predictions.csv"
    code, _, err = run_cli(["predict", tiny_run, "--images", folder, "--out", out, "--strict", "--workers", "0",
                            "--device", "cpu"], capsys)
    first = assert_refused(code, err)
    assert any(name in first for name in BROKEN), first
    assert not out.exists()


def test_predict_kaggle_format_refuses_broken_images(tiny_run, images, tmp_path, capsys):
    folder, _ = images
    listing = tmp_path / "images.csv"
    names = CONVERTED + ["truncated.jpg"]
    pd.DataFrame({"annotation_id": range(1, len(names) + 1),
                  "path": [str(folder / n) for n in names]}).to_csv(listing, index=False)
    out = tmp_path / "submission.csv"
    code, _, err = run_cli(["predict", tiny_run, "--images", listing, "--out", out, "--format", "kaggle",
                            "--workers", "0", "--device", "cpu"], capsys)
    assert_refused(code, err, "truncated.jpg", "--fill-unreadable")
    assert not out.exists()


def test_png_with_corrupt_image_data_is_an_error_not_a_crash(tmp_path):
    """torchvision 0.29's PNG decoder kills the process (SIGSEGV) on a complete PNG whose image data is bad: a
    wrong filter byte, a broken deflate stream, too few rows. read_image names the file instead (run in a
    subprocess, so that a crash fails this test rather than the whole session)."""
    row = b"\x00" + b"\x10" * 12
    cases = {"filter.png": zlib.compress(b"\x07" + b"\x10" * 12 + row * 2),
             "deflate.png": b"\x78\x9c\xff\xff\xff\xff" + zlib.compress(row * 3)[6:],
             "short.png": zlib.compress(row)}
    for name, idat in cases.items():
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 8, 2, 0, 0, 0))
                                      + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    code = ("import sys\nfrom pathlib import Path\nfrom taxonomist.data.loading import read_image, UnreadableImageError\n"
            "for p in sorted(Path(sys.argv[1]).glob('*.png')):\n"
            "    try:\n        read_image(p)\n        print('decoded', p.name)\n"
            "    except UnreadableImageError as e:\n        print('refused', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-1000:])
    lines = sorted(proc.stdout.strip().splitlines(), key=lambda line: line.split()[1].rsplit("/", 1)[-1])
    assert len(lines) == 3, proc.stdout
    deflate, filter_, short = lines
    for line, name in ((deflate, "deflate.png"), (filter_, "filter.png")):
        assert line.startswith("refused") and f"{name}: cannot decode image" in line, line
    assert short.startswith(("refused", "decoded")), short   # PIL pads missing rows; the process lives either way
