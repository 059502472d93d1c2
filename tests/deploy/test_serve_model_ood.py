"""`taxonomist serve --ood odin|mc-dropout`: scores that run the model again per batch, as `predict` computes
them; `ensemble` and ONNX models are refused with one line."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")

from fastapi.testclient import TestClient

from taxonomist.decide import DecisionOptions  # noqa: E402
from taxonomist.deploy.serve import ServeOptions, create_app
from taxonomist.errors import ConfigError, ModelError

torch.set_num_threads(1)


def _images(data: Path, n: int) -> list[Path]:
    return sorted((data / "images").rglob("*.jpg"))[::4][:n]  # several taxa


@pytest.fixture(scope="module")
def odin_run(served_run, tmp_path_factory):
    """`served_run` calibrated with ODIN at ε = 0 (MSP at T = 1000): its scores have no gradient sign in them,
    so the service and `predict` can be compared exactly. (With ε > 0 the sign of near-zero gradient elements
    can flip with float rounding; on the demo run that moved scores by at most 6.5e-7 against an IQR of
    7.3e-5 between batch sizes 64 and 5, with the same flags: docs/decisions.md.)"""
    import shutil

    from taxonomist.inference import calibrate_run

    run, data = served_run
    copy = tmp_path_factory.mktemp("odin") / "run"
    shutil.copytree(run, copy)
    calibrate_run(copy, device="cpu", num_workers=0, model_ood=["odin"], model_ood_options={"odin": {"epsilon": 0.0}})
    return copy, data


def test_odin_answers_equal_predict(odin_run, tmp_path):
    from taxonomist.inference.predict import predict

    run, data = odin_run
    files = _images(data, 12)
    folder = tmp_path / "images"
    for f in files:  # the synthetic file names repeat across taxa: keep the taxon folder in the name
        (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / f.parent.name / f.name).write_bytes(f.read_bytes())
    predict(run, folder, tmp_path / "p.csv", decision="min-risk", candidates="all", ood="odin", ood_tpr=0.5,
            device="cpu", num_workers=0, progress=False)
    offline = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("path")
    options = ServeOptions(DecisionOptions("min-risk", candidates="all", ood="odin", ood_tpr=0.5), device="cpu")
    with TestClient(create_app(run, options, max_batch=5, max_wait_ms=2)) as client:
        info = client.get("/metadata").json()["service"]["ood"]
        response = client.post("/predict", files=[("file", (f"{f.parent.name}/{f.name}", f.read_bytes(),
                                                              "image/jpeg")) for f in files])
    from taxonomist.inference.calibrate import ood_threshold
    assert info == {"method": "odin", "threshold": ood_threshold(run, "odin", 0.5)}   # the stored one
    assert response.status_code == 200, response.text
    answers = response.json()["predictions"]
    for a in answers:
        row = offline.loc[a["filename"]]
        assert a["ood"]["method"] == "odin" and a["decision"] == row["prediction"]
        assert a["ood"]["score"] == pytest.approx(row["ood_score"], rel=0, abs=1e-10)  # batching: float32 logits
        assert a["ood"]["unknown"] == (str(row["unknown"]) == "True") == (a["ood"]["score"] >= info["threshold"])
    assert 0 < sum(a["ood"]["unknown"] for a in answers) < len(answers)


def test_mc_dropout_is_repeatable_per_request(served_run):
    run, data = served_run
    files = _images(data, 3)
    options = ServeOptions(DecisionOptions(ood="mc-dropout", ood_threshold=0.5), device="cpu")
    upload = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    with TestClient(create_app(run, options, max_batch=8, max_wait_ms=2)) as client:
        first, again = (client.post("/predict", files=upload).json()["predictions"] for _ in range(2))
    assert [a["ood"] for a in first] == [a["ood"] for a in again]
    assert all(a["ood"]["score"] > 0 and a["ood"]["unknown"] == (a["ood"]["score"] >= 0.5) for a in first)


def test_model_ood_refusals(served_run, tmp_path):
    run, _ = served_run
    with pytest.raises(ConfigError, match="needs several checkpoints"):
        create_app(run, ServeOptions(DecisionOptions(ood="ensemble", ood_threshold=0.1)))
    with pytest.raises(ModelError, match=r"decide\.model_ood=odin"):  # no stored threshold and none given
        with TestClient(create_app(run, ServeOptions(DecisionOptions(ood="odin"), device="cpu"))):
            pass
    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"refused before it is read")
    with pytest.raises(ConfigError, match="ONNX model cannot"):
        odin = DecisionOptions(ood="odin", ood_threshold=0.1)
        with TestClient(create_app(fake, ServeOptions(odin, device="cpu"))):
            pass
