"""`serve --engine auto|torch|onnx`: on CPU the service answers from onnxruntime (the checkpoint exported once,
cached) with the JSON PyTorch gives; options that need the PyTorch model keep it."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fastapi.testclient import TestClient  # noqa: E402

from taxonomist.decide import DecisionOptions  # noqa: E402
from taxonomist.deploy.serve import ServeOptions, create_app  # noqa: E402
from taxonomist.deploy.serve.predictor import Predictor  # noqa: E402
from taxonomist.errors import ConfigError  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "serve-engine-cache"))


def images_of(data: Path) -> list[Path]:
    return sorted((data / "images").rglob("*.jpg"))


def answers(run: Path, data: Path, engine: str) -> tuple[str, list[dict]]:
    upload = [("file", (f.name, f.read_bytes(), "image/jpeg")) for f in images_of(data)[:12]]
    options = ServeOptions(DecisionOptions(decision="min-risk", candidates="all", ood="energy"), device="cpu",
                           engine=engine)
    with TestClient(create_app(run, options, max_batch=16, max_wait_ms=2)) as c:
        service = c.get("/metadata").json()["service"]
        return service["engine"], c.post("/predict", files=upload).json()["predictions"]


def test_both_engines_answer_the_same_json(served_run):
    run, data = served_run
    torch_engine, by_torch = answers(run, data, "torch")
    onnx_engine, by_onnx = answers(run, data, "auto")  # auto on CPU: onnxruntime
    assert (torch_engine, onnx_engine) == ("PyTorch", "onnxruntime")
    assert len(by_onnx) == len(by_torch) == 12
    for a, b in zip(by_onnx, by_torch):
        assert (a["decision"], a["rank"], a["ood"]["unknown"]) == (b["decision"], b["rank"], b["ood"]["unknown"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
        assert {k: v["name"] for k, v in a["lineage"].items()} == {k: v["name"] for k, v in b["lineage"].items()}
        for level in a["lineage"]:
            assert a["lineage"][level]["p"] == pytest.approx(b["lineage"][level]["p"], abs=1e-5)
        assert {t["name"]: t["p"] for t in a["top"]} == pytest.approx({t["name"]: t["p"] for t in b["top"]}, abs=1e-5)
        assert a["ood"]["score"] == pytest.approx(b["ood"]["score"], rel=1e-5, abs=1e-5)


def test_an_option_needing_torch_keeps_pytorch(served_run):
    run, _ = served_run
    odin = DecisionOptions(ood="odin", ood_threshold=0.5)
    assert Predictor.load(run, ServeOptions(odin, device="cpu")).info["engine"] == "PyTorch"
    with pytest.raises(ConfigError, match="^--engine onnx: --ood odin needs the PyTorch model"):
        Predictor.load(run, ServeOptions(odin, device="cpu", engine="onnx"))
    with pytest.raises(ConfigError, match="unknown engine 'pytorch'"):
        Predictor.load(run, ServeOptions(engine="pytorch"))


def test_serve_cli_takes_the_engine():
    from taxonomist.cli.main import build_parser

    args = build_parser().parse_args(["serve", "RUN", "--engine", "torch"])
    assert args.engine == "torch"
    assert build_parser().parse_args(["serve", "RUN"]).engine == "auto"
