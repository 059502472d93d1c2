"""`taxonomist benchmark` end to end with a tiny timm model, tiny images and a few steps: the JSON keys and
positive finite figures (no timing assertions: the shared CI cores make them meaningless)."""
from __future__ import annotations

import json
import math
import os

import pytest

from taxonomist.benchmark import BenchmarkConfig, format_table, run_benchmark
from taxonomist.benchmark.images import write_roi_dataset
from taxonomist.cli.main import main
from taxonomist.errors import ConfigError
from taxonomist.runtime import cpu_threads_for
from taxonomist.utils.system import usable_cores

KEYS = ("ceiling_img_s", "taxonomist_img_s", "baseline_img_s", "vs_ceiling", "vs_baseline")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmark_cli_writes_json_with_every_figure(tmp_path, capsys, monkeypatch):
    from taxonomist import runtime
    monkeypatch.setattr(runtime, "busy_cores", lambda: 0)  # the policy is under test, not this machine's load
    out = tmp_path / "b.json"
    rc = main(["benchmark", "--device", "cpu", "--model", "test_efficientnet", "--image-size", "32",
               "--batch-size", "4", "--steps", "2", "--warmup", "1", "--workers", "1", "--rounds", "2",
               "--decision-images", "500", "--decision-candidates", "200", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["model"] == "test_efficientnet"
    assert result["image_size"] == 32 and result["batch_size"] == 4
    assert result["device"].startswith("cpu: ")
    for part in ("train", "predict"):
        assert set(KEYS) <= set(result[part])
        assert all(_positive(result[part][k]) for k in KEYS)
        r = result[part]
        assert r["vs_ceiling"] == pytest.approx(r["taxonomist_img_s"] / r["ceiling_img_s"], rel=0.01)
        assert r["vs_baseline"] == pytest.approx(r["taxonomist_img_s"] / r["baseline_img_s"], rel=0.01)
    assert result["decision"]["images"] == 500 and result["decision"]["candidates"] == 200
    assert _positive(result["decision"]["seconds"])
    assert _positive(result["peak_rss_mb"]) and _positive(result["peak_device_mb"])
    assert result["rounds"] == 2 and len(result["per_round"]) == 2
    for part in ("train", "predict"):  # pooled img/s: total images over total seconds of the rounds
        rates = [rd[part]["taxonomist_img_s"] for rd in result["per_round"]]
        assert min(rates) * 0.99 <= result[part]["taxonomist_img_s"] <= max(rates) * 1.01
    # the ceiling: measured at every thread count 1…N (the default), the best of them
    cores = usable_cores()
    assert result["cores"] == cores and result["ceiling_threads_tried"] == list(range(1, cores + 1))
    for part in ("train", "predict"):
        r = result[part]
        assert set(r["ceiling_by_threads"]) == {str(t) for t in range(1, cores + 1)}
        assert all(_positive(v) for v in r["ceiling_by_threads"].values())
        assert r["ceiling_img_s"] == max(r["ceiling_by_threads"].values())
        assert r["ceiling_by_threads"][str(r["ceiling_threads"])] == r["ceiling_img_s"]
        for rd in result["per_round"]:
            assert rd[part]["ceiling_img_s"] == max(rd[part]["ceiling_by_threads"].values())
    # taxonomist at the project's policy (1 worker), the baseline at torch's default
    if "OMP_NUM_THREADS" not in os.environ:
        assert result["torch_threads"] == cpu_threads_for(cores, 1)
        assert result["torch_threads_rule"].startswith("cpu_threads_for")
    assert result["baseline_torch_threads"] >= 1
    targets = result["targets"]
    assert set(targets) == {"train_vs_ceiling", "train_vs_baseline", "predict_vs_baseline"}
    assert targets["train_vs_ceiling"]["at_least"] == 0.9 and targets["predict_vs_baseline"]["at_least"] == 1.0
    for name, t in targets.items():
        part, against = name.split("_vs_")
        assert t["ratio"] == result[part][f"vs_{against}"] and t["met"] == (t["ratio"] >= t["at_least"])
    timing = result["predict"]["timing"]
    assert timing["method"] in ("steady_state", "whole_call", "mixed") and timing["reason"]
    assert len(timing["per_round"]) == 2
    for rd, method in zip(result["per_round"], timing["per_round"]):
        assert rd["predict"]["timing"]["method"] == method in ("steady_state", "whole_call")
        assert rd["predict"]["timing"]["all_s"] > 0 and rd["predict"]["timing"]["reason"]
    table = capsys.readouterr().out
    assert "train" in table and "predict" in table and "min-risk" in table and "per round" in table
    assert "ceiling by thread count" in table and "targets" in table and "predict timed as" in table


def test_benchmark_times_the_real_train_step_and_predict_path(tmp_path, monkeypatch):
    """The taxonomist figures come from `TrainStep` (the step `train()` runs) and `infer_rows` (what
    `taxonomist predict` runs): count their calls during a run."""
    from taxonomist.inference import run_model
    from taxonomist.train.step import TrainStep

    calls = {"step": 0, "infer": []}
    real_step, real_infer = TrainStep.__call__, run_model.infer_rows

    def counting_step(self, *a, **k):
        calls["step"] += 1
        return real_step(self, *a, **k)

    def counting_infer(*a, **k):
        out = real_infer(*a, **k)
        calls["infer"].append(len(out.result.logits))
        return out

    monkeypatch.setattr(TrainStep, "__call__", counting_step)
    monkeypatch.setattr(run_model, "infer_rows", counting_infer)
    result = run_benchmark(BenchmarkConfig(model="test_efficientnet", device="cpu", image_size=32, batch_size=4,
                                           steps=2, warmup=1, num_workers=0, decision_images=50,
                                           decision_candidates=20, baseline=False), log=lambda *_: None)
    assert calls["step"] == 3            # 1 warm-up + 2 timed training steps
    assert calls["infer"] == [4, 12, 4]  # untimed warm-up; warm-up + 2 timed batches; warm-up alone
    assert "baseline_img_s" not in result["train"] and "vs_baseline" not in result["predict"]  # --skip-baseline
    assert "—" in format_table(result)


def test_benchmark_rejects_bad_sizes():
    with pytest.raises(ConfigError, match="batch-size"):
        run_benchmark(BenchmarkConfig(batch_size=0))


def test_roi_dataset_has_varied_jpegs_and_a_taxonomy(tmp_path):
    from PIL import Image

    root = write_roi_dataset(tmp_path, 6, n_labels=3)
    rows = (root / "annotations.csv").read_text().splitlines()
    assert rows[0] == "path,label" and len(rows) == 7
    sizes = {Image.open(root / r.split(",")[0]).size for r in rows[1:]}
    assert len(sizes) > 1 and all(256 <= s <= 640 for wh in sizes for s in wh)
    assert "Species 0,Genus A" in (root / "taxonomy.csv").read_text()


def test_frames_are_full_hd_and_unknown_kinds_are_refused(tmp_path):
    from PIL import Image

    root = write_roi_dataset(tmp_path, 2, n_labels=2, frame_size=(1920, 1080))
    assert Image.open(root / "images" / "roi_00001.jpg").size == (1920, 1080)
    with pytest.raises(ConfigError, match="--images"):
        run_benchmark(BenchmarkConfig(images="videos"))


def test_format_table_names_device_and_ratios():
    fig = {"ceiling_img_s": 10.0, "taxonomist_img_s": 9.0, "baseline_img_s": 3.0, "vs_ceiling": 0.9, "vs_baseline": 3.0}
    text = format_table({"model": "m", "image_size": 8, "batch_size": 2, "device": "cpu: X", "train": fig,
                         "predict": fig, "decision": {"images": 10, "candidates": 5, "seconds": 0.1},
                         "peak_rss_mb": 1.0, "peak_device_mb": 1.0})
    assert "cpu: X" in text and "0.900×" in text and "3.00×" in text


def test_device_side_batches_run_on_cpu(tmp_path):
    """The CUDA path (decode → GPU crop/resize/flips) written against any device: exercised here on CPU,
    where `decode_jpeg_batch_cuda` falls back to CPU decoding."""
    import torch

    from taxonomist.benchmark.pipeline import _gpu_batches
    from taxonomist.config import AugmentConfig
    from taxonomist.data.dataset import load_dataset

    ds = load_dataset(write_roi_dataset(tmp_path, 6, n_labels=3))
    for train in (True, False):
        batches = list(_gpu_batches(ds, ds.annotations, torch.device("cpu"), 3, 16, [0.5] * 3, [0.5] * 3, train,
                                    False, AugmentConfig(), 0))
        assert len(batches) == 2
        image, target = batches[0]["image"], batches[0]["target"]
        assert image.shape == (3, 3, 16, 16) and image.dtype == torch.float32
        assert len(target) == 3 and set(target.tolist()) <= {0, 1, 2}
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(6))


def test_benchmark_cuda_without_gpu_is_one_error_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["benchmark", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: benchmark --device cuda: no CUDA device")


def test_profile_of_one_epoch_splits_the_time():
    from taxonomist.benchmark.profile import format_profile, profile_epoch

    p = profile_epoch(batches=2, val_batches=1, batch_size=4, image_size=32, model="test_efficientnet", workers=0)
    phases = {r["phase"].strip(): r for r in p["phases"]}
    assert phases["waiting on the loader (training batches)"]["seconds"] > 0
    step = phases["train step (TrainStep.__call__)"]["seconds"]
    assert step > 0 and phases["validation (run_inference)"]["seconds"] > 0
    parts = [phases[k]["seconds"] for k in ("forward + loss", "backward", "clip_grad_norm_", "optimizer step (AdamW)")]
    assert all(t > 0 for t in parts) and sum(parts) <= step * 1.01  # the step's parts lie inside it
    assert sum(r["share"] for r in p["phases"] if not r["phase"].startswith(" ")) == pytest.approx(1, abs=0.01)
    assert p["aten_self_cpu"] and all(0 < r["share"] <= 1 for r in p["aten_self_cpu"])
    assert p["worker_per_image_ms"]["read_image"] > 0 and "TrainStep" in format_profile(p)
