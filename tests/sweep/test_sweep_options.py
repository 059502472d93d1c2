"""`taxonomist sweep` options beyond the defaults: a database storage URL (SQLite here; PostgreSQL and MySQL
take the same path through Optuna's RDBStorage), the Hyperband pruner, and `--timeout`."""
from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest

from taxonomist.errors import ConfigError
from taxonomist.sweep.run import run_sweep
from taxonomist.sweep.space import parse_space

from .conftest import base_config

LR = parse_space({"train.lr": {"loguniform": [1e-4, 3e-1]}})


def config(data: Path, epochs: int):
    return base_config(data, f"train.epochs={epochs}")


def states(out: Path) -> list[str]:
    with open(out / "trials.csv", newline="") as f:
        return [row["state"] for row in csv.DictReader(f)]


def test_sqlite_storage_url_holds_the_study_and_continues_it(tiny_data, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    out = tmp_path / "lr"
    first = run_sweep(config(tiny_data, 1), LR, 2, out, storage=url, study_name="lr", pruner="none", seed=0,
                      progress=False, log=lambda _: None, report=False)
    assert [r["state"] for r in first.rows] == ["complete", "complete"]
    assert not (out / "study.journal").exists()            # the database holds the study, not a journal file
    study = optuna.load_study(study_name="lr", storage=url)
    assert [t.number for t in study.trials] == [0, 1] and study.user_attrs["metric"] == "mhd"
    again = run_sweep(config(tiny_data, 1), LR, 3, out, storage=url, study_name="lr", pruner="none", seed=0,
                      progress=False, log=lambda _: None, report=False)
    assert len(again.rows) == 3 and len(optuna.load_study(study_name="lr", storage=url).trials) == 3
    assert (out / "best.yaml").is_file()


def test_an_unopenable_storage_url_is_one_line(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"--storage sqlite:////no/such/folder/s\.db: cannot open"):
        run_sweep(config(tiny_data, 1), LR, 1, tmp_path / "x", storage="sqlite:////no/such/folder/s.db",
                  progress=False, log=lambda _: None)


def test_hyperband_prunes_by_epoch(tiny_data, tmp_path):
    out = tmp_path / "hb"
    result = run_sweep(config(tiny_data, 3), LR, 8, out, pruner="hyperband", seed=0, progress=False,
                       log=lambda _: None, report=False)
    study = optuna.load_study(study_name="hb", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    rows = {r["trial"]: r for r in result.rows}
    assert set(states(out)) <= {"complete", "pruned"} and "pruned" in states(out)
    for trial in study.trials:
        epochs = sorted(trial.intermediate_values)           # one report per finished epoch, 1-based
        assert epochs == list(range(1, len(epochs) + 1))
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert len(epochs) < 3 and rows[trial.number]["epochs"] == len(epochs)
        else:
            assert len(epochs) == 3


def test_timeout_stops_between_trials_and_the_study_continues(tiny_data, tmp_path):
    out, lines = tmp_path / "t", []
    first = run_sweep(config(tiny_data, 1), LR, 5, out, pruner="none", timeout=0.01, seed=0, progress=False,
                      log=lines.append, report=False)
    assert len(first.rows) == 1                               # the deadline is checked before each trial
    assert lines == ["--timeout 0.01 s reached; re-run the command to continue the study"]
    second = run_sweep(config(tiny_data, 1), LR, 2, out, pruner="none", seed=0, progress=False,
                       log=lambda _: None, report=False)
    assert [r["trial"] for r in second.rows] == [0, 1]
    with pytest.raises(ConfigError, match="--timeout 0"):
        run_sweep(config(tiny_data, 1), LR, 1, out, timeout=0, progress=False, log=lambda _: None)
