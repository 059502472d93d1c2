"""One benchmark run: build the model once per measurement from the same seed, write the ROI files, and
measure ceiling → taxonomist → baseline for train and predict, then the decision layer; a dict for JSON."""
from __future__ import annotations

import math
import platform
import tempfile
import time
from dataclasses import dataclass

import torch

from taxonomist.benchmark.baseline import baseline_predict, baseline_train
from taxonomist.benchmark.ceiling import ceiling_predict, ceiling_train
from taxonomist.benchmark.decision import time_min_risk
from taxonomist.benchmark.images import write_roi_dataset
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
    num_workers: int = -1           #: -1 = the project's choice for this machine
    decision_images: int = 100_000
    decision_candidates: int = 10_000


def _check(bc: BenchmarkConfig) -> None:
    for name in ("image_size", "batch_size", "steps"):
        if getattr(bc, name) < 1:
            raise ConfigError(f"benchmark --{name.replace('_', '-')} {getattr(bc, name)}: must be at least 1")
    if bc.warmup < 0 or bc.decision_images < 1 or bc.decision_candidates < 1:
        raise ConfigError("benchmark: --warmup must be ≥ 0, decision sizes ≥ 1")


def run_benchmark(bc: BenchmarkConfig, log=print) -> dict:
    from taxonomist.data.dataset import load_dataset
    from taxonomist.data.loading import auto_num_workers
    from taxonomist.losses import build_loss
    from taxonomist.models import build_model
    from taxonomist.taxonomy import default_metric, distance_matrix
    from taxonomist.train.loop import configure_threads, select_device

    _check(bc)
    default_threads = torch.get_num_threads()
    if bc.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"benchmark --device {bc.device}: no CUDA device is available (use auto or cpu)")
    device = select_device(bc.device)
    if device.type == "mps":
        raise ConfigError("benchmark: --device mps is not supported; use cpu or cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    workers = auto_num_workers() if bc.num_workers < 0 else bc.num_workers
    cfg = Config()
    cfg.model.backbone, cfg.model.pretrained = bc.model, "none"
    cfg.data.image_size, cfg.train.batch_size, cfg.data.num_workers = bc.image_size, bc.batch_size, workers
    n_batches = bc.warmup + bc.steps
    res: dict = {"train": {}, "predict": {}}
    with tempfile.TemporaryDirectory(prefix="taxonomist-bench-") as tmp, PeakRSS() as rss:
        t0 = time.perf_counter()
        root = write_roi_dataset(tmp, bc.batch_size * n_batches)
        log(f"wrote {bc.batch_size * n_batches} ROI JPEGs (256–640 px sides) in {time.perf_counter() - t0:.1f} s")
        dataset = load_dataset(root)
        taxonomy = dataset.taxonomy
        labels = list(taxonomy.labels)
        rows = dataset.annotations
        metric = default_metric(taxonomy)
        D = distance_matrix(taxonomy, metric, labels, labels)
        candidates = list(taxonomy.internal_nodes) + labels  # min-risk may answer a genus or family
        D_lc = distance_matrix(taxonomy, metric, labels, candidates).astype("float32")
        criterion = build_loss(cfg.loss, taxonomy, D).to(device)

        def fresh_model():
            torch.manual_seed(0)
            model = build_model(cfg.model, taxonomy, bc.image_size).to(device)
            if device.type == "cuda" and cfg.train.channels_last:
                model = model.to(memory_format=torch.channels_last)
            return model

        threads = configure_threads(0, device, workers)  # the project's policy, for ceiling and taxonomist
        amp = device.type == "cuda"
        common = {"warmup": bc.warmup, "steps": bc.steps}
        log(f"device {device}, {threads} torch thread(s), {workers} loader worker(s); ceiling …")
        res["train"]["ceiling_img_s"] = ceiling_train(fresh_model(), criterion, device, bc.batch_size, bc.image_size,
                                                      len(labels), amp=amp, channels_last=amp, **common)
        res["predict"]["ceiling_img_s"] = ceiling_predict(fresh_model(), device, bc.batch_size, bc.image_size,
                                                          amp=amp, channels_last=amp, **common)
        log("taxonomist …")
        res["train"]["taxonomist_img_s"] = taxonomist_train(fresh_model(), criterion, cfg, dataset, rows, device,
                                                            workers, **common)
        res["predict"]["taxonomist_img_s"] = taxonomist_predict(fresh_model(), cfg, dataset, rows, D_lc, device,
                                                                workers, **common)
        log(f"baseline ({default_threads} torch threads) …")
        torch.set_num_threads(default_threads)
        model = fresh_model()
        pre = model.preprocessing
        targets = [labels.index(lab) for lab in rows["label"]]
        args = (device, root, list(rows["path"]), targets, bc.image_size, pre["mean"], pre["std"], bc.batch_size,
                workers, bc.warmup, bc.steps)
        res["train"]["baseline_img_s"] = baseline_train(model, *args)
        res["predict"]["baseline_img_s"] = baseline_predict(fresh_model(), *args)
        torch.set_num_threads(threads)
        log("decision layer …")
        res["decision"] = time_min_risk(bc.decision_images, candidates=bc.decision_candidates)
    for part in ("train", "predict"):
        r = res[part]
        r["vs_ceiling"] = r["taxonomist_img_s"] / r["ceiling_img_s"]
        r["vs_baseline"] = r["taxonomist_img_s"] / r["baseline_img_s"]
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
    return {
        "device": description, "model": bc.model, "image_size": bc.image_size, "batch_size": bc.batch_size,
        "steps": bc.steps, "warmup": bc.warmup, "num_workers": workers, "torch_threads": threads,
        "baseline_torch_threads": default_threads,
        "train": res["train"], "predict": res["predict"], "decision": res["decision"],
        "peak_rss_mb": round(rss.peak_mb, 1), "peak_device_mb": round(peak_device, 1),
        "images": "pre-cropped ROI JPEGs, sides 256–640 px, quality 90",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def format_table(result: dict) -> str:
    lines = [f"{result['model']} · {result['image_size']} px · batch {result['batch_size']} · {result['device']}",
             f"{'':8} {'ceiling':>9} {'taxonomist':>11} {'baseline':>9} {'vs ceiling':>11} {'vs baseline':>12}  (img/s)"]
    for part in ("train", "predict"):
        r = result[part]
        lines.append(f"{part:8} {r['ceiling_img_s']:9.1f} {r['taxonomist_img_s']:11.1f} {r['baseline_img_s']:9.1f} "
                     f"{r['vs_ceiling']:10.2f}× {r['vs_baseline']:11.2f}×")
    d = result["decision"]
    lines.append(f"min-risk: {d['images']:,} images × {d['candidates']:,} candidates in {d['seconds']:.2f} s")
    lines.append(f"peak host RSS {result['peak_rss_mb']:.0f} MB · peak device memory {result['peak_device_mb']:.0f} MB")
    return "\n".join(lines)
