"""The models of one prediction — one model file or an ensemble's members: each loaded once, run over a chunk of
images with its own preprocessing, temperature and TTA views, aligned on the rows every member could read, and
scored for OOD with its own statistics and threshold. `predict` combines them and hands the arrays to
`decide.answer`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from taxonomist.card import ModelCard
from taxonomist.data.dataset import Dataset
from taxonomist.decide import (DEFAULT_OOD_TPR, ENSEMBLE_OOD_METHOD, MODEL_OOD_METHODS, DecisionOptions,
                               apply_temperature, ensemble_disagreement, softmax)
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.inference.images import ImageInput
from taxonomist.taxonomy import Taxonomy


@dataclass
class Member:
    """A model of the prediction, loaded once for all chunks: a `TaxonModel` or an onnxruntime session."""

    path: Path
    model: object
    card: ModelCard
    taxonomy: Taxonomy


class MemberOutput(NamedTuple):
    """One member's outputs on the rows every member answered, in the same order."""

    probs: np.ndarray        # (n, L) calibrated probabilities (TTA views merged)
    features: np.ndarray     # (n, F)
    logits: np.ndarray       # (n, L) raw logits (mean over views with TTA): what OOD scores read


def member_rows(member: Member, images: ImageInput) -> tuple[Dataset, pd.DataFrame, str | None]:
    """(dataset, rows, path column) that a member reads the images through (the labels left empty)."""
    # a dataset with context_path feeds context-input models their scenes; a folder or CSV gives the images
    path_column = None if images.kind == "dataset" else "path"
    rows = images.rows.assign(label="")
    return Dataset(images.root, rows, member.taxonomy), rows, path_column


def run_member(member: Member, images: ImageInput, dev, tta_views, tta_mode: str, batch_size: int,
               num_workers: int, progress: bool = False, desc: str = "predict", strict: bool = False):
    """One model over the images: (its outputs, the row positions it answered), and what it skipped (with
    `strict`, the first unreadable image raises `UnreadableImageError` naming it instead)."""
    from taxonomist.inference.run_model import infer_rows

    card = member.card
    dataset, loader_rows, path_column = member_rows(member, images)
    out = infer_rows(member.model, card, dataset, loader_rows, dev, card.label_index, batch_size=batch_size,
                     num_workers=num_workers, progress=progress, desc=desc, tta=tta_views, tta_mode=tta_mode,
                     temperature=card.temperature, path_column=path_column, strict=strict)
    res = out.result
    if tta_views:
        probs, raw = softmax(res.logits.astype(np.float64)), res.mean_logits
    else:
        probs, raw = apply_temperature(res.logits.astype(np.float64), card.temperature), res.logits
    return (MemberOutput(probs, res.features, raw), res.indices), out.skipped


def run_members(members: list[Member], images_in: ImageInput, dev, tta_views, tta_mode: str, batch_size: int,
                num_workers: int, strict: bool = False):
    """Run every member; return the row positions every member answered, each member's `MemberOutput` on those
    rows in that order, and the skipped rows as (position, reason)."""
    results, skipped_by_row = [], {}
    for member in members:
        result, skipped = run_member(member, images_in, dev, tta_views, tta_mode, batch_size, num_workers,
                                     strict=strict)
        for s in skipped:
            skipped_by_row.setdefault(int(s.index), s.reason)
        results.append(result)
    # an image unreadable for one member (the same file, so normally for all) is dropped for all
    common = results[0][1]
    for _, positions in results[1:]:
        common = np.intersect1d(common, positions)
    common = np.sort(common)
    aligned = []
    for output, positions in results:
        rows = take(positions, common)
        aligned.append(MemberOutput(output.probs[rows], output.features[rows], output.logits[rows]))
    for p in np.setdiff1d(np.arange(len(images_in.rows)), common):
        skipped_by_row.setdefault(int(p), "not predicted by every member")
    return common, aligned, [(k, skipped_by_row[k]) for k in sorted(skipped_by_row)]


def take(positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of the row positions `wanted` sits in `positions` (a KeyError names one that is absent)."""
    where = {int(p): i for i, p in enumerate(positions)}
    return np.array([where[int(p)] for p in wanted], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- OOD
def check_ood_members(options: DecisionOptions, ckpts: list[Path]) -> None:
    """What the OOD options ask of the model files, checked before any is read: `ensemble` needs several; an
    absolute threshold fits one model's scores; ODIN and MC-dropout need a PyTorch checkpoint."""
    from taxonomist.inference.model_file import is_onnx

    if options.ood == ENSEMBLE_OOD_METHOD:
        if len(ckpts) < 2:
            raise ConfigError("--ood ensemble scores the disagreement of several checkpoints; give two or more")
        return
    if options.ood_threshold is not None and len(ckpts) > 1:
        raise ConfigError("--ood-threshold: an absolute OOD threshold fits one model's scores; with an ensemble use "
                          "an OOD TPR (--ood-tpr)")
    if options.ood in MODEL_OOD_METHODS:
        for ckpt in ckpts:
            if is_onnx(ckpt):
                raise ConfigError(f"{ckpt}: --ood {options.ood} runs the PyTorch model again "
                                  f"({'gradients with respect to the input' if options.ood == 'odin' else 'dropout on'}"
                                  "); an exported ONNX model cannot: give its .safetensors checkpoint")


@dataclass
class MemberOOD:
    """How one member scores unknowns: a fitted scorer (feature/logit methods) or a model score with options."""

    threshold: float
    scorer: object = None            # decide.OODScorer, for OOD_METHODS
    options: dict | None = None      # for MODEL_OOD_METHODS: as calibrated (or the defaults with a given threshold)


def member_ood_scorers(ckpts: list[Path], method: str, threshold: float | None, tpr: float | None) -> list[MemberOOD]:
    """How each member scores `method`, read once: the stored statistics or model-score options, and the stored
    (or given) threshold. `ensemble` has no per-member scorer: an empty list."""
    from taxonomist.inference.calibrate import load_ood_scorers, model_ood_options
    from taxonomist.inference.calibrate import ood_threshold as stored_threshold

    if method == ENSEMBLE_OOD_METHOD:
        return []
    out = []
    for ckpt in ckpts:
        if method in MODEL_OOD_METHODS:
            options = model_ood_options(ckpt, method)
            if options is None and threshold is None:
                raise ModelError(f"{ckpt}: no {method!r} validation scores to set its threshold from; train with "
                                 f"--set decide.model_ood={method} (or calibrate_run(RUN, model_ood=['{method}'])), "
                                 f"or give --ood-threshold T (`taxonomist evaluate RUN --model-ood {method}` reports "
                                 f"ood.{method}.threshold)")
            t = threshold if threshold is not None else stored_threshold(ckpt, method, tpr or DEFAULT_OOD_TPR)
            out.append(MemberOOD(float(t), options=options or {}))
            continue
        scorers = load_ood_scorers(ckpt)
        if method not in scorers:
            raise ModelError(f"{ckpt}: no {method!r} OOD statistics (stored: {', '.join(scorers) or 'none'}); "
                             "`taxonomist train` calibrates checkpoints unless --no-calibrate")
        t = threshold if threshold is not None else stored_threshold(ckpt, method, tpr or DEFAULT_OOD_TPR)
        out.append(MemberOOD(float(t), scorer=scorers[method]))
    return out


def ood_scores(options: DecisionOptions, scorers: list[MemberOOD], members: list[Member],
               aligned: list[MemberOutput], chunk: ImageInput, common: np.ndarray, dev, batch_size: int,
               num_workers: int, strict: bool = False) -> tuple[np.ndarray, float]:
    """(scores, threshold) of the rows `common` of `chunk`, for `decide.answer`: one model's raw scores and its
    threshold; for an ensemble the mean margin (score − own threshold) over members against 0, or with `ensemble`
    the members' disagreement against `options.ood_threshold`."""
    if options.ood == ENSEMBLE_OOD_METHOD:
        score = ensemble_disagreement([out.logits for out in aligned], [m.card.temperature for m in members])
        return score, options.ood_threshold
    scores, margins = [], []
    for member, how, out in zip(members, scorers, aligned):
        if how.scorer is not None:
            s = how.scorer.score(out.features, out.logits)
        else:
            s = _model_ood_scores(options.ood, member, how, chunk, common, dev, batch_size, num_workers, strict)
        scores.append(s)
        margins.append(s - how.threshold)
    if len(scorers) == 1:
        return scores[0], scorers[0].threshold
    # members' scores live on different scales; their distances to their own thresholds are comparable
    return np.mean(margins, axis=0), 0.0


def _model_ood_scores(method: str, member: Member, how: MemberOOD, chunk: ImageInput, common: np.ndarray, dev,
                      batch_size: int, num_workers: int, strict: bool) -> np.ndarray:
    """ODIN / MC-dropout scores of one member on the rows `common` of `chunk` (without TTA: one view)."""
    from taxonomist.inference.ood_model import model_ood_rows

    dataset, rows, path_column = member_rows(member, chunk)
    result = model_ood_rows(method, member.model, member.card, dataset, rows, dev, member.card.label_index,
                            how.options, batch_size=batch_size, num_workers=num_workers, strict=strict,
                            path_column=path_column)
    try:
        return result.scores[take(result.indices, common)]
    except KeyError as e:
        raise DataError(f"{chunk.root / chunk.rows['path'].iloc[e.args[0]]}: readable for the prediction but "
                        f"not for the {method} score") from None


__all__ = ["Member", "MemberOutput", "MemberOOD", "run_members", "member_ood_scorers", "ood_scores",
           "check_ood_members", "take"]
