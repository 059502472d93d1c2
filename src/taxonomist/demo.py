"""The offline demo: synthesize a hierarchical dataset, fine-tune the offline-pretrained EfficientNet-Lite0,
evaluate it, and say where everything is. Minutes on a laptop CPU, no network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from taxonomist.config import Config, load_config

#: what the demo trains; `--set` style overrides may change any of it
DEMO_SETTINGS = {
    "data": {"image_size": 128, "num_workers": -1},
    "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "auto", "head": "flat"},
    "loss": {"name": "ce", "label_smoothing": 0.1, "distance_weight": 0.0},
    "train": {"epochs": 6, "batch_size": 32, "lr": 1e-3, "warmup_epochs": 0.5, "seed": 0},
    "decide": {"metric": "auto"},
}


@dataclass
class DemoResult:
    out_dir: Path
    data_dir: Path
    run_dir: Path
    metrics: dict
    seconds: float

    def summary(self) -> str:
        m = self.metrics
        lines = [
            "",
            "taxonomist demo — results on the held-out test split",
            f"  {'examples':<28}{m['n']}",
            f"  {'mean hierarchical distance':<28}{m['mhd']:.3f}   (0 = perfect; {m['metric']} metric)",
            f"  {'top-1 (label)':<28}{m['top1']:.3f}",
            f"  {'macro-F1':<28}{m['macro_f1']:.3f}",
            "  per rank:  " + "  ".join(f"{k} {v['top1']:.2f}" for k, v in m["per_rank"].items()),
            "",
            f"  dataset        {self.data_dir}",
            f"  run directory  {self.run_dir}",
            f"  metrics        {self.run_dir / 'metrics.json'}",
            f"  predictions    {self.run_dir / 'predictions.csv'}",
            f"  checkpoint     {self.run_dir / 'checkpoints' / 'best.safetensors'}",
            f"  took {self.seconds / 60:.1f} min",
        ]
        report = self.run_dir / "report.html"
        if report.exists():
            lines.append(f"  report         {report}")  # last: the one path to open
        return "\n".join(lines)


def demo_config(out_dir: Path, device: str = "auto", overrides: list[str] | None = None) -> Config:
    cfg = load_config(None, overrides, base=DEMO_SETTINGS)
    cfg.data.root = str(out_dir / "data")
    cfg.train.device = device
    cfg.out = str(out_dir / "run")
    return cfg


def run_demo(out_dir: str | Path = "runs/demo", device: str = "auto", overrides: list[str] | None = None,
             progress: bool = True, log=print) -> DemoResult:
    """Synthesize → split → train → evaluate. An existing demo dataset in `out_dir/data` is reused;
    an existing `out_dir/run` is replaced."""
    import shutil

    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.pipeline import finish_run, fit

    start = time.time()
    out_dir = Path(out_dir)
    cfg = demo_config(out_dir, device, overrides)
    data_dir = Path(cfg.data.root)
    if not (data_dir / "annotations.csv").exists():
        log(f"1/4 synthesizing the demo dataset into {data_dir}")
        synthesize(data_dir, progress=progress)
    else:
        log(f"1/4 reusing the demo dataset in {data_dir}")
    log("2/4 splitting it into train / val / test (seeded, stratified)")
    split_dataset(data_dir, val=0.15, test=0.15, seed=0)
    run_dir = Path(cfg.out)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log(f"3/4 fine-tuning {cfg.model.backbone} ({cfg.train.epochs} epochs at {cfg.data.image_size} px)")
    fit(cfg, calibrate=False, evaluate=False, progress=progress, log=log)
    log("4/4 calibrating (temperature, OOD scores) and evaluating the best checkpoint on the test split")
    result = finish_run(run_dir, cfg, split="test", progress=progress,
                        log=lambda text: log("    " + text.replace("\n", "\n    ")))
    result.raise_for_failure()
    return DemoResult(out_dir, data_dir, run_dir, result.evaluation.metrics, time.time() - start)
