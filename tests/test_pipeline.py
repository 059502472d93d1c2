"""A finished training is never lost to a step after it: each of calibrate, evaluate and report is made to fail
in turn; the model, metrics.csv and config.yaml stay intact, the command says which step failed in one line and
exits with 3, RUN/errors.log and RUN/run.json record it, and the command it names completes the run."""
from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import yaml

from taxonomist.cli.main import main
from taxonomist.config import load_config
from taxonomist.errors import PostTrainingError
from taxonomist.pipeline import fit, redo_command
from taxonomist.train.checkpoint import load_checkpoint, read_metadata

#: what each step calls, as the pipeline looks it up when the step runs
STEP_FUNCTIONS = {"calibrate": "taxonomist.inference.calibrate.calibrate_run",
                  "evaluate": "taxonomist.evaluate.run.evaluate_run",
                  "report": "taxonomist.report.write_report"}
TINY = ["data.image_size=32", "data.num_workers=0", "model.backbone=test_efficientnet", "model.pretrained=none",
        "train.batch_size=8", "train.epochs=2", "train.device=cpu", "train.tensorboard=false", "augment.randaugment="]


@pytest.fixture(scope="module")
def tiny_data(synth_dataset) -> Path:
    return synth_dataset(n_taxa=5, per_class=12, seed=4, val=0.25, test=0.25)


def train_args(data: Path, out: Path) -> list[str]:
    return ["train", "--set", f"data.root={data}", "--set", f"out={out}", *(a for kv in TINY for a in ("--set", kv))]


def fail(step: str):
    def broken(*args, **kwargs):
        raise RuntimeError(f"simulated failure in {step}")
    return broken


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("step", ["calibrate", "evaluate", "report"])
def test_a_failed_step_after_training_keeps_the_run_and_its_redo_completes_it(tiny_data, tmp_path, monkeypatch,
                                                                               capsys, step):
    run = tmp_path / "run"
    monkeypatch.setattr(STEP_FUNCTIONS[step], fail(step))
    code, out, err = run_cli(capsys, train_args(tiny_data, run))

    # one line, the documented status, the step, the log and the command that redoes it
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    redo = redo_command(run, step)
    assert lines[0].startswith("error: training finished and its model is saved")
    assert f"the {step} step after it failed: RuntimeError: simulated failure in {step}" in lines[0]
    assert str(run / "errors.log") in lines[0] and lines[0].endswith(f"redo the step with: {redo}")

    # the trained model, its metrics and its config are intact
    rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["out"] == str(run) and cfg["train"]["epochs"] == 2
    model, meta, taxonomy = load_checkpoint(run / "checkpoints" / "best.safetensors", device="cpu")
    assert len(taxonomy.labels) == 5 and meta["epoch"] in (1, 2)
    # the steps before the failed one did their work; the failed one left nothing half-written
    assert ("temperature" in read_metadata(run / "checkpoints" / "best.safetensors")) == (step != "calibrate")
    assert (run / "metrics.json").is_file() == (step == "report")
    assert not (run / "report.html").exists()

    # the run directory records the failure and its traceback
    log = (run / "errors.log").read_text()
    assert f"step '{step}' failed" in log and "Traceback (most recent call last)" in log
    assert f"RuntimeError: simulated failure in {step}" in log
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "post-training failed" and status["failed_step"] == step
    assert status["redo"] == redo and status["epochs_trained"] == 2

    # the command named in the message completes the run, without training again
    monkeypatch.undo()
    argv = shlex.split(redo)
    assert argv[0] == "taxonomist"
    code, out, err = run_cli(capsys, argv[1:])
    assert code == 0, err
    assert "epoch 1/2" not in out  # no epoch was trained again
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "metrics.csv", newline=""))] == [1, 2]
    assert "temperature" in read_metadata(run / "checkpoints" / "best.safetensors")
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] > 0 and 0 <= m["top1"] <= 1
    assert (run / "report.html").stat().st_size > 10_000
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "finished" and "failed_step" not in status and "redo" not in status


def test_fit_reports_a_failed_step_without_raising_and_raise_for_failure_raises(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(STEP_FUNCTIONS["report"], fail("report"))
    cfg = load_config(None, [f"data.root={tiny_data}", f"out={tmp_path / 'run'}", *TINY])
    result = fit(cfg, log=lambda _: None)
    assert result.training.best_epoch in (1, 2) and len(result.calibrations) == 2
    assert result.evaluation.metrics["n"] > 0 and result.report is None
    assert result.failure.step == "report" and result.failure.log == tmp_path / "run" / "errors.log"
    with pytest.raises(PostTrainingError) as info:
        result.raise_for_failure()
    assert info.value.exit_code == 3 and info.value.redo == redo_command(tmp_path / "run", "report")


def test_a_failed_report_after_evaluate_names_the_report_command(tiny_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_data, run) + ["--no-eval"]) == 0
    monkeypatch.setattr(STEP_FUNCTIONS["report"], fail("report"))
    code, out, err = run_cli(capsys, ["evaluate", str(run)])
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: the evaluation is written ({run / 'metrics.json'}), but the report failed")
    assert (run / "metrics.json").is_file() and (run / "predictions.csv").is_file()
    monkeypatch.undo()
    redo = shlex.split(err.strip().rsplit("redo it with: ", 1)[1])
    assert main(redo[1:]) == 0 and (run / "report.html").is_file()


def test_an_unexpected_error_is_one_line_naming_its_saved_traceback(tmp_path, monkeypatch, capsys):
    import taxonomist.cli.score as score_cli

    def bug(args):
        return {}["missing key"]
    monkeypatch.setattr(score_cli, "run", bug)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, ["score", "a.csv", "b.csv"])
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: unexpected KeyError: 'missing key' — a bug in taxonomist; its traceback is in ")
    saved = Path(lines[0].split("its traceback is in ", 1)[1].split(" (rerun", 1)[0])
    assert saved.parent == tmp_path / "cache" / "taxonomist" / "errors"
    text = saved.read_text()
    assert "taxonomist score a.csv b.csv" in text and "Traceback (most recent call last)" in text
    assert "KeyError: 'missing key'" in text
    with pytest.raises(KeyError):  # --debug shows everything
        main(["--debug", "score", "a.csv", "b.csv"])


def test_the_evaluate_redo_command_trusts_the_code_the_run_itself_was_trained_with(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  backbone: module:my_nets.plankton:build\n")
    assert redo_command(run, "evaluate") == f"taxonomist evaluate {run} --trust-code"
    (run / "config.yaml").write_text("model:\n  backbone: tf_efficientnet_lite0\n")
    assert redo_command(run, "evaluate") == f"taxonomist evaluate {run}"
    (run / "config.yaml").write_text("[[[")       # unreadable: no flag rather than a second failure
    assert redo_command(run, "evaluate") == f"taxonomist evaluate {run}"
