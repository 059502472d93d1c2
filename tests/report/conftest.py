"""A tiny trained and evaluated run shared by the report tests (trained once per session)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.decide import build_ood_scorer
from taxonomist.evaluate.run import evaluate_run
from taxonomist.report import write_report
from taxonomist.train import train


@dataclass
class Reports:
    run: Path            # run directory, evaluated with argmax + OOD into itself
    min_risk: Path       # the same checkpoint evaluated with min-risk into run/min-risk
    data: Path
    genus: str           # a critical internal node with test examples
    species: str         # a critical label with test examples
    single: str          # report.html of `run` with both critical taxa
    compare: str         # report comparing `run` (baseline) and `min_risk`


@pytest.fixture(scope="session")
def reports(tmp_path_factory) -> Reports:
    import torch
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    data, run = root / "data", root / "run"
    synthesize(data, n_taxa=6, per_class=10, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.3, ood_taxa=1, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.device=cpu", "train.tensorboard=false", "augment.randaugment="])
    train(cfg, progress=False, log=lambda *_: None)
    common = dict(data=data, device="cpu", num_workers=0, progress=False)
    seen = evaluate_run(run, split="train", out=root / "train-outputs", ood_scorers={}, **common).outputs
    scorers = {"energy": build_ood_scorer("energy").fit(None, seen.logits, seen.targets)}
    evaluate_run(run, ood_scorers=scorers, **common)
    evaluate_run(run, out=run / "min-risk", decision="min-risk", candidates="all", ood_scorers=scorers, **common)
    test = pd.read_csv(data / "annotations.csv", keep_default_na=False).query("split == 'test'")
    taxa = pd.read_csv(data / "taxonomy.csv", keep_default_na=False).set_index("concept_name")
    species = str(test["label"].iloc[0])
    genus = str(taxa.loc[species, "genus"])
    single = write_report([run], run / "report.html", critical=[genus, species]).read_text(encoding="utf-8")
    compare = write_report([run, run / "min-risk"], root / "compare.html").read_text(encoding="utf-8")
    return Reports(run, run / "min-risk", data, genus, species, single, compare)
