"""Where the time of one `taxonomist train` epoch goes, on the ROI JPEGs `taxonomist benchmark` writes.

    python -m taxonomist.benchmark.profile --batches 4 --val-batches 1 --out profile.json

Runs `train()` for one epoch (data.num_workers and threads as the project picks them, cache off) under
cProfile and torch.profiler in the main process, then times the loader worker's share (decode and train
transform per image, one thread, in this process). Reports the epoch's wall time and the shares of: the
training step (forward, loss, backward, clipping, AdamW), waiting on the loader, validation, checkpoint and
metrics writing, and the top aten operators by self CPU time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

from taxonomist.train.callbacks import BatchEnd, Callback

#: Python functions whose cumulative time is reported: (label, file suffix, function, caller file suffix or
#: None, top-level: counted in the sum that leaves "everything else")
PHASES = (
    ("train step (TrainStep.__call__)", "train/step.py", "__call__", None, True),
    ("  forward + loss", "torch/nn/modules/module.py", "_wrapped_call_impl", "train/step.py", False),
    ("  backward", "torch/_tensor.py", "backward", "train/step.py", False),
    ("  clip_grad_norm_", "torch/nn/utils/clip_grad.py", "_no_grad_wrapper", "train/step.py", False),
    ("  optimizer step (AdamW)", "torch/optim/", "wrapper", "train/step.py", False),
    ("validation (run_inference)", "inference/forward.py", "run_inference", None, True),
    ("checkpoints (save_checkpoint)", "train/checkpoint.py", "save_checkpoint", None, True),
    ("resume state (save_resume_state)", "train/checkpoint.py", "save_resume_state", None, True),
    ("model build (build_model)", "models/taxon_model.py", "build_model", None, True),
)


class LoaderWait(Callback):
    """Seconds the training batches were waited for from the loader, summed over the run."""

    def __init__(self):
        self.seconds = 0.0

    def on_batch_end(self, run, batch: BatchEnd) -> None:
        self.seconds += batch.waited


def _cumulative(stats: pstats.Stats, suffix: str, name: str, caller: str | None) -> float:
    """Cumulative seconds of the calls of function `name` (in a file whose path contains `suffix`) from
    other functions (of files ending in `caller` when given); nested calls of itself are counted once. The
    optimiser's `step` is wrapped by the LR scheduler, hence a folder (`torch/optim/`) for it."""
    total = 0.0
    for (file, _line, func), (_cc, _nc, _tt, _ct, callers) in stats.stats.items():
        if func == name and suffix in file.replace("\\", "/"):
            for (cf, _cl, cfn), v in callers.items():
                cf = cf.replace("\\", "/")
                if cfn == name and suffix in cf:
                    continue
                if caller is None or cf.endswith(caller):
                    total += v[3]
    return total


def profile_epoch(batches: int = 4, val_batches: int = 1, batch_size: int = 32, image_size: int = 224,
                  model: str = "tf_efficientnet_lite0", workers: int = -1, top: int = 8) -> dict:
    import sklearn.metrics  # noqa: F401  imported by train() on first use: keep one-time imports out of the epoch
    import timm  # noqa: F401
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from taxonomist.benchmark.images import write_roi_dataset
    from taxonomist.config import Config
    from taxonomist.data.loading import build_transforms, read_image
    from taxonomist.runtime import auto_num_workers
    from taxonomist.train.loop import train

    workers = auto_num_workers() if workers < 0 else workers
    n_train, n_val = batches * batch_size, val_batches * batch_size
    with tempfile.TemporaryDirectory(prefix="taxonomist-profile-") as tmp:
        root = write_roi_dataset(Path(tmp) / "data", n_train + n_val)
        lines = (root / "annotations.csv").read_text().splitlines()
        split = ["train"] * n_train + ["val"] * n_val
        (root / "annotations.csv").write_text("\n".join([lines[0] + ",split"] + [f"{r},{s}" for r, s in
                                                                                 zip(lines[1:], split)]) + "\n")
        cfg = Config()
        cfg.data.root, cfg.out = str(root), str(Path(tmp) / "run")
        cfg.model.backbone, cfg.model.pretrained = model, "none"
        cfg.data.image_size, cfg.data.num_workers = image_size, workers
        cfg.train.batch_size, cfg.train.epochs, cfg.train.device = batch_size, 1, "cpu"
        cfg.train.tensorboard = False
        cfg.augment.preset = "default"  # as the documented profiles ran; train() and the per-image timing agree
        prof = cProfile.Profile()
        waited = LoaderWait()
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as tprof:
            prof.enable()
            result = train(cfg, progress=False, log=lambda *_: None, callbacks=[waited])
            prof.disable()
        wall = time.perf_counter() - start
        threads = torch.get_num_threads()
        stats = pstats.Stats(prof)
        phases = [{"phase": "waiting on the loader (training batches)", "seconds": round(waited.seconds, 6),
                   "share": round(waited.seconds / wall, 4)}]
        counted = waited.seconds
        for label, suffix, name, caller, top_level in PHASES:
            seconds = _cumulative(stats, suffix, name, caller)
            counted += seconds if top_level else 0.0
            phases.append({"phase": label, "seconds": round(seconds, 6), "share": round(seconds / wall, 4)})
        rest = max(0.0, wall - counted)
        phases.append({"phase": "everything else (data, loader start, metrics)", "seconds": round(rest, 6),
                       "share": round(rest / wall, 4)})
        events = [e for e in tprof.key_averages() if e.key.startswith("aten::")]
        total_self = sum(e.self_cpu_time_total for e in tprof.key_averages()) or 1.0
        ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        aten = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
                 "share": round(e.self_cpu_time_total / total_self, 4)} for e in ops]

        # the loader worker's work, per image, in one thread here (as a worker runs it)
        paths = [root / line.split(",")[0] for line in lines[1:1 + min(64, n_train)]]
        tf = build_transforms(cfg, True)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        images = [read_image(p) for p in paths]
        decode = (time.perf_counter() - t0) / len(paths)
        t0 = time.perf_counter()
        for im in images:
            tf(im)
        transform = (time.perf_counter() - t0) / len(paths)
        torch.set_num_threads(threads)
    img_s = result.history[0]["img_s"]
    return {"model": model, "image_size": image_size, "batch_size": batch_size, "train_images": n_train,
            "val_images": n_val, "num_workers": workers, "torch_threads": threads,
            "epoch_wall_s": round(wall, 2), "train_img_s": round(img_s, 2), "phases": phases, "aten_self_cpu": aten,
            "worker_per_image_ms": {"read_image": round(decode * 1e3, 2), "train_transform": round(transform * 1e3, 2)},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def format_profile(p: dict) -> str:
    lines = [(f"{p['model']} · {p['image_size']} px · batch {p['batch_size']} · {p['train_images']} train + "
             f"{p['val_images']} val images · {p['num_workers']} worker(s), {p['torch_threads']} torch thread(s)"),
             f"epoch wall {p['epoch_wall_s']:.1f} s, training {p['train_img_s']:.2f} img/s", ""]
    lines += [f"{r['phase']:40} {r['seconds']:8.2f} s {100 * r['share']:6.1f} %" for r in p["phases"]]
    lines += ["", "top aten operators by self CPU time (main process):"]
    lines += [f"  {r['op']:38} {r['self_cpu_s']:8.2f} s {100 * r['share']:6.1f} %" for r in p["aten_self_cpu"]]
    w = p["worker_per_image_ms"]
    lines += ["", (f"loader worker, per image (1 thread): read_image {w['read_image']:.1f} ms, "
                  f"train transform {w['train_transform']:.1f} ms")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4, help="training batches in the epoch")
    ap.add_argument("--val-batches", type=int, default=1, help="validation batches")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=-1, help="loader workers; -1 = chosen for the machine")
    ap.add_argument("--out", default=None, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    p = profile_epoch(args.batches, args.val_batches, args.batch_size, args.image_size, args.model, args.workers)
    print(format_profile(p))
    if args.out:
        from taxonomist.utils.files import atomic_write_json
        atomic_write_json(Path(args.out), p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
