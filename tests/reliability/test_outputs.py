"""Outputs never destroy inputs or foreign folders: predict, evaluate and export refuse an --out that is one of their
inputs; train refuses an `out` that is not empty and not a taxonomist run (unless --force), an empty out, `/` and
the dataset folder; evaluate's and export's files are replaced as a set, so that a crash or kill -9 at any moment
leaves the old set, the new set or a set that readers refuse — never a mix."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from taxonomist.config import load_config
from taxonomist.errors import ConfigError
from taxonomist.train.loop import check_run_out, is_run_dir

from .conftest import VENV_BIN, assert_refused, files_under, run_cli, tiny_overrides


# ------------------------------------------------------------------------------------ --out over an input
def _a_label(data: Path) -> str:
    from taxonomist.taxonomy import read_taxonomy
    return read_taxonomy(data / "taxonomy.csv").labels[0]


def test_predict_refuses_an_out_that_is_one_of_its_inputs(tiny_run, tiny_data, tmp_path, capsys):
    csv = tmp_path / "images.csv"
    images = sorted(p for p in (tiny_data / "images").rglob("*") if p.is_file())[:3]
    csv.write_text("path\n" + "\n".join(os.path.relpath(p, tmp_path) for p in images) + "\n")
    cand = tmp_path / "candidates.txt"
    cand.write_text(_a_label(tiny_data) + "\n")
    best = tiny_run / "checkpoints" / "best.safetensors"
    cases = [(["--images", tiny_data], tiny_data / ".." / tiny_data.name / "annotations.csv", "annotations.csv"),
             (["--images", tiny_data], tiny_data / "taxonomy.csv", "taxonomy.csv"),
             (["--images", csv], csv, "images CSV"),
             (["--images", csv, "--candidates", cand], cand, "candidates file"),
             (["--images", csv], best.with_suffix(".json"), "metadata"),
             (["--images", csv], best, "model file")]
    before = files_under(tiny_data), files_under(tiny_run), csv.read_bytes(), cand.read_bytes()
    for images, out, what in cases:
        code, _, err = run_cli(["predict", tiny_run, *images, "--out", out, "--device", "cpu", "--workers", "0"],
                               capsys)
        line = assert_refused(code, err, out, what)
        assert "refusing to write over an input" in line
    assert (files_under(tiny_data), files_under(tiny_run), csv.read_bytes(), cand.read_bytes()) == before


def test_evaluate_and_export_refuse_an_out_over_their_inputs(tiny_run, tiny_data, tmp_path, capsys):
    before = files_under(tiny_data), files_under(tiny_run)
    code, _, err = run_cli(["evaluate", tiny_run, "--data", tiny_data, "--out", tiny_data, "--device", "cpu"], capsys)
    assert "dataset folder" in assert_refused(code, err, tiny_data)
    cand = tmp_path / "ev" / "predictions.csv"  # a candidates file where evaluate would write its predictions
    cand.parent.mkdir()
    cand.write_text(_a_label(tiny_data) + "\n")
    code, _, err = run_cli(["evaluate", tiny_run, "--data", tiny_data, "--out", cand.parent, "--candidates", cand,
                            "--device", "cpu"], capsys)
    assert_refused(code, err, cand, "candidates file")
    best = tiny_run / "checkpoints" / "best.safetensors"
    code, _, err = run_cli(["export", tiny_run, "--format", "torchscript", "--out", best], capsys)
    assert_refused(code, err, best, "model file")
    assert (files_under(tiny_data), files_under(tiny_run)) == before and cand.read_text() == _a_label(tiny_data) + "\n"


# ------------------------------------------------------------------------------------ train's out
def test_train_refuses_foreign_folders_empty_out_root_and_the_dataset(tiny_data, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my own notes\n")
    (foreign / "report.html").write_text("<p>my report</p>")
    before = files_under(foreign)
    code, _, err = run_cli(["train", *sum((["--set", o] for o in tiny_overrides(tiny_data, foreign)), [])], capsys)
    line = assert_refused(code, err, f"out={foreign}", "--force")
    assert "not a taxonomist run" in line and files_under(foreign) == before
    for out, words in (("", "out is empty"), ("  ", "out is empty"), ("/", "filesystem root"),
                       (str(tiny_data), "dataset folder")):
        cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "x"))
        cfg.out = out
        for force in (False, True):    # --force never opens these
            with pytest.raises(ConfigError, match=words):
                check_run_out(cfg, force=force)
    file_out = tmp_path / "a-file"
    file_out.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_out(load_config(None, tiny_overrides(tiny_data, file_out)))


def test_runs_new_and_old_are_recognised_and_force_trains_into_a_foreign_folder(tiny_run, tiny_data, tmp_path,
                                                                                 capsys):
    assert is_run_dir(tiny_run) and not is_run_dir(tiny_data)
    old = tmp_path / "old-run"      # a run of a version before run.json: checkpoints with their JSON
    shutil.copytree(tiny_run / "checkpoints", old / "checkpoints")
    assert not (old / "run.json").exists() and is_run_dir(old)
    for out in (tmp_path / "new", tmp_path / "empty", old, tiny_run):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert check_run_out(load_config(None, tiny_overrides(tiny_data, out))) == out
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n")
    code, _, err = run_cli(["train", "--force", "--no-eval", "--no-calibrate",
                            *sum((["--set", o] for o in tiny_overrides(tiny_data, foreign)), [])], capsys)
    assert code == 0, err
    assert (foreign / "notes.txt").read_text() == "keep me\n" and is_run_dir(foreign)


# ------------------------------------------------------------------------------------ evaluate as a set
def _replace_failing_after(n: int, real_replace):
    """An `os.replace` that does its first `n` renames and then fails as a full disk would."""
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) > n:
            raise OSError(28, "No space left on device (injected)")
        return real_replace(src, dst)
    return replace


def _evaluation_state(folder: Path, old: dict, new_decision: str) -> str:
    """'old', 'new' or 'none' (no metrics.json: readers refuse it); fails on a mix."""
    from taxonomist.evaluate.run import check_evaluation

    if not (folder / "metrics.json").exists():
        return "none"
    check_evaluation(folder)                        # predictions.csv and taxonomy.csv belong to metrics.json
    metrics = json.loads((folder / "metrics.json").read_text())
    if (folder / "metrics.json").read_bytes() == old["metrics.json"]:
        assert (folder / "predictions.csv").read_bytes() == old["predictions.csv"]
        assert (folder / "report.html").read_bytes() == old["report.html"]
        return "old"
    assert metrics["decision"] == new_decision
    assert not (folder / "report.html").exists() or b"min-risk" in (folder / "report.html").read_bytes()
    return "new"


@pytest.fixture
def evaluated(tiny_run, tiny_data, tmp_path, capsys) -> tuple[Path, dict]:
    out = tmp_path / "ev"
    code, _, err = run_cli(["evaluate", tiny_run, "--data", tiny_data, "--out", out, "--device", "cpu",
                            "--num-workers", "0"], capsys)
    assert code == 0, err
    return out, files_under(out)


def test_evaluate_replaces_its_files_as_a_set_when_a_write_fails(evaluated, tiny_run, tiny_data, monkeypatch):
    from taxonomist.evaluate.run import evaluate_run

    out, old = evaluated
    real_replace = os.replace
    states = []
    # the renames: taxonomy.csv's own atomic write into its staged file, then the commit's predictions.csv,
    # taxonomy.csv and metrics.json; the last round fails none
    for fail_at in range(5):
        monkeypatch.setattr(os, "replace", _replace_failing_after(fail_at, real_replace))
        try:
            evaluate_run(tiny_run, data=tiny_data, out=out, device="cpu", num_workers=0, progress=False,
                         decision="min-risk", candidates="all")
        except OSError:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        states.append(_evaluation_state(out, old, "min-risk"))
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]   # no temporaries left behind
    assert states == ["old", "none", "none", "none", "new"]


def test_evaluate_killed_at_random_moments_leaves_one_whole_evaluation(evaluated, tiny_run, tiny_data):
    out, old = evaluated
    argv = [str(VENV_BIN / "taxonomist"), "evaluate", str(tiny_run), "--data", str(tiny_data), "--out", str(out),
            "--device", "cpu", "--num-workers", "0", "--decision", "min-risk", "--candidates", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.time()
    subprocess.run(argv, env=env, capture_output=True, timeout=300, check=True)
    full = time.time() - start
    new = files_under(out)
    rng = random.Random(19)
    seen = set()
    for _ in range(3):
        for name, data in old.items():   # back to the old set, then kill a new evaluation somewhere in its run
            (out / name).write_bytes(data)
        (out / "report.html").write_bytes(old["report.html"])
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        seen.add(_evaluation_state(out, old, "min-risk"))   # fails on a mix
        assert not (out / "metrics.json").exists() or (out / "metrics.json").read_bytes() in (
            old["metrics.json"], new["metrics.json"])


# ------------------------------------------------------------------------------------ export as a pair
def _temperature(model_file: Path) -> str:
    import warnings

    import torch
    extra = {"temperature": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export and says so
        torch.jit.load(str(model_file), _extra_files=extra)
    return extra["temperature"]


def test_export_replaces_model_and_ood_statistics_as_a_pair(tiny_run, tiny_data, tmp_path, monkeypatch, capsys):
    from safetensors.numpy import load_file, save_file

    from taxonomist.deploy.export import export_model
    from taxonomist.inference.calibrate import calibrate_checkpoint
    from taxonomist.inference.model_file import ood_path

    folders = []
    for name, temperature in (("a", 1.0), ("b", 2.0)):   # two checkpoints whose exports differ in every file
        folder = tmp_path / name
        shutil.copytree(tiny_run / "checkpoints", folder, ignore=shutil.ignore_patterns("*.pt"))
        calibrate_checkpoint(folder / "best.safetensors", tiny_data, device="cpu", num_workers=0,
                             ood_methods=("energy", "msp"))
        meta = json.loads((folder / "best.json").read_text())
        meta["temperature"] = temperature
        (folder / "best.json").write_text(json.dumps(meta))
        stats = folder / "best.ood.safetensors"
        save_file(load_file(str(stats)), str(stats), metadata={"format": "taxonomist-ood", "note": name})
        folders.append(folder / "best.safetensors")
    out = tmp_path / "model.pt"
    pairs = {}
    for ckpt in folders:
        export_model(ckpt, out, fmt="torchscript", check=False)
        pairs[ckpt.parent.name] = (_temperature(out), ood_path(out).read_bytes())
    real_replace = os.replace
    for fail_at in range(3):           # before the model's rename, between the two renames, none
        export_model(folders[0], out, fmt="torchscript", check=False)
        monkeypatch.setattr(os, "replace", _replace_failing_after(fail_at, real_replace))
        try:
            export_model(folders[1], out, fmt="torchscript", check=False)
        except OSError:
            pass
        monkeypatch.setattr(os, "replace", real_replace)
        model = _temperature(out)   # which export the model file is (TorchScript archives name their temp file)
        stats = ood_path(out).read_bytes() if ood_path(out).exists() else None
        if stats is not None:
            assert (model, stats) in (pairs["a"], pairs["b"])
        else:  # a model without its statistics (a kill between the renames)
            assert model in (pairs["a"][0], pairs["b"][0])
        assert (fail_at == 2) == ((model, stats) == pairs["b"])
    # such a model is refused as soon as OOD is asked for, never scored with statistics of another export
    onnx_file = tmp_path / "model.onnx"
    export_model(folders[0], onnx_file, check=False)
    ood_path(onnx_file).unlink()
    code, _, err = run_cli(["predict", onnx_file, "--images", tiny_data, "--split", "test", "--ood", "energy",
                            "--out", tmp_path / "p.csv", "--device", "cpu", "--workers", "0"], capsys)
    assert_refused(code, err, ood_path(onnx_file).name, "missing")


def test_report_refuses_predictions_that_another_evaluation_wrote(evaluated, tmp_path, capsys):
    """`taxonomist report` checks the set too: a predictions.csv swapped in from elsewhere is one error line."""
    out, _ = evaluated
    frame = (out / "predictions.csv").read_text().splitlines()
    (out / "predictions.csv").write_text("\n".join([frame[0], *reversed(frame[1:])]) + "\n")
    code, _, err = run_cli(["report", str(out), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "predictions.csv does not belong to" in err and not (tmp_path / "r.html").exists()
