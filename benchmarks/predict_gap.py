"""Where predict's gap to the model-only ceiling comes from, in one process with the project's thread policy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/predict_gap.py --batches 8 --rounds 3

Writes `--batches` × 32 ROI JPEGs as `taxonomist benchmark` does (`benchmark.images.write_roi_dataset`), builds
a random-init Lite0 at 224 px (1 torch thread: `configure_threads` beside one loader worker), then per round
times, in this order: the forward on one `torch.randn` batch repeated (the benchmark's ceiling); the forward
on the real images, decoded once beforehand and kept in memory; `infer_rows` (what `taxonomist predict`
runs) with 0 and with 1 loader worker, loader start included; and the loader alone (decode + eval transform).
Each forward is `model(x)["logits"].softmax(1)` under `torch.inference_mode()`, as the ceiling does.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    args = parser.parse_args()

    import torch

    from taxonomist.benchmark.images import write_roi_dataset
    from taxonomist.benchmark.pipeline import checkpoint_meta
    from taxonomist.config import Config
    from taxonomist.data.dataset import load_dataset
    from taxonomist.inference.run_model import infer_rows, rows_loader
    from taxonomist.models import build_model
    from taxonomist.runtime import configure_threads, tune_cpu_allocator

    tune_cpu_allocator()
    device, bs = torch.device("cpu"), args.batch_size
    tmp = tempfile.TemporaryDirectory(prefix="taxonomist-gap-")
    dataset = load_dataset(write_roi_dataset(tmp.name, bs * args.batches))
    rows = dataset.annotations
    label_index = {lab: i for i, lab in enumerate(dataset.taxonomy.labels)}
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained, cfg.data.image_size = args.model, "none", 224
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.taxonomy, 224).eval()
    meta = checkpoint_meta(cfg, model)
    torch.set_num_threads(configure_threads(0, device, 1))
    _, loader = rows_loader(meta, dataset, rows, label_index, bs, 0)
    real = [batch["image"] for batch in loader]

    def forward(x) -> None:
        with torch.inference_mode():
            model(x)["logits"].float().softmax(1)

    def rate(batches) -> float:
        forward(batches[0])
        start = time.perf_counter()
        for x in batches:
            forward(x)
        return len(batches) * bs / (time.perf_counter() - start)

    def whole(fn) -> float:
        start = time.perf_counter()
        n = fn()
        return n / (time.perf_counter() - start)

    def loader_only() -> int:
        _, ld = rows_loader(meta, dataset, rows, label_index, bs, 1)
        return sum(len(b["image"]) for b in ld)

    print(f"{args.model} 224 px, batch {bs}, {len(rows)} images, {torch.get_num_threads()} torch thread(s)")
    print("| round | load | ceiling (randn) | real batches in memory | infer_rows, 0 workers | infer_rows, 1 worker "
          "| loader alone, 1 worker |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    randn = torch.randn(bs, 3, 224, 224)
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        ceiling = rate([randn] * args.batches)
        mem = rate(real)
        w0, w1 = (whole(lambda w=w: len(infer_rows(model, meta, dataset, rows, device, label_index, batch_size=bs,
                                                    num_workers=w).result.logits)) for w in (0, 1))
        alone = whole(loader_only)
        print(f"| {r + 1} | {load:.1f} | {ceiling:.1f} | {mem:.1f} ({mem / ceiling:.2f}×) | {w0:.1f} "
              f"({w0 / ceiling:.2f}×) | {w1:.1f} ({w1 / ceiling:.2f}×) | {alone:.0f} |", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
