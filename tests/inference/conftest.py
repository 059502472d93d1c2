"""Shared fixtures: a tiny synthetic dataset with a held-out taxon, a tiny calibrated run, and a perturbed copy
of its checkpoint as an ensemble partner (training a second model would double the suite's time)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.inference import calibrate_run
from taxonomist.train import train

torch.set_num_threads(1)


def tiny_config(data: Path, out: Path, seed: int = 0):
    return load_config(None, [
        f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
        "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=1",
        "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=",
        f"train.seed={seed}"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    synthesize(root, n_taxa=6, per_class=10, image_size=32, seed=3)
    split_dataset(root, val=0.2, test=0.2, ood_taxa=1, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A calibrated run: best/last checkpoints with temperature and OOD statistics."""
    run = tmp_path_factory.mktemp("run") / "run"
    train(tiny_config(tiny_data, run), progress=False, log=lambda *_: None)
    calibrate_run(run, device="cpu", num_workers=0)
    return run


@pytest.fixture(scope="session")
def second_checkpoint(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run`'s best checkpoint with its classifier weights perturbed: another model with the same labels,
    metadata and OOD statistics."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("second")
    src = tiny_run / "checkpoints"
    state = load_file(str(src / "best.safetensors"))
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.startswith("head") and value.is_floating_point():
            state[key] = value + 0.1 * torch.randn(value.shape, generator=generator)
    save_file(state, str(folder / "best.safetensors"))
    for name in ("best.json", "best.ood.safetensors"):
        shutil.copyfile(src / name, folder / name)
    return folder / "best.safetensors"
