"""Calibrate a trained checkpoint: temperature on the validation rows, OOD scorers on the training rows.

Writes `FILE.ood.safetensors` beside the checkpoint and adds `temperature`, `calibration` and `ood` to its JSON.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from taxonomist.config import Config, load_config
from taxonomist.data.dataset import load_dataset
from taxonomist.card import CalibrationInfo, ModelCard, OODInfo
from taxonomist.decide import (OOD_METHODS, OODScorer, apply_temperature, build_ood_scorer, check_tpr,
                               expected_calibration_error, load_ood_scorer)
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.inference.model_file import ood_path
from taxonomist.taxonomy import suggest
from taxonomist.models.checkpoint import metadata_path, read_card, resolve_checkpoint, write_card
from taxonomist.utils.files import atomic_path, file_sha256

#: Known-data TPRs whose thresholds are stored in the metadata; other values are computed from the stored scores.
TPR_LEVELS = (0.8, 0.85, 0.9, 0.95, 0.975, 0.99)
#: Key suffix of the sorted validation scores in the OOD file (the rest of `<method>/…` is the scorer's state).
VAL_SCORES_KEY = "val_known_scores"
#: Training features the kNN score keeps (seeded subset): 20,000 × 1,280 float32 is 100 MB.
KNN_MAX_BANK = 20_000


@dataclass
class Calibration:
    """What `calibrate_checkpoint` fitted and wrote."""

    checkpoint: Path
    temperature: float
    ece_before: float
    ece_after: float
    n_val: int
    n_train: int
    ood_file: Path | None
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    reused_from: Path | None = None
    model_methods: tuple[str, ...] = ()     # of `thresholds`, those fitted with the model on the val rows
    objective: str = "nll"                  # what the temperature was fitted for (decide.temperature)
    nll_before: float = math.nan
    nll_after: float = math.nan

    def summary(self) -> str:
        how = f" (same weights as {self.reused_from.name})" if self.reused_from else f" in {self.seconds:.1f} s"
        line = (f"calibrated {self.checkpoint.name}: temperature {self.temperature:.3f} (fitted for "
                f"{self.objective}), val log loss {self.nll_before:.4f} → {self.nll_after:.4f}, top-1 ECE "
                f"{self.ece_before:.4f} → {self.ece_after:.4f} (n={self.n_val})")
        if self.ece_after > self.ece_before + 1e-4:
            # not a broken calibration: the fit serves the whole distribution (or the decision), not the top label
            line += (" [the top-1 ECE rose: the temperature serves the log loss of all labels, or the decision, "
                     "not the top label's confidence; common after label smoothing, see docs/decisions.md]")
        fitted = [m for m in self.thresholds if m not in self.model_methods]
        if fitted:
            line += f"; OOD scores {', '.join(fitted)} fitted on {self.n_train} training images"
        if self.model_methods:
            line += f"; {', '.join(self.model_methods)} thresholds from the val images"
        return line + how


def known_threshold(known_scores: np.ndarray, tpr: float) -> float:
    """The lowest threshold t that keeps at least `tpr` of the known examples (kept = score < t).

    The flagging rule is `decide.ood`'s: flagged (unknown) when score ≥ t. `decide.threshold_for_tpr` sets t
    from labelled *unknowns* (TPR = unknowns flagged); at predict time no unknowns are labelled, so
    `--ood-tpr 0.95` means a TPR on *known* data: at most 5 % of the known validation examples are flagged.
    t is the next float above the ⌈tpr·n⌉-th smallest known score.

    >>> known_threshold(np.arange(1.0, 21.0), 0.95) > 19.0, known_threshold(np.arange(1.0, 21.0), 0.95) < 19.01
    (True, True)
    """
    s = np.sort(np.asarray(known_scores, dtype=np.float64).ravel())
    if len(s) == 0 or not np.isfinite(s).all():
        raise DataError("known_scores must be a non-empty array of finite scores")
    tpr = check_tpr(tpr)
    k = min(len(s), max(1, math.ceil(tpr * len(s) - 1e-9)))  # the slack keeps 0.95 × 20 from rounding to 20
    return float(np.nextafter(s[k - 1], np.inf))


def _tpr_key(tpr: float) -> str:
    return f"{float(tpr):g}"


def _methods(ood_methods: Sequence[str] | None) -> list[str]:
    methods = list(dict.fromkeys(ood_methods or ()))
    for m in methods:
        if m not in OOD_METHODS:
            raise ConfigError(f"unknown OOD method {m!r}{suggest(str(m), OOD_METHODS)}; "
                              f"choose from {', '.join(OOD_METHODS)}")
    return methods




def _run_config(ckpt: Path, data: str | Path | None) -> Config:
    """The training run's config (for its train/val split) when the checkpoint sits in a run directory."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    cfg_file = run_dir / "config.yaml" if run_dir else None
    cfg = load_config(cfg_file if cfg_file is not None and cfg_file.is_file() else None)
    if data is not None:
        cfg.data.root = str(data)
    if not cfg.data.root:
        raise DataError(f"{ckpt}: no run directory config.yaml names its dataset; pass data=DATASET")
    return cfg


def calibrate_checkpoint(checkpoint_or_run: str | Path, data: str | Path | None = None, device: str = "auto",
                         ood_methods: Sequence[str] | None = OOD_METHODS, batch_size: int = 64,
                         num_workers: int = -1, progress: bool = False, model_ood: Sequence[str] = (),
                         model_ood_options: Mapping[str, dict] | None = None) -> Calibration:
    """Fit the temperature and the OOD scorers of one checkpoint (a run directory means its best checkpoint).

    1. Rebuild the run's train/val rows (`data.split.split_rows` with the run's config.yaml; `data` overrides
       its dataset directory).
    2. Run the model over the val rows (eval transforms): fit the temperature (`decide.fit_temperature`) and
       measure the top-1 ECE before and after it.
    3. Run it over the train rows (eval transforms, no augmentation): fit each OOD scorer on the features and
       logits (`msp` with the fitted temperature); score the val rows with it and keep their sorted scores.
    4. Write `FILE.ood.safetensors` (keys `<method>/<state key>` and `<method>/val_known_scores`) and add to
       the checkpoint JSON, atomically: `temperature`, `calibration: {ece_before, ece_after, n_val}`,
       `ood: {file, methods, n_train, n_val, thresholds: {method: {tpr: t}}}` for the TPRs in `TPR_LEVELS`
       (see `known_threshold`). `ood_methods=()` skips steps 3–4.
    5. `model_ood` (`odin`, `mc-dropout`; `inference.ood_model`): scores that need the model, not statistics.
       Each is run over the val rows (options per method in `model_ood_options`, else the defaults); their
       sorted scores and thresholds are stored like the others, and `ood.model_methods` records the options,
       so that `predict --ood odin` scores new images exactly as the threshold was fitted.
    """
    from taxonomist.inference.model_file import load_model
    from taxonomist.data.split import split_rows
    from taxonomist.runtime import configure_threads, select_device
    from taxonomist.inference.run_model import infer_rows

    start = time.time()
    from taxonomist.inference.ood_model import check_model_ood

    methods = _methods(ood_methods)
    extra_methods = check_model_ood(model_ood, model_ood_options)
    ckpt = resolve_checkpoint(checkpoint_or_run)
    cfg = _run_config(ckpt, data)
    dev = select_device(device)
    configure_threads(0, dev, num_workers)
    model, card, taxonomy = load_model(ckpt, device=str(dev))
    label_index = card.label_index
    dataset = load_dataset(cfg.data.root, taxonomy)
    train_rows, val_rows = split_rows(dataset, cfg)
    if val_rows.empty:
        raise DataError(f"{dataset.root}: no validation rows to fit the temperature on")
    common = dict(device=dev, label_index=label_index, batch_size=batch_size, num_workers=num_workers,
                  progress=progress)
    val = infer_rows(model, card, dataset, val_rows, desc="calibrate (val)", **common).result
    if len(val.targets) == 0:
        raise DataError(f"{dataset.root}: every validation image was unreadable")
    objective = cfg.decide.temperature
    temperature = _fit_temperature(val.logits, val.targets, objective, taxonomy, cfg, card)
    ece, nll = {}, {}
    for key, t in (("before", 1.0), ("after", temperature)):
        p = apply_temperature(val.logits.astype(np.float64), t)
        ece[key] = expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == val.targets)
        nll[key] = float(-np.log(np.maximum(p[np.arange(len(p)), val.targets], 1e-300)).mean())

    thresholds: dict[str, dict[str, float]] = {}
    tensors: dict[str, np.ndarray] = {}
    ood_file, n_train = None, 0
    if methods:
        train = infer_rows(model, card, dataset, train_rows, desc="calibrate (train features)", **common).result
        n_train = len(train.targets)
        if n_train == 0:
            raise DataError(f"{dataset.root}: every training image was unreadable")
        for method in methods:
            options = {"temperature": temperature} if method == "msp" else {}
            if method == "knn":  # k = 10 (Sun et al.), fewer only for toy training sets
                options = {"k": min(10, n_train), "max_bank": KNN_MAX_BANK}
            scorer = build_ood_scorer(method, **options).fit(train.features, train.logits, train.targets)
            val_scores = np.sort(scorer.score(val.features, val.logits))
            for key, value in scorer.state_dict().items():
                tensors[f"{method}/{key}"] = np.ascontiguousarray(np.asarray(value))
            tensors[f"{method}/{VAL_SCORES_KEY}"] = val_scores.astype(np.float64)
            thresholds[method] = {_tpr_key(t): known_threshold(val_scores, t) for t in TPR_LEVELS}
    model_options: dict[str, dict] = {}
    for method, options in extra_methods.items():
        from taxonomist.inference.ood_model import model_ood_rows

        result = model_ood_rows(method, model, card, dataset, val_rows, dev, label_index, options, temperature,
                                batch_size, num_workers, progress=progress)
        val_scores = np.sort(result.scores)
        tensors[f"{method}/{VAL_SCORES_KEY}"] = val_scores.astype(np.float64)
        thresholds[method] = {_tpr_key(t): known_threshold(val_scores, t) for t in TPR_LEVELS}
        model_options[method] = result.extra
    stored = methods + list(extra_methods)
    if stored:
        ood_file = ood_path(ckpt)
        _save_ood(ood_file, tensors, stored, ckpt.name)

    card = read_card(ckpt)  # re-read: write back what is on disk plus the calibration
    ood = None
    if stored:
        ood = OODInfo(ood_file.name, tuple(methods), n_train, len(val.targets),
                      "score >= threshold; thresholds[method][tpr] keeps at least tpr of the known validation "
                      "examples below it", thresholds, model_options)
    write_card(ckpt, card.replace(
        temperature=float(temperature), ood=ood,
        calibration=CalibrationInfo(float(ece["before"]), float(ece["after"]), nll["before"], nll["after"], objective,
                                    len(val.targets))))
    if not stored:
        ood_path(ckpt).unlink(missing_ok=True)  # statistics of earlier weights would no longer match
    return Calibration(ckpt, float(temperature), float(ece["before"]), float(ece["after"]), len(val.targets),
                       n_train, ood_file, thresholds, time.time() - start, model_methods=tuple(model_options),
                       objective=objective, nll_before=nll["before"], nll_after=nll["after"])


def check_temperature_objective(objective: str) -> str:
    """`decide.temperature` as given, or a ConfigError naming the choices."""
    from taxonomist.decide import TEMPERATURE_OBJECTIVES
    if objective not in (*TEMPERATURE_OBJECTIVES, "none"):
        raise ConfigError(f"decide.temperature {objective!r}{suggest(str(objective), (*TEMPERATURE_OBJECTIVES, 'none'))}; "
                          f"choose one of {', '.join((*TEMPERATURE_OBJECTIVES, 'none'))}")
    return objective


def _fit_temperature(logits: np.ndarray, targets: np.ndarray, objective: str, taxonomy, cfg: Config,
                     card: ModelCard) -> float:
    """The temperature for `decide.temperature` (`nll`, `node-nll`, `risk` or `none`) on the val rows."""
    from taxonomist.decide import candidate_nodes, fit_temperature_for
    from taxonomist.taxonomy import distance_matrix

    if check_temperature_objective(objective) == "none":
        return 1.0
    distance = None
    if objective == "risk":  # the risk of the rule min-risk will run: over the run's candidates, its metric
        metric = card.distance_metric
        spec = cfg.decide.candidates or ("all" if cfg.decide.decision != "min-risk" else None)
        distance = distance_matrix(taxonomy, metric, taxonomy.labels, candidate_nodes(taxonomy, spec))
    return fit_temperature_for(logits, targets, objective, taxonomy=taxonomy, distance_lc=distance)


def calibrate_run(run_dir: str | Path, data: str | Path | None = None, device: str = "auto",
                  ood_methods: Sequence[str] | None = OOD_METHODS, batch_size: int = 64, num_workers: int = -1,
                  progress: bool = False, model_ood: Sequence[str] = (),
                  model_ood_options: Mapping[str, dict] | None = None) -> list[Calibration]:
    """Calibrate a run's `best` and `last` checkpoints (`calibrate_checkpoint`); when both hold the same
    weights, `last` gets a copy."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    best = ckpt_dir / "best.safetensors"
    if not best.is_file():
        raise ModelError(f"{best}: checkpoint not found (is {run_dir} a run directory?)")
    extra = dict(model_ood=model_ood, model_ood_options=model_ood_options)
    done = [calibrate_checkpoint(best, data, device, ood_methods, batch_size, num_workers, progress, **extra)]
    last = ckpt_dir / "last.safetensors"
    if last.is_file():
        if file_sha256(last) == file_sha256(best):
            done.append(_copy_calibration(done[0], last))
        else:
            done.append(calibrate_checkpoint(last, data, device, ood_methods, batch_size, num_workers, progress,
                                             **extra))
    return done


def _copy_calibration(source: Calibration, target: Path) -> Calibration:
    src = read_card(source.checkpoint)
    ood = src.ood
    ood_file = None
    if source.ood_file is not None:
        ood_file = ood_path(target)
        with atomic_path(ood_file) as tmp:
            shutil.copyfile(source.ood_file, tmp)
        ood = dataclasses.replace(ood, file=ood_file.name)
    write_card(target, read_card(target).replace(temperature=src.temperature, calibration=src.calibration, ood=ood))
    return Calibration(target, source.temperature, source.ece_before, source.ece_after, source.n_val,
                       source.n_train, ood_file, source.thresholds, 0.0, reused_from=source.checkpoint,
                       model_methods=source.model_methods, objective=source.objective,
                       nll_before=source.nll_before, nll_after=source.nll_after)


def _save_ood(path: Path, tensors: dict[str, np.ndarray], methods: list[str], checkpoint_name: str) -> None:
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "taxonomist-ood", "version": "1",
                                               "methods": ",".join(methods), "checkpoint": checkpoint_name})


def _ood_info(checkpoint: str | Path) -> tuple[Path, OODInfo | None]:
    """(OOD file, the card's `ood` block) of a checkpoint or exported model, without reading the file's
    tensors (the kNN bank can be 100 MB); (the model path, None) when it has none. A named file that is missing
    is an error."""
    from taxonomist.inference.model_file import is_onnx, read_card, resolve_model

    ckpt = resolve_model(checkpoint)  # a checkpoint, or an exported .onnx with its statistics beside it
    info = read_card(ckpt).ood
    if info is None:
        return ckpt, None
    # an exported file's statistics follow its name (DESIGN.md: FILE.ood.safetensors), so renaming both works
    name = info.file if info.file is not None else ood_path(ckpt).name
    if not is_onnx(ckpt) and (not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")):
        # the metadata is untrusted data: it may name a file beside the model, never a path elsewhere
        raise ModelError(f"{ckpt}: its metadata names OOD statistics {name!r} outside the model's folder; "
                         "expected a file name such as best.ood.safetensors")
    path = ood_path(ckpt) if is_onnx(ckpt) else ckpt.parent / name
    if not path.is_file():
        fix = ("copy it beside the model or export again" if is_onnx(ckpt)
               else "recalibrate with taxonomist.inference.calibrate_run")
        raise ModelError(f"{path}: OOD statistics named in {ckpt.name if is_onnx(ckpt) else metadata_path(ckpt).name} "
                         f"are missing ({fix})")
    return path, info


def _read_ood(checkpoint: str | Path) -> tuple[Path, OODInfo | None, dict[str, np.ndarray]]:
    path, info = _ood_info(checkpoint)
    if info is None:
        return path, None, {}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: cannot read OOD statistics ({e})") from None
    return path, info, tensors


def load_ood_scorers(checkpoint: str | Path) -> dict[str, OODScorer]:
    """The fitted OOD scorers stored beside a checkpoint, by method; an empty dict when it has none."""
    path, info, tensors = _read_ood(checkpoint)
    scorers = {}
    for method in info.methods if info is not None else ():
        prefix = f"{method}/"
        state = {k[len(prefix):]: v for k, v in tensors.items()
                 if k.startswith(prefix) and k != prefix + VAL_SCORES_KEY}
        try:
            scorers[method] = load_ood_scorer(method, state)
        except DataError as e:
            raise ModelError(f"{path}: {e}") from None
    return scorers


def model_ood_options(checkpoint: str | Path, method: str) -> dict | None:
    """The options a model OOD score (`odin`, `mc-dropout`) was calibrated with, or None when it was not."""
    _, info = _ood_info(checkpoint)
    options = info.model_methods.get(method) if info is not None else None
    return None if options is None else dict(options)


def ood_threshold(checkpoint: str | Path, method: str, tpr: float) -> float:
    """The `--ood-tpr` threshold of `method` for a checkpoint: the stored one, else computed from the stored
    sorted validation scores (`known_threshold`)."""
    path, info, tensors = _read_ood(checkpoint)
    if info is None:
        raise ModelError(f"{checkpoint}: the checkpoint has no OOD statistics; calibrate it first "
                         "(taxonomist train does so unless --no-calibrate)")
    known = info.stored_methods
    if method not in known:
        raise ConfigError(f"{path}: no {method!r} OOD statistics (stored: {', '.join(known) or 'none'})")
    stored = (info.thresholds or {}).get(method, {})
    if _tpr_key(check_tpr(tpr)) in stored:
        return float(stored[_tpr_key(tpr)])
    scores = tensors.get(f"{method}/{VAL_SCORES_KEY}")
    if scores is None:
        raise ModelError(f"{path}: no validation scores for {method!r}; recalibrate the checkpoint")
    return known_threshold(scores, tpr)
