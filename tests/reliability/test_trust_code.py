"""Model files are data: a checkpoint (or an ONNX file) that names a `module:` backbone never imports it unless the
user passes --trust-code / trust_code=True, whether taxonomist runs as the `taxonomist` command, in-process, or as
`python -m taxonomist.cli.main` from inside the downloaded folder (where the current folder is on sys.path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taxonomist.config import ModelConfig
from taxonomist.errors import ModelError
from taxonomist.models import build_model
from taxonomist.models.backbones import check_backbone_trusted, chosen_by_user, code_named_by
from taxonomist.train.checkpoint import load_checkpoint, read_metadata, save_checkpoint, taxonomy_from_json

from .conftest import VENV_BIN, assert_refused, run_cli

#: the backbone of the forged files; `make` is defined below from the same source as the shipped payload.py
NET_SOURCE = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.num_features = 8

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))

def make():
    return Net()
"""
#: importing the shipped payload.py creates this file beside it: the proof that the file's code ran
MARKER_SOURCE = "import pathlib\npathlib.Path(__file__).with_name('code-ran').touch()\n"
exec(NET_SOURCE)  # Net and make, here without the marker: the weights of the forged checkpoint are built from them
FORGED = "module:payload:make"


def _write_payload(folder: Path) -> None:
    (folder / "payload.py").write_text(MARKER_SOURCE + NET_SOURCE)


@pytest.fixture(scope="module")
def forged(tmp_path_factory, tiny_run) -> Path:
    """A downloaded run folder: run/checkpoints/best.{safetensors,json} naming `module:payload:make`, payload.py
    beside it and in code/, and a safetensors.py that would shadow safetensors if the current folder were on
    sys.path."""
    folder = tmp_path_factory.mktemp("forged")
    meta = read_metadata(tiny_run / "checkpoints" / "best.safetensors")
    taxonomy = taxonomy_from_json(meta["taxonomy"])
    model = build_model(ModelConfig(backbone=f"module:{__name__}:make", pretrained="none", head="flat"), taxonomy,
                        int(meta["image_size"]))
    meta.pop("format_version", None)
    meta["backbone"] = FORGED
    meta["model_config"] = {**meta["model_config"], "backbone": FORGED}
    save_checkpoint(folder / "run" / "checkpoints" / "best.safetensors", model, meta)
    _write_payload(folder)
    (folder / "code").mkdir()
    _write_payload(folder / "code")
    (folder / "safetensors.py").write_text("import pathlib\npathlib.Path(__file__).with_name('shadow-ran').touch()\n"
                                           "raise ImportError('a shadow of safetensors')\n")
    return folder


def _ran(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*-ran"))


@pytest.fixture
def cwd_on_path(forged, monkeypatch):
    """The worst case in-process: the forged folder is the current folder and first on sys.path."""
    monkeypatch.chdir(forged)
    monkeypatch.syspath_prepend(str(forged))
    yield forged
    sys.modules.pop("payload", None)
    for marker in forged.rglob("*-ran"):
        marker.unlink()


def test_code_selecting_names_are_recognised():
    assert code_named_by("module:payload:make") == "module payload"
    assert code_named_by("open_clip:hf-hub:imageomics/bioclip") is not None  # its hub config picks the tokenizer
    for data in ("test_efficientnet", "tf_efficientnet_lite0", "scratch_cnn", "", None):
        assert code_named_by(data) is None
    with pytest.raises(ModelError, match=r"x\.json names code to import \(backbone module:payload:make\); "
                                         r"pass --trust-code"):
        check_backbone_trusted(FORGED, "x.json")
    check_backbone_trusted(FORGED, "x.json", trust_code=True)
    with chosen_by_user(FORGED):        # the user's own training config chose it
        check_backbone_trusted(FORGED, "x.json")
        with pytest.raises(ModelError):
            check_backbone_trusted("module:other:make", "x.json")


def test_python_api_refuses_and_trust_code_loads(cwd_on_path, tiny_data, tmp_path):
    from taxonomist.deploy.export import export_model
    from taxonomist.deploy.serve.app import create_app
    from taxonomist.deploy.serve.predictor import ServeOptions
    from taxonomist.evaluate.run import evaluate_run
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.predict import predict

    run = cwd_on_path / "run"
    best_json = run / "checkpoints" / "best.json"
    calls = [lambda: load_checkpoint(run), lambda: load_model(run),
             lambda: predict([run], tiny_data, tmp_path / "p.csv", split="test", device="cpu", num_workers=0,
                             progress=False),
             lambda: evaluate_run(run, data=tiny_data, out=tmp_path / "ev", device="cpu", num_workers=0,
                                  progress=False),
             lambda: export_model(run, tmp_path / "m.pt", fmt="torchscript", check=False),
             lambda: create_app(run, ServeOptions(device="cpu"))]
    for call in calls:
        with pytest.raises(ModelError) as info:
            call()
        assert str(best_json) in str(info.value) and FORGED in str(info.value) and "--trust-code" in str(info.value)
        assert "\n" not in str(info.value)
    assert _ran(cwd_on_path) == [] and "payload" not in sys.modules
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "ev").exists() and not (tmp_path / "m.pt").exists()

    model, meta, _ = load_checkpoint(run, trust_code=True)
    assert meta["backbone"] == FORGED and _ran(cwd_on_path) == ["code-ran"]
    assert model(torch.rand(2, 3, 32, 32))["logits"].shape == (2, len(meta["labels"]))
    summary = predict([run], tiny_data, tmp_path / "p.csv", split="test", device="cpu", num_workers=0,
                      progress=False, trust_code=True)
    assert summary.n_predicted > 0 and (tmp_path / "p.csv").is_file()


def test_cli_refuses_in_process_and_trust_code_loads(cwd_on_path, tiny_data, tmp_path, capsys):
    run = cwd_on_path / "run"
    fast = ["--device", "cpu"]
    commands = [["predict", run, "--images", tiny_data, "--split", "test", "--out", tmp_path / "p.csv", *fast,
                 "--workers", "0"],
                ["evaluate", run, "--data", tiny_data, "--out", tmp_path / "ev", *fast, "--num-workers", "0"],
                ["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--no-check"]]
    for argv in commands:
        code, _, err = run_cli(argv, capsys)
        line = assert_refused(code, err, run / "checkpoints" / "best.json", FORGED, "--trust-code")
        assert "names code to import" in line
    assert _ran(cwd_on_path) == [] and list(tmp_path.iterdir()) == []
    code, out, err = run_cli([*commands[2], "--trust-code"], capsys)
    assert code == 0, err
    assert (tmp_path / "m.pt").is_file() and _ran(cwd_on_path) == ["code-ran"]


def _python_m(argv, cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    environ.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **env)
    return subprocess.run([str(VENV_BIN / "python"), "-m", "taxonomist.cli.main", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=environ)


def test_python_m_from_the_forged_folder_imports_nothing_from_it(forged, tiny_data, tmp_path):
    """Under `python -m` the current folder is first on sys.path: neither the named payload.py nor a safetensors.py
    there is imported — without the flag the file is refused, with it only an installed (or PYTHONPATH) module
    is; serve refuses before it listens."""
    run = forged / "run"
    out = tmp_path / "p.csv"
    predict = ["predict", run, "--images", tiny_data, "--split", "test", "--out", out, "--device", "cpu",
               "--workers", "0"]
    done = _python_m(predict, cwd=forged)
    assert_refused(done.returncode, done.stderr, run / "checkpoints" / "best.json", FORGED, "--trust-code")
    served = _python_m(["serve", run, "--port", "8765", "--device", "cpu"], cwd=forged)
    assert_refused(served.returncode, served.stderr, FORGED, "--trust-code")
    trusted = _python_m([*predict, "--trust-code"], cwd=forged)  # the flag does not make the cwd importable
    line = assert_refused(trusted.returncode, trusted.stderr, "cannot import 'payload'")
    assert "model.backbone" in line
    assert _ran(forged) == [] and not out.exists()
    loaded = _python_m([*predict, "--trust-code"], cwd=forged, PYTHONPATH=str(forged / "code"))
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert out.is_file() and _ran(forged) == ["code/code-ran"]
    (forged / "code" / "code-ran").unlink()


def test_onnx_metadata_naming_code_imports_nothing(forged, tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    """An exported ONNX file runs in onnxruntime and builds no backbone: a backbone its metadata names is a label,
    never imported (with or without --trust-code), and the file predicts."""
    import onnx

    from taxonomist.deploy.export import export_model
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.onnx_model import METADATA_KEY

    onnx_file = tmp_path / "m.onnx"
    export_model(tiny_run, onnx_file, check=False)
    proto = onnx.load(str(onnx_file))
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            rest = json.loads(prop.value)
            rest["backbone"] = FORGED
            rest["model_config"] = {**rest.get("model_config", {}), "backbone": FORGED}
            prop.value = json.dumps(rest)
    forged_onnx = forged / "forged.onnx"
    onnx.save(proto, str(forged_onnx))
    monkeypatch.chdir(forged)
    monkeypatch.syspath_prepend(str(forged))
    for trust in (False, True):
        model, meta, _ = load_model(forged_onnx, trust_code=trust)
        assert meta["backbone"] == FORGED
        assert model(torch.rand(2, 3, 32, 32))["logits"].shape == (2, len(meta["labels"]))
    code, _, err = run_cli(["predict", forged_onnx, "--images", tiny_data, "--split", "test", "--out",
                            tmp_path / "p.csv", "--device", "cpu", "--workers", "0"], capsys)
    assert code == 0, err
    assert _ran(forged) == [] and "payload" not in sys.modules
