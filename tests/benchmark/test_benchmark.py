"""`taxonomist benchmark` end to end with a tiny timm model, tiny images and a few steps: the JSON keys and
positive finite figures (no timing assertions: the shared CI cores make them meaningless)."""
from __future__ import annotations

import json
import math

import pytest

from taxonomist.benchmark import BenchmarkConfig, format_table, run_benchmark
from taxonomist.benchmark.images import write_roi_dataset
from taxonomist.cli.main import main
from taxonomist.errors import ConfigError

KEYS = ("ceiling_img_s", "taxonomist_img_s", "baseline_img_s", "vs_ceiling", "vs_baseline")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmark_cli_writes_json_with_every_figure(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["benchmark", "--device", "cpu", "--model", "test_efficientnet", "--image-size", "32",
               "--batch-size", "4", "--steps", "2", "--warmup", "1", "--workers", "1",
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
    table = capsys.readouterr().out
    assert "train" in table and "predict" in table and "min-risk" in table


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


def test_format_table_names_device_and_ratios():
    fig = {"ceiling_img_s": 10.0, "taxonomist_img_s": 9.0, "baseline_img_s": 3.0, "vs_ceiling": 0.9, "vs_baseline": 3.0}
    text = format_table({"model": "m", "image_size": 8, "batch_size": 2, "device": "cpu: X", "train": fig,
                         "predict": fig, "decision": {"images": 10, "candidates": 5, "seconds": 0.1},
                         "peak_rss_mb": 1.0, "peak_device_mb": 1.0})
    assert "cpu: X" in text and "0.90×" in text and "3.00×" in text


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
        (image, target), n = batches[0]
        assert image.shape == (3, 3, 16, 16) and image.dtype == torch.float32 and n == 3
        assert len(target) == 3 and set(target.tolist()) <= {0, 1, 2}


def test_benchmark_cuda_without_gpu_is_one_error_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["benchmark", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: benchmark --device cuda: no CUDA device")
