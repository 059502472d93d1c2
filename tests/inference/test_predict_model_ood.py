"""`predict --ood odin|mc-dropout|ensemble`: scores that run the model again, their thresholds stored at
calibration (`decide.model_ood`), and the disagreement of an ensemble's members."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from taxonomist.decide import stack_score
from taxonomist.errors import ConfigError, ModelError
from taxonomist.inference import calibrate_run, predict
from taxonomist.inference.calibrate import known_threshold
from taxonomist.inference.ood_model import mc_dropout_probs, model_ood_rows
from taxonomist.inference.run_model import rows_loader
from taxonomist.train.checkpoint import load_checkpoint

FAST = dict(device="cpu", num_workers=0, progress=False)
MC = {"passes": 4}


@pytest.fixture(scope="module")
def model_ood_run(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` calibrated again with ODIN and MC-dropout (4 passes) thresholds from its val rows."""
    run = tmp_path_factory.mktemp("model_ood") / "run"
    shutil.copytree(tiny_run, run)
    done = calibrate_run(run, device="cpu", num_workers=0, model_ood=["odin", "mc-dropout"],
                         model_ood_options={"mc-dropout": MC})
    assert done[0].model_methods == ("odin", "mc-dropout")
    assert "odin, mc-dropout thresholds from the val images" in done[0].summary()
    return run


def _rows(run: Path, data: Path, split: str):
    model, meta, taxonomy = load_checkpoint(run, device="cpu")
    from taxonomist.evaluate.run import _open_dataset

    dataset = _open_dataset(data, taxonomy)
    rows = dataset.annotations[dataset.annotations["split"] == split].reset_index(drop=True)
    return model, meta, dataset, rows, {lab: i for i, lab in enumerate(meta["labels"])}


def test_calibration_stores_model_scores_with_their_options(model_ood_run, tiny_data):
    meta = json.loads((model_ood_run / "checkpoints" / "best.json").read_text())
    info = meta["ood"]
    assert info["model_methods"]["odin"] == {"temperature": 1000.0, "epsilon": 0.0014}
    assert info["model_methods"]["mc-dropout"] == {"passes": 4, "score": "predictive_entropy", "seed": 0}
    assert "odin" not in info["methods"]           # no fitted scorer: `load_ood_scorers` must not look for one
    # the stored threshold is the 95 % threshold of the ODIN scores of the val rows, recomputed here
    model, meta, dataset, rows, labels = _rows(model_ood_run, tiny_data, "val")
    scores = model_ood_rows("odin", model, meta, dataset, rows, "cpu", labels, info["model_methods"]["odin"],
                            num_workers=0).scores
    assert len(scores) == info["n_val"] == len(rows)
    assert info["thresholds"]["odin"]["0.95"] == pytest.approx(known_threshold(scores, 0.95), abs=1e-6)
    # last.safetensors holds the same weights: it got a copy, options included
    last = json.loads((model_ood_run / "checkpoints" / "last.json").read_text())
    assert last["ood"]["model_methods"] == info["model_methods"]


def test_predict_odin_scores_each_image_as_calibrated(model_ood_run, tiny_data, tmp_path):
    summary = predict(model_ood_run, tiny_data, tmp_path / "o.csv", split="test", ood="odin",
                      decision="min-risk", candidates="all", **FAST)
    frame = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    model, meta, dataset, rows, labels = _rows(model_ood_run, tiny_data, "test")
    direct = model_ood_rows("odin", model, meta, dataset, rows, "cpu", labels, meta["ood"]["model_methods"]["odin"],
                            num_workers=0)
    expected = dict(zip(rows["path"].to_numpy()[direct.indices], direct.scores))
    # ODIN's scores (−max softmax at T = 1000) sit within 1e-5 of −1/L: compare them closely
    np.testing.assert_allclose(frame["ood_score"], [expected[p] for p in frame["path"]], rtol=0, atol=1e-9)
    threshold = meta["ood"]["thresholds"]["odin"]["0.95"]
    assert (frame["unknown"] == (frame["ood_score"] >= threshold)).all()
    assert summary.n_unknown == int(frame["unknown"].sum())
    # a row's score does not depend on the rows beside it: chunks of 3 give the same file
    predict(model_ood_run, tiny_data, tmp_path / "c.csv", split="test", ood="odin", decision="min-risk",
            candidates="all", chunk_size=3, batch_size=2, **FAST)
    chunked = pd.read_csv(tmp_path / "c.csv", keep_default_na=False)
    np.testing.assert_allclose(chunked["ood_score"], frame["ood_score"], rtol=0, atol=1e-9)
    assert chunked["prediction"].tolist() == frame["prediction"].tolist()


def test_predict_mc_dropout_is_seeded_and_uses_the_calibrated_passes(model_ood_run, tiny_data, tmp_path):
    for name in ("a.csv", "b.csv"):
        predict(model_ood_run, tiny_data, tmp_path / name, split="test", ood="mc-dropout", **FAST)
    a, b = (pd.read_csv(tmp_path / n) for n in ("a.csv", "b.csv"))
    pd.testing.assert_frame_equal(a, b)
    model, meta, dataset, rows, labels = _rows(model_ood_run, tiny_data, "test")
    _, loader = rows_loader(meta, dataset, rows, labels, 64, 0)
    probs, idx, _ = mc_dropout_probs(model, loader, "cpu", passes=4, temperature=meta["temperature"], seed=0)
    expected = dict(zip(rows["path"].to_numpy()[idx], stack_score(probs, "predictive_entropy")))
    np.testing.assert_allclose(a["ood_score"], [expected[p] for p in a["path"]], atol=2e-6)


def test_model_scores_need_a_threshold_and_a_pytorch_model(tiny_run, model_ood_run, tiny_data, tmp_path):
    # tiny_run was calibrated without decide.model_ood: no stored threshold, so the error says how to get one
    with pytest.raises(ModelError, match=r"decide\.model_ood=odin.*--ood-threshold"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", split="test", ood="odin", **FAST)
    assert not (tmp_path / "x.csv").exists()
    # an explicit threshold is enough (default options)
    predict(tiny_run, tiny_data, tmp_path / "t.csv", split="test", ood="odin", ood_threshold=-0.5, **FAST)
    frame = pd.read_csv(tmp_path / "t.csv")
    assert (frame["unknown"] == (frame["ood_score"] >= -0.5)).all()
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not read: refused before loading")
    with pytest.raises(ConfigError, match="ONNX model cannot"):
        predict(fake, tiny_data, tmp_path / "x.csv", ood="mc-dropout", ood_threshold=1.0, **FAST)
    with pytest.raises(ConfigError, match="unknown OOD method 'odni'.*odin"):
        predict(model_ood_run, tiny_data, tmp_path / "x.csv", ood="odni", **FAST)


def test_ensemble_disagreement(tiny_run, second_checkpoint, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="two or more"):
        predict(tiny_run, tiny_data, tmp_path / "x.csv", ood="ensemble", ood_threshold=0.1, **FAST)
    with pytest.raises(ConfigError, match="needs --ood-threshold"):
        predict([tiny_run, second_checkpoint], tiny_data, tmp_path / "x.csv", ood="ensemble", **FAST)
    # one model twice agrees with itself: mutual information 0 for every image
    predict([tiny_run, tiny_run], tiny_data, tmp_path / "same.csv", split="test", ood="ensemble",
            ood_threshold=1e-4, **FAST)
    same = pd.read_csv(tmp_path / "same.csv")
    np.testing.assert_allclose(same["ood_score"], 0.0, atol=1e-6)
    assert not same["unknown"].any()
    predict([tiny_run, second_checkpoint], tiny_data, tmp_path / "two.csv", split="test", ood="ensemble",
            ood_threshold=1e-4, **FAST)
    two = pd.read_csv(tmp_path / "two.csv")
    assert (two["ood_score"] >= -1e-9).all() and two["ood_score"].max() > 1e-4
    assert (two["unknown"] == (two["ood_score"] >= 1e-4)).all()


def test_train_refuses_an_unknown_model_ood_before_training(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "taxonomist.cli.main", "train", "--set", f"data.root={tiny_data}",
                           "--set", f"out={tmp_path / 'run'}", "--set", "decide.model_ood=odni"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown model OOD method 'odni' (did you mean 'odin'?); choose from odin, mc-dropout"]
    assert not (tmp_path / "run").exists()


def test_evaluate_uses_the_calibrated_options_and_threshold(model_ood_run, tiny_data, tmp_path):
    from taxonomist.evaluate.run import evaluate_run

    kw = dict(out=tmp_path / "e", device="cpu", num_workers=0, progress=False)
    m = evaluate_run(model_ood_run, tiny_data, model_ood=["mc-dropout"], **kw).metrics["ood"]["mc-dropout"]
    meta = json.loads((model_ood_run / "checkpoints" / "best.json").read_text())
    assert m["threshold_source"] == "stored at calibration"
    assert m["threshold"] == pytest.approx(meta["ood"]["thresholds"]["mc-dropout"]["0.95"])
    # options given here win over the stored ones, and the threshold is then fitted on the val rows again
    m2 = evaluate_run(model_ood_run, tiny_data, model_ood=["mc-dropout"], model_ood_options={"mc-dropout":
                      {"passes": 3}}, **kw).metrics["ood"]["mc-dropout"]
    assert m2["threshold_source"] == "95% of the val rows kept" and m2["auroc"] != m["auroc"]
