"""`taxonomist sweep`: trials are training runs; failed trials are recorded and the sweep goes on; best.yaml
retrains the best trial; an interrupted study continues; two workers share one embedded study."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage

from taxonomist.config import load_config
from taxonomist.errors import ConfigError
from taxonomist.sweep.run import run_sweep
from taxonomist.sweep.space import parse_space
from taxonomist.train import train

from .conftest import BASE, base_config

VENV_BIN = Path(sys.executable).parent


def read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def grid_sweep(tiny_data, tmp_path_factory):
    """Four trials on a grid: two learning rates × two backbones, of which one does not exist (as a backbone
    that needs a newer timm would): its trials fail."""
    out = tmp_path_factory.mktemp("sweep") / "grid"
    space = parse_space({"train.lr": {"choice": [1e-3, 2e-2]},
                         "model.backbone": {"choice": ["test_efficientnet", "test_no_such_net"]}})
    result = run_sweep(base_config(tiny_data), space, 4, out, sampler="grid", pruner="none", seed=0,
                       progress=False, log=quiet)
    return out, result


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(grid_sweep):
    out, result = grid_sweep
    rows = read_trials(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2", "3"]
    assert list(rows[0]) == ["trial", "state", "mhd", "epochs", "planned_epochs", "seconds", "train.lr",
                             "model.backbone", "run_dir", "note"]
    failed = [r for r in rows if r["state"] == "fail"]
    done = [r for r in rows if r["state"] == "complete"]
    assert [r["model.backbone"] for r in failed] == ["test_no_such_net", "test_no_such_net"]
    assert all(r["note"].startswith("ModelError: unknown backbone 'test_no_such_net'") for r in failed)
    assert all(r["mhd"] == "" for r in failed)
    assert len(done) == 2 and {r["train.lr"] for r in done} == {"0.001", "0.02"}
    for r in done:
        assert r["epochs"] == r["planned_epochs"] == "2" and float(r["seconds"]) > 0
        run = Path(r["run_dir"])
        assert run.parent == out / "trials" and (run / "checkpoints" / "best.safetensors").is_file()
        # the trial's value is its best checkpoint's validation MHD, as training logged it
        with open(run / "metrics.csv", newline="") as f:
            logged = min(float(x["val_mhd"]) for x in csv.DictReader(f))
        assert float(r["mhd"]) == pytest.approx(logged, abs=1e-5)
    assert result.counts() == {"complete": 2, "fail": 2}


def test_a_trial_whose_evaluation_failed_is_ranked_by_its_training_metric(tiny_data, tmp_path, monkeypatch,
                                                                          offline_page):
    """A trial's step after training is its evaluation on the validation rows: when it fails, the trained model
    still counts, ranked by the validation metric training logged for its best epoch, and the note says why."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated evaluation failure")
    monkeypatch.setattr("taxonomist.evaluate.run.evaluate_run", broken)
    out = tmp_path / "failing-eval"
    space = parse_space({"train.lr": {"choice": [1e-3, 2e-2]}})
    result = run_sweep(base_config(tiny_data), space, 2, out, sampler="grid", pruner="none", seed=0,
                       progress=False, log=quiet)
    rows = read_trials(out)
    assert [r["state"] for r in rows] == ["complete", "complete"] and result.counts() == {"complete": 2}
    for r in rows:
        run = Path(r["run_dir"])
        with open(run / "metrics.csv", newline="") as f:
            logged = min(float(x["val_mhd"]) for x in csv.DictReader(f))  # monitor val_mhd: the best epoch's
        assert float(r["mhd"]) == pytest.approx(logged, abs=1e-6)
        assert r["note"].startswith("evaluate failed (RuntimeError: simulated evaluation failure); ranked by the "
                                    "best epoch's val_mhd from training; traceback in ")
        assert "simulated evaluation failure" in (run / "errors.log").read_text()
        assert not (run / "metrics.json").exists() and (run / "checkpoints" / "best.safetensors").is_file()
    best = min(rows, key=lambda r: float(r["mhd"]))
    assert result.best["trial"] == int(best["trial"]) and (out / "best.yaml").is_file()
    html = offline_page((out / "report.html").read_text())
    assert "The best trial has no metrics.json: evaluate failed" in html


def test_best_yaml_is_the_best_trial_and_retrains_to_its_validation_mhd(grid_sweep, offline_page):
    out, result = grid_sweep
    done = [r for r in read_trials(out) if r["state"] == "complete"]
    assert float(done[0]["mhd"]) != float(done[1]["mhd"]), "the trials must differ for this test to mean anything"
    best = min(done, key=lambda r: float(r["mhd"]))
    assert result.best["trial"] == int(best["trial"])
    text = (out / "best.yaml").read_text()
    assert text.startswith(f"# best trial {best['trial']} ")
    cfg = load_config(out / "best.yaml")
    trial_cfg = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    assert cfg.out == str(out / "best")
    assert {**cfg.to_dict(), "out": None} == {**trial_cfg, "out": None}
    assert cfg.train.lr == float(best["train.lr"]) and cfg.model.backbone == "test_efficientnet"

    retrained = train(cfg, progress=False, log=quiet)
    assert retrained.run_dir == out / "best"
    assert retrained.best_metric == pytest.approx(float(best["mhd"]), abs=1e-5)

    html = (out / "report.html").read_text()
    offline_page(html)
    assert html.count("data:image/png;base64,") >= 2  # history and curves (importances need varied values)
    assert re.search(rf'<td>{best["trial"]}</td><td>complete</td><td class="best">', html)
    assert ">species<" in html  # the best run's per-rank table


def test_resume_after_a_killed_worker_repeats_no_finished_trial(tiny_data, tmp_path):
    out, space_file = tmp_path / "resumed", tmp_path / "space.yaml"
    space_file.write_text("train.lr: {loguniform: [1e-3, 3e-2]}\n")
    cmd = [str(VENV_BIN / "taxonomist"), "sweep", "--space", str(space_file), "--trials", "2", "--out", str(out),
           "--pruner", "none", "--seed", "0", "--set", f"data.root={tiny_data}"]
    for pair in BASE:
        cmd += ["--set", pair]
    cmd += ["--set", "train.epochs=5"]  # long enough a trial to kill it midway
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "trials" / "0001" / "metrics.csv").exists():  # trial 0 is done, trial 1 has begun
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_trials(out)
    assert [r["state"] for r in before] == ["complete"]
    first = out / "trials" / "0000" / "metrics.csv"
    stamp = first.stat().st_mtime_ns

    result = run_sweep(base_config(tiny_data), parse_space({"train.lr": {"loguniform": [1e-3, 3e-2]}}), 2, out,
                       pruner="none",
                       progress=False, log=quiet, report=False)
    rows = read_trials(out)
    assert [r["state"] for r in rows] == ["complete", "interrupted", "complete"]
    assert rows[0] == before[0] and first.stat().st_mtime_ns == stamp  # trial 0 was not trained again
    assert len({r["train.lr"] for r in rows}) == 3
    assert result.counts() == {"complete": 2, "interrupted": 1}

    # the total is reached: the same command runs nothing; another metric is another study
    run_sweep(base_config(tiny_data), parse_space({"train.lr": {"loguniform": [1e-3, 3e-2]}}), 2, out,
              progress=False, log=quiet, report=False)
    assert len(read_trials(out)) == 3
    with pytest.raises(ConfigError, match="optimises mhd, not top1"):
        run_sweep(base_config(tiny_data), parse_space({"train.lr": {"loguniform": [1e-3, 3e-2]}}), 2, out,
                  metric="top1", progress=False, log=quiet)


def test_fresh_clone_flow_two_workers_then_train_best_yaml(tmp_path):
    """`data synth`, two concurrent `sweep` workers on the embedded journal (4 trials), then
    `taxonomist train --config OUT/best.yaml` reproduces the best trial's validation MHD."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    exe = str(VENV_BIN / "taxonomist")
    subprocess.run([exe, "data", "synth", "D", "--taxa", "6", "--per-class", "8", "--image-size", "48"],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    (tmp_path / "base.yaml").write_text(
        "data: {root: D, image_size: 32, num_workers: 0}\nmodel: {backbone: test_efficientnet, pretrained: none}\n"
        "augment: {randaugment: '', rotation: 0}\ntrain: {epochs: 2, batch_size: 8, device: cpu, tensorboard: false}\n")
    (tmp_path / "space.yaml").write_text("train.lr: {loguniform: [1e-3, 5e-2]}\nmodel.head: {choice: [flat, multirank]}\n")
    workers = [subprocess.Popen([exe, "sweep", "--config", "base.yaml", "--space", "space.yaml", "--trials", "4",
                                 "--out", "S", "--pruner", "none", "--seed", str(seed)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    for w in workers:
        _, stderr = w.communicate(timeout=300)
        assert w.returncode == 0, stderr
    out = tmp_path / "S"
    rows = read_trials(out)
    # no trial lost or run twice: numbers 0..n-1, each trained once in its own directory, all complete
    assert 4 <= len(rows) <= 5  # a worker may start one trial more when both check the total at one instant
    assert [int(r["trial"]) for r in rows] == list(range(len(rows)))
    assert {r["state"] for r in rows} == {"complete"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:04d}" for i in range(len(rows))]
    for r in rows:
        with open(tmp_path / r["run_dir"] / "metrics.csv", newline="") as f:
            assert [x["epoch"] for x in csv.DictReader(f)] == ["1", "2"]
    study = optuna.load_study(study_name="S", storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers ran trials
    for name in ("best.yaml", "trials.csv", "report.html"):
        assert (out / name).is_file()

    best = min(rows, key=lambda r: (float(r["mhd"]), int(r["trial"])))
    retrain = subprocess.run([exe, "train", "--config", "S/best.yaml", "--no-eval", "--no-calibrate"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert retrain.returncode == 0, retrain.stderr
    printed = re.search(r"best val_mhd ([0-9.]+) at epoch \d+; run directory: (\S+)", retrain.stdout)
    assert printed and Path(printed.group(2)) == Path("S/best")
    assert float(printed.group(1)) == pytest.approx(float(best["mhd"]), abs=1e-4)


def test_on_epoch_exception_stops_training_and_leaves_a_resumable_run(tiny_data, tmp_path):
    """What pruning relies on: the callback sees each epoch's row after it is written, and what it raises
    stops training there and reaches the caller."""
    class Stop(Exception):
        pass

    seen = []

    def on_epoch(epoch, row):
        seen.append((epoch, row["val_mhd"]))
        assert len(read_metrics_rows(tmp_path / "run")) == epoch  # the row is on disk already
        if epoch == 1:
            raise Stop

    cfg = base_config(tiny_data, f"out={tmp_path / 'run'}", "train.epochs=2")
    with pytest.raises(Stop):
        train(cfg, progress=False, log=quiet, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1]
    result = train(cfg, progress=False, log=quiet, resume=True, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2] and len(result.history) == 2


def read_metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))
