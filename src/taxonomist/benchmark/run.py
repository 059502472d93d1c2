"""One benchmark run: build the model once per measurement from the same seed, write the ROI files, and
measure ceiling → taxonomist → baseline for train and predict, then the decision layer; a dict for JSON."""
from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass

import torch

from taxonomist.benchmark.baseline import baseline_predict, baseline_train
from taxonomist.benchmark.ceiling import ceiling_predict, ceiling_train
from taxonomist.benchmark.decision import time_min_risk
from taxonomist.benchmark.images import IMAGE_KINDS, write_roi_dataset
from taxonomist.benchmark.measure import PeakRSS
from taxonomist.benchmark.pipeline import taxonomist_predict, taxonomist_train
from taxonomist.config import Config
from taxonomist.errors import ConfigError
from taxonomist.utils.system import cpu_name, usable_cores


@dataclass
class BenchmarkConfig:
    model: str = "tf_efficientnet_lite0"
    device: str = "auto"
    image_size: int = 224
    batch_size: int = 32
    steps: int = 3                  #: timed batches per measurement
    warmup: int = 1                 #: untimed batches before them
    rounds: int = 1                 #: ceiling → taxonomist → baseline repeated; img/s pooled over the rounds
    num_workers: int = -1           #: -1 = the project's choice for this machine
    compile: bool = False           #: torch.compile the model (ceiling and taxonomist), as train.compile does
    images: str = "rois"            #: `rois` (256–640 px crops) or `frames` (1920×1080 frames)
    baseline: bool = True           #: False: ceiling and taxonomist only (no baseline keys, no vs_baseline)
    decision_images: int = 100_000
    decision_candidates: int = 10_000


def _check(bc: BenchmarkConfig) -> None:
    for name in ("image_size", "batch_size", "steps", "rounds"):
        if getattr(bc, name) < 1:
            raise ConfigError(f"benchmark --{name.replace('_', '-')} {getattr(bc, name)}: must be at least 1")
    if bc.warmup < 0 or bc.decision_images < 1 or bc.decision_candidates < 1:
        raise ConfigError("benchmark: --warmup must be ≥ 0, decision sizes ≥ 1")
    if bc.images not in IMAGE_KINDS:
        raise ConfigError(f"benchmark --images {bc.images!r}: choose one of {', '.join(IMAGE_KINDS)}")


def _pool(rates: list[float], images: int) -> float:
    """img/s over several rounds of `images` each: total images over total seconds."""
    return len(rates) * images / sum(images / r for r in rates)


def run_benchmark(bc: BenchmarkConfig, log=print) -> dict:
    from taxonomist.data.dataset import load_dataset
    from taxonomist.data.loading import auto_num_workers
    from taxonomist.losses import build_loss
    from taxonomist.models import build_model
    from taxonomist.taxonomy import default_metric, distance_matrix
    from taxonomist.train.loop import (
        configure_threads,
        select_device,
        tune_cpu_allocator,
    )

    _check(bc)
    if bc.device == "cpu" or (bc.device == "auto" and not torch.cuda.is_available()):
        tune_cpu_allocator()  # before the first large allocation, as configure_threads does in train()
    default_threads = torch.get_num_threads()
    if bc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"benchmark --device {bc.device}: no CUDA device is available (use auto or cpu)")
    device = select_device(bc.device)
    if device.type == "mps":
        raise ConfigError("benchmark: --device mps is not supported; use cpu or cuda")
    if device.type == "cuda":  # as train() sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    workers = auto_num_workers() if bc.num_workers < 0 else bc.num_workers
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained = bc.model, "none"
    cfg.data.image_size, cfg.train.batch_size, cfg.data.num_workers = bc.image_size, bc.batch_size, workers
    cfg.train.compile = bc.compile
    n_batches = bc.warmup + bc.steps
    timed_images = bc.steps * bc.batch_size
    rates: dict = {"train": {}, "predict": {}}
    rounds: list[dict] = []

    def note(part: str, kind: str, value: float) -> None:
        rates[part].setdefault(kind, []).append(value)
        rounds[-1].setdefault(part, {})[kind] = float(f"{value:.4g}")

    with tempfile.TemporaryDirectory(prefix="taxonomist-bench-") as tmp, PeakRSS() as rss:
        t0 = time.perf_counter()
        root = write_roi_dataset(tmp, bc.batch_size * n_batches,
                                 frame_size=(1920, 1080) if bc.images == "frames" else None)
        log(f"wrote {bc.batch_size * n_batches} {IMAGE_KINDS[bc.images]} in {time.perf_counter() - t0:.1f} s")
        dataset = load_dataset(root)
        taxonomy = dataset.taxonomy
        labels = list(taxonomy.labels)
        label_index = {lab: i for i, lab in enumerate(labels)}
        rows = dataset.annotations
        metric = default_metric(taxonomy)
        D = distance_matrix(taxonomy, metric, labels, labels)
        criterion = build_loss(cfg.loss, taxonomy, D).to(device)

        def fresh_model():
            torch.manual_seed(0)
            model = build_model(cfg.model, taxonomy, bc.image_size).to(device)
            if device.type == "cuda" and cfg.train.channels_last:  # as train() does
                model = model.to(memory_format=torch.channels_last)
            return model

        def compiled(model):
            return torch.compile(model) if bc.compile else model

        threads = configure_threads(0, device, workers)  # the project's policy, for ceiling and taxonomist
        amp = cfg.train.amp and device.type == "cuda"
        channels_last = cfg.train.channels_last and device.type == "cuda"
        common = {"warmup": bc.warmup, "steps": bc.steps}
        log(f"device {device}, {threads} torch thread(s), {workers} loader worker(s), {bc.rounds} round(s)")
        for r in range(bc.rounds):
            rounds.append({})
            torch.set_num_threads(threads)
            log(f"round {r + 1}/{bc.rounds}: ceiling …")
            note("train", "ceiling_img_s", ceiling_train(compiled(fresh_model()), criterion, device, bc.batch_size,
                                                         bc.image_size, len(labels), amp=amp,
                                                         channels_last=channels_last, **common))
            note("predict", "ceiling_img_s", ceiling_predict(compiled(fresh_model()), device, bc.batch_size,
                                                             bc.image_size, amp=amp, channels_last=channels_last,
                                                             **common))
            log(f"round {r + 1}/{bc.rounds}: taxonomist …")
            model = fresh_model()
            note("train", "taxonomist_img_s", taxonomist_train(model, criterion, cfg, dataset, rows, label_index,
                                                               device, workers, train_model=compiled(model),
                                                               **common))
            note("predict", "taxonomist_img_s", taxonomist_predict(fresh_model(), cfg, dataset, rows, label_index,
                                                                   device, workers, **common))
            if device.type == "cuda":  # the device-side decoder, through the same step and run_inference
                log(f"round {r + 1}/{bc.rounds}: taxonomist with nvJPEG decode + GPU augment …")
                model = fresh_model()
                note("train", "gpu_decode_img_s", taxonomist_train(model, criterion, cfg, dataset, rows, label_index,
                                                                   device, workers, gpu_decode=True,
                                                                   train_model=compiled(model), **common))
                note("predict", "gpu_decode_img_s", taxonomist_predict(fresh_model(), cfg, dataset, rows,
                                                                       label_index, device, workers,
                                                                       gpu_decode=True, **common))
            if bc.baseline:
                log(f"round {r + 1}/{bc.rounds}: baseline ({default_threads} torch threads) …")
                torch.set_num_threads(default_threads)
                pre = fresh_model().preprocessing
                targets = [label_index[lab] for lab in rows["label"]]
                args = (device, root, list(rows["path"]), targets, bc.image_size, pre["mean"], pre["std"],
                        bc.batch_size, workers, bc.warmup, bc.steps)
                note("train", "baseline_img_s", baseline_train(fresh_model(), *args))
                note("predict", "baseline_img_s", baseline_predict(fresh_model(), *args))
            for part in ("train", "predict"):
                fig = rounds[-1][part]
                fig["vs_ceiling"] = round(fig["taxonomist_img_s"] / fig["ceiling_img_s"], 4)
                base = f", baseline {fig['baseline_img_s']:.4g}" if bc.baseline else ""
                log(f"round {r + 1}/{bc.rounds}: {part} ceiling {fig['ceiling_img_s']:.4g}, taxonomist "
                    f"{fig['taxonomist_img_s']:.4g}{base} img/s ({fig['vs_ceiling']:.3f}× ceiling)")
            torch.set_num_threads(threads)
        log("decision layer …")
        res: dict = {"decision": time_min_risk(bc.decision_images, candidates=bc.decision_candidates)}
    for part in ("train", "predict"):
        r = res[part] = {kind: _pool(values, timed_images) for kind, values in rates[part].items()}
        r["vs_ceiling"] = r["taxonomist_img_s"] / r["ceiling_img_s"]
        if bc.baseline:
            r["vs_baseline"] = r["taxonomist_img_s"] / r["baseline_img_s"]
        if "gpu_decode_img_s" in r:
            r["gpu_decode_vs_ceiling"] = r["gpu_decode_img_s"] / r["ceiling_img_s"]
        for k, v in r.items():
            if not (math.isfinite(v) and v > 0):
                raise RuntimeError(f"benchmark: {part}.{k} = {v} is not a positive number")
            r[k] = float(f"{v:.4g}")  # 4 significant figures: ratios of a few img/s stay readable
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        description = f"cuda: {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
        peak_device = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        description = f"cpu: {cpu_name()} ({usable_cores()} usable cores)"
        peak_device = rss.peak_mb  # the host is the device
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "device": description, "model": bc.model, "image_size": bc.image_size, "batch_size": bc.batch_size,
        "steps": bc.steps, "warmup": bc.warmup, "rounds": len(rounds), "num_workers": workers,
        "torch_threads": threads, "baseline_torch_threads": default_threads, "compile": bc.compile,
        "train": res["train"], "predict": res["predict"], "decision": res["decision"],
        "peak_rss_mb": round(rss.peak_mb, 1), "peak_device_mb": round(peak_device, 1),
        "per_round": rounds, "load_average_1min_at_end": load,
        "images": IMAGE_KINDS[bc.images],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _rate(v: float) -> str:
    return f"{v:9.1f}" if v >= 100 else f"{v:9.2f}"


def format_table(result: dict) -> str:
    lines = [f"{result['model']} · {result['image_size']} px · batch {result['batch_size']} · {result['device']}",
             f"{'':8} {'ceiling':>9} {'taxonomist':>11} {'baseline':>9} {'vs ceiling':>11} {'vs baseline':>12}  (img/s)"]
    for part in ("train", "predict"):
        r = result[part]
        base, vs_base = ((_rate(r["baseline_img_s"]), f"{r['vs_baseline']:11.2f}×") if "baseline_img_s" in r
                         else (f"{'—':>9}", f"{'—':>12}"))
        lines.append(f"{part:8} {_rate(r['ceiling_img_s'])} {_rate(r['taxonomist_img_s']):>11} "
                     f"{base} {r['vs_ceiling']:10.3f}× {vs_base}")
    for part in ("train", "predict"):
        r = result[part]
        if "gpu_decode_img_s" in r:
            lines.append(f"{part} with nvJPEG decode + GPU augment: {r['gpu_decode_img_s']:.1f} img/s "
                         f"({r['gpu_decode_vs_ceiling']:.3f}× ceiling)")
    per_round = result.get("per_round") or []
    if len(per_round) > 1:
        for part in ("train", "predict"):
            ratios = [rd[part]["vs_ceiling"] for rd in per_round]
            lines.append(f"{part} vs ceiling per round: " + ", ".join(f"{v:.3f}" for v in ratios))
    d = result["decision"]
    lines.append(f"min-risk: {d['images']:,} images × {d['candidates']:,} candidates in {d['seconds']:.2f} s")
    lines.append(f"peak host RSS {result['peak_rss_mb']:.0f} MB · peak device memory {result['peak_device_mb']:.0f} MB")
    return "\n".join(lines)
