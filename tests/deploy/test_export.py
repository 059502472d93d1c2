"""`taxonomist export`: ONNX and TorchScript files that carry their metadata, predict like the checkpoint (same
top-1 on every test image, probabilities within 1e-4, flat and two-stream), keep the OOD statistics beside them,
and fail with one clear line."""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from taxonomist.cli.main import main  # noqa: E402
from taxonomist.config import load_config  # noqa: E402
from taxonomist.data.dataset import Dataset  # noqa: E402
from taxonomist.deploy import export_model  # noqa: E402
from taxonomist.errors import ConfigError, ModelError  # noqa: E402
from taxonomist.inference import ood_threshold, predict, read_images  # noqa: E402
from taxonomist.inference.calibrate import load_ood_scorers  # noqa: E402
from taxonomist.inference.model_file import load_model, read_card  # noqa: E402
from taxonomist.inference.onnx_model import PROPERTY_KEYS, OnnxTaxonModel, metadata_from_props  # noqa: E402
from taxonomist.inference.run_model import infer_rows  # noqa: E402
from taxonomist.train.checkpoint import read_metadata  # noqa: E402

torch.set_num_threads(1)
FAST = dict(device="cpu", num_workers=0, progress=False)


def _train(data: Path, run: Path, head: str, calibrate_ood: bool) -> Path:
    from taxonomist.inference import calibrate_run
    from taxonomist.train import train

    cfg = load_config(None, [f"data.root={data}", f"out={run}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", f"model.head={head}",
                             "train.batch_size=8", "train.epochs=1", "train.lr=3e-3", "train.device=cpu",
                             "train.tensorboard=false", "augment.randaugment=", "train.seed=0"])
    train(cfg, progress=False, log=lambda *_: None)
    calibrate_run(run, device="cpu", num_workers=0, ood_methods=("energy", "mahalanobis") if calibrate_ood else ())
    return run / "checkpoints" / "best.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from taxonomist.data.split import split_dataset
    from taxonomist.data.synth import synthesize

    root = tmp_path_factory.mktemp("export") / "synth"
    synthesize(root, n_taxa=6, per_class=8, image_size=32, seed=3)
    split_dataset(root, val=0.2, test=0.25, ood_taxa=1, seed=0)
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory, data) -> tuple[Path, Path]:
    """A tiny calibrated flat model and its ONNX export made through the CLI."""
    ckpt = _train(data, tmp_path_factory.mktemp("flat") / "run", "flat", calibrate_ood=True)
    onnx_file = ckpt.parent.parent / "model.onnx"
    assert main(["export", str(ckpt.parent.parent), "--format", "onnx", "--out", str(onnx_file)]) == 0
    return ckpt, onnx_file


@pytest.fixture(scope="module")
def two_stream(tmp_path_factory, data) -> tuple[Path, Path]:
    ckpt = _train(data, tmp_path_factory.mktemp("two") / "run", "two_stream", calibrate_ood=False)
    onnx_file = ckpt.parent.parent / "model.onnx"
    export_model(ckpt, onnx_file)
    return ckpt, onnx_file


def _probabilities(model_file: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and row positions over the test split, through the path predict uses."""
    model, meta, taxonomy = load_model(model_file, device="cpu")
    rows = read_images(data, split="test").rows
    res = infer_rows(model, meta, Dataset(data, rows, taxonomy), rows, torch.device("cpu"),
                     {lab: i for i, lab in enumerate(meta["labels"])}, batch_size=5, num_workers=0).result
    logits = res.logits.astype(np.float64) / float(meta["temperature"])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), res.indices


@pytest.mark.parametrize("which", ["flat", "two_stream"])
def test_onnx_predicts_like_the_checkpoint(which, request, data, tmp_path):
    ckpt, onnx_file = request.getfixturevalue(which)
    p_torch, idx_torch = _probabilities(ckpt, data)
    p_onnx, idx_onnx = _probabilities(onnx_file, data)
    assert len(idx_torch) >= 10 and np.array_equal(idx_torch, idx_onnx)  # batch 5: the last batch is partial
    assert np.array_equal(p_torch.argmax(axis=1), p_onnx.argmax(axis=1))
    assert np.abs(p_torch - p_onnx).max() < 1e-4
    # and through `predict`: a dataset directory, so the two-stream model gets its context scenes
    a = predict(ckpt, data, tmp_path / "torch.csv", split="test", batch_size=4, engine="torch", **FAST)
    b = predict(onnx_file, data, tmp_path / "onnx.csv", split="test", batch_size=4, **FAST)
    ft, fo = pd.read_csv(a.out, keep_default_na=False), pd.read_csv(b.out, keep_default_na=False)
    assert list(ft.columns) == list(fo.columns) and len(ft) == len(idx_torch)
    assert ft["prediction"].tolist() == fo["prediction"].tolist()
    assert np.abs(ft["confidence"] - fo["confidence"]).max() < 1e-4


def test_onnx_file_is_checked_and_self_contained(flat, two_stream):
    ckpt, onnx_file = flat
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "features"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a named, dynamic batch axis
    props = {p.key: p.value for p in proto.metadata_props}
    assert set(PROPERTY_KEYS) <= set(props)
    source = read_metadata(ckpt)
    assert json.loads(props["labels"]) == source["labels"]
    assert props["taxonomy.csv"].splitlines()[0].startswith("concept_name,")
    assert json.loads(props["preprocessing"])["mean"] == source["preprocessing"]["mean"]
    assert float(props["temperature"]) == pytest.approx(source["temperature"], abs=0)
    meta = read_card(onnx_file)
    for key in ("labels", "taxonomy_hash", "image_size", "preprocessing", "data", "head", "backbone", "metric",
                "temperature", "model_config"):
        assert meta[key] == source[key], key
    assert meta["taxonomy"]["rows"] == source["taxonomy"]["rows"]
    assert meta["ood"]["file"] == "model.ood.safetensors" and meta["export"]["format"] == "onnx"
    two_ckpt, two_onnx = two_stream
    assert [i.name for i in onnx.load(str(two_onnx)).graph.input] == ["image", "context"]
    model, _, _ = load_model(two_onnx)
    assert isinstance(model, OnnxTaxonModel) and model.eval() is model and model.to("cpu") is model
    with pytest.raises(ModelError, match="needs the context image"):
        model(torch.zeros(2, 3, 32, 32))
    out = model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    assert out["logits"].shape == (1, len(meta_labels(two_ckpt))) and out["features"].dtype == torch.float32
    assert not Path(str(two_onnx).replace(".onnx", ".ood.safetensors")).exists()  # no OOD statistics to copy


def meta_labels(ckpt: Path) -> list:
    return read_metadata(ckpt)["labels"]


def test_ood_statistics_travel_with_the_onnx_file(flat, data, tmp_path):
    ckpt, onnx_file = flat
    ood_file = onnx_file.with_name("model.ood.safetensors")
    assert ood_file.read_bytes() == ckpt.with_name("best.ood.safetensors").read_bytes()
    assert set(load_ood_scorers(onnx_file)) == {"energy", "mahalanobis"}
    for tpr in (0.95, 0.9125):  # a stored level, and one computed from the stored validation scores
        assert ood_threshold(onnx_file, "energy", tpr) == ood_threshold(ckpt, "energy", tpr)
    a = predict(ckpt, data, tmp_path / "a.csv", ood="energy", decision="min-risk", candidates="all", **FAST)
    b = predict(onnx_file, data, tmp_path / "b.csv", ood="energy", decision="min-risk", candidates="all", **FAST)
    fa, fb = pd.read_csv(a.out, keep_default_na=False), pd.read_csv(b.out, keep_default_na=False)
    assert np.abs(fa["ood_score"] - fb["ood_score"]).max() < 1e-4
    # the stored threshold sits a hair above a validation image's score, so that image may fall on either side
    # with float noise of 1e-7; every other image gets the same flag and the same (fallback) answer
    clear = (fa["ood_score"] - ood_threshold(ckpt, "energy", 0.95)).abs() > 1e-5
    assert clear.sum() >= 0.8 * len(fa) and 0 < fa["unknown"][clear].sum() < clear.sum()
    assert fa["unknown"][clear].tolist() == fb["unknown"][clear].tolist()
    assert fa["prediction"][clear].tolist() == fb["prediction"][clear].tolist()
    moved = tmp_path / "alone.onnx"
    moved.write_bytes(onnx_file.read_bytes())  # copied without its statistics
    with pytest.raises(ModelError, match="alone.ood.safetensors: OOD statistics named in alone.onnx are missing"):
        load_ood_scorers(moved)


def test_predict_cli_with_an_onnx_ensemble(flat, data, tmp_path, capsys):
    ckpt, onnx_file = flat
    images = data / "images"
    out = tmp_path / "p.csv"
    assert main(["predict", str(onnx_file), str(ckpt), "--images", str(images), "--out", str(out), "--device",
                 "cpu", "--workers", "0"]) == 0
    assert "2 checkpoints" in capsys.readouterr().out
    frame = pd.read_csv(out, keep_default_na=False)
    single = predict(ckpt, images, tmp_path / "s.csv", **FAST)
    # the members agree to 1e-4, so their mean answers as the checkpoint alone
    assert frame["prediction"].tolist() == pd.read_csv(single.out, keep_default_na=False)["prediction"].tolist()


def test_torchscript_export_carries_the_same_metadata(flat, tmp_path):
    ckpt, _ = flat
    out = tmp_path / "model.pt"
    onnx_stats = out.with_name("model.ood.safetensors")
    if importlib.util.find_spec("onnxruntime") is not None:  # an ONNX export to the same stem keeps its own
        export_model(ckpt, out.with_suffix(".onnx"), check=False)
        before = onnx_stats.read_bytes()
    summary = export_model(ckpt, out, fmt="torchscript")
    assert summary.exporter == "torch.jit.trace" and summary.max_abs_diff < 1e-4
    assert summary.ood_file == out.with_name("model.pt.ood.safetensors") and summary.ood_file.is_file()
    if importlib.util.find_spec("onnxruntime") is not None:
        assert onnx_stats.read_bytes() == before  # untouched by the TorchScript export
    extra = {k: "" for k in PROPERTY_KEYS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 marks TorchScript deprecated
        scripted = torch.jit.load(str(out), _extra_files=extra)
    meta = metadata_from_props(extra, str(out))
    assert meta["labels"] == meta_labels(ckpt) and meta["export"]["format"] == "torchscript"
    model, _, _ = load_model(ckpt)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, features = scripted(x)
        reference = model(x)
    assert torch.allclose(logits, reference["logits"], atol=1e-5)
    assert torch.allclose(features, reference["features"], atol=1e-5)


def test_export_errors_are_one_line(flat, tmp_path, capsys, monkeypatch):
    ckpt, onnx_file = flat
    with pytest.raises(ConfigError, match="unknown export format 'tflite'.*choose one of onnx, torchscript"):
        export_model(ckpt, tmp_path / "m.onnx", fmt="tflite")
    with pytest.raises(ConfigError, match="must end in .onnx"):
        export_model(ckpt, tmp_path / "m.bin", fmt="onnx")
    with pytest.raises(ModelError, match="already an exported ONNX model"):
        export_model(onnx_file, tmp_path / "again.onnx")
    (tmp_path / "weights.safetensors").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "weights.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "checkpoint metadata not found" in err
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "nowhere: checkpoint not found (give a .safetensors file or a run directory)" in capsys.readouterr().err

    import importlib
    real_import = importlib.import_module

    def without_onnxscript(name, *args):
        if name == "onnxscript":
            raise ImportError("No module named 'onnxscript'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxscript)
    with pytest.raises(ModelError, match=r"need the onnxscript package: pip install 'taxonomist\[onnx\]'"):
        export_model(ckpt, tmp_path / "m.onnx")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_export_leaves_no_file(flat, tmp_path, monkeypatch):
    import taxonomist.deploy.export as export_module

    ckpt, _ = flat
    real_trace = export_module._torchscript

    def mistranslated(module, sample):  # as if the exporter computed something else
        traced = real_trace(module, sample)
        return lambda *x: (traced(*x)[0] + 0.5, traced(*x)[1])

    monkeypatch.setattr(export_module, "_torchscript", mistranslated)
    with pytest.raises(ModelError, match=r"the exported torchscript model disagrees with PyTorch \(max \|logit "
                                         r"difference\| 0.5\)"):
        export_model(ckpt, tmp_path / "m.pt", fmt="torchscript")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the model nor its OOD statistics


def test_an_onnx_file_without_taxonomist_metadata_is_refused(flat, tmp_path):
    _, onnx_file = flat
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelError, match="bare.onnx: no taxonomist metadata"):
        read_card(bare)
    with pytest.raises(ModelError, match="bare.onnx: no taxonomist metadata"):
        load_model(bare)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="junk.onnx: not a readable ONNX model"):
        read_card(tmp_path / "junk.onnx")


def test_metadata_reads_with_onnxruntime_alone(flat, monkeypatch):
    import builtins

    ckpt, onnx_file = flat
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    meta = read_card(onnx_file)  # a machine that only predicts may install onnxruntime alone
    assert meta["labels"] == meta_labels(ckpt) and meta["taxonomy_hash"] == read_metadata(ckpt)["taxonomy_hash"]
