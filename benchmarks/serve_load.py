"""Load test of `taxonomist serve`: N concurrent HTTP clients for T seconds against a real server, next to offline
`taxonomist predict` throughput of the same model on the same images, measured in the same run.

Starts `taxonomist serve MODEL` (uvicorn, micro-batching) on a free port, preloads the images, and runs `--clients`
asyncio httpx clients that each post one image (or `--per-request`) at a time for `--duration` seconds after a
short warm-up. Reports requests/s, images/s, p50/p99 latency and errors, the server's batch sizes, and the offline
figure: `predict` over the same images just before and just after the load test (images/s with and without the
model-load time; their mean is the reference). docs/deploy.md quotes it.

    .venv/bin/python benchmarks/serve_load.py runs/demo/run --images runs/demo/data/images --out /tmp/serve_load.json
    .venv/bin/python benchmarks/serve_load.py model.onnx --images DIR --clients 16 --duration 10
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from taxonomist.utils.system import cpu_name

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def offline_predict(model: str, images: Path, device: str) -> dict:
    """`taxonomist predict` over the folder: its own images/s, and images/s once the model-load time (measured
    separately, warm file cache) is taken out — the stricter comparison for a server that loads once."""
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        summary = predict(model, images, Path(tmp) / "p.csv", device=device, progress=False)
    start = time.perf_counter()
    load_model(model, device="cpu" if device == "auto" else device)
    load_s = time.perf_counter() - start
    run_s = max(summary.seconds - load_s, 1e-9)
    return {"images": summary.n_predicted, "seconds": round(summary.seconds, 2), "load_seconds": round(load_s, 2),
            "images_per_s": round(summary.n_predicted / summary.seconds, 2),
            "images_per_s_without_load": round(summary.n_predicted / run_s, 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "taxonomist.cli.main", "serve", model, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("serve did not answer /health within 120 s")


BOUNDARY = "taxonomist-load-test"


def multipart_bodies(payloads: list[tuple[str, bytes, str]], per_request: int) -> list[bytes]:
    """One ready multipart/form-data body per request, built once: the clients share the server's two cores,
    so they should spend them on sending, not on encoding the same forms again."""
    bodies = []
    for k in range(len(payloads)):
        parts = []
        for name, data, ctype in (payloads[(k + j) % len(payloads)] for j in range(per_request)):
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                         f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
        bodies.append(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
    return bodies


async def load(base: str, payloads: list[tuple[str, bytes, str]], clients: int, duration: float, per_request: int,
               warmup: float) -> dict:
    """`clients` loops posting `per_request` images each, until `duration` seconds after the warm-up."""
    import httpx

    bodies = multipart_bodies(payloads, per_request)
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}

    latencies: list[float] = []
    errors: dict[str, int] = {}
    counts = {"requests": 0, "images": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        t0 = time.perf_counter()
        measure_from, stop_at = t0 + warmup, t0 + warmup + duration

        async def one(k: int) -> None:
            i = k
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                body = bodies[i % len(bodies)]
                i += clients
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", content=body, headers=headers)
                    ok = r.status_code == 200 and len(r.json()["predictions"]) == per_request
                    why = None if ok else f"HTTP {r.status_code}"
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    why = type(e).__name__
                end = time.perf_counter()
                if start >= measure_from and end <= stop_at:
                    counts["requests"] += 1
                    if why:
                        errors[why] = errors.get(why, 0) + 1
                    else:
                        counts["images"] += per_request
                        latencies.append(end - start)

        await asyncio.gather(*(one(k) for k in range(clients)))
    lat = np.array(latencies) * 1000
    return {"clients": clients, "duration_s": duration, "requests": counts["requests"],
            "requests_per_s": round(counts["requests"] / duration, 2),
            "images_per_s": round(counts["images"] / duration, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "errors": sum(errors.values()), "error_kinds": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="runs/demo/run", help="checkpoint, run directory or .onnx")
    parser.add_argument("--images", default="runs/demo/data/images", help="folder of images (searched recursively)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--per-request", type=int, default=1, help="images per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-offline", action="store_true", help="only the load test")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    import torch

    from taxonomist.inference.predict import read_images

    images = read_images(args.images)
    paths = [images.root / p for p in images.rows["path"]]
    payloads = [(p.name, p.read_bytes(), IMAGE_TYPES.get(p.suffix.lower(), "application/octet-stream"))
                for p in paths]
    result: dict = {"model": args.model, "images": len(paths), "cpu": cpu_name(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": args.device,
                    "load_average_at_start": os.getloadavg()[0]}
    if not args.skip_offline:
        print(f"offline predict over {len(paths)} images …", file=sys.stderr)
        result["offline_before"] = offline_predict(args.model, Path(args.images), args.device)
    port = free_port()
    proc = start_server(args.model, port, ["--device", args.device, "--max-batch", str(args.max_batch),
                                           "--max-wait-ms", str(args.max_wait_ms)])
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        print(f"{args.clients} clients for {args.duration:g} s against {base} …", file=sys.stderr)
        result["serve"] = asyncio.run(load(base, payloads, args.clients, args.duration, args.per_request,
                                           args.warmup))
        result["serve"]["batching"] = httpx.get(f"{base}/health").json()["batching"]
        result["serve"]["max_batch"], result["serve"]["max_wait_ms"] = args.max_batch, args.max_wait_ms
    finally:
        proc.terminate()
        proc.wait(30)
    if not args.skip_offline:
        # the machine may be shared: predict again after the load test and compare with the mean of both runs
        print(f"offline predict over {len(paths)} images again …", file=sys.stderr)
        result["offline_after"] = offline_predict(args.model, Path(args.images), args.device)
        before, after = result["offline_before"], result["offline_after"]
        result["offline"] = {key: round((before[key] + after[key]) / 2, 2)
                             for key in ("images_per_s", "images_per_s_without_load")}
    result["load_average_at_end"] = os.getloadavg()[0]
    if "offline" in result:
        result["serve_vs_offline"] = round(result["serve"]["images_per_s"] / result["offline"]["images_per_s"], 3)
        result["serve_vs_offline_without_load"] = round(
            result["serve"]["images_per_s"] / result["offline"]["images_per_s_without_load"], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from taxonomist.utils.files import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
