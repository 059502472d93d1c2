"""Batch prediction: one or several models (checkpoints or exported ONNX files) over a folder, a CSV or a
dataset, to a decisions CSV.

Each member applies its own preprocessing, temperature and optional TTA; `decide` turns the combined
probabilities into answers, OOD scores flag unknowns, and `--format kaggle` writes a validated submission.
The input is processed in chunks whose decisions are kept as part files (`inference.sharding`), so that a run
can resume after a kill and can be spread over processes with torchrun.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from taxonomist.data.dataset import ANNOTATIONS, Dataset, read_annotations, read_csv_table
from taxonomist.decide import (COMBINE_MODES, DECISIONS, OOD_METHODS, VIEW_MODES, ancestor_operator,
                               apply_temperature, candidate_nodes, combine_probs, decide, ensemble_disagreement,
                               expected_distance, ood_fallback, resolve_ood_method, softmax)
from taxonomist.errors import ConfigError, DataError, ModelError, SubmissionError
from taxonomist.inference.ood_model import MODEL_OOD_METHODS
from taxonomist.inference.sharding import (DEFAULT_CHUNK_SIZE, ChunkResult, PartStore, Shard, chunk_count, chunk_key,
                                           end_group, run_key, start_group, sum_across)
from taxonomist.taxonomy import RANKS, Taxonomy, default_metric, distance_matrix, suggest
from taxonomist.taxonomy.core import RANK_INDEX
from taxonomist.utils.files import atomic_path

#: Files a folder of images is searched for (case-insensitive), recursively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
FORMATS = ("csv", "kaggle")
#: `--ood-tpr` when neither a TPR nor a threshold is given: keep 95 % of known validation examples.
DEFAULT_OOD_TPR = 0.95
#: `--ood` methods: scores fitted at calibration from features and logits, scores that run the model again
#: (ODIN, MC-dropout; thresholds stored when trained with `decide.model_ood`), and the disagreement of the
#: members of an ensemble (mutual information of their tempered probabilities).
PREDICT_OOD_METHODS = ("auto", *OOD_METHODS, *MODEL_OOD_METHODS, "ensemble")


# ---------------------------------------------------------------------------------------------- input
@dataclass
class ImageInput:
    """The images to predict: `rows` has a `path` column relative to `root`, plus the input's other columns."""

    root: Path
    rows: pd.DataFrame
    kind: str            # folder | csv | dataset
    source: Path         # the folder, CSV file or annotations.csv, for messages


def read_images(images: str | Path, split: str | None = None) -> ImageInput:
    """Read `--images`: a folder (recursive), a CSV with a `path` column (relative to the CSV's folder), or a
    dataset directory (its annotations.csv; unlabelled rows are fine). `split` keeps one split of a dataset.
    """
    src = Path(images)
    if src.is_dir() and (src / ANNOTATIONS).is_file():
        frame = read_annotations(src / ANNOTATIONS)
        source = src / ANNOTATIONS
        if split:
            if "split" not in frame.columns:
                raise DataError(f"{source}: no 'split' column, so split {split!r} cannot be selected")
            frame = frame[frame["split"] == split]
            if frame.empty:
                raise DataError(f"{source}: no rows with split {split!r}")
        return ImageInput(src, frame.reset_index(drop=True), "dataset", source)
    if split:
        raise ConfigError(f"{src}: --split selects rows of a dataset directory (with annotations.csv)")
    if src.is_dir():
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(src).parts))
        if not files:
            raise DataError(f"{src}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below it")
        return ImageInput(src, pd.DataFrame({"path": files}), "folder", src)
    if src.is_file():
        return ImageInput(src.parent, _read_image_csv(src), "csv", src)
    raise DataError(f"{src}: not found (give a folder of images, a CSV with a 'path' column or a dataset directory)")


def _read_image_csv(path: Path) -> pd.DataFrame:
    frame = read_csv_table(path, "image list", ("path",))
    empty = np.flatnonzero(frame["path"].to_numpy() == "")
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 2}: empty path")
    return frame


# ---------------------------------------------------------------------------------------------- options
def parse_thresholds(text: str | float | Mapping | None) -> Mapping | float | None:
    """`--thresholds`: `species=0.6,genus=0.7` (or `depth2=0.6`) → a dict, `0.7` → one number for every node.

    >>> parse_thresholds("species=0.6,genus=0.65")
    {'species': 0.6, 'genus': 0.65}
    """
    if text is None or isinstance(text, (Mapping, float, int)):
        return text
    raw = str(text).strip()
    if not raw:
        return None
    if "=" not in raw:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--thresholds {raw!r}: expected RANK=P,… (e.g. species=0.6,genus=0.65) "
                              "or one number") from None
    out: dict[str, float] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--thresholds {raw!r}: item {item.strip()!r} is not RANK=P")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--thresholds {raw!r}: {key.strip()}={value.strip()!r} is not a number") from None
    return out


def _parse_fallback(value, taxonomy: Taxonomy):
    """`--ood-fallback`: a rank, `depthN`, an int depth or a probability; `auto` = order (ranked trees) or depth 1."""
    if value in (None, "", "auto"):
        return "order" if taxonomy.has_ranks else 1
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    if text in RANKS or (text.startswith("depth") and text[5:].isdigit()):
        return text
    if text.isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--ood-fallback {text!r}: give a rank ({', '.join(RANKS)}), depthN or a probability"
                          f"{suggest(text, RANKS)}") from None


def _tta_views(tta):
    from taxonomist.inference.tta import View, parse_tta

    if tta is None or tta is False:
        return None
    if tta is True:
        return parse_tta(None)
    if isinstance(tta, str):
        return parse_tta(tta)
    views = list(tta)
    if not views or not all(isinstance(v, View) for v in views):
        raise ConfigError("tta must be True, a spec such as 'rot2+flip', or a list of View objects")
    return views


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PredictSummary:
    """What `predict` wrote."""

    out: Path
    n_images: int                                      # rows in the input
    n_predicted: int                                   # rows with an answer from the model
    skipped: list = field(default_factory=list)        # (path, reason) of unreadable images
    n_unknown: int | None = None                       # flagged by --ood (None without it)
    n_filled: int = 0                                  # kaggle: unreadable images given the fill answer
    seconds: float = 0.0
    decision: str = "argmax"
    checkpoints: list = field(default_factory=list)
    views: tuple = ()
    fmt: str = "csv"
    chunks: int = 0                                    # chunks of the input (part files)
    chunks_resumed: int = 0                            # chunks kept from an interrupted run (--resume)
    processes: int = 1                                 # torchrun's WORLD_SIZE
    rank: int = 0                                      # this process; only rank 0 writes `out`

    @property
    def images_per_s(self) -> float:
        return self.n_predicted / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        members = f"{len(self.checkpoints)} checkpoints" if len(self.checkpoints) > 1 else "1 checkpoint"
        tta = f", {len(self.views)} TTA views" if self.views else ""
        if self.rank:
            return (f"rank {self.rank} of {self.processes}: predicted {self.n_predicted} images of its chunks in "
                    f"{self.seconds:.1f} s; rank 0 writes {self.out}")
        procs = f", {self.processes} processes" if self.processes > 1 else ""
        lines = [f"predicted {self.n_predicted} of {self.n_images} images ({self.decision}, {members}{tta}{procs}) "
                 f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s); wrote {self.out} ({self.fmt})"]
        if self.chunks_resumed:
            lines.append(f"resumed: {self.chunks_resumed} of {self.chunks} chunks were already predicted")
        if self.n_unknown is not None:
            lines.append(f"{self.n_unknown} image(s) flagged unknown by the OOD score")
        if self.skipped:
            shown = "; ".join(f"{p} ({r})" for p, r in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            fill = ", answered with the fill answer" if self.n_filled else ", left out of the output"
            lines.append(f"skipped {len(self.skipped)} unreadable image(s){fill}: {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- members
@dataclass
class _Loaded:
    """An ensemble member, loaded once for all chunks: a checkpoint's TaxonModel or an ONNX session."""

    path: Path
    model: object
    meta: dict
    taxonomy: Taxonomy


@dataclass
class _Member:
    checkpoint: Path
    probs: np.ndarray        # (n, L) calibrated probabilities
    features: np.ndarray     # (n, F)
    logits: np.ndarray       # (n, L) raw logits (mean over views with TTA)
    positions: np.ndarray    # (n,) row positions in the input


def _member_rows(member: _Loaded, images: ImageInput) -> tuple[Dataset, pd.DataFrame, str | None]:
    """(dataset, rows, path column) that a member reads the images through (the labels left empty)."""
    # a dataset with context_path feeds context-input models their scenes; a folder or CSV gives the images
    path_column = None if images.kind == "dataset" else "path"
    rows = images.rows.assign(label="")
    return Dataset(images.root, rows, member.taxonomy), rows, path_column


def _run_member(member: _Loaded, images: ImageInput, dev, tta_views, tta_mode: str, batch_size: int,
                num_workers: int, progress: bool, desc: str, strict: bool = False):
    """One model over the images: its calibrated probabilities, features and raw logits, and what it skipped
    (with `strict`, the first unreadable image raises `UnreadableImageError` naming it instead)."""
    from taxonomist.inference.run_model import infer_rows

    model, meta = member.model, member.meta
    labels = list(meta["labels"])
    temperature = float(meta.get("temperature", 1.0))
    dataset, loader_rows, path_column = _member_rows(member, images)
    out = infer_rows(model, meta, dataset, loader_rows, dev, {lab: i for i, lab in enumerate(labels)},
                     batch_size=batch_size, num_workers=num_workers, progress=progress, desc=desc, tta=tta_views,
                     tta_mode=tta_mode, temperature=temperature, path_column=path_column, strict=strict)
    res = out.result
    if tta_views:
        probs, raw = softmax(res.logits.astype(np.float64)), res.mean_logits
    else:
        probs, raw = apply_temperature(res.logits.astype(np.float64), temperature), res.logits
    return _Member(member.path, probs, res.features, raw, res.indices), out.skipped


# ---------------------------------------------------------------------------------------------- kaggle
def check_kaggle_submission(frame: pd.DataFrame, expected_ids: Sequence[str], candidates: Sequence[str]) -> None:
    """Raise `SubmissionError` listing every problem of an `annotation_id,concept_name` table: other columns,
    an expected id missing or repeated, an id not expected, an empty name or one outside `candidates`."""
    problems: list[str] = []
    if list(frame.columns) != ["annotation_id", "concept_name"]:
        problems.append(f"submission columns are {','.join(map(str, frame.columns))}; "
                        "expected annotation_id,concept_name")
    else:
        ids = frame["annotation_id"].astype(str).to_numpy()
        names = frame["concept_name"].astype(str).to_numpy()
        expected = set(map(str, expected_ids))
        counts = pd.Series(ids).value_counts()
        repeated = counts[counts > 1]
        if len(repeated):
            problems.append(f"annotation_id {repeated.index[0]!r} appears {int(repeated.iloc[0])} times "
                            f"({len(repeated)} repeated ids)")
        missing = sorted(expected - set(ids))
        if missing:
            problems.append(f"{len(missing)} annotation id(s) have no answer, e.g. {missing[0]!r}")
        extra = sorted(set(ids) - expected)
        if extra:
            problems.append(f"{len(extra)} annotation id(s) are not in the input, e.g. {extra[0]!r}")
        allowed = set(candidates)
        bad = [k for k, n in enumerate(names) if n not in allowed]
        if bad:
            k = bad[0]
            problems.append(f"row {k + 2}: concept_name {names[k]!r} (annotation_id {ids[k]!r}) is not in the "
                            f"candidate set of {len(allowed)} names{suggest(names[k], allowed)} "
                            f"({len(bad)} such rows)")
    if problems:
        raise SubmissionError(problems)


def _annotation_ids(images: ImageInput) -> np.ndarray:
    if "annotation_id" not in images.rows.columns:
        raise DataError(f"{images.source}: --format kaggle needs an annotation_id column "
                        f"(columns: {','.join(images.rows.columns)}); give a CSV or a prepared dataset that has one")
    ids = images.rows["annotation_id"].astype(str).str.strip().to_numpy()
    empty = np.flatnonzero(ids == "")
    if len(empty):
        raise DataError(f"{images.source}: row {empty[0] + 2}: empty annotation_id")
    seen: dict[str, int] = {}
    for k, value in enumerate(ids):
        if value in seen:
            raise DataError(f"{images.source}: row {k + 2}: annotation_id {value!r} repeats row {seen[value] + 2}")
        seen[value] = k
    return ids


# ---------------------------------------------------------------------------------------------- output
def _answer_probability(probs: np.ndarray, taxonomy: Taxonomy, nodes: np.ndarray) -> np.ndarray:
    """P(answer): the summed probability of the labels at or below each answer."""
    under = ancestor_operator(taxonomy).tocsc()[:, nodes]  # (L, N): label l at or below answer n
    return np.asarray(under.multiply(probs.T).sum(axis=0)).ravel()


def _level_columns(taxonomy: Taxonomy, nodes: np.ndarray) -> dict[str, list[str]]:
    """Per-rank (or per-depth, for unranked trees) columns: the answer's ancestor-or-self at that level."""
    names = np.array(list(taxonomy.names) + [""], dtype=object)  # index -1 → ""
    cols: dict[str, list[str]] = {}
    if taxonomy.has_ranks:
        codes = taxonomy.rank_codes()[nodes]
        for level in taxonomy.levels():
            cols[level.name] = names[codes[:, RANK_INDEX[level.name]]].tolist()
    else:
        anc = taxonomy.ancestor_table()[nodes]
        for level in taxonomy.levels():
            cols[level.name] = names[anc[:, int(level.name.removeprefix("depth"))]].tolist()
    return cols


def _fill_answer(taxonomy: Taxonomy, metric: str, candidates: list[str]) -> str:
    """The candidate with the least mean distance to the labels: min-risk under a uniform label prior."""
    d = distance_matrix(taxonomy, metric, rows=taxonomy.labels, cols=candidates)
    return candidates[int(d.mean(axis=0).argmin())]


# ---------------------------------------------------------------------------------------------- predict
def predict(checkpoints: Sequence[str | Path] | str | Path, images: str | Path, out: str | Path,
            decision: str = "argmax", candidates: str | Path | Sequence[str] | None = None,
            thresholds: str | Mapping | float | None = None, ood: str | None = None,
            ood_threshold: float | None = None, ood_tpr: float | None = None, tta=None, fmt: str = "csv",
            batch_size: int = 64, device: str = "auto", ensemble_mode: str = "arithmetic",
            weights: Sequence[float] | None = None, progress: bool = True, selective_threshold: float | None = None,
            ood_fallback_level: str | int | float | None = "auto", tta_mode: str = "mean_probs",
            split: str | None = None, num_workers: int = -1, fill_unreadable: bool = False,
            chunk_size: int = DEFAULT_CHUNK_SIZE, resume: bool = False, strict: bool = False,
            trust_code: bool = False, top_k: int | None = None) -> PredictSummary:
    """Predict every image of `images` with one model or an ensemble, and write `out`.

    Args:
        checkpoints: checkpoint files, run directories (→ their best checkpoint) or exported `.onnx` files.
            Several = an ensemble: same labels and taxonomy required; each member uses its own preprocessing,
            temperature and TTA views; probabilities are combined with `decide.combine_probs(weights,
            ensemble_mode)`.
        images: a folder (recursive), a CSV with a `path` column relative to its folder (other columns are
            kept), or a dataset directory (`split` keeps one split).
        decision: `argmax`, `min-risk`, `backoff`, `selective`, `rollup` or `common-ancestor` (`decide.decide`).
        candidates: `None` (training labels for argmax/min-risk, every node for backoff/selective; the
            training labels for every rule with `fmt='kaggle'`), `all`, `fathomnet2025`, a file or a list.
        thresholds: backoff thresholds, `species=0.6,…`, a dict or one number (default: the config ladder);
            rollup's sum (default 0.65) or common-ancestor's share (default 0.78), one number.
        top_k: rollup (default 5) and common-ancestor (default 15): how many of the most probable labels count.
        selective_threshold: the selective rule's P(answer) target (default: `thresholds` when it is one
            number, else 0.5).
        ood: one of `PREDICT_OOD_METHODS`: adds `ood_score` and `unknown` columns. `auto` is
            `decide.AUTO_OOD_METHOD` (mahalanobis). `msp`, `max-logit`, `energy`, `mahalanobis`, `knn`,
            `relative-mahalanobis`, `vim`, `react-energy` use the statistics stored at calibration; `odin` and `mc-dropout`
            run the model again per image (`inference.ood_model`, with the options the checkpoint was
            calibrated with — `decide.model_ood` at training — else the defaults; PyTorch checkpoints only);
            `ensemble` scores the members' disagreement (mutual information; two or more checkpoints and an
            `ood_threshold`). An example is unknown when its score ≥ the threshold: `ood_threshold` (one
            checkpoint, or `ensemble`), else the threshold keeping `ood_tpr` (default 0.95) of the known
            validation examples. With an ensemble and another method, `ood_score` is the members' mean of
            (score − own threshold) and unknown means ≥ 0. With min-risk, backoff or selective an unknown's
            answer falls back to the deepest ancestor at or above `ood_fallback_level` (`auto`: order for ranked trees,
            depth 1 otherwise) that is a candidate (`decide.ood_fallback`); argmax answers are only flagged.
        tta: None, True (`DEFAULT_TTA`), a spec (`parse_tta`) or a list of `View`s; `tta_mode` merges views.
        fmt: `csv` — `path,prediction,confidence`, one column per rank (or depth), `expected_distance`,
            [`ood_score,unknown`], then the input's other columns; unreadable images get no row.
            `kaggle` — `annotation_id,concept_name` for every input row, validated before writing; an
            unreadable image is an error unless `fill_unreadable` (then it gets the candidate with the least
            mean distance to the labels, and the summary says how many).
        chunk_size: rows per chunk. Each chunk's decisions are written atomically to `OUT.parts/` and the
            folder is removed once `out` is written. Every row's answer depends on that row alone (the OOD
            threshold comes from the stored calibration), so chunks are independent.
        resume: keep the parts of an interrupted run with the same models, options and images (a part whose
            key differs is predicted again); without it every chunk is predicted.
        strict: stop at the first unreadable image with an error naming it, instead of skipping and listing it.
        trust_code: load checkpoints whose backbone imports code (`module:`) or fetches it (`open_clip:hf-hub:`);
            without it they are refused (a model file is data). ONNX files never import their backbone.

    `out` may not be one of the inputs (the images CSV, the dataset's annotations.csv or taxonomy.csv, an image, a
    model file, the candidates file): that is refused before anything runs.

    Under torchrun (WORLD_SIZE > 1) chunk c goes to rank c mod WORLD_SIZE (gloo on CPU, nccl on CUDA, each
    rank on cuda:LOCAL_RANK), and rank 0 merges the parts in chunk order once every rank is done, so the
    output equals a single-process run. With several nodes `out` must be on a filesystem they share.

    Returns a `PredictSummary` (on ranks other than 0, of that rank's chunks). The output is written atomically.
    """
    from taxonomist.inference.calibrate import check_tpr
    from taxonomist.inference.model_file import read_model_metadata, resolve_model
    from taxonomist.train.checkpoint import taxonomy_from_json
    from taxonomist.train.loop import configure_threads, select_device

    start = time.time()
    # every option is checked before a model runs: a typo must not cost a pass over the images
    for value, allowed, what in ((decision, DECISIONS, "decision"), (fmt, FORMATS, "format"),
                                 (ensemble_mode, COMBINE_MODES, "ensemble mode"), (tta_mode, VIEW_MODES, "TTA mode")):
        if value not in allowed:
            raise ConfigError(f"unknown {what} {value!r}{suggest(str(value), allowed)}; "
                              f"choose one of {', '.join(allowed)}")
    for value, what in ((batch_size, "batch size"), (chunk_size, "chunk size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not paths:
        raise ConfigError("no checkpoint given")
    ckpts = [resolve_model(p) for p in paths]
    if weights is not None and len(weights) != len(ckpts):
        raise ConfigError(f"{len(weights)} weights for {len(ckpts)} checkpoints; give one weight per checkpoint")
    ood = resolve_ood_method(ood)  # `auto`: the score measured best on real data
    check_ood_options(ood, ood_threshold, ood_tpr, ckpts)
    if ood_tpr is not None:
        check_tpr(ood_tpr)
    metas = [read_model_metadata(ckpt) for ckpt in ckpts]
    _check_trusted(ckpts, metas, trust_code)  # refused now, before the images are read or OUT.parts/ is made
    meta0 = metas[0]
    taxonomy = taxonomy_from_json(meta0["taxonomy"])
    for ckpt, meta in zip(ckpts[1:], metas[1:]):
        if list(meta["labels"]) != list(meta0["labels"]):
            raise ModelError(f"{ckpt}: its {len(meta['labels'])} labels differ from those of {ckpts[0]} "
                             f"({len(meta0['labels'])} labels); ensemble members must share one label list")
        if taxonomy_from_json(meta["taxonomy"]).hash != taxonomy.hash:
            raise ModelError(f"{ckpt}: its taxonomy differs from that of {ckpts[0]}; ensemble members must share one")
    metric = meta0.get("metric", "auto")
    metric = default_metric(taxonomy) if metric in ("", "auto") else metric
    if candidates is None and fmt == "kaggle":
        candidates = ""  # a submission may only name labels the scorer knows
    cand = None if candidates is None else candidate_nodes(taxonomy, candidates)
    rule_thr = _rule_thresholds(decision, parse_thresholds(thresholds), selective_threshold, taxonomy, top_k)
    fallback = _parse_fallback(ood_fallback_level, taxonomy) if ood else None
    tta_views = _tta_views(tta)
    images_in = read_images(images, split)
    _refuse_out_over_inputs(out, ckpts, images_in, candidates)
    ids = _annotation_ids(images_in) if fmt == "kaggle" else None

    shard = Shard.from_env()
    dev = select_device(device)
    if dev.type == "cuda" and shard.world > 1:
        import torch

        dev = torch.device("cuda", shard.local_rank)
        torch.cuda.set_device(dev)
    configure_threads(0, dev, num_workers)
    rules = _Rules(taxonomy, decision, cand, metric, rule_thr, weights, ensemble_mode, ood, ood_threshold, ood_tpr,
                   fallback, tta_views, tta_mode, batch_size, num_workers, strict, top_k)
    base_key = run_key({"models": [_model_identity(c, m) for c, m in zip(ckpts, metas)], "rules": rules.key(),
                        "images": str(images_in.root.resolve())})
    store = PartStore(out)
    started = start_group(shard, dev)
    try:
        mine = shard.chunks(len(images_in.rows), chunk_size)
        n_answered, n_resumed = _predict_chunks(ckpts, images_in, mine, store, base_key, rules, dev, shard,
                                                resume, progress, trust_code)
        n_resumed_all, _ = sum_across([n_resumed, 0], shard, dev)  # also: wait until every rank is done
    finally:
        end_group(started)
    out = Path(out)
    views = tuple(v.name for v in tta_views) if tta_views else ()
    n_chunks = chunk_count(len(images_in.rows), chunk_size)
    if shard.rank != 0:
        return PredictSummary(out, len(images_in.rows), n_answered, seconds=time.time() - start, decision=decision,
                              checkpoints=ckpts, views=views, fmt=fmt, chunks=n_chunks, chunks_resumed=n_resumed,
                              processes=shard.world, rank=shard.rank)

    merged = ChunkResult.concat([_read_part(store, k, base_key, images_in, chunk_size) for k in range(n_chunks)])
    common = merged.positions
    paths_col = images_in.rows["path"].to_numpy()
    skipped = [(paths_col[p], str(r)) for p, r in zip(merged.skipped_positions, merged.skipped_reasons)]
    if len(common) == 0:
        path, reason = skipped[0]
        raise DataError(f"{images_in.source}: no image could be read ({len(skipped)} unreadable; the first: "
                        f"{path}: {reason})")
    nodes = merged.nodes
    ood_score, unknown = (merged.ood_score, merged.unknown.astype(bool)) if ood else (None, None)

    n_filled = 0
    if fmt == "kaggle":
        answers = np.full(len(images_in.rows), "", dtype=object)
        answers[common] = [taxonomy.names[n] for n in nodes]
        allowed = cand if cand is not None else list(taxonomy.labels)
        if skipped:
            if not fill_unreadable:
                path, reason = skipped[0]
                raise DataError(f"{images_in.root / path}: {reason}; --format kaggle needs an answer for every "
                                f"annotation ({len(skipped)} unreadable image(s)); fix them or pass "
                                "--fill-unreadable")
            missing = np.setdiff1d(np.arange(len(images_in.rows)), common)
            answers[missing] = _fill_answer(taxonomy, metric, list(allowed))
            n_filled = len(missing)
        frame = pd.DataFrame({"annotation_id": ids, "concept_name": answers})
        check_kaggle_submission(frame, ids, allowed)
    else:
        frame = _decisions_table(images_in, common, nodes, merged.confidence, merged.expected_distance, taxonomy,
                                 ood_score, unknown)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    store.remove()
    return PredictSummary(out, len(images_in.rows), len(common), skipped,
                          None if unknown is None else int(unknown.sum()), n_filled, time.time() - start, decision,
                          ckpts, views, fmt, n_chunks, n_resumed_all, shard.world, 0)


@dataclass
class _Rules:
    """Everything besides the models and the images that decides a row's answer."""

    taxonomy: Taxonomy
    decision: str
    cand: Sequence | None
    metric: str
    rule_thr: object
    weights: Sequence[float] | None
    ensemble_mode: str
    ood: str | None
    ood_threshold: float | None
    ood_tpr: float | None
    fallback: object
    tta_views: list | None
    tta_mode: str
    batch_size: int
    num_workers: int
    strict: bool = False     # fail on the first unreadable image; changes no answer, so not part of the key
    top_k: int | None = None  # rollup / common-ancestor: the labels that count (None: the rule's default)

    def key(self) -> dict:
        """What a part file's key covers (the batch size too: it can move float results in the last digit)."""
        return {"taxonomy": self.taxonomy.hash, "decision": self.decision, "metric": self.metric,
                "candidates": None if self.cand is None else [str(n) for n in self.cand],
                "thresholds": repr(self.rule_thr), "weights": None if self.weights is None else list(self.weights),
                "ensemble_mode": self.ensemble_mode, "ood": self.ood, "ood_threshold": self.ood_threshold,
                "ood_tpr": self.ood_tpr, "fallback": repr(self.fallback),
                "tta": [v.name for v in self.tta_views] if self.tta_views else None, "tta_mode": self.tta_mode,
                "batch_size": self.batch_size, "top_k": self.top_k}


def _model_identity(path: Path, meta: dict) -> dict:
    """A model as a part key sees it: the file (path, size, modification time) and its metadata."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "metadata": run_key(meta)}


def _check_trusted(ckpts: list[Path], metas: list[dict], trust_code: bool) -> None:
    """A checkpoint whose backbone imports code is refused without `trust_code` (an ONNX file builds none)."""
    from taxonomist.inference.model_file import is_onnx
    from taxonomist.models.backbones import check_backbone_trusted
    from taxonomist.train.checkpoint import metadata_path

    for ckpt, meta in zip(ckpts, metas):
        config = meta.get("model_config")
        if not is_onnx(ckpt) and isinstance(config, dict):
            check_backbone_trusted(config.get("backbone"), metadata_path(ckpt), trust_code)


def _refuse_out_over_inputs(out, ckpts: list[Path], images_in: ImageInput, candidates) -> None:
    """`out` must be none of the files predict reads: refused by resolved path (or as the same file)."""
    from taxonomist.inference.model_file import model_file_parts
    from taxonomist.utils.files import refuse_output_over_inputs

    what = {"csv": "the images CSV", "dataset": "the dataset's annotations.csv"}.get(images_in.kind, "the images folder")
    inputs = [(images_in.source, what)]
    if images_in.kind == "dataset":
        inputs.append((images_in.root / "taxonomy.csv", "the dataset's taxonomy.csv"))
    if isinstance(candidates, (str, Path)) and str(candidates) not in ("", "all", "fathomnet2025"):
        inputs.append((Path(candidates), "the candidates file"))
    for ckpt in ckpts:
        inputs += model_file_parts(ckpt)
    refuse_output_over_inputs(out, inputs)
    # an image among the inputs (a folder, or the rows of a CSV or dataset)
    try:
        relative = Path(out).expanduser().resolve().relative_to(images_in.root.resolve()).as_posix()
    except ValueError:
        return
    if relative in set(images_in.rows["path"].astype(str)):
        refuse_output_over_inputs(out, [(images_in.root / relative, "one of the images")])


def _predict_chunks(ckpts: list[Path], images_in: ImageInput, mine: list, store: PartStore, base_key: str,
                    rules: _Rules, dev, shard: Shard, resume: bool, progress: bool,
                    trust_code: bool = False) -> tuple[int, int]:
    """Predict this process's chunks into part files; return (rows answered, chunks kept from a previous run)."""
    from tqdm import tqdm

    from taxonomist.inference.model_file import load_model

    paths = images_in.rows["path"].to_numpy()
    todo, n_answered, n_resumed = [], 0, 0
    for c, a, b in mine:
        key = chunk_key(base_key, paths[a:b])
        kept = store.read(c, key) if resume else None
        if kept is not None:
            n_resumed += 1
            n_answered += len(kept.positions)
        else:
            todo.append((c, a, b, key))
    if not todo:
        return n_answered, n_resumed
    # models load once per process, and not at all when every chunk of a resumed process is done
    loaded = [_Loaded(p, *load_model(p, device=str(dev), trust_code=trust_code)) for p in ckpts]
    scorers = member_ood_scorers(ckpts, rules.ood, rules.ood_threshold, rules.ood_tpr) if rules.ood else None
    desc = "predict" if shard.world == 1 else f"predict (rank 0 of {shard.world})"
    with tqdm(total=sum(b - a for _, a, b, _ in todo), desc=desc, unit="img", leave=False, file=sys.stderr,
              disable=not progress or shard.rank != 0) as bar:
        for c, a, b, key in todo:
            chunk = ImageInput(images_in.root, images_in.rows.iloc[a:b].reset_index(drop=True), images_in.kind,
                               images_in.source)
            result = _predict_chunk(loaded, chunk, a, rules, scorers, dev)
            store.write(c, key, result)
            n_answered += len(result.positions)
            bar.update(b - a)
    return n_answered, n_resumed


def _predict_chunk(loaded: list[_Loaded], chunk: ImageInput, offset: int, rules: _Rules, scorers, dev) -> ChunkResult:
    """The decisions of one chunk's rows (positions in the result are absolute: `offset` + row in the chunk)."""
    common, aligned, skipped = _run_members(loaded, chunk, dev, rules.tta_views, rules.tta_mode, rules.batch_size,
                                            rules.num_workers, rules.strict)
    skipped_positions = np.array([offset + k for k, _ in skipped], dtype=np.int64)
    skipped_reasons = np.array([reason for _, reason in skipped], dtype=str)
    empty_f, empty_i = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    if len(common) == 0:
        return ChunkResult(empty_i, empty_i, empty_f, empty_f, empty_f, np.zeros(0, dtype=bool), skipped_positions,
                           skipped_reasons)
    taxonomy = rules.taxonomy
    probs = aligned[0][0] if len(aligned) == 1 else combine_probs([m[0] for m in aligned], rules.weights,
                                                                  rules.ensemble_mode, kind="probs")
    nodes = decide(probs, taxonomy, rules.decision, candidates=rules.cand, metric=rules.metric,
                   thresholds=rules.rule_thr, top_k=rules.top_k).nodes.copy()
    ood_score, unknown = empty_f, np.zeros(0, dtype=bool)
    if scorers is not None:
        ood_score, unknown = _flag_unknowns(rules, scorers, loaded, aligned, chunk, common, dev)
        if rules.decision != "argmax" and unknown.any():
            nodes = ood_fallback(nodes, unknown, taxonomy, rules.fallback, probs=probs, candidates=rules.cand)
    answered = sorted(set(nodes.tolist()))
    column = {n: i for i, n in enumerate(answered)}
    dist = distance_matrix(taxonomy, rules.metric, rows=taxonomy.labels, cols=[taxonomy.names[n] for n in answered])
    exp_dist = expected_distance(probs, dist, np.array([column[n] for n in nodes.tolist()], dtype=np.int64))
    return ChunkResult(offset + common.astype(np.int64), nodes.astype(np.int64),
                       _answer_probability(probs, taxonomy, nodes).astype(np.float64), exp_dist.astype(np.float64),
                       np.asarray(ood_score, dtype=np.float64), np.asarray(unknown, dtype=bool), skipped_positions,
                       skipped_reasons)


def _read_part(store: PartStore, chunk: int, base_key: str, images_in: ImageInput, chunk_size: int) -> ChunkResult:
    a = chunk * chunk_size
    b = min(len(images_in.rows), a + chunk_size)
    part = store.read(chunk, chunk_key(base_key, images_in.rows["path"].to_numpy()[a:b]))
    if part is None:
        raise DataError(f"{store.path(chunk)}: the part of rows {a + 1}–{b} is missing or stale after every process "
                        "finished; with several nodes, --out must be on a filesystem they all share")
    return part


def _rule_thresholds(decision: str, thr, selective_threshold: float | None, taxonomy: Taxonomy,
                     top_k: int | None = None):
    """The `thresholds` argument of `decide` for the rule, validated against the taxonomy (and `top_k` checked
    against the rule: only rollup and common-ancestor take it)."""
    from taxonomist.decide import node_thresholds
    from taxonomist.decide.heuristics import check_top_k

    if top_k is not None:
        if decision not in ("rollup", "common-ancestor"):
            raise ConfigError("--top-k applies to --decision rollup and common-ancestor only")
        check_top_k(top_k, "--top-k")
    if decision == "selective":
        if isinstance(thr, Mapping):
            raise ConfigError("--thresholds RANK=P applies to backoff; the selective rule takes one number "
                              "(--selective-threshold P)")
        value = selective_threshold if selective_threshold is not None else (thr if thr is not None else 0.5)
        node_thresholds(taxonomy, value)  # the same check as a one-number threshold: a number in [0, 1]
        return value
    if selective_threshold is not None:
        raise ConfigError("--selective-threshold applies to --decision selective only")
    if decision in ("rollup", "common-ancestor"):
        if isinstance(thr, Mapping):
            raise ConfigError(f"--thresholds RANK=P applies to backoff; {decision} takes one number (--thresholds P)")
        if thr is not None:
            node_thresholds(taxonomy, thr)
        return thr
    if decision == "backoff":
        node_thresholds(taxonomy, thr)
    return thr


def _run_members(members: list[_Loaded], images_in: ImageInput, dev, tta_views, tta_mode: str, batch_size: int,
                 num_workers: int, strict: bool = False):
    """Run every member; return the row positions every member answered, each member's (probs, features, raw
    logits) on those rows in that order, and the skipped rows as (position, reason)."""
    results, skipped_by_row = [], {}
    for member in members:
        result, skipped = _run_member(member, images_in, dev, tta_views, tta_mode, batch_size, num_workers, False,
                                      "predict", strict=strict)
        for s in skipped:
            skipped_by_row.setdefault(int(s.index), s.reason)
        results.append(result)
    # an image unreadable for one member (the same file, so normally for all) is dropped for all
    common = results[0].positions
    for m in results[1:]:
        common = np.intersect1d(common, m.positions)
    common = np.sort(common)
    aligned = []
    for m in results:
        take = _take(m.positions, common)
        aligned.append((m.probs[take], m.features[take], m.logits[take]))
    for p in np.setdiff1d(np.arange(len(images_in.rows)), common):
        skipped_by_row.setdefault(int(p), "not predicted by every member")
    return common, aligned, [(k, skipped_by_row[k]) for k in sorted(skipped_by_row)]


def check_ood_options(ood: str | None, threshold: float | None, tpr: float | None, ckpts: list[Path]) -> None:
    """The `--ood` options that need no model file read: the method, and a threshold the method can use."""
    from taxonomist.inference.model_file import is_onnx

    if threshold is not None and tpr is not None:
        raise ConfigError("give either an OOD threshold or an OOD TPR, not both")
    if (threshold is not None or tpr is not None) and not ood:
        raise ConfigError("an OOD threshold or TPR needs an OOD method (--ood METHOD)")
    if not ood:
        return
    if ood not in PREDICT_OOD_METHODS:
        raise ConfigError(f"unknown OOD method {ood!r}{suggest(str(ood), PREDICT_OOD_METHODS)}; "
                          f"choose one of {', '.join(PREDICT_OOD_METHODS)}")
    if ood == "ensemble":
        if len(ckpts) < 2:
            raise ConfigError("--ood ensemble scores the disagreement of several checkpoints; give two or more")
        if threshold is None:
            # members trained on different folds share no held-out rows to fit a threshold on
            raise ConfigError("--ood ensemble needs --ood-threshold T (no validation scores are stored for an "
                              "ensemble; `taxonomist evaluate RUN --ensemble OTHER…` reports ood.ensemble.threshold)")
        return
    if threshold is not None and len(ckpts) > 1:
        raise ConfigError("an absolute OOD threshold fits one model's scores; with an ensemble use an OOD TPR")
    if ood in MODEL_OOD_METHODS:
        for ckpt in ckpts:
            if is_onnx(ckpt):
                raise ConfigError(f"{ckpt}: --ood {ood} runs the PyTorch model again "
                                  f"({'gradients with respect to the input' if ood == 'odin' else 'dropout on'}); "
                                  "an exported ONNX model cannot: give its .safetensors checkpoint")


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

    if method == "ensemble":
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


def _flag_unknowns(rules: _Rules, scorers: list[MemberOOD], loaded: list[_Loaded], aligned: list,
                   chunk: ImageInput, common: np.ndarray, dev):
    """(ood_score, unknown) of the rows `common` of `chunk`: the raw score for one model; for an ensemble the
    mean margin (score − own threshold) over members, or with `ensemble` the members' disagreement."""
    if rules.ood == "ensemble":
        temps = [float(m.meta.get("temperature", 1.0)) for m in loaded]
        score = ensemble_disagreement([raw for _, _, raw in aligned], temps)
        return score, score >= rules.ood_threshold
    scores, margins = [], []
    for member, how, (_, features, raw_logits) in zip(loaded, scorers, aligned):
        if how.scorer is not None:
            s = how.scorer.score(features, raw_logits)
        else:
            s = _model_ood_scores(member, how, rules, chunk, common, dev)
        scores.append(s)
        margins.append(s - how.threshold)
    if len(scorers) == 1:
        return scores[0], margins[0] >= 0
    # members' scores live on different scales; their distances to their own thresholds are comparable
    mean_margin = np.mean(margins, axis=0)
    return mean_margin, mean_margin >= 0


def _model_ood_scores(member: _Loaded, how: MemberOOD, rules: _Rules, chunk: ImageInput, common: np.ndarray,
                      dev) -> np.ndarray:
    """ODIN / MC-dropout scores of one member on the rows `common` of `chunk` (without TTA: one view)."""
    from taxonomist.inference.ood_model import model_ood_rows

    dataset, rows, path_column = _member_rows(member, chunk)
    labels = list(member.meta["labels"])
    result = model_ood_rows(rules.ood, member.model, member.meta, dataset, rows, dev,
                            {lab: i for i, lab in enumerate(labels)}, how.options, batch_size=rules.batch_size,
                            num_workers=rules.num_workers, strict=rules.strict, path_column=path_column)
    try:
        return result.scores[_take(result.indices, common)]
    except KeyError as e:
        raise DataError(f"{chunk.root / chunk.rows['path'].iloc[e.args[0]]}: readable for the prediction but "
                        f"not for the {rules.ood} score") from None


def _take(positions: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of the row positions `wanted` sits in `positions` (a KeyError names one that is absent)."""
    where = {int(p): i for i, p in enumerate(positions)}
    return np.array([where[int(p)] for p in wanted], dtype=np.int64)


def _decisions_table(images_in: ImageInput, common: np.ndarray, nodes: np.ndarray, confidence: np.ndarray,
                     exp_dist: np.ndarray, taxonomy: Taxonomy, ood_score, unknown) -> pd.DataFrame:
    """The csv output: path, prediction, confidence, levels, expected distance, OOD columns, input columns."""
    frame = pd.DataFrame({"path": images_in.rows["path"].to_numpy()[common],
                          "prediction": [taxonomy.names[n] for n in nodes],
                          "confidence": np.round(confidence, 6)})
    for name, values in _level_columns(taxonomy, nodes).items():
        frame[name] = values
    frame["expected_distance"] = np.round(exp_dist, 6)
    if ood_score is not None:
        # unrounded: ODIN's scores (max softmax at T = 1000) differ in the 7th decimal
        frame["ood_score"] = np.asarray(ood_score, dtype=np.float64)
        frame["unknown"] = unknown.astype(bool)
    for col in images_in.rows.columns:
        if col != "path":
            frame[col if col not in frame.columns else f"{col}_input"] = images_in.rows[col].to_numpy()[common]
    return frame
