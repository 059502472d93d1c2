"""Evaluate a trained run (or checkpoint) on a dataset split: metrics.json and predictions.csv.

The model is run once over the split (and over the `ood` rows when OOD scorers exist); every figure then
comes from the resulting arrays through `evaluate.outputs`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from taxonomist.config import Config, load_config
from taxonomist.data.dataset import ANNOTATIONS, Dataset, read_annotations
from taxonomist.decide import DEFAULT_OOD_TPR, DecisionOptions
from taxonomist.errors import ConfigError, DataError
from taxonomist.evaluate.outputs import evaluate_outputs
from taxonomist.taxonomy import Taxonomy, write_taxonomy
from taxonomist.utils.files import atomic_path


@dataclass
class Evaluation:
    """What `evaluate_run` wrote (metrics.json, predictions.csv in `out_dir`) and the model's raw outputs on the
    split (`outputs`: logits, features, targets — e.g. to fit an OOD scorer on the train split)."""

    metrics: dict
    predictions: pd.DataFrame
    out_dir: Path
    split: str
    outputs: object = None

    def summary(self) -> str:
        m = self.metrics
        decision = "" if m.get("decision", "argmax") == "argmax" else f", decision {m['decision']}"
        lines = [f"evaluated {m['n']} examples ({self.split} split) with metric {m['metric']}{decision}",
                 f"  mean hierarchical distance  {m['mhd']:.3f}",
                 f"  top-1                       {m['top1']:.3f}",
                 f"  macro-F1                    {m['macro_f1']:.3f}",
                 f"  hierarchical accuracy       {m['hierarchical_accuracy']:.3f}"]
        if "argmax" in m:
            lines.append(f"  (argmax: MHD {m['argmax']['mhd']:.3f}, top-1 {m['argmax']['top1']:.3f})")
        if "priors" in m:
            pr = m["priors"]
            lines.append(f"  (without the priors: MHD {pr['without']['mhd']:.3f}, top-1 {pr['without']['top1']:.3f}; "
                         f"they applied to {pr['applied']} examples and changed {pr['changed']} answers)")
        for level, v in m["per_rank"].items():
            lines.append(f"  {level:<12} top-1 {v['top1']:.3f}  top-5 {v['top5']:.3f}  n={v['n']}")
        for method, v in (m.get("ood") or {}).items():
            lines.append(f"  OOD {method:<8} AUROC {v['auroc']:.3f}  FPR95 {v['fpr95']:.3f}")
        return "\n".join(lines)


def rows_for_split(dataset, run_dir: Path | None, split: str):
    """(the rows of `split`, the split's name): the `test` rows fall back to `val` when the dataset has none, and
    without a split column the validation rows the run held out are made again from its config."""
    frame = dataset.annotations
    if split == "ood":
        raise ConfigError("the ood rows hold taxa the model never learnt; evaluate the test (or val) split — "
                          "the ood rows are then scored as unknowns when the checkpoint has OOD scorers")
    if "split" in frame.columns and split in set(frame["split"]):
        return frame[frame["split"] == split], split
    if split in ("test", "val"):
        # no such split column values: recreate the validation rows the training run held out
        from taxonomist.data.split import split_rows
        cfg_file = run_dir / "config.yaml" if run_dir else None
        cfg = load_config(cfg_file if cfg_file and cfg_file.is_file() else None)
        if "split" in frame.columns and split == "test" and "val" in set(frame["split"]):
            return frame[frame["split"] == "val"], "val"
        _, val = split_rows(dataset, cfg)
        return val, "val"
    raise DataError(f"{dataset.root}: no rows with split {split!r}")


def _run_of(ckpt: Path) -> tuple[Path | None, Config | None]:
    """The run directory of a checkpoint and its config, when it has them."""
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    cfg_file = run_dir / "config.yaml" if run_dir else None
    return run_dir, (load_config(cfg_file) if cfg_file and cfg_file.is_file() else None)


def run_decision_options(run_or_checkpoint: str | Path, **given) -> DecisionOptions:
    """The decision `evaluate` applies to a model: its run's `decide` config (the defaults for a model without a
    run directory), with the `given` `DecisionOptions` fields that are not None in place of its values
    (`DecisionOptions.from_config`).

    >>> run_decision_options("runs/first", decision="min-risk", priors="priors.csv")   # doctest: +SKIP
    """
    from taxonomist.inference.model_file import resolve_model

    ckpt = resolve_model(run_or_checkpoint)
    return _decision_options(ckpt, _run_of(ckpt)[1], given)


def _decision_options(ckpt: Path, run_cfg: Config | None, given: dict) -> DecisionOptions:
    from taxonomist.inference.model_file import read_card

    dcfg = run_cfg.decide if run_cfg is not None else Config().decide
    return DecisionOptions.from_config(dcfg, read_card(ckpt).taxonomy.has_ranks, **given)


def _open_dataset(root: str | Path, taxonomy: Taxonomy) -> Dataset:
    """The dataset under the model's taxonomy. Not `load_dataset`: the `ood` rows name taxa the model's
    taxonomy may lack, and only the evaluated split has to be known (checked by the caller)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset directory not found")
    return Dataset(root, read_annotations(root / ANNOTATIONS), taxonomy)


def _checkpoint_ood(ckpt: Path) -> tuple[dict, dict, str | None]:
    """(scorers, thresholds in use, note) from the checkpoint's calibration, or a note saying why none."""
    try:
        from taxonomist.inference.calibrate import load_ood_scorers, ood_threshold
    except ImportError:
        return {}, {}, "OOD not evaluated: taxonomist.inference.calibrate is not available"
    scorers = load_ood_scorers(ckpt)
    if not scorers:
        return {}, {}, (f"OOD not evaluated: {ckpt.name} has no fitted OOD scorers "
                        f"(no {ckpt.stem}.ood.safetensors; calibrate the checkpoint first)")
    return scorers, {m: ood_threshold(ckpt, m, DEFAULT_OOD_TPR) for m in scorers}, None


def predictions_frame(rows: pd.DataFrame, indices, columns: dict, notes: list[str]) -> pd.DataFrame:
    """The `predictions.csv` table of an evaluation: one row per evaluated example (`rows` at `indices`), the
    input's ids and `columns`; images left out as unreadable are counted in `notes`."""
    skipped = len(rows) - len(indices)
    if skipped:
        notes.append(f"{skipped} unreadable image(s) were skipped")
    sub = rows.iloc[indices]
    frame = pd.DataFrame({"path": sub["path"].to_numpy(), **columns})
    for col in ("annotation_id", "image_id"):
        if col in sub.columns:
            frame.insert(1, col, sub[col].to_numpy())
    if "prior_applied" in columns and "context" in sub.columns:
        frame["context"] = sub["context"].to_numpy()
    return frame


def write_predictions(out_dir: Path, rows: pd.DataFrame, indices, columns: dict, notes: list[str]) -> pd.DataFrame:
    """Write and return `predictions.csv` alone (`predictions_frame`), atomically."""
    frame = predictions_frame(rows, indices, columns, notes)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return frame


#: The files of one evaluation, in the order they replace the old ones: metrics.json last, as the commit
EVALUATION_FILES = ("predictions.csv", "taxonomy.csv", "metrics.json")
#: Files that describe an evaluation and are removed when it is replaced (the report is rewritten after it)
STALE_AFTER_EVALUATION = ("report.html",)


def write_evaluation(out_dir: Path, frame: pd.DataFrame, metrics: dict, taxonomy: Taxonomy | None = None) -> None:
    """Replace the evaluation in `out_dir` (predictions.csv, taxonomy.csv when given, metrics.json) as a set.

    Every new file is written completely beside its target first; only then is the old metrics.json removed (with
    the old report.html, which describes the old evaluation), the others renamed into place, and metrics.json
    renamed last. A kill at any moment leaves the old set, the new set, or a folder without metrics.json, which
    readers refuse ("no metrics.json"); never metrics beside predictions of another evaluation. metrics.json also
    records each file's SHA-256 (`files`), so `check_evaluation` can prove that they belong together.
    """
    import hashlib
    import json

    from taxonomist.utils.files import file_set, json_value

    names = [n for n in EVALUATION_FILES if n != "taxonomy.csv" or taxonomy is not None]
    with file_set([out_dir / n for n in names],
                  remove_first=[out_dir / n for n in ("metrics.json", *STALE_AFTER_EVALUATION)]) as tmp:
        staged = {n: tmp[out_dir / n] for n in names}
        frame.to_csv(staged["predictions.csv"], index=False)
        if taxonomy is not None:
            write_taxonomy(taxonomy, staged["taxonomy.csv"])
        metrics = {**metrics, "files": {n: hashlib.sha256(staged[n].read_bytes()).hexdigest()
                                        for n in names if n != "metrics.json"}}
        staged["metrics.json"].write_text(json.dumps(metrics, indent=1, default=json_value) + "\n", encoding="utf-8")


def check_evaluation(folder: str | Path) -> None:
    """Refuse (DataError, one line) an evaluation folder whose files do not belong to its metrics.json: each file
    metrics.json records under `files` must have that SHA-256. Folders written before `files` existed pass."""
    import hashlib
    import json

    folder = Path(folder)
    try:
        recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # a missing or unreadable metrics.json is the reader's own error to report
    for name, digest in recorded.items():
        path = folder / str(name)
        if path.name != str(name) or not path.is_file():
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DataError(f"{path} does not belong to {folder / 'metrics.json'} (another evaluation wrote it); "
                            f"rerun taxonomist evaluate into {folder}")


def evaluate_run(run_or_checkpoint: str | Path, data: str | Path | None = None, split: str = "test",
                 out: str | Path | None = None, device: str = "auto", batch_size: int = 64,
                 num_workers: int = -1, progress: bool = True, decision: str | None = None,
                 candidates: str | list[str] | None = None, thresholds: Mapping | float | None = None,
                 ood_scorers: Mapping | None = None, model_ood: Sequence[str] = (),
                 model_ood_options: Mapping[str, dict] | None = None,
                 ensemble: Sequence[str | Path] = (), trust_code: bool = False,
                 top_k: int | None = None, tta=None, tta_mode: str | None = None,
                 options: DecisionOptions | None = None) -> Evaluation:
    """Run a model — a run directory (its best checkpoint), a checkpoint or an exported `.onnx` file — over `split`
    of the dataset and write metrics.json + predictions.csv into `out` (default: the run directory, else the
    model's folder). `split` falls back to the validation rows when the dataset has no test split.

    Args:
        options: how the answers are decided (`decide.DecisionOptions`: rule, candidates, thresholds, top-k, TTA,
            context priors); default: the run's `decide` config (`run_decision_options`). Its OOD fields are not
            used: every OOD score the model has is evaluated (below). With `priors` (`predict --priors`'s table,
            `decide.priors`), the dataset's `context` column shifts the probabilities before the rule;
            metrics.json gets `priors` with the answers' figures without them, predictions.csv
            `raw_prediction`.
        decision, candidates, thresholds, top_k, tta, tta_mode: single options given in place of those of
            `options` (or of the run's config): the rule (`argmax`, `min-risk`, `backoff`, `selective`, `rollup`,
            `common-ancestor`), its candidate set (`candidate_nodes` spec), thresholds, rollup's and
            common-ancestor's number of labels, and test-time augmentation as `predict --tta` applies it (a spec
            such as `rot2+flip` or `d4`, True for `DEFAULT_TTA`: the views' calibrated probabilities merged per
            image, on the evaluated split and the `ood` rows; OOD scores read the views' mean features and raw
            logits).
        ood_scorers: fitted `OODScorer`s by method; default: those stored beside the model
            (`best.ood.safetensors`). With scorers and `ood` rows in the dataset, metrics.json gets `ood`.
        model_ood: OOD scores that need the model (`odin`, `mc-dropout`; `inference.ood_model`; PyTorch
            checkpoints only), computed on the split and the `ood` rows; options per method in
            `model_ood_options` (e.g. `{"odin": {"epsilon": 0.002}}`). Their threshold keeps 95 % of the
            dataset's `val` rows when it has some.
        ensemble: further models with the same labels: `ood.ensemble` scores each example by the members'
            disagreement (`decide.ensemble_disagreement`, mutual information, each member at its temperature).
        trust_code: load checkpoints whose backbone imports or fetches code (`module:`, `open_clip:hf-hub:`);
            refused without it.

    The files replace an earlier evaluation in `out` as a set (`write_evaluation`). `out` may not hold the files
    evaluate reads (the dataset folder, a model file, the candidates file): refused before the model runs.
    """
    from taxonomist.inference.forward import run_inference
    from taxonomist.inference.model_file import is_onnx, load_model, resolve_model
    from taxonomist.inference.ood_model import check_model_ood
    from taxonomist.inference.run_model import rows_loader
    from taxonomist.inference.tta import run_inference_tta, views_for
    from taxonomist.runtime import configure_threads, select_device

    ckpt = resolve_model(run_or_checkpoint)
    check_model_ood(model_ood)  # before minutes of inference, not after
    if model_ood and is_onnx(ckpt):
        raise ConfigError(f"{ckpt}: --model-ood {' '.join(model_ood)} runs the PyTorch model again; an exported "
                          "ONNX model cannot: give its .safetensors checkpoint")
    run_dir, run_cfg = _run_of(ckpt)
    given = dict(decision=decision, candidates=candidates, thresholds=thresholds, top_k=top_k, tta=tta,
                 tta_mode=tta_mode)
    if options is None:
        options = _decision_options(ckpt, run_cfg, given)  # the run's config, read once
    elif any(v is not None for v in given.values()):
        options = options.replace(**{k: v for k, v in given.items() if v is not None})
    tta_views = views_for(options.tta)
    if tta_views and (model_ood or ensemble):
        raise ConfigError("--tta cannot be combined with --model-ood or --ensemble: those scores run the model "
                          "on one view; evaluate them without --tta")
    dev = select_device(device)
    configure_threads(0, dev, num_workers)
    if data is None:
        if run_cfg is None or not run_cfg.data.root:
            raise DataError("no dataset given: pass --data DATASET")
        data = run_cfg.data.root
    out_dir = Path(out) if out else (run_dir or ckpt.parent)
    _refuse_out_over_inputs(out_dir, data, [ckpt, *ensemble], options.candidates)
    model, card, taxonomy = load_model(ckpt, device=str(dev), trust_code=trust_code)
    spec = candidates_text(options.candidates)
    options = options.resolve(taxonomy, model_metric=card.metric, label_prior=card.label_prior)
    dataset = _open_dataset(data, taxonomy)
    rows, used_split = rows_for_split(dataset, run_dir, split)
    rows = rows[rows["label"] != ""]
    if options.priors is not None and "context" not in rows.columns:
        raise DataError(f"{dataset.root / 'annotations.csv'}: no 'context' column; --priors applies to each "
                        "example's context (e.g. region=Monterey;depth=200-400)")
    unknown = sorted(set(rows["label"]) - set(taxonomy.labels))
    if unknown:
        raise DataError(f"{dataset.root}: label {unknown[0]!r} was not among the model's training labels "
                        f"({len(unknown)} such labels)")
    if rows.empty:
        raise DataError(f"{dataset.root}: no labelled rows in the {used_split} split")

    label_index = card.label_index

    def infer(subset: pd.DataFrame, desc: str, allow_unknown: bool = False, runner=None, member=None):
        mod, mcard = member or (model, card)
        _, loader = rows_loader(mcard, dataset, subset, label_index, batch_size, num_workers, allow_unknown)
        try:
            if runner is not None:
                return runner(mod, loader)
            if tta_views:  # logits = log of the merged calibrated probabilities; raw ones in mean_logits
                return run_inference_tta(mod, loader, dev, tta_views, mode=options.tta_mode,
                                         temperature=card.temperature, progress=progress, desc=f"{desc} (TTA)")
            return run_inference(mod, loader, dev, progress=progress, desc=desc)
        finally:
            loader.close()

    def raw_logits(result):
        return getattr(result, "mean_logits", None) if tta_views else result.logits

    res = infer(rows, "evaluate")
    notes = []
    ood_scores, ood_thr = None, {}
    stored_thr: set[str] = set()  # model OOD methods whose threshold (and options) came from the calibration
    ood_rows = dataset.annotations[dataset.annotations["split"] == "ood"] \
        if "split" in dataset.annotations.columns else dataset.annotations.iloc[:0]
    if ood_rows.empty:
        notes.append("OOD not evaluated: the dataset has no ood rows (taxonomist data split --ood-taxa N)")
    else:
        if ood_scorers is None:
            ood_scorers, ood_thr, note = _checkpoint_ood(ckpt)
            if note:
                notes.append(note)
        if ood_scorers:
            unk = infer(ood_rows, "evaluate ood", allow_unknown=True)
            ood_scores = {method: (scorer.score(res.features, raw_logits(res)),
                                   scorer.score(unk.features, raw_logits(unk)))
                          for method, scorer in ood_scorers.items()}
        if model_ood or ensemble:
            extra, extra_thr, stored = _model_ood(infer, ckpt, model, card, dataset, rows, ood_rows, used_split,
                                                  model_ood, model_ood_options or {}, ensemble, res, dev, progress,
                                                  trust_code)
            ood_scores = {**(ood_scores or {}), **extra}
            ood_thr = {**ood_thr, **extra_thr}
            stored_thr |= stored

    # with TTA the temperature was applied to every view before merging
    result = evaluate_outputs(res.logits, res.targets, taxonomy, card.distance_metric,
                              temperature=1.0 if tta_views else card.temperature, options=options,
                              rank_logits=res.rank_logits, ood_scores=ood_scores, ood_thresholds=ood_thr,
                              contexts=rows["context"].to_numpy()[res.indices] if options.priors is not None else None)
    m = result.metrics
    for method in set(m.get("ood") or {}) & set(ood_thr) - set(ood_scorers or {}):
        m["ood"][method]["threshold_source"] = ("stored at calibration" if method in stored_thr else
                                                f"{DEFAULT_OOD_TPR:.0%} of the val rows kept")
    m.update(split=used_split, candidates=spec, thresholds=options.thresholds,
             top_k=options.top_k, checkpoint=str(ckpt.resolve()),
             tta=[v.name for v in tta_views] if tta_views else None, tta_mode=options.tta_mode if tta_views else None,
             run_dir=str(run_dir.resolve()) if run_dir else None, data=str(Path(data).resolve()),
             taxonomy_hash=taxonomy.hash, epoch=card.epoch, group_level=_group_level(taxonomy))
    m["notes"] = notes + m["notes"]
    frame = predictions_frame(rows, res.indices, result.columns, m["notes"])
    # the report reads lineages from the evaluation folder, which need not be a run directory
    own_taxonomy = run_dir is None or out_dir.resolve() != run_dir.resolve()
    write_evaluation(out_dir, frame, m, taxonomy if own_taxonomy else None)
    return Evaluation(m, frame, out_dir, used_split, res)


def candidates_text(candidates) -> str:
    """The candidate set as metrics.json names it: the spec (a word, a file, a list), "" for the rule's default."""
    if not candidates:
        return ""
    return candidates if isinstance(candidates, str) else str(list(candidates))


def _refuse_out_over_inputs(out_dir: Path, data, models: Sequence, candidates) -> None:
    """No file evaluate writes into `out_dir` may be one it reads: the dataset's tables, a model file (of the
    evaluated model or an ensemble member), the candidates file."""
    from taxonomist.inference.model_file import model_file_parts
    from taxonomist.utils.files import refuse_output_over_inputs

    root = Path(data).expanduser()
    if out_dir.expanduser().resolve() == root.resolve():
        raise ConfigError(f"--out {out_dir} is the dataset folder {data}: evaluate would write its predictions.csv, "
                          "taxonomy.csv and metrics.json among the dataset's files; choose another folder")
    inputs = [(root / "annotations.csv", "the dataset's annotations.csv"), (root / "taxonomy.csv",
                                                                         "the dataset's taxonomy.csv")]
    if isinstance(candidates, (str, Path)) and str(candidates) not in ("", "all", "fathomnet2025"):
        inputs.append((Path(candidates), "the candidates file"))
    for model in models:
        inputs += model_file_parts(model)
    refuse_output_over_inputs(out_dir, inputs)
    for name in (*EVALUATION_FILES, *STALE_AFTER_EVALUATION):
        refuse_output_over_inputs(out_dir / name, inputs, option=f"--out {out_dir}: its")


def _model_ood(infer, ckpt, model, card, dataset, rows, ood_rows, used_split, methods, options, ensemble, res, dev,
               progress, trust_code: bool = False) -> tuple[dict, dict, set]:
    """Scores of the model-side OOD methods and of ensemble disagreement on (known rows, ood rows), their
    thresholds, and the methods whose threshold is the checkpoint's own.

    A method the checkpoint was calibrated with (`decide.model_ood`) and given no options here runs with the
    stored options and keeps the stored threshold, as `predict --ood` does; otherwise the threshold keeps 95 %
    of the dataset's `val` rows when it has val rows other than the evaluated ones."""
    import numpy as np

    from taxonomist.decide import ensemble_disagreement
    from taxonomist.inference.calibrate import known_threshold, model_ood_options, ood_threshold
    from taxonomist.inference.ood_model import model_ood_scores
    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.run_model import input_settings

    val_rows = rows.iloc[:0]
    if used_split != "val" and "split" in dataset.annotations.columns:
        val_rows = dataset.annotations[dataset.annotations["split"] == "val"]
    temperature = card.temperature
    std = input_settings(card)[1].std
    scores, thresholds, stored = {}, {}, set()
    for method in dict.fromkeys(methods):
        calibrated = model_ood_options(ckpt, method) if options.get(method) is None else None
        opts = calibrated if calibrated is not None else options.get(method)

        def runner(mod, loader, method=method, opts=opts):
            return model_ood_scores(method, mod, loader, dev, temperature, std, opts, progress)
        known = infer(rows, method, runner=runner).scores
        unknown = infer(ood_rows, method, allow_unknown=True, runner=runner).scores
        scores[method] = (known, unknown)
        if calibrated is not None:
            thresholds[method] = ood_threshold(ckpt, method, DEFAULT_OOD_TPR)
            stored.add(method)
        elif not val_rows.empty:
            thresholds[method] = known_threshold(infer(val_rows, method, runner=runner).scores, DEFAULT_OOD_TPR)
    if ensemble:
        labels = list(card.labels)
        members = []
        for path in ensemble:
            mod, mcard, _ = load_model(path, device=str(dev), trust_code=trust_code)
            if list(mcard.labels) != labels:
                raise ConfigError(f"{path}: an ensemble member must have the evaluated model's labels in the same "
                                  f"order ({len(mcard.labels)} labels vs {len(labels)})")
            members.append((mod, mcard))
        subsets = {"known": rows, "unknown": ood_rows, "val": val_rows}
        base = {"known": res, "unknown": infer(ood_rows, "ensemble", allow_unknown=True)}
        if not val_rows.empty:
            base["val"] = infer(val_rows, "ensemble")
        out = {}
        for key, first in base.items():
            logits, temps = [first.logits], [temperature]
            for mod, mcard in members:
                r = infer(subsets[key], "ensemble", allow_unknown=key == "unknown", member=(mod, mcard))
                if not np.array_equal(r.indices, first.indices):
                    raise DataError(f"{dataset.root}: ensemble members read different images of the {key} rows")
                logits.append(r.logits)
                temps.append(mcard.temperature)
            out[key] = ensemble_disagreement(logits, temps)
        scores["ensemble"] = (out["known"], out["unknown"])
        if "val" in out:
            thresholds["ensemble"] = known_threshold(out["val"], DEFAULT_OOD_TPR)
    return scores, thresholds, stored


def _group_level(taxonomy: Taxonomy) -> str | None:
    from taxonomist.data.explore import top_level_groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = top_level_groups(taxonomy)
    return level.name if level is not None else None
