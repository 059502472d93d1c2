"""Model files that are not checkpoints, given where a checkpoint goes: one error line that says what they are."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from taxonomist.cli.main import main
from taxonomist.train.checkpoint import is_torchscript


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_export_given_to_predict_says_what_it_is_and_what_predict_takes(tmp_path, capsys):
    """Issue 23: `predict model.pt` answered "checkpoint metadata not found (expected beside model.pt)"."""
    scripted = tmp_path / "model.pt"
    torch.jit.script(nn.Linear(3, 2)).save(str(scripted))
    plain = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    assert is_torchscript(scripted) and not is_torchscript(plain) and not is_torchscript(tmp_path / "none.pt")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    for command in (["predict", str(scripted), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "p.csv")],
                    ["export", str(scripted), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {scripted}: a TorchScript export, made for running the model in other "
                              "programs (torch.jit.load); taxonomist predict, evaluate, serve and export take the "
                              "checkpoint or run directory it was exported from, an .onnx export or a Hub folder")
        assert err.count("\n") == 1 and "metadata not found" not in err
