"""`taxonomist predict` (and the calibration `taxonomist train` runs): options, each rule, errors, a fast --help."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from taxonomist.cli.main import main
from taxonomist.cli.predict import DECISION_CHOICES, OOD_CHOICES
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize

torch.set_num_threads(1)

TRAIN_SETTINGS = ["data.image_size=32", "data.num_workers=0", "model.backbone=test_efficientnet",
                  "model.pretrained=none", "train.batch_size=8", "train.epochs=1", "train.device=cpu",
                  "train.tensorboard=false", "augment.randaugment="]


def train_cli(data: Path, out: Path, *flags: str) -> int:
    sets = [x for s in [f"data.root={data}", f"out={out}", *TRAIN_SETTINGS] for x in ("--set", s)]
    return main(["train", *sets, "--no-eval", *flags])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "synth"
    synthesize(root, n_taxa=6, per_class=10, image_size=32, seed=5)
    split_dataset(root, val=0.2, test=0.2, seed=0)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("cli_run") / "run"
    assert train_cli(data, out) == 0
    return out


def test_help_imports_no_torch_and_lists_the_contract_options():
    code = ("import sys, contextlib, io\n"
            "from taxonomist.cli.main import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n        main(['predict', '--help'])\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)\nprint(buf.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "False"
    for option in ("--images", "--out", "--decision", "--candidates", "--thresholds", "--ood", "--ood-threshold",
                   "--ood-tpr", "--tta", "--format", "--batch-size", "--device", "--weights", "--ensemble-mode",
                   "--selective-threshold"):
        assert option in out


def test_choices_match_the_library():
    from taxonomist.decide import DECISIONS
    from taxonomist.inference.predict import PREDICT_OOD_METHODS
    assert DECISION_CHOICES == DECISIONS and OOD_CHOICES == PREDICT_OOD_METHODS


def test_train_calibrates_unless_told_not_to(run, data, tmp_path, capsys):
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    from taxonomist.decide import OOD_METHODS
    assert meta["temperature"] > 0 and meta["ood"]["methods"] == list(OOD_METHODS)
    assert "model_methods" not in meta["ood"]          # odin / mc-dropout only with decide.model_ood
    assert (run / "checkpoints" / "best.ood.safetensors").is_file()
    assert train_cli(data, tmp_path / "raw", "--no-calibrate", "--set", "train.max_steps=1") == 0
    raw = json.loads((tmp_path / "raw" / "checkpoints" / "best.json").read_text())
    assert "temperature" not in raw and not (tmp_path / "raw" / "checkpoints" / "best.ood.safetensors").exists()
    assert "calibrated best.safetensors: temperature" not in capsys.readouterr().out.split("raw")[-1]


@pytest.mark.parametrize("rule", DECISION_CHOICES)
def test_each_rule_through_the_cli(run, data, tmp_path, capsys, rule):
    out = tmp_path / "p.csv"
    rc = main(["predict", str(run / "checkpoints" / "best.safetensors"), "--images", str(data / "images"),
               "--decision", rule, "--out", str(out), "--workers", "0", "--device", "cpu"])
    assert rc == 0
    frame = pd.read_csv(out, keep_default_na=False)
    assert len(frame) == 60 and list(frame.columns[:3]) == ["path", "prediction", "confidence"]
    assert f"predicted 60 of 60 images ({rule}, 1 checkpoint)" in capsys.readouterr().out


def test_ood_tta_and_kaggle_through_the_cli(run, data, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    rc = main(["predict", str(run), "--images", str(data), "--split", "test", "--decision", "min-risk",
               "--candidates", "all", "--ood", "energy", "--ood-tpr", "0.9", "--tta", "--workers", "0",
               "--format", "kaggle", "--out", str(out)])
    assert rc == 0
    frame = pd.read_csv(out, dtype=str)
    test_rows = pd.read_csv(data / "annotations.csv", dtype=str).query("split == 'test'")
    assert frame["annotation_id"].tolist() == test_rows["annotation_id"].tolist()
    printed = capsys.readouterr().out
    assert "4 TTA views" in printed and "flagged unknown by the OOD score" in printed


def test_user_mistakes_are_one_error_line(run, data, tmp_path, capsys):
    rc = main(["predict", str(run), "--images", str(data / "images"), "--format", "kaggle", "--workers", "0",
               "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "annotation_id" in err
    rc = main(["predict", str(run), "--images", str(data / "images"), "--candidates", "Nowhere", "--workers", "0",
               "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: Nowhere: candidates file not found") and err.count("\n") == 1
    rc = main(["predict", str(run), "--images", str(data / "images"), "--weights", "1,x", "--out", "s.csv"])
    assert rc == 2 and "--weights '1,x'" in capsys.readouterr().err


def test_rollup_parameters_through_the_cli(run, data, tmp_path, capsys):
    args = ["predict", str(run), "--images", str(data / "images"), "--workers", "0", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "argmax.csv")]) == 0
    # only the top label counts and any sum reaches 0: the deepest such node is the top label itself
    assert main([*args, "--decision", "rollup", "--top-k", "1", "--thresholds", "0",
                 "--out", str(tmp_path / "rollup.csv")]) == 0
    argmax = pd.read_csv(tmp_path / "argmax.csv", keep_default_na=False)
    rollup = pd.read_csv(tmp_path / "rollup.csv", keep_default_na=False)
    assert rollup["prediction"].tolist() == argmax["prediction"].tolist()
    capsys.readouterr()
    for bad, message in ((["--top-k", "3"], "--top-k applies to --decision rollup and common-ancestor only"),
                         (["--decision", "rollup", "--top-k", "0"], "--top-k must be a whole number of at least 1"),
                         (["--decision", "common-ancestor", "--thresholds", "species=0.5"],
                          "common-ancestor takes one number")):
        assert main([*args, *bad, "--out", str(tmp_path / "x.csv")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_ood_auto_is_the_measured_default(run, data, tmp_path, capsys):
    from taxonomist.decide import AUTO_OOD_METHOD, DecisionOptions
    from taxonomist.deploy.serve.predictor import ServeOptions

    assert AUTO_OOD_METHOD == "mahalanobis" and ServeOptions(DecisionOptions(ood="auto")).decide.ood == "mahalanobis"
    args = ["predict", str(run), "--images", str(data), "--split", "test", "--workers", "0", "--device", "cpu"]
    assert main([*args, "--ood", "auto", "--out", str(tmp_path / "auto.csv")]) == 0
    assert main([*args, "--ood", "mahalanobis", "--out", str(tmp_path / "maha.csv")]) == 0
    auto = pd.read_csv(tmp_path / "auto.csv", keep_default_na=False)
    assert auto.equals(pd.read_csv(tmp_path / "maha.csv", keep_default_na=False))
    assert {"ood_score", "unknown"} <= set(auto.columns)
