"""`evaluate_run` and `taxonomist evaluate` on a tiny trained run: DESIGN keys for every decision rule, the
checkpoint's temperature, OOD on held-out taxa, predictions.csv columns, one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from taxonomist.cli.main import main
from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.decide import build_ood_scorer
from taxonomist.evaluate.run import evaluate_run
from taxonomist.train import train

DESIGN_KEYS = ("mhd", "top1", "log_loss", "macro_f1", "hierarchical_accuracy", "per_rank", "ece",
               "ece_uncalibrated", "n")
OOD_KEYS = ("auroc", "fpr95", "threshold", "precision", "recall", "f1", "known_flagged", "unknown_missed")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """Six synthetic taxa (one held out as `ood`), a test_efficientnet trained for one epoch at 32 px."""
    import torch
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    synthesize(data, n_taxa=6, per_class=10, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.3, ood_taxa=1, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={root / 'run'}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.device=cpu", "train.tensorboard=false", "augment.randaugment="])
    train(cfg, progress=False, log=lambda *_: None)
    return root / "run", data


def run_eval(run, data, out, **kw):
    return evaluate_run(run, data=data, out=out, device="cpu", num_workers=0, progress=False, batch_size=16, **kw)


@pytest.mark.parametrize("rule", ["argmax", "min-risk", "backoff", "selective"])
def test_each_decision_writes_design_keys(tiny_run, tmp_path, rule):
    run, data = tiny_run
    ev = run_eval(run, data, tmp_path, decision=rule, candidates="all" if rule == "min-risk" else None)
    m = json.loads((tmp_path / "metrics.json").read_text())
    for key in DESIGN_KEYS:
        assert key in m, key
    for level, v in m["per_rank"].items():
        assert set(v) >= {"top1", "top5", "macro_f1", "avg_confidence"}, level
    assert m["decision"] == rule and m["split"] == "test"
    frame = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert frame.columns[0] == "path"
    for col in ("path", "label", "prediction", "confidence", "distance"):
        assert col in frame.columns
    for level in m["per_rank"]:
        assert {f"label_{level}", f"prediction_{level}", f"confidence_{level}"} <= set(frame.columns)
    assert len(frame) == m["n"] == 15
    assert frame["distance"].mean() == pytest.approx(m["mhd"])
    assert (frame["prediction"] == frame["label"]).mean() == pytest.approx(m["top1"])
    assert (tmp_path / "taxonomy.csv").is_file()  # --out outside the run: lineages travel with it
    assert "ood" not in m and any(n.startswith("OOD not evaluated") for n in m["notes"])
    assert ev.summary().startswith("evaluated 15 examples (test split)")


def test_temperature_of_the_checkpoint_is_applied(tiny_run, tmp_path):
    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta_file = copy / "checkpoints" / "best.json"
    meta = json.loads(meta_file.read_text())
    base = run_eval(copy, data, tmp_path / "plain").metrics
    meta["temperature"] = 3.0
    meta_file.write_text(json.dumps(meta))
    hot = run_eval(copy, data, tmp_path / "hot").metrics
    assert hot["temperature"] == 3.0 and base["temperature"] == 1.0
    assert hot["top1"] == base["top1"] and hot["mhd"] == base["mhd"]  # argmax is unchanged by a temperature
    assert hot["ece_uncalibrated"] == pytest.approx(base["ece"])
    assert hot["log_loss"] != pytest.approx(base["log_loss"])


def test_ood_rows_scored_with_fitted_scorers(tiny_run, tmp_path):
    run, data = tiny_run
    seen = run_eval(run, data, tmp_path / "train", split="train", ood_scorers={}).outputs
    scorers = {"energy": build_ood_scorer("energy").fit(None, seen.logits, seen.targets),
               "knn": build_ood_scorer("knn", k=3).fit(seen.features, None, seen.targets)}
    m = run_eval(run, data, tmp_path / "eval", ood_scorers=scorers).metrics
    assert set(m["ood"]) == {"energy", "knn"}
    for method, v in m["ood"].items():
        for key in OOD_KEYS:
            assert key in v, (method, key)
        assert v["n_unknown"] == 10 and v["n_known"] == 15
        assert 0.0 <= v["auroc"] <= 1.0 and v["recall"] == pytest.approx(1 - v["unknown_missed"])
    assert set(m["curves"]["ood_roc"]) == {"energy", "knn"}


def test_checkpoint_ood_scorers_are_used(tiny_run, tmp_path):
    calibrate = pytest.importorskip("taxonomist.inference.calibrate")
    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if not hasattr(calibrate, "calibrate_checkpoint"):
        pytest.skip("taxonomist.inference.calibrate has no calibrate_checkpoint")
    calibrate.calibrate_checkpoint(copy, data=data, device="cpu", ood_methods=["msp", "energy"], num_workers=0)
    m = run_eval(copy, data, tmp_path / "eval").metrics
    meta = json.loads((copy / "checkpoints" / "best.json").read_text())
    assert set(m["ood"]) == {"msp", "energy"} == set(meta["ood"]["methods"])
    assert all(v["threshold_source"] == "checkpoint" for v in m["ood"].values())
    assert m["temperature"] == pytest.approx(meta["temperature"])


def test_cli_evaluate_writes_report_and_errors_in_one_line(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    taxon = pd.read_csv(data / "annotations.csv").query("split == 'test'")["label"].iloc[0]
    out = tmp_path / "cli"
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), "--decision", "backoff",
                 "--device", "cpu", "--num-workers", "0", "--critical", taxon]) == 0
    text = capsys.readouterr().out
    assert f"report       {out / 'report.html'}" in text
    html = (out / "report.html").read_text()
    assert f'data-taxon="{taxon}"' in html
    assert main(["evaluate", str(run), "--data", str(data), "--out", str(out), "--critical", "Nonexistus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --critical 'Nonexistus'")
    assert main(["evaluate", str(run), "--data", str(tmp_path / "nowhere")]) == 2
    assert "dataset directory not found" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--data", str(data), "--split", "ood"]) == 2
    assert "ood rows" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--data", str(data), "--thresholds", "species:0.5"]) == 2
    assert "--thresholds" in capsys.readouterr().err


def test_tta_merges_calibrated_views_and_one_identity_view_changes_nothing(tiny_run, tmp_path):
    """`evaluate --tta`: the identity view alone reproduces the plain evaluation (same answers, same log
    loss), several views are recorded in metrics.json, and the OOD scorers read the views' mean outputs."""
    import numpy as np

    run, data = tiny_run
    plain = run_eval(run, data, tmp_path / "plain")
    identity = run_eval(run, data, tmp_path / "identity", tta="identity")
    assert identity.metrics["tta"] == ["identity"]
    assert plain.metrics["tta"] is None
    assert list(identity.predictions["prediction"]) == list(plain.predictions["prediction"])
    assert identity.metrics["log_loss"] == pytest.approx(plain.metrics["log_loss"], abs=1e-5)
    rot4 = run_eval(run, data, tmp_path / "rot4", tta="rot4",
                    ood_scorers={"energy": build_ood_scorer("energy")})
    assert sorted(rot4.metrics["tta"]) == ["identity", "rot180", "rot270", "rot90"]
    assert rot4.metrics["tta_mode"] == "mean_probs"
    assert np.isfinite(rot4.metrics["ood"]["energy"]["auroc"])
    assert json.loads((tmp_path / "rot4" / "metrics.json").read_text())["tta"] == rot4.metrics["tta"]


def test_tta_with_model_ood_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    run, data = tiny_run
    code = main(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / "e"), "--tta", "rot2",
                 "--model-ood", "odin", "--device", "cpu", "--num-workers", "0", "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--tta cannot be combined with --model-ood" in err[0]


def test_evaluating_into_the_run_says_it_replaced_the_earlier_evaluation(tiny_run, tmp_path, capsys):
    """Without --out, evaluate writes into the run directory; when an evaluation is already there (training's
    own), the output says it was replaced and how to keep it."""
    import shutil

    run, data = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.json").write_text("{}")  # the training-time evaluation
    assert main(["evaluate", str(copy), "--data", str(data), "--device", "cpu", "--num-workers", "0",
                 "--no-report"]) == 0
    text = capsys.readouterr().out
    assert f"note: replaced the evaluation that was in {copy} (metrics.json, predictions.csv)" in text
    assert "--out DIR" in text
    assert main(["evaluate", str(copy), "--data", str(data), "--out", str(tmp_path / "elsewhere"), "--device", "cpu",
                 "--num-workers", "0", "--no-report"]) == 0
    assert "replaced" not in capsys.readouterr().out


def test_an_exported_onnx_model_evaluates_like_its_checkpoint(tiny_run, tmp_path, capsys):
    """`taxonomist evaluate model.onnx`: the one loader reads an exported file too; its answers are the
    checkpoint's (probabilities within onnxruntime's float noise), and what needs PyTorch is refused in one line."""
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module)
    from taxonomist.deploy.export import export_model

    run, data = tiny_run
    onnx_file = tmp_path / "model.onnx"
    export_model(run, onnx_file)
    torch_ev = run_eval(run, data, tmp_path / "torch", decision="min-risk", candidates="all")
    assert main(["evaluate", str(onnx_file), "--data", str(data), "--out", str(tmp_path / "onnx"), "--decision",
                 "min-risk", "--candidates", "all", "--device", "cpu", "--num-workers", "0", "--no-report"]) == 0
    m = json.loads((tmp_path / "onnx" / "metrics.json").read_text())
    frame = pd.read_csv(tmp_path / "onnx" / "predictions.csv", keep_default_na=False)
    assert list(frame["prediction"]) == list(torch_ev.predictions["prediction"])
    assert (frame["confidence"] - torch_ev.predictions["confidence"]).abs().max() < 1e-4
    assert m["checkpoint"] == str(onnx_file.resolve()) and m["decision"] == "min-risk" and m["run_dir"] is None
    for key in ("mhd", "top1", "macro_f1"):
        assert m[key] == pytest.approx(torch_ev.metrics[key])
    assert m["log_loss"] == pytest.approx(torch_ev.metrics["log_loss"], abs=1e-4)
    capsys.readouterr()
    assert main(["evaluate", str(onnx_file), "--data", str(data), "--out", str(tmp_path / "odin"), "--model-ood",
                 "odin", "--device", "cpu", "--num-workers", "0", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs the PyTorch model again; an exported ONNX model cannot" in err[0]

