"""`predict --engine auto|torch|onnx`: on CPU a checkpoint runs on onnxruntime through an export made once and
cached by the checkpoint's SHA-256, writes what PyTorch writes, and falls back to PyTorch (under auto) or refuses
(under onnx) where onnxruntime cannot run it."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from taxonomist.errors import ConfigError, ModelError  # noqa: E402
from taxonomist.inference import predict  # noqa: E402
from taxonomist.inference import onnx_model  # noqa: E402
from taxonomist.inference.model_file import load_model  # noqa: E402
from taxonomist.inference.onnx_model import (CACHE_KEY_PROPERTY, ENGINES, OnnxTaxonModel, choose_engine,  # noqa: E402
                                             export_cache_key, onnx_cache_dir)

FAST = dict(device="cpu", num_workers=0, progress=False)
#: The options whose outputs are compared: every column predict writes (levels, expected distance, OOD score).
RICH = dict(decision="min-risk", candidates="all", ood="energy", split="test")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    """One cache for the module's tests (an export costs seconds), never the user's ~/.cache."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def isolated_cache(cache_root, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_root))


def exports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("exporting ")]


def checkpoint_of(run: Path) -> Path:
    return run / "checkpoints" / "best.safetensors"


# ---------------------------------------------------------------------------------------------- parity
def test_auto_on_cpu_runs_onnxruntime_and_writes_what_torch_writes(tiny_run, tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, "taxonomist.inference")
    beside = sorted(p.name for p in checkpoint_of(tiny_run).parent.iterdir())
    ran_torch = predict(tiny_run, tiny_data, tmp_path / "torch.csv", engine="torch", **RICH, **FAST)
    ran_auto = predict(tiny_run, tiny_data, tmp_path / "auto.csv", **RICH, **FAST)  # auto is the default
    assert ran_torch.engines == ("PyTorch",) and ran_auto.engines == ("onnxruntime",)
    assert "with onnxruntime in" in ran_auto.summary() and "with PyTorch in" in ran_torch.summary()
    cached = onnx_cache_dir() / f"{export_cache_key(checkpoint_of(tiny_run))}.onnx"
    assert [m.split(" (once;")[0] for m in exports(caplog)] == [f"exporting {checkpoint_of(tiny_run)} to ONNX for "
                                                                "CPU inference"]
    assert f"cached at {cached})" in exports(caplog)[0] and cached.is_file()
    assert sorted(p.name for p in checkpoint_of(tiny_run).parent.iterdir()) == beside  # nothing beside it

    torch_out, onnx_out = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "auto.csv")
    assert list(onnx_out.columns) == list(torch_out.columns)
    numeric = ["confidence", "expected_distance", "ood_score"]
    same = [c for c in torch_out.columns if c not in numeric]
    pd.testing.assert_frame_equal(onnx_out[same], torch_out[same])  # answers, levels, unknown flags, input columns
    # measured: 0 (confidence and expected distance are rounded to 6 decimals) and 1.1e-8 for the energy score
    for column in numeric:
        np.testing.assert_allclose(onnx_out[column], torch_out[column], rtol=0, atol=1e-5, err_msg=column)


def test_onnxruntime_and_torch_outputs_agree(tiny_run, tiny_data):
    """The model outputs themselves: logits, features and calibrated probabilities on the same batch."""
    from taxonomist.decide import apply_temperature

    ckpt = checkpoint_of(tiny_run)
    torch_model, meta, _ = load_model(ckpt, engine="torch")
    onnx_model_, onnx_meta, taxonomy = load_model(ckpt, engine="onnx")
    assert isinstance(onnx_model_, OnnxTaxonModel) and not isinstance(torch_model, OnnxTaxonModel)
    assert onnx_meta == meta and taxonomy.hash == meta["taxonomy_hash"]  # the checkpoint's own metadata
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = torch_model(x), onnx_model_(x)
    t = float(meta["temperature"])
    probs_a = apply_temperature(a["logits"].double().numpy(), t)
    probs_b = apply_temperature(b["logits"].double().numpy(), t)
    # measured on this model's test images: logits 1.5e-8, probabilities 4e-9 (the demo's Lite0: docs/deploy.md)
    assert np.abs(a["logits"].numpy() - b["logits"].numpy()).max() < 1e-4
    assert np.abs(a["features"].numpy() - b["features"].numpy()).max() < 1e-4
    assert np.abs(probs_a - probs_b).max() < 1e-5
    assert (probs_a.argmax(1) == probs_b.argmax(1)).all()


# ---------------------------------------------------------------------------------------------- cache
def test_the_cache_is_reused(tiny_run, tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, "taxonomist.inference")
    predict(tiny_run, tiny_data, tmp_path / "first.csv", engine="onnx", **FAST)  # exports, unless a test above did
    cached = onnx_cache_dir() / f"{export_cache_key(checkpoint_of(tiny_run))}.onnx"
    stamp = cached.stat().st_mtime_ns
    caplog.clear()
    s = predict(tiny_run, tiny_data, tmp_path / "second.csv", engine="onnx", **FAST)
    assert exports(caplog) == [] and cached.stat().st_mtime_ns == stamp and s.engines == ("onnxruntime",)
    assert [p.name for p in onnx_cache_dir().iterdir()] == [cached.name]  # no temporary file left


def test_a_corrupt_cache_file_is_exported_again(tiny_run, tiny_data, tmp_path, caplog):
    caplog.set_level(logging.INFO, "taxonomist.inference")
    predict(tiny_run, tiny_data, tmp_path / "before.csv", engine="onnx", **FAST)
    cached = onnx_cache_dir() / f"{export_cache_key(checkpoint_of(tiny_run))}.onnx"
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # a truncated file
    caplog.clear()
    predict(tiny_run, tiny_data, tmp_path / "after.csv", engine="onnx", **FAST)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{cached}: onnxruntime cannot load the model") and m.endswith("exporting the checkpoint "
                                                                                           "again") for m in messages)
    assert len(exports(caplog)) == 1
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "after.csv"), pd.read_csv(tmp_path / "before.csv"))


def test_a_cached_file_made_for_another_key_is_not_trusted(tiny_run, tmp_path):
    import onnx

    ckpt = checkpoint_of(tiny_run)
    load_model(ckpt, engine="onnx")  # the cached export exists
    key = export_cache_key(ckpt)
    proto = onnx.load(str(onnx_cache_dir() / f"{key}.onnx"))
    for prop in proto.metadata_props:
        if prop.key == CACHE_KEY_PROPERTY:
            prop.value = "0" * 64
    forged = tmp_path / f"{key}.onnx"
    onnx.save(proto, str(forged))
    with pytest.raises(ModelError, match="the cached export does not carry its key"):
        onnx_model._open_cached(forged, key, "cpu", {})


def test_the_key_follows_the_files_not_their_place(tiny_run, tmp_path):
    src = checkpoint_of(tiny_run)
    copies = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(src.with_suffix(suffix), tmp_path / name / f"best{suffix}")
        copies.append(tmp_path / name / "best.safetensors")
    key = export_cache_key(copies[0])
    assert export_cache_key(copies[1]) == key == export_cache_key(src)  # the same bytes: one export
    assert export_cache_key(src, opset=17) != key
    meta = copies[1].with_suffix(".json")
    meta.write_text(meta.read_text() + "\n")  # one byte more: the metadata (temperature, image size, …) is keyed
    assert export_cache_key(copies[1]) != key


def test_a_failed_export_falls_back_under_auto_and_fails_under_onnx(tiny_run, tiny_data, tmp_path, monkeypatch,
                                                                     caplog):
    caplog.set_level(logging.INFO, "taxonomist.inference")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a cold cache

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(onnx_model, "export_onnx", broken)
    s = predict(tiny_run, tiny_data, tmp_path / "p.csv", split="test", **FAST)
    assert s.engines == ("PyTorch",)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned[-1] == (f"{checkpoint_of(tiny_run)}: the ONNX export failed (Unsupported operator aten::frobnicate); "
                          "running it with PyTorch")
    with pytest.raises(ModelError, match=r"the ONNX export failed \(Unsupported operator aten::frobnicate\)$"):
        predict(tiny_run, tiny_data, tmp_path / "q.csv", engine="onnx", split="test", **FAST)
    assert not any((tmp_path / "cache").rglob("*.onnx")) and not any((tmp_path / "cache").rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------- fallbacks
def test_an_option_needing_torch_falls_back_under_auto_and_is_refused_under_onnx(tiny_run, tiny_data, tmp_path,
                                                                                  caplog):
    caplog.set_level(logging.INFO, "taxonomist.inference")
    s = predict(tiny_run, tiny_data, tmp_path / "odin.csv", ood="odin", ood_threshold=0.5, split="test", **FAST)
    assert s.engines == ("PyTorch",)
    assert f"{checkpoint_of(tiny_run)}: running it with PyTorch (--ood odin needs the PyTorch model)" in \
        [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    with pytest.raises(ConfigError, match="^--engine onnx: --ood mc-dropout needs the PyTorch model; use --engine "
                                          "auto or torch$"):
        predict(tiny_run, tiny_data, tmp_path / "mc.csv", ood="mc-dropout", ood_threshold=0.5, engine="onnx",
                **FAST)
    assert not (tmp_path / "mc.csv").exists() and not (tmp_path / "mc.csv.parts").exists()  # refused up front


def test_without_onnxruntime_auto_runs_torch_quietly(tiny_run, tiny_data, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, "taxonomist.inference")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    s = predict(tiny_run, tiny_data, tmp_path / "p.csv", split="test", **FAST)
    assert s.engines == ("PyTorch",)
    records = [r for r in caplog.records if r.name == "taxonomist.inference"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "the onnxruntime package is missing; pip install 'taxonomist[onnx]'" in records[0].getMessage()
    with pytest.raises(ModelError, match=r"^--engine onnx needs the onnxruntime package: pip install "
                                         r"'taxonomist\[onnx\]'$"):
        predict(tiny_run, tiny_data, tmp_path / "q.csv", engine="onnx", split="test", **FAST)


def test_engine_choice_rules(tiny_run, tmp_path):
    ckpt = checkpoint_of(tiny_run)
    assert choose_engine("auto", ckpt, "cpu") == ("onnx", None)
    for device in ("cuda", "cuda:1", "mps"):
        assert choose_engine("auto", ckpt, device)[0] == "torch"
        assert choose_engine("onnx", ckpt, device) == ("onnx", None)  # forced: onnxruntime's CUDA provider or CPU
    assert choose_engine("torch", ckpt, "cpu") == ("torch", None)
    assert choose_engine("auto", tmp_path / "m.onnx", "cuda") == ("onnx", None)  # an .onnx file has one engine
    with pytest.raises(ConfigError, match=r"--engine torch: .*m\.onnx is an exported ONNX model, which runs on "
                                          "onnxruntime only"):
        choose_engine("torch", tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"unknown engine 'onxx' \(did you mean 'onnx'\?\); choose one of auto, "
                                          "torch, onnx"):
        choose_engine("onxx", ckpt)


def test_an_onnx_file_is_refused_by_engine_torch(tiny_run, tiny_data, tmp_path):
    load_model(checkpoint_of(tiny_run), engine="onnx")
    exported = tmp_path / "m.onnx"
    shutil.copyfile(onnx_cache_dir() / f"{export_cache_key(checkpoint_of(tiny_run))}.onnx", exported)
    with pytest.raises(ConfigError, match="--engine torch: .*m.onnx is an exported ONNX model"):
        predict(exported, tiny_data, tmp_path / "p.csv", engine="torch", **FAST)
    assert predict(exported, tiny_data, tmp_path / "p.csv", split="test", **FAST).engines == ("onnxruntime",)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_engine_option(tiny_run, tiny_data, tmp_path, capsys):
    from taxonomist.cli.main import build_parser, main
    from taxonomist.cli.predict import ENGINE_CHOICES

    assert ENGINE_CHOICES == ENGINES
    args = build_parser().parse_args(["predict", "RUN", "--images", "D", "--out", "p.csv"])
    assert args.engine == "auto"
    common = [str(tiny_run), "--images", str(tiny_data), "--split", "test", "--workers", "0", "--device", "cpu"]
    assert main(["predict", *common, "--out", str(tmp_path / "o.csv"), "--engine", "onnx"]) == 0
    assert "(argmax, 1 checkpoint) with onnxruntime in" in capsys.readouterr().out
    assert main(["predict", *common, "--out", str(tmp_path / "t.csv"), "--engine", "torch"]) == 0
    assert "(argmax, 1 checkpoint) with PyTorch in" in capsys.readouterr().out
    assert main(["predict", *common, "--out", str(tmp_path / "x.csv"), "--engine", "onnx", "--ood", "odin",
                 "--ood-threshold", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --engine onnx: --ood odin needs the PyTorch model; use "
                                               "--engine auto or torch")


def test_a_backbone_that_is_code_stays_on_pytorch_under_auto(tiny_run, tmp_path, caplog):
    """A `module:` model is built from its code on every run (what --trust-code allows); auto does not freeze it
    into a cached graph that would later run without that code."""
    import json

    from taxonomist.inference.onnx_model import load_checkpoint_on_onnxruntime

    caplog.set_level(logging.INFO, "taxonomist.inference")
    src = checkpoint_of(tiny_run)
    ckpt = tmp_path / "best.safetensors"
    shutil.copyfile(src, ckpt)
    meta = json.loads(src.with_suffix(".json").read_text())
    meta["model_config"]["backbone"] = "module:payload:make"
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="names code to import"):
        load_checkpoint_on_onnxruntime(ckpt, fallback=True)  # refused without --trust-code, cache or not
    assert load_checkpoint_on_onnxruntime(ckpt, trust_code=True, fallback=True) is None
    assert caplog.records[-1].getMessage() == (f"{ckpt}: running it with PyTorch (its backbone is code, module "
                                               "payload; --engine onnx exports it)")
    assert not onnx_cache_dir().joinpath(f"{export_cache_key(ckpt)}.onnx").exists()
