"""Train → calibrate → evaluate → report, as `taxonomist train` runs it, callable from Python as `fit(cfg)`.

Training writes its checkpoints, metrics.csv and config.yaml as it goes. The steps after it are guarded one by
one, so that a failure there never loses or hides a finished model: the step's traceback goes to RUN/errors.log,
RUN/run.json records which step failed and the one command that redoes it, and `FitResult.failure` says the same
(`raise_for_failure()` turns it into a `PostTrainingError`, exit status 3 at the command line).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from taxonomist.config import Config
from taxonomist.errors import PostTrainingError
from taxonomist.utils.run_status import STATUS_FILE, log_error, read_status, update_status

if TYPE_CHECKING:
    from taxonomist.train.callbacks import Callback

#: the steps after training, in the order they run; each needs the ones before it
POST_TRAINING_STEPS = ("calibrate", "evaluate", "report")


@dataclass
class StepFailure:
    """A step after training that failed: which, why (one line), where its traceback is, how to redo it."""
    step: str
    error: str
    log: Path
    redo: str

    def message(self, run_dir: Path) -> str:
        best = Path(run_dir) / "checkpoints" / "best.safetensors"
        return (f"training finished and its model is saved ({best}), but the {self.step} step after it failed: "
                f"{self.error} — traceback in {self.log}; redo the step with: {self.redo}")


@dataclass
class FitResult:
    """What `fit` did: the training result, then whatever the steps after it produced before any failure."""
    run_dir: Path
    training: object                               # train.TrainResult, or train.kfold.KFoldResult
    calibrations: list = field(default_factory=list)
    evaluation: object = None                      # evaluate.run.Evaluation
    report: Path | None = None
    failure: StepFailure | None = None

    def raise_for_failure(self) -> None:
        if self.failure is not None:
            raise PostTrainingError(self.failure.message(self.run_dir), step=self.failure.step,
                                    redo=self.failure.redo, log=self.failure.log)


def redo_command(run_dir: str | Path, step: str) -> str:
    """The command that redoes `step` of a run and every step after it."""
    run = Path(run_dir)
    q = shlex.quote
    if step == "calibrate":  # a run whose training finished resumes straight into the steps after it
        return f"taxonomist train --config {q(str(run / 'config.yaml'))} --resume"
    if step == "evaluate":   # evaluate writes the report too
        return f"taxonomist evaluate {q(str(run))}" + (" --trust-code" if _names_code(run) else "")
    if step == "report":
        return f"taxonomist report {q(str(run))} --out {q(str(run / 'report.html'))}"
    raise ValueError(f"unknown step {step!r}")


def _names_code(run: Path) -> bool:
    """Whether the run's own config trains a backbone that imports code (`module:…`): evaluating its checkpoint
    again then needs `--trust-code`, which the user may give for a run they trained themselves."""
    from taxonomist.errors import TaxonomistError
    from taxonomist.models.backbones import code_named_by
    from taxonomist.utils.safe_parse import read_yaml
    try:
        cfg = read_yaml(run / "config.yaml")
    except TaxonomistError:
        return False
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and code_named_by(str(model.get("backbone", ""))) is not None


def one_line_error(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, cut to `limit` characters (a message may quote a huge value)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _is_run(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() or (run_dir / STATUS_FILE).is_file()


def record_step_done(run_dir: str | Path, step: str) -> None:
    """Note in RUN/run.json that `step` completed; when it is the step that had failed, the run is whole again.
    A folder that is not a run directory (e.g. an `evaluate --out` folder) gets no run.json."""
    run_dir = Path(run_dir)
    if not _is_run(run_dir):
        return
    status = read_status(run_dir)
    steps = [s for s in status.get("steps", []) if isinstance(s, str) and s != step] + [step]
    mended = {"status": "finished", "failed_step": None, "error": None, "redo": None}
    update_status(run_dir, steps=steps, **(mended if status.get("failed_step") == step else {}))


def run_step(run_dir: str | Path, step: str, action: Callable[[], object]) -> tuple[object, StepFailure | None]:
    """Run `action` as `step` of the run: (its value, None), or on an exception (None, the failure), with the
    traceback appended to RUN/errors.log and the failure recorded in RUN/run.json. Ctrl-C is not caught."""
    run_dir = Path(run_dir)
    try:
        value = action()
    except Exception as e:  # noqa: BLE001 — any failure here must leave the trained model usable
        log = log_error(run_dir, step, e)
        failure = StepFailure(step, one_line_error(e), log, redo_command(run_dir, step))
        if _is_run(run_dir):
            update_status(run_dir, status="post-training failed", failed_step=step, error=failure.error,
                          redo=failure.redo)
        return None, failure
    record_step_done(run_dir, step)
    return value, None


def finish_run(run_dir: str | Path, cfg: Config, steps: Sequence[str] = POST_TRAINING_STEPS, split: str = "test",
               progress: bool = False, log: Callable[[str], None] = print) -> FitResult:
    """Run the steps after training on a trained run directory, stopping at the first that fails.

    `calibrate` fits the temperature and OOD scores of the best and last checkpoints; `evaluate` evaluates the
    best checkpoint on `split` (metrics.json, predictions.csv); `report` writes report.html from them.
    """
    unknown = [s for s in steps if s not in POST_TRAINING_STEPS]
    if unknown:
        raise ValueError(f"unknown post-training step(s) {unknown}; choose from {POST_TRAINING_STEPS}")
    from taxonomist.models.backbones import chosen_by_user
    with chosen_by_user(cfg.model.backbone):  # the checkpoints of the user's own config, not a stranger's file
        return _finish_run(Path(run_dir), cfg, steps, split, progress, log)


def _finish_run(run_dir: Path, cfg: Config, steps: Sequence[str], split: str, progress: bool,
                log: Callable[[str], None]) -> FitResult:
    result = FitResult(run_dir, training=None)
    device, batch, workers = cfg.train.device, cfg.train.batch_size, cfg.data.num_workers

    def calibrate():
        from taxonomist.inference.calibrate import calibrate_run
        out = calibrate_run(run_dir, device=device, batch_size=batch, num_workers=workers, progress=progress,
                            model_ood=cfg.decide.model_ood)
        for calibration in out:
            log(calibration.summary())
        return out

    def evaluate():
        from taxonomist.evaluate.run import evaluate_run
        ev = evaluate_run(run_dir, split=split, device=device, batch_size=batch, num_workers=workers,
                          progress=progress)
        log(ev.summary())
        return ev

    def report():
        from taxonomist.report import write_report
        path = write_report([run_dir], run_dir / "report.html")
        log(f"report: {path}")
        return path

    actions = {"calibrate": calibrate, "evaluate": evaluate, "report": report}
    for step in POST_TRAINING_STEPS:
        if step not in steps:
            continue
        value, result.failure = run_step(run_dir, step, actions[step])
        if result.failure is not None:
            break
        if step == "calibrate":
            result.calibrations = value
        elif step == "evaluate":
            result.evaluation = value
        else:
            result.report = value
    if steps and result.failure is None and _is_run(run_dir):
        update_status(run_dir, status="finished", failed_step=None, error=None, redo=None)
    return result


def _trained_result(run_dir: Path, cfg: Config):
    """The `TrainResult` of a run whose training finished, read back from run.json and metrics.csv."""
    from taxonomist.train import TrainResult
    from taxonomist.train.loop import load_history
    status = read_status(run_dir)
    history = [{**row, "epoch": int(row["epoch"])} for row in load_history(run_dir)]
    return TrainResult(run_dir, int(status.get("best_epoch", -1)), float(status.get("best_metric", "nan")),
                       str(status.get("monitor", cfg.train.monitor)), history, [])


def training_finished(run_dir: str | Path, cfg: Config) -> bool:
    """True when the run in `run_dir` trained to the end of `cfg`'s epochs (its run.json says so)."""
    status = read_status(run_dir)
    return (status.get("status") in ("trained", "finished", "post-training failed")
            and status.get("epochs") == cfg.train.epochs and (Path(run_dir) / "metrics.csv").is_file()
            and (Path(run_dir) / "checkpoints" / "best.safetensors").is_file())


def fit(cfg: Config, *, resume: bool = False, kfold: bool = False, calibrate: bool = True, evaluate: bool = True,
        report: bool = True, split: str = "test", progress: bool = False, force: bool = False,
        log: Callable[[str], None] = print, on_epoch: Callable[[int, dict], None] | None = None,
        callbacks: Sequence[Callback] = ()) -> FitResult:
    """Train as `cfg` says, then calibrate, evaluate the best checkpoint on `split` and write the report: what
    `taxonomist train` does (it calls this), also as `taxonomist.fit`.

    A step after training that fails does not raise: `FitResult.failure` names it, its traceback is in
    RUN/errors.log, and the trained model stays in RUN/checkpoints (call `raise_for_failure()` to raise it as a
    `PostTrainingError`). With `resume`, a run that already trained to the end goes straight to those steps.
    With `kfold`, one run per fold is trained and calibrated (`OUT/fold_K`), and nothing is evaluated.
    `cfg.out` must be new, empty or a taxonomist run; `force` trains into another existing folder
    (`train.loop.check_run_out`). `callbacks` (`train.callbacks.Callback`) watch training and may stop it after an
    epoch; `on_epoch(epoch, row)` is the short form of one, called after each epoch (a sweep reports to its
    pruner there). Neither with `kfold`.

    >>> from taxonomist.config import load_config                                            # doctest: +SKIP
    >>> result = fit(load_config(None, ["data.root=data/synth", "out=runs/first"]))         # doctest: +SKIP
    >>> result.raise_for_failure(); result.evaluation.metrics["mhd"]                         # doctest: +SKIP
    """
    from taxonomist.models.backbones import chosen_by_user
    with chosen_by_user(cfg.model.backbone):  # the user's config chose it: a `module:` backbone needs no flag here
        return _fit(cfg, resume=resume, kfold=kfold, calibrate=calibrate, evaluate=evaluate, report=report,
                    split=split, progress=progress, force=force, log=log, on_epoch=on_epoch, callbacks=callbacks)


def _fit(cfg: Config, *, resume: bool, kfold: bool, calibrate: bool, evaluate: bool, report: bool, split: str,
         progress: bool, force: bool, log: Callable[[str], None], on_epoch, callbacks) -> FitResult:
    from taxonomist.runtime import is_main_process
    from taxonomist.train.loop import check_run_out

    if kfold and on_epoch is not None:
        raise ValueError("fit: on_epoch is not supported with kfold")
    if kfold and callbacks:
        raise ValueError("fit: callbacks are not supported with kfold")
    run_dir = check_run_out(cfg, resume=resume, force=force, kfold=kfold)  # before any step reads or writes
    steps = [s for s, on in zip(POST_TRAINING_STEPS, (calibrate, evaluate, evaluate and report)) if on]
    if kfold:
        from taxonomist.train.kfold import train_kfold
        folds = train_kfold(cfg, progress=progress, resume=resume, log=log)
        log(folds.summary())
        result = FitResult(run_dir, training=folds)
        if calibrate:
            for fold in folds.folds:
                done = finish_run(fold.run_dir, cfg, ("calibrate",), progress=progress, log=log)
                result.calibrations += done.calibrations
                if done.failure is not None:
                    result.run_dir, result.failure = fold.run_dir, done.failure
                    break
        return result
    if resume and training_finished(run_dir, cfg):
        trained = _trained_result(run_dir, cfg)
        log(f"{run_dir}: training already finished ({trained.history[-1]['epoch'] if trained.history else 0} "
            f"epochs); running the steps after it: {', '.join(steps) or 'none'}")
    else:
        from taxonomist.train import train
        trained = train(cfg, progress=progress, resume=resume, log=log, force=force, on_epoch=on_epoch,
                        callbacks=callbacks)
        if not is_main_process():  # one process of several: rank 0 does the rest
            return FitResult(run_dir, training=trained)
        log(f"best {trained.monitor} {trained.best_metric:.4f} at epoch {trained.best_epoch}; "
            f"run directory: {trained.run_dir}")
    result = finish_run(run_dir, cfg, steps, split=split, progress=progress, log=log)
    result.training = trained
    return result


__all__ = ["fit", "finish_run", "run_step", "record_step_done", "redo_command", "FitResult", "StepFailure", "POST_TRAINING_STEPS",
           "training_finished"]
