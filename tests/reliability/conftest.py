"""Shared pieces of the reliability suite: the CLI run in-process and as a subprocess, the checks every refused
input must pass (one `error:` line naming the file, exit 2, no traceback, nothing written), and one tiny
trained run for the checkpoint, predict and interrupt tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taxonomist.cli.main import main
from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize

torch.set_num_threads(1)
VENV_BIN = Path(sys.executable).parent

#: a rank table with two labels, and the annotations of a valid two-image dataset that uses it
TAXONOMY_CSV = ("concept_name,kingdom,phylum,class,order,family,genus,species\n"
                "Sebastes diploproa,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,Sebastes diploproa\n"
                "Sebastes,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,\n"
                "Octopus rubescens,Animalia,Mollusca,Cephalopoda,Octopoda,Octopodidae,Octopus,Octopus rubescens\n")
LABELS = ("Sebastes diploproa", "Sebastes", "Octopus rubescens")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`taxonomist ARGV` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(VENV_BIN / "taxonomist"), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def assert_refused(code: int, err: str, *names: str) -> str:
    """A refused input: exit status 2, no traceback, only `error:` (and `warning:`) lines, at most 1000
    characters each, and the first error naming each of `names` (the file, the row or field). Returns it."""
    assert code == 2, f"exit status {code}: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors, err[-2000:]
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), err[-2000:]
    assert all(len(line) <= 1000 for line in lines), max(map(len, lines))
    for name in names:
        assert str(name) in errors[0], (name, errors[0][:500])
    return errors[0]


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (to show that a refused command changed nothing)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"out={out}", "data.image_size=32", "data.num_workers=0",
            "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8", "train.epochs=1",
            "train.lr=3e-3", "train.device=cpu", "train.tensorboard=false", "augment.randaugment=", *extra]


def tiny_config(data: Path, out: Path, *extra: str):
    return load_config(None, tiny_overrides(data, out, *extra))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`data synth --taxa 6 --per-class 8 --image-size 32` with a seeded val/test split."""
    root = tmp_path_factory.mktemp("reliability_data") / "synth"
    synthesize(root, n_taxa=6, per_class=8, image_size=32, seed=3)
    split_dataset(root, val=0.25, test=0.15, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A one-epoch run of test_efficientnet on `tiny_data` (checkpoints only; no calibration)."""
    from taxonomist.train import train
    run = tmp_path_factory.mktemp("reliability_run") / "run"
    train(tiny_config(tiny_data, run), progress=False, log=lambda *_: None)
    return run
