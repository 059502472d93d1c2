"""One benchmark run: build the model once per measurement from the same seed, write the ROI files, and
measure ceiling → taxonomist → baseline for train and predict, then the decision layer; a dict for JSON.

The ceiling is the model alone at the best of several torch thread counts (on CPU 1…N by default), so a thread
policy that leaves cores idle shows against it; taxonomist runs at the project's own count
(`configure_threads`), the baseline at torch's default. The run reports the issue's targets (`TARGETS`)."""
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
    ceiling_threads: str = "all"    #: CPU thread counts for the ceiling: all | max | policy | "1,2,…"
    decision_images: int = 100_000
    decision_candidates: int = 10_000


#: the issue's targets for one run, per device type: (part, against what, at least this ratio)
TARGETS = {
    "cpu": (("train", "ceiling", 0.9), ("train", "baseline", 1.0), ("predict", "baseline", 1.0)),
    "cuda": (("train", "ceiling", 0.9), ("predict", "ceiling", 0.9), ("train", "baseline", 2.0),
             ("predict", "baseline", 2.0)),
}


def ceiling_thread_counts(spec: str, cores: int, policy: int) -> list[int]:
    """The torch thread counts at which the CPU ceiling is measured: `all` = 1…cores, `max` = cores only,
    `policy` = the project's own count only, or a comma-separated list; sorted, without repeats.

    >>> ceiling_thread_counts("all", 4, 3), ceiling_thread_counts("max", 4, 3), ceiling_thread_counts("policy", 4, 3)
    ([1, 2, 3, 4], [4], [3])
    >>> ceiling_thread_counts("2,1,2", 4, 3)
    [1, 2]
    """
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(1, max(1, cores) + 1))
    if spec == "max":
        return [max(1, cores)]
    if spec == "policy":
        return [policy]
    try:
        counts = sorted({int(tok) for tok in spec.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise ConfigError(f"benchmark --ceiling-threads {spec!r}: give all, max, policy or thread counts ≥ 1 "
                          "separated by commas (e.g. 1,2)")
    return counts


def check_targets(parts: dict, device_type: str) -> dict:
    """Each target of `TARGETS[device_type]` with the measured ratio and whether it is met (None where the
    figure was not measured, e.g. without the baseline).

    >>> check_targets({"train": {"vs_ceiling": 0.95, "vs_baseline": 0.8}, "predict": {"vs_baseline": 1.2}}, "cpu")
    ... # doctest: +NORMALIZE_WHITESPACE
    {'train_vs_ceiling': {'target': 'train ≥ 0.9× ceiling', 'at_least': 0.9, 'ratio': 0.95, 'met': True},
     'train_vs_baseline': {'target': 'train ≥ 1.0× baseline', 'at_least': 1.0, 'ratio': 0.8, 'met': False},
     'predict_vs_baseline': {'target': 'predict ≥ 1.0× baseline', 'at_least': 1.0, 'ratio': 1.2, 'met': True}}
    """
    out = {}
    for part, against, at_least in TARGETS.get(device_type, TARGETS["cpu"]):
        ratio = parts[part].get(f"vs_{against}")
        out[f"{part}_vs_{against}"] = {"target": f"{part} ≥ {at_least:.1f}× {against}", "at_least": at_least,
                                       "ratio": ratio, "met": None if ratio is None else bool(ratio >= at_least)}
    return out


def _check(bc: BenchmarkConfig) -> None:
    for name in ("image_size", "batch_size", "steps", "rounds"):
        if getattr(bc, name) < 1:
            raise ConfigError(f"benchmark --{name.replace('_', '-')} {getattr(bc, name)}: must be at least 1")
    if bc.warmup < 0 or bc.decision_images < 1 or bc.decision_candidates < 1:
        raise ConfigError("benchmark: --warmup must be ≥ 0, decision sizes ≥ 1")
    if bc.images not in IMAGE_KINDS:
        raise ConfigError(f"benchmark --images {bc.images!r}: choose one of {', '.join(IMAGE_KINDS)}")
    ceiling_thread_counts(bc.ceiling_threads, 1, 1)  # the spelling, before minutes of work


def _pool(rates: list[float], images: int) -> float:
    """img/s over several rounds of `images` each: total images over total seconds."""
    return len(rates) * images / sum(images / r for r in rates)


def _figure(v: float) -> float:
    """4 significant figures: ratios of a few img/s stay readable."""
    return float(f"{v:.4g}")


def _best(by_threads: dict[str, float]) -> str:
    """The thread count (a JSON key) with the highest img/s; the fewer threads on a tie."""
    return max(by_threads, key=lambda t: (by_threads[t], -int(t)))


def _timing_summary(methods: list[str], last_reason: str) -> dict:
    """How predict was timed over the rounds (`pipeline.predict_rate` chooses per round).

    >>> _timing_summary(["steady_state", "whole_call", "steady_state"], "…")["reason"]
    "steady_state in 2 round(s), whole_call in 1 round(s); each round's reason is in per_round[].predict.timing"
    """
    kinds = sorted(set(methods))
    if len(kinds) == 1:
        return {"method": kinds[0], "per_round": methods, "reason": last_reason}
    counts = ", ".join(f"{k} in {methods.count(k)} round(s)" for k in kinds)
    return {"method": "mixed", "per_round": methods,
            "reason": f"{counts}; each round's reason is in per_round[].predict.timing"}


def run_benchmark(bc: BenchmarkConfig, log=print) -> dict:
    """Run one benchmark (see the module docstring); torch's thread count is restored on return."""
    caller_threads = torch.get_num_threads()
    try:
        return _run(bc, log)
    finally:
        torch.set_num_threads(caller_threads)


def _run(bc: BenchmarkConfig, log) -> dict:
    from taxonomist.data.dataset import load_dataset
    from taxonomist.losses import build_loss
    from taxonomist.models import build_model
    from taxonomist.taxonomy import default_metric, distance_matrix
    from taxonomist.runtime import (
        LOADER_CORE_SHARE,
        auto_num_workers,
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
    ceiling_rates: dict = {"train": {}, "predict": {}}  # part → thread count (str) → img/s per round
    predict_timings: list[dict] = []
    rounds: list[dict] = []

    def note(part: str, kind: str, value: float) -> None:
        rates[part].setdefault(kind, []).append(value)
        rounds[-1].setdefault(part, {})[kind] = _figure(value)

    def note_ceiling(part: str, threads: int, value: float) -> None:
        ceiling_rates[part].setdefault(str(threads), []).append(value)
        by = rounds[-1].setdefault(part, {}).setdefault("ceiling_by_threads", {})
        by[str(threads)] = _figure(value)

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

        cores = usable_cores()
        threads = configure_threads(0, device, workers)  # the project's policy, for taxonomist's own paths
        if device.type != "cpu":
            rule = "unchanged: the model runs on the device"
            counts = [threads]  # the GPU does the model's work; the host's thread count does not bound it
            if bc.ceiling_threads != "all":
                log(f"--ceiling-threads {bc.ceiling_threads} applies to the CPU; on {device.type} the ceiling "
                    f"runs at {threads} thread(s)")
        else:
            rule = ("OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ
                    else f"cpu_threads_for({cores} cores, {workers} loader worker(s)) = cores − ⌊workers × "
                         f"{LOADER_CORE_SHARE}⌋")
            counts = ceiling_thread_counts(bc.ceiling_threads, cores, threads)
        amp = cfg.train.amp and device.type == "cuda"
        channels_last = cfg.train.channels_last and device.type == "cuda"
        common = {"warmup": bc.warmup, "steps": bc.steps}
        log(f"device {device}, {cores} usable core(s), {workers} loader worker(s), {bc.rounds} round(s); torch "
            f"threads: taxonomist {threads} ({rule}), baseline {default_threads} (torch's default), ceiling the "
            f"best of {', '.join(map(str, counts))}")
        for r in range(bc.rounds):
            rounds.append({})
            for t in counts:
                torch.set_num_threads(t)
                log(f"round {r + 1}/{bc.rounds}: ceiling at {t} thread(s) …")
                note_ceiling("train", t, ceiling_train(compiled(fresh_model()), criterion, device, bc.batch_size,
                                                       bc.image_size, len(labels), amp=amp,
                                                       channels_last=channels_last, **common))
                note_ceiling("predict", t, ceiling_predict(compiled(fresh_model()), device, bc.batch_size,
                                                           bc.image_size, amp=amp, channels_last=channels_last,
                                                           **common))
            for part in ("train", "predict"):
                fig = rounds[-1][part]
                fig["ceiling_threads"] = int(_best(fig["ceiling_by_threads"]))
                fig["ceiling_img_s"] = fig["ceiling_by_threads"][str(fig["ceiling_threads"])]
            torch.set_num_threads(threads)
            log(f"round {r + 1}/{bc.rounds}: taxonomist ({threads} thread(s)) …")
            model = fresh_model()
            note("train", "taxonomist_img_s", taxonomist_train(model, criterion, cfg, dataset, rows, label_index,
                                                               device, workers, train_model=compiled(model),
                                                               **common))
            timing = taxonomist_predict(fresh_model(), cfg, dataset, rows, label_index, device, workers, **common)
            note("predict", "taxonomist_img_s", timing.img_s)
            predict_timings.append(timing.as_dict())
            rounds[-1]["predict"]["timing"] = timing.as_dict()
            log(f"round {r + 1}/{bc.rounds}: predict timed as {timing.method}: {timing.reason}")
            if device.type == "cuda":  # the device-side decoder, through the same step and run_inference
                log(f"round {r + 1}/{bc.rounds}: taxonomist with nvJPEG decode + GPU augment …")
                model = fresh_model()
                note("train", "gpu_decode_img_s", taxonomist_train(model, criterion, cfg, dataset, rows, label_index,
                                                                   device, workers, gpu_decode=True,
                                                                   train_model=compiled(model), **common))
                timing = taxonomist_predict(fresh_model(), cfg, dataset, rows, label_index, device, workers,
                                            gpu_decode=True, **common)
                note("predict", "gpu_decode_img_s", timing.img_s)
                rounds[-1]["predict"]["gpu_decode_timing"] = timing.as_dict()
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
                by = ", ".join(f"{t}: {v:.4g}" for t, v in fig["ceiling_by_threads"].items())
                log(f"round {r + 1}/{bc.rounds}: {part} ceiling {fig['ceiling_img_s']:.4g} (by threads {by}), "
                    f"taxonomist {fig['taxonomist_img_s']:.4g}{base} img/s ({fig['vs_ceiling']:.3f}× ceiling)")
            torch.set_num_threads(threads)
        log("decision layer …")
        res: dict = {"decision": time_min_risk(bc.decision_images, candidates=bc.decision_candidates)}
    for part in ("train", "predict"):
        pooled = {kind: _pool(values, timed_images) for kind, values in rates[part].items()}
        by_threads = {t: _pool(values, timed_images) for t, values in ceiling_rates[part].items()}
        best = _best(by_threads)  # one thread count for all rounds: the ceiling a fixed policy could reach
        pooled["ceiling_img_s"] = by_threads[best]
        pooled["vs_ceiling"] = pooled["taxonomist_img_s"] / pooled["ceiling_img_s"]
        if bc.baseline:
            pooled["vs_baseline"] = pooled["taxonomist_img_s"] / pooled["baseline_img_s"]
        if "gpu_decode_img_s" in pooled:
            pooled["gpu_decode_vs_ceiling"] = pooled["gpu_decode_img_s"] / pooled["ceiling_img_s"]
        for k, v in [*pooled.items(), *by_threads.items()]:
            if not (math.isfinite(v) and v > 0):
                raise RuntimeError(f"benchmark: {part}.{k} = {v} is not a positive number")
        res[part] = {"ceiling_img_s": _figure(pooled.pop("ceiling_img_s")), "ceiling_threads": int(best),
                     "ceiling_by_threads": {t: _figure(v) for t, v in by_threads.items()},
                     **{k: _figure(v) for k, v in pooled.items()}}
    res["predict"]["timing"] = _timing_summary([t["method"] for t in predict_timings], predict_timings[-1]["reason"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        description = f"cuda: {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
        peak_device = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        description = f"cpu: {cpu_name()} ({cores} usable cores)"
        peak_device = rss.peak_mb  # the host is the device
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "device": description, "model": bc.model, "image_size": bc.image_size, "batch_size": bc.batch_size,
        "steps": bc.steps, "warmup": bc.warmup, "rounds": len(rounds), "num_workers": workers,
        "cores": cores, "torch_threads": threads, "torch_threads_rule": rule,
        "baseline_torch_threads": default_threads, "ceiling_threads_tried": counts, "compile": bc.compile,
        "train": res["train"], "predict": res["predict"], "decision": res["decision"],
        "targets": check_targets(res, device.type),
        "peak_rss_mb": round(rss.peak_mb, 1), "peak_device_mb": round(peak_device, 1),
        "per_round": rounds, "load_average_1min_at_end": load,
        "images": IMAGE_KINDS[bc.images],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _rate(v: float) -> str:
    return f"{v:9.1f}" if v >= 100 else f"{v:9.2f}"


def _ratio(v) -> str:
    return "—" if v is None else f"{v:.2f}×"


def format_table(result: dict) -> str:
    lines = [f"{result['model']} · {result['image_size']} px · batch {result['batch_size']} · {result['device']}",
             f"{'':8} {'ceiling':>9} {'taxonomist':>11} {'baseline':>9} {'vs ceiling':>11} {'vs baseline':>12}  (img/s)"]
    for part in ("train", "predict"):
        r = result[part]
        base, vs_base = ((_rate(r["baseline_img_s"]), f"{r['vs_baseline']:11.2f}×") if "baseline_img_s" in r
                         else (f"{'—':>9}", f"{'—':>12}"))
        lines.append(f"{part:8} {_rate(r['ceiling_img_s'])} {_rate(r['taxonomist_img_s']):>11} "
                     f"{base} {r['vs_ceiling']:10.3f}× {vs_base}")
    if "torch_threads" in result:
        lines.append(f"torch threads: taxonomist {result['torch_threads']} ({result.get('torch_threads_rule', '?')}),"
                     f" baseline {result.get('baseline_torch_threads', '?')} (torch's default)")
    for part in ("train", "predict"):
        r = result[part]
        if "ceiling_by_threads" in r:
            by = ", ".join(f"{t} thread{'s' * (t != '1')} {v:.4g}" for t, v in r["ceiling_by_threads"].items())
            lines.append(f"{part} ceiling by thread count: {by} img/s → best at {r['ceiling_threads']}")
    for part in ("train", "predict"):
        r = result[part]
        if "gpu_decode_img_s" in r:
            lines.append(f"{part} with nvJPEG decode + GPU augment: {r['gpu_decode_img_s']:.1f} img/s "
                         f"({r['gpu_decode_vs_ceiling']:.3f}× ceiling)")
    timing = result["predict"].get("timing")
    if timing:
        lines.append(f"predict timed as {timing['method']} ({', '.join(timing['per_round'])} per round): "
                     f"{timing['reason']}")
    per_round = result.get("per_round") or []
    if len(per_round) > 1:
        for part in ("train", "predict"):
            ratios = [rd[part]["vs_ceiling"] for rd in per_round]
            lines.append(f"{part} vs ceiling per round: " + ", ".join(f"{v:.3f}" for v in ratios))
    if result.get("targets"):
        lines.append("targets (reported, not enforced: one run on a shared machine is noisy):")
        for t in result["targets"].values():
            verdict = "not measured" if t["met"] is None else "met" if t["met"] else "NOT met"
            lines.append(f"  {t['target']:<26} measured {_ratio(t['ratio']):>7}  {verdict}")
    d = result["decision"]
    lines.append(f"min-risk: {d['images']:,} images × {d['candidates']:,} candidates in {d['seconds']:.2f} s")
    lines.append(f"peak host RSS {result['peak_rss_mb']:.0f} MB · peak device memory {result['peak_device_mb']:.0f} MB")
    return "\n".join(lines)
