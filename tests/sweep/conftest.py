"""Shared by the sweep tests: a tiny synthetic dataset (train/val only) and the base config of every trial."""
from __future__ import annotations

from pathlib import Path

import pytest

from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize

#: The trials' fixed settings (`--set` pairs): a tiny timm test model on 32 px images, on the CPU.
BASE = ["data.image_size=32", "data.num_workers=0", "model.backbone=test_efficientnet", "model.pretrained=none",
        "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=",
        "augment.scale=0.8,1.0", "augment.rotation=0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, n_taxa=6, per_class=12, image_size=32, seed=3)
    split_dataset(root, val=0.25, test=0.0, seed=0)
    return root


def base_config(data: Path, *extra: str):
    """The base config on `data`, with `extra` key=value pairs after BASE (later pairs win)."""
    return load_config(None, [f"data.root={data}", *BASE, *extra])
