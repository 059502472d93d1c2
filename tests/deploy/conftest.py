"""Shared fixtures of the deployment tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served_run(tmp_path_factory):
    """A tiny calibrated run on synthetic data (6 taxa, one held out as OOD): (run directory, dataset)."""
    from taxonomist.config import load_config
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize
    from taxonomist.inference import calibrate_run
    from taxonomist.train import train

    base = tmp_path_factory.mktemp("serve")
    data, run = base / "synth", base / "run"
    synthesize(data, n_taxa=6, per_class=8, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.2, ood_taxa=1, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false",
                             "augment.randaugment=", "train.seed=0"])
    train(cfg, progress=False, log=lambda *_: None)
    calibrate_run(run, device="cpu", num_workers=0)
    return run, data
