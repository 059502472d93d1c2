"""Multi-frame images (issue 19): an animated GIF, PNG or WebP and a multi-page TIFF are read as their first frame
by train/predict (`read_image`), serve (`decode_upload`) and explore, and the pixel budget counts that frame only,
so a file with hundreds of frames can neither go round the limit nor break a batch."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from taxonomist.data.explore import inspect_images
from taxonomist.data.images import MAX_IMAGE_PIXELS
from taxonomist.data.loading import UnreadableImageError, decode_image_data, read_image

from .conftest import run_cli

FORMATS = {"GIF": ".gif", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif"}


def multiframe(fmt: str, sizes: list[tuple[int, int]], colours: list[int]) -> bytes:
    """A file of `fmt` whose frame k is a uniform `sizes[k]` image of grey `colours[k]`."""
    frames = [Image.new("RGB", size, (c, c, c)) for size, c in zip(sizes, colours)]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}
    if len(frames) == 1:
        frames[0].save(buf, fmt, **extra)
    else:
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **extra)
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(FORMATS)), n=st.integers(1, 6), width=st.integers(1, 40),
       height=st.integers(1, 40), data=st.data())
def test_every_reader_takes_the_first_frame(tmp_path, fmt, n, width, height, data):
    """Formats × frame counts: read_image, the service's decode_upload and explore agree on the first frame —
    its size and its pixels — whatever the later frames hold (here: other sizes, other greys)."""
    from taxonomist.deploy.serve.uploads import decode_upload

    colours = data.draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    # GIF and TIFF frames may be larger than the first; APNG and WebP frames lie within the first's canvas
    grow = (3, 2) if fmt in ("GIF", "TIFF") else (0, 0)
    sizes = [(width + grow[0] * k, height + grow[1] * k) for k in range(n)]
    raw = multiframe(fmt, sizes, colours)
    path = tmp_path / f"animated{FORMATS[fmt]}"
    path.write_bytes(raw)

    image = read_image(path)
    assert image.shape == (3, height, width) and image.dtype == torch.uint8
    # GIF stores a palette: a grey may come back as its nearest palette entry
    assert np.abs(image.numpy().astype(int) - colours[0]).max() <= (4 if fmt == "GIF" else 0)
    assert torch.equal(decode_upload(raw, path.name), image)
    facts = inspect_images([path])
    assert facts["error"][0] == "" and (facts["width"][0], facts["height"][0]) == (width, height)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_pixel_budget_counts_the_first_frame(tmp_path, fmt):
    """A first frame at the budget decodes, one pixel over is refused naming the file; the later frames do not
    count (they are not decoded), however many and, where the format allows it (GIF, TIFF), however large."""
    later = (400, 300) if fmt in ("GIF", "TIFF") else (20, 10)
    raw = multiframe(fmt, [(20, 10)] + [later] * 30, [10] + [200, 90] * 15)
    assert decode_image_data(as_tensor(raw), "a", max_pixels=200).shape == (3, 10, 20)
    with pytest.raises(UnreadableImageError, match=r"^b\.x: image too large .*more than 199 px"):
        decode_image_data(as_tensor(raw), "b.x", max_pixels=199)


def test_hundred_frame_gif_costs_one_frame():
    """torchvision decodes every frame of a GIF: 100 frames of 1000² took 300 MB and 1.5 s before; now the
    first frame is all that is decoded (peak RSS measured in a fresh process)."""
    code = (
        "import io, resource, sys, torch\nfrom PIL import Image\n"
        "from taxonomist.data.loading import decode_image_data\n"
        "frames = [Image.new('P', (1000, 1000), i % 200) for i in range(100)]\n"
        "[f.putpalette(list(range(256)) * 3) for f in frames]\n"
        "buf = io.BytesIO(); frames[0].save(buf, 'GIF', save_all=True, append_images=frames[1:])\n"
        "del frames\ndata = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "image = decode_image_data(data, 'a.gif')\n"
        "print(tuple(image.shape), before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shape, before, after = proc.stdout.strip().rsplit(" ", 2)
    assert shape == "(3, 1000, 1000)"
    assert int(after) - int(before) < 60, (before, after)   # MB: one frame is 3 MB (+ PIL's copies), 100 are 300


def test_gif_with_a_huge_declared_screen_is_refused_before_decoding(tmp_path):
    """The GIF header's screen size is checked first, as the PNG/JPEG/WebP headers are."""
    raw = bytearray(multiframe("GIF", [(8, 8), (8, 8)], [1, 2]))
    raw[6:10] = (60_000).to_bytes(2, "little") + (60_000).to_bytes(2, "little")
    path = tmp_path / "screen.gif"
    path.write_bytes(bytes(raw))
    with pytest.raises(UnreadableImageError, match="too large"):
        read_image(path)
    assert 60_000 * 60_000 > MAX_IMAGE_PIXELS


def test_predict_on_a_folder_with_animated_images(tiny_run, tiny_data, tmp_path, capsys):
    """`predict` over a folder holding an animated GIF, APNG, WebP and TIFF beside JPEGs: one row per file, the
    animated ones answered as their first frame (it wrote nothing and ended in a traceback before)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    jpegs = sorted((tiny_data / "images").rglob("*.jpg"))[:3]
    for f in jpegs:
        (folder / f.name).write_bytes(f.read_bytes())
    first = np.asarray(Image.open(jpegs[0]).convert("RGB"))
    frames = [Image.fromarray(first)] + [Image.new("RGB", first.shape[1::-1], (255 * k % 256, 0, 0)) for k in (1, 2)]
    for fmt, ext in FORMATS.items():
        frames[0].save(folder / f"animated{ext}", fmt, save_all=True, append_images=frames[1:],
                       **({"lossless": True} if fmt == "WEBP" else {}))
    out = tmp_path / "p.csv"
    code, stdout, err = run_cli(["predict", tiny_run, "--images", folder, "--out", out, "--workers", "0",
                                 "--device", "cpu"], capsys)
    assert code == 0 and "Traceback" not in err, err[-2000:]
    rows = pd.read_csv(out)
    assert sorted(Path(p).name for p in rows["path"]) == sorted([f.name for f in jpegs] +
                                                                [f"animated{e}" for e in FORMATS.values()])
    by_name = {Path(p).name: r for p, r in zip(rows["path"], rows.itertuples())}
    # a lossless first frame holds the JPEG's decoded pixels: the same answer as the JPEG itself
    for ext in (".png", ".webp", ".tif"):
        assert by_name[f"animated{ext}"].prediction == by_name[jpegs[0].name].prediction
