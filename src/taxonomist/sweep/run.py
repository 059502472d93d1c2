"""Run a sweep: an Optuna study whose trials are ordinary training runs in OUT/trials/NNNN, each reporting its
validation metric every epoch so that Optuna's pruner can stop the poor ones; then trials.csv, best.yaml and
report.html in OUT.

Optuna does the searching (its samplers), the early stopping (its pruners) and the bookkeeping shared by many
processes or machines (its storages); this module only turns a trial into a training run and back.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from taxonomist.config import Config, load_config
from taxonomist.errors import ConfigError
from taxonomist.sweep.space import Parameter, grid, import_optuna, overrides, suggest_values
from taxonomist.utils.files import atomic_write_text

#: --metric → (the metrics.csv column reported each epoch for pruning, the study's direction). The trial's
#: value is the metric of its best checkpoint evaluated on the validation rows (metrics.json); for log_loss
#: the per-epoch signal is the validation loss of the training criterion, the nearest quantity training logs.
METRICS = {"mhd": ("val_mhd", "minimize"), "top1": ("val_top1", "maximize"), "log_loss": ("val_loss", "minimize")}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
JOURNAL = "study.journal"
TRIALS_DIR = "trials"


@dataclass
class SweepResult:
    out_dir: Path
    study_name: str
    metric: str
    direction: str
    rows: list[dict]                       # trials.csv rows, by trial number
    best: dict | None                      # the best complete trial's row
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def step_column(self) -> str:
        """The metrics.csv column that trials report each epoch for `metric` (what the pruner compares)."""
        return METRICS[self.metric][0]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["state"]] = out.get(r["state"], 0) + 1
        return out

    def epochs_saved(self) -> tuple[int, int]:
        """(epochs the pruned trials did not train, epochs all trials would have trained unpruned)."""
        planned = sum(int(r["planned_epochs"] or 0) for r in self.rows if r["state"] in ("complete", "pruned"))
        saved = sum(int(r["planned_epochs"] or 0) - int(r["epochs"] or 0) for r in self.rows if r["state"] == "pruned")
        return saved, planned

    def summary(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        saved, planned = self.epochs_saved()
        lines = [(f"study {self.study_name!r}: {len(self.rows)} trials ({counts or 'none'}); "
                  f"pruning saved {saved} of {planned} epochs")]
        if self.best is not None:
            params = ", ".join(f"{k}={v}" for k, v in self.best["params"].items())
            lines.append(f"best trial {self.best['trial']}: {self.metric} {self.best['value']:.4f} ({params})")
        for name, path in self.files.items():
            lines.append(f"{name}: {path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- storage
def _redact(url: str) -> str:
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


def open_storage(storage: str | None, out_dir: Path):
    """The embedded default (an Optuna journal file in OUT, safe for several processes on one disk), a
    journal file at a given path, or a database URL (`sqlite:///…`, `postgresql://…`, `mysql://…`)."""
    optuna = import_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    if storage and "://" in storage:
        import warnings
        try:
            # a heartbeat marks the trials of a machine that died as failed, so that they are run again
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, heartbeat_interval=60, grace_period=180)
        except ImportError:
            raise ConfigError(f"--storage {_redact(storage)}: the database driver is not installed "
                              "(e.g. pip install psycopg2-binary for postgresql://)") from None
        except Exception as e:  # sqlalchemy: bad URL, server unreachable, wrong password
            raise ConfigError(f"--storage {_redact(storage)}: cannot open ({str(e).splitlines()[0]})") from None
    path = Path(storage) if storage else out_dir / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Trials left `running` by a process of this machine that no longer exists (killed, power cut) are
    marked failed and `interrupted`, so they do not count as finished; database storages do the same for
    every machine through their heartbeat."""
    from optuna.trial import TrialState
    host, dead = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") == host and isinstance(pid, int) and pid != os.getpid() and \
                not _process_alive(pid):
            study.tell(t.number, state=TrialState.FAIL)  # no `error` attribute: shown as interrupted
            dead.append(t.number)
    return dead


def counts_toward_total(trial) -> bool:
    """Finished trials (complete, pruned, failed by an error) and the ones running now count toward
    --trials; an interrupted trial does not, so a re-run replaces it."""
    from optuna.trial import TrialState
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


# ---------------------------------------------------------------------------------------------- study
def _sampler(name: str, params: list[Parameter], seed: int | None):
    optuna = import_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(grid(params), seed=seed)
    raise ConfigError(f"--sampler {name!r}: choose {', '.join(SAMPLERS)}")


def _pruner(name: str, params: list[Parameter], base: Config):
    optuna = import_optuna()
    if name == "median":
        # the first 3 trials run to the end to set the bar; no trial is judged on its first epoch alone
        # (steps are 1-based epochs; Optuna prunes from step == n_warmup_steps)
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        epochs = next((p for p in params if p.key == "train.epochs"), None)
        max_epochs = base.train.epochs if epochs is None else (
            max(epochs.distribution.choices) if epochs.kind == "choice" else epochs.distribution.high)
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(max_epochs)), reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {name!r}: choose {', '.join(PRUNERS)}")


def open_study(storage, name: str, metric: str, sampler, pruner, embedded: bool):
    """Create the study, or load it to continue; a study made for another metric is an error."""
    optuna = import_optuna()
    direction = METRICS[metric][1]
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if embedded and existing and name not in existing:
        raise ConfigError(f"the sweep's storage holds study {', '.join(sorted(existing))}, not {name!r}; "
                          f"pass --study {sorted(existing)[0]} to continue it, or use another --out")
    if name in existing:
        had = existing[name].user_attrs.get("metric")
        if had and had != metric:
            raise ConfigError(f"study {name!r} optimises {had}, not {metric}; pass --metric {had} or a new --study")
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} was created to {study.direction.name.lower()}; "
                          f"--metric {metric} needs {direction}")
    if "metric" not in study.user_attrs:
        study.set_user_attr("metric", metric)
    return study


def trial_config(base: Config, values: dict[str, Any], run_dir: Path) -> Config:
    """The base config with the trial's values and its own run directory."""
    return load_config(None, overrides(values) + [f"out={run_dir}"], base=base.to_dict())


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def training_value(trained, metric: str) -> float:
    """`metric` as training logged it for the best checkpoint's epoch (metrics.csv): the value of a trial whose
    evaluation after training failed. For log_loss that is the validation loss of the training criterion."""
    column = METRICS[metric][0]
    row = next((r for r in trained.history if int(r["epoch"]) == trained.best_epoch), None)
    if row is None and trained.best_epoch == 0 and trained.warmup_metrics:  # the warmed-up head stayed the best
        row = trained.warmup_metrics
    if row is None:
        raise FloatingPointError(f"no epoch of the training holds {column}")
    return float(row[column])


class PruneTrial:
    """The sweep's training callback (`train.callbacks.Callback`, its `on_epoch_end` only): reports each epoch's
    `column` to the trial and stops a trial the pruner gives up on (`optuna.TrialPruned`, which leaves its run
    directory resumable)."""

    def __init__(self, trial, column: str, epochs: int):
        self.trial, self.column, self.epochs = trial, column, epochs

    def on_epoch_end(self, run, row: dict) -> None:
        epoch = int(row["epoch"])
        self.trial.report(float(row[self.column]), epoch)
        # after the last epoch there is nothing left to save: the trial completes and keeps its value
        # (Hyperband would otherwise mark a fully trained trial as pruned, out of the ranking)
        if epoch < self.epochs and self.trial.should_prune():
            optuna = import_optuna()
            raise optuna.TrialPruned(f"{self.column} {row[self.column]:.4f} after epoch {epoch}")


def make_objective(base: Config, params: list[Parameter], out_dir: Path, metric: str, log: Callable[[str], None]):
    """The function Optuna calls for a trial: `taxonomist.fit` without calibration and report — one training run,
    then an evaluation of its best checkpoint on the validation rows; the value is `metric` from that evaluation."""
    optuna = import_optuna()
    step_column = METRICS[metric][0]

    def objective(trial) -> float:
        from taxonomist.pipeline import fit

        values = suggest_values(trial, params)
        run_dir = out_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            cfg = trial_config(base, values, run_dir)
            trial.set_user_attr("planned_epochs", cfg.train.epochs)

            pruning = PruneTrial(trial, step_column, cfg.train.epochs)

            def train_log(message: str) -> None:
                if message.startswith("warning"):
                    log(f"trial {trial.number}: {message}")

            done = fit(cfg, calibrate=False, report=False, split="val", log=train_log, callbacks=[pruning])
            trained = done.training
            if done.failure is None:
                value = float(done.evaluation.metrics[metric])
            else:  # the model is trained: rank it by what training measured on the same validation rows
                value = training_value(trained, metric)
                note = (f"{done.failure.step} failed ({done.failure.error}); ranked by the best epoch's "
                        f"{METRICS[metric][0]} from training; traceback in {done.failure.log}")
                trial.set_user_attr("failed_step", done.failure.step)
                trial.set_user_attr("error_note", note)
                log(f"trial {trial.number}: {note}")
            if not math.isfinite(value):
                raise FloatingPointError(f"validation {metric} is {value}")
            return value
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:  # out of memory, a NaN loss, a value the model rejects: this trial fails
            trial.set_user_attr("error", _one_line(e))
            raise
    return objective


# ---------------------------------------------------------------------------------------------- outputs
def trial_rows(study, metric: str) -> list[dict]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        state = t.state.name.lower()
        if state == "fail" and "error" not in t.user_attrs:  # Ctrl-C, a killed process, a lost machine
            state = "interrupted"
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append({
            "trial": t.number, "state": state, "value": t.value if t.state.name == "COMPLETE" else None,
            "epochs": len(t.intermediate_values), "planned_epochs": t.user_attrs.get("planned_epochs"),
            "seconds": seconds, "params": dict(t.params), "run_dir": t.user_attrs.get("run_dir", ""),
            "note": t.user_attrs.get("error", t.user_attrs.get("error_note", "")),
            "intermediate": dict(sorted(t.intermediate_values.items())),
        })
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_trials_csv(rows: list[dict], params: list[str], metric: str, path: Path) -> Path:
    """One row per trial: number, state, metric, epochs trained and planned, wall time, parameters, run dir."""
    columns = ["trial", "state", metric, "epochs", "planned_epochs", "seconds", *params, "run_dir", "note"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r["trial"], r["state"], _fmt(r["value"]), r["epochs"], _fmt(r["planned_epochs"]),
                    _fmt(None if r["seconds"] is None else round(r["seconds"], 2)),
                    *(_fmt(r["params"].get(p)) for p in params), r["run_dir"], r["note"]])
    return atomic_write_text(path, buf.getvalue())


def best_row(rows: list[dict], direction: str) -> dict | None:
    done = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if not done:
        return None
    sign = 1.0 if direction == "minimize" else -1.0
    return min(done, key=lambda r: (sign * r["value"], r["trial"]))


def write_best_yaml(best: dict, base: Config, out_dir: Path, study_name: str, metric: str) -> Path:
    """The best trial's full config (its run's config.yaml when on this machine) with `out` set to
    OUT/best, a fresh run directory: `taxonomist train --config OUT/best.yaml` retrains the best trial."""
    run_cfg = Path(best["run_dir"]) / "config.yaml" if best["run_dir"] else None
    if run_cfg is not None and run_cfg.is_file():
        cfg = load_config(run_cfg)
    else:
        cfg = trial_config(base, best["params"], Path(best["run_dir"] or out_dir / TRIALS_DIR))
    cfg.out = str(out_dir / "best")
    header = (f"# best trial {best['trial']} of study {study_name!r}: validation {metric} {best['value']:.6g}\n"
              f"# trained in {best['run_dir']}; `out` points to a fresh run directory, so that\n"
              f"# `taxonomist train --config {out_dir / 'best.yaml'}` retrains it (same seed: same result on CPU)\n")
    return atomic_write_text(out_dir / "best.yaml", header + cfg.to_yaml())


# ---------------------------------------------------------------------------------------------- the sweep
def run_sweep(base: Config, params: list[Parameter], n_trials: int, out_dir: str | Path, storage: str | None = None,
              study_name: str | None = None, sampler: str = "tpe", pruner: str = "median", metric: str = "mhd",
              timeout: float | None = None, seed: int | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, report: bool = True) -> SweepResult:
    """Run trials until the study holds `n_trials` finished (or running) trials, then write trials.csv, best.yaml
    and report.html into `out_dir`. Re-running continues the study; several processes may run at once.

    >>> from taxonomist.sweep.space import parse_space                                     # doctest: +SKIP
    >>> space = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}})                   # doctest: +SKIP
    >>> run_sweep(load_config("base.yaml"), space, 8, "sweeps/lr").summary()              # doctest: +SKIP
    """
    optuna = import_optuna()
    from optuna.trial import TrialState
    from tqdm import tqdm

    log = log or (lambda message: print(message, file=sys.stderr))
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: choose {', '.join(METRICS)}")
    if n_trials < 1:
        raise ConfigError(f"--trials {n_trials}: give at least 1")
    if timeout is not None and timeout <= 0:
        raise ConfigError(f"--timeout {timeout}: give a number of seconds > 0")
    if not base.data.root:
        raise ConfigError("data.root is not set: give it in --config or --set data.root=DATASET_DIR")
    if not Path(base.data.root).is_dir():
        raise ConfigError(f"data.root {base.data.root}: dataset directory not found")
    out_dir = Path(out_dir)
    sampler_obj = _sampler(sampler, params, seed)
    pruner_obj = _pruner(pruner, params, base)
    for p in params:  # every value reaches a valid config (the type checks ran when the space was read)
        trial_config(base, {p.key: (p.distribution.choices[0] if p.kind == "choice" else p.distribution.low)},
                     out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = study_name or out_dir.resolve().name
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial below instead of Optuna's log
    study = open_study(open_storage(storage, out_dir), name, metric, sampler_obj, pruner_obj,
                       embedded=not (storage and "://" in storage))
    dead = fail_dead_trials(study)
    if dead:
        log(f"trials {', '.join(map(str, dead))} were interrupted (their process is gone); they will be run again")
    if sampler == "grid":
        size = math.prod(len(v) for v in grid(params).values())
        if n_trials > size:
            log(f"--sampler grid: the grid has {size} points; running {size} trials, not {n_trials}")
            n_trials = size
    keys = [p.key for p in params]
    for t in study.get_trials(deepcopy=False):  # a study continued with a wider space keeps its old columns
        keys += [k for k in t.params if k not in keys]
    objective = make_objective(base, params, out_dir, metric, log)

    def counted() -> int:
        return sum(counts_toward_total(t) for t in study.get_trials(deepcopy=False))

    bar = tqdm(total=n_trials, initial=min(n_trials, counted()), desc=f"sweep {name}", unit="trial",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def after_trial(study_, trial) -> None:
        if trial.state == TrialState.COMPLETE:
            text = f"{metric} {trial.value:.4f}"
        elif trial.state == TrialState.PRUNED:
            text = f"pruned after {len(trial.intermediate_values)} epoch(s)"
        else:
            text = f"failed: {trial.user_attrs.get('error', 'interrupted')}"
        params_text = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        tqdm.write(f"trial {trial.number}: {text}  ({params_text})", file=sys.stderr)
        bar.n = min(n_trials, counted())
        bar.refresh()
        write_trials_csv(trial_rows(study_, metric), keys, metric, out_dir / "trials.csv")

    deadline = time.time() + timeout if timeout else None
    try:
        while counted() < n_trials:
            if deadline is not None and time.time() >= deadline:
                log(f"--timeout {timeout:g} s reached; re-run the command to continue the study")
                break
            if sampler == "grid" and sampler_obj.is_exhausted(study):
                break
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after_trial],
                           gc_after_trial=True)
    finally:
        bar.close()
        rows = trial_rows(study, metric)
        files = {"trials": write_trials_csv(rows, keys, metric, out_dir / "trials.csv")}
    best = best_row(rows, METRICS[metric][1])
    result = SweepResult(out_dir, name, metric, METRICS[metric][1], rows, best, files)
    if best is not None:
        files["best config"] = write_best_yaml(best, base, out_dir, name, metric)
    else:
        log("no trial completed: no best.yaml")
    if report:
        from taxonomist.sweep.report import write_sweep_report
        files["report"] = write_sweep_report(study, result, out_dir / "report.html")
    return result


__all__ = ["run_sweep", "SweepResult", "open_storage", "trial_config", "METRICS", "SAMPLERS", "PRUNERS"]
