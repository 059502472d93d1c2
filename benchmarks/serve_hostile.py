"""Hostile load on `taxonomist serve`: good clients beside clients flooding it with decode bombs and broken uploads,
against a real server on 127.0.0.1. Shows that the hostile uploads get 4xx, no request gets a 5xx, every good
request is answered, and the server's memory stays within `--max-decodes × --max-image-pixels`. docs/deploy.md
quotes it.

The hostile mix: a 1-bit 9999×9999 PNG (12 KB, 300 MB once decoded: within the default 100 MP budget, so it is
decoded — the memory flood), a 100-frame animated GIF of 1000² frames, a PNG header claiming 50,000² pixels, a PNG
whose image data is corrupt (it crashed torchvision's decoder), a truncated JPEG, a text file, and frames with
degenerate boxes (outside the frame, below one pixel). Every client sends a bounded number of requests; the server
is stopped at the end. The server's RSS is sampled from /proc, its peak read from VmHWM.

    .venv/bin/python benchmarks/serve_hostile.py --out /tmp/serve_hostile.json            # trains a tiny run
    .venv/bin/python benchmarks/serve_hostile.py --model runs/demo/run --max-decodes 4
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import free_port  # noqa: E402  (the same free-port helper as the plain load test)

BOUNDARY = "taxonomist-hostile"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def hostile_uploads() -> dict[str, tuple[str, bytes, dict]]:
    """name → (file name, bytes, extra form fields)."""
    from PIL import Image

    def save(im, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    frames = [Image.new("P", (1000, 1000), i % 200) for i in range(100)]
    for f in frames:
        f.putpalette(list(range(256)) * 3)
    row = b"\x00" + b"\x10" * 12
    corrupt_png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 3, 8, 2, 0, 0, 0))
                   + _png_chunk(b"IDAT", zlib.compress(b"\x07" + b"\x10" * 12 + row * 2)) + _png_chunk(b"IEND", b""))
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))
    jpeg = save(Image.new("RGB", (64, 48), (120, 80, 40)), "JPEG")
    return {
        "png_1bit_9999": ("flood.png", save(Image.new("1", (9999, 9999)), "PNG"), {}),
        "gif_100_frames": ("anim.gif", save(frames[0], "GIF", save_all=True, append_images=frames[1:]), {}),
        "png_bomb_header": ("bomb.png", bomb, {}),
        "png_corrupt_data": ("corrupt.png", corrupt_png, {}),
        "jpeg_truncated": ("cut.jpg", jpeg[:200], {}),
        "text": ("notes.jpg", b"not an image at all", {}),
        "bbox_outside": ("frame.jpg", jpeg, {"bbox": "500,500,10,10"}),
        "bbox_subpixel": ("frame.jpg", jpeg, {"bbox": "63.7,10,5,5"}),
    }


def good_uploads(n: int) -> list[tuple[str, bytes, dict]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append((f"good{k}.jpg", buf.getvalue(), {}))
    return out


def body(upload: tuple[str, bytes, dict]) -> bytes:
    name, data, fields = upload
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"]
    for key, value in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def tiny_run(folder: Path) -> Path:
    """A one-epoch test_efficientnet run on synthetic data (seconds on CPU), when no --model is given."""
    from taxonomist.config import load_config
    from taxonomist.data.synth import synthesize
    from taxonomist.train import train

    data, run = folder / "synth", folder / "run"
    synthesize(data, n_taxa=6, per_class=8, image_size=32, seed=3)
    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.device=cpu", "train.tensorboard=false", "augment.randaugment="])
    train(cfg, progress=False, log=lambda *_: None)
    return run


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024
    return fields


async def flood(base: str, pid: int, good: list, hostile: dict, good_clients: int, hostile_clients: int,
                requests_per_client: int) -> dict:
    import httpx

    results: dict[str, dict[int, int]] = {}
    latencies: list[float] = []
    samples: list[float] = []
    bodies = {name: body(upload) for name, upload in hostile.items()}
    good_bodies = [body(u) for u in good]
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    limits = httpx.Limits(max_connections=good_clients + hostile_clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        async def send(kind: str, content: bytes) -> None:
            start = time.perf_counter()
            try:
                status = (await client.post("/predict", content=content, headers=headers)).status_code
            except httpx.HTTPError as e:
                status = -1
                print(f"{kind}: {type(e).__name__}: {e}", file=sys.stderr)
            if kind == "good":
                latencies.append(time.perf_counter() - start)
            counts = results.setdefault(kind, {})
            counts[status] = counts.get(status, 0) + 1

        async def good_client(k: int) -> None:
            for i in range(requests_per_client):
                await send("good", good_bodies[(k * requests_per_client + i) % len(good_bodies)])

        names = list(bodies)

        async def hostile_client(k: int) -> None:
            for i in range(requests_per_client):
                name = names[(k + i) % len(names)]
                await send(name, bodies[name])

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                samples.append(proc_memory(pid)["VmRSS"])
                await asyncio.sleep(0.05)

        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(stop))
        start = time.perf_counter()
        await asyncio.gather(*(good_client(k) for k in range(good_clients)),
                             *(hostile_client(k) for k in range(hostile_clients)))
        seconds = time.perf_counter() - start
        stop.set()
        await sampler
        health = (await client.get("/health")).json()
    lat = np.array(latencies) * 1000
    return {"seconds": round(seconds, 1), "statuses": {k: {str(s): n for s, n in sorted(v.items())}
                                                       for k, v in sorted(results.items())},
            "good_latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                                "p99": round(float(np.percentile(lat, 99)), 1), "max": round(float(lat.max()), 1)},
            "rss_sampled_max_mb": round(max(samples), 1), "health": health["status"],
            "batching": health["batching"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="run directory or checkpoint (default: train a tiny run)")
    parser.add_argument("--good-clients", type=int, default=8)
    parser.add_argument("--hostile-clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=16, help="requests per client")
    parser.add_argument("--max-decodes", type=int, default=2)
    parser.add_argument("--max-image-pixels", type=int, default=100_000_000)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    import httpx

    from taxonomist.utils.system import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_run(Path(tmp)))
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen([sys.executable, "-m", "taxonomist.cli.main", "serve", model, "--port", str(port),
                                 "--device", "cpu", "--max-decodes", str(args.max_decodes),
                                 "--max-image-pixels", str(args.max_image_pixels)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            end = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    sys.exit(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > end:
                    sys.exit("serve did not answer /health within 120 s")
                time.sleep(0.3)
            good, hostile = good_uploads(32), hostile_uploads()
            # warm-up: one good request, so that the baseline includes the first forward pass
            httpx.post(f"{base}/predict", content=body(good[0]), timeout=60,
                       headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"})
            baseline = proc_memory(proc.pid)
            figures = asyncio.run(flood(base, proc.pid, good, hostile, args.good_clients, args.hostile_clients,
                                        args.requests))
            after = proc_memory(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    statuses = figures["statuses"]
    five_xx = sum(n for counts in statuses.values() for s, n in counts.items() if s.startswith("5") or s == "-1")
    good_failed = sum(n for s, n in statuses.get("good", {}).items() if s != "200")
    bound = args.max_decodes * args.max_image_pixels * 5 / 2**20
    result = {"cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS"),
              "settings": {k: getattr(args, k) for k in ("good_clients", "hostile_clients", "requests",
                                                          "max_decodes", "max_image_pixels")},
              **figures, "five_xx": five_xx, "good_failed": good_failed,
              "rss_mb": {"baseline": round(baseline["VmRSS"], 1), "peak": round(after["VmHWM"], 1),
                         "end": round(after["VmRSS"], 1), "peak_over_baseline": round(after["VmHWM"] -
                                                                                      baseline["VmRSS"], 1),
                         "stated_bound_over_baseline": round(bound, 1)}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if five_xx or good_failed:
        sys.exit(f"{five_xx} responses were 5xx and {good_failed} good requests failed")


if __name__ == "__main__":
    main()
