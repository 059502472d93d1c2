"""Batch prediction: one or several models (checkpoints or exported ONNX files) over a folder, a CSV or a
dataset, to a decisions CSV.

Each member applies its own preprocessing, temperature and optional TTA (`inference.members`); `decide.answer`
turns the combined probabilities and OOD scores into answers, and `--format kaggle` writes a validated
submission (`inference.submission`); Darwin Core, JSON lines and the embeddings' Parquet file are
`inference.formats`'. The input is processed in chunks whose decisions are kept as part files
(`inference.sharding`), so that a run can resume after a kill and can be spread over processes with torchrun.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from taxonomist.card import ModelCard
from taxonomist.decide import (COMBINE_MODES, PREDICT_OOD_METHODS, DecisionOptions, answer, answer_levels,
                               combine_probs)
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.inference.formats import (FORMATS, ModelIdentity, Provenance, check_embeddings_path, chunk_outputs,
                                          dwc_table, require_pyarrow, write_embeddings, write_jsonl)
from taxonomist.inference.images import IMAGE_EXTENSIONS, ImageInput, read_images
from taxonomist.inference.members import (Member, check_ood_members, member_ood_scorers, ood_scores,
                                          run_members)
from taxonomist.inference.sharding import (DEFAULT_CHUNK_SIZE, ChunkResult, PartStore, Shard, chunk_count, chunk_key,
                                           end_group, run_key, start_group, sum_across)
from taxonomist.inference.submission import annotation_ids, check_kaggle_submission, fill_answer
from taxonomist.taxonomy import Taxonomy, suggest
from taxonomist.utils.files import atomic_path

#: The `DecisionOptions` fields `predict` also takes as keywords (the keyword path of earlier versions), and the
#: old name of one of them.
DECISION_KEYWORDS = frozenset(f for f in DecisionOptions.__dataclass_fields__ if f != "resolved_for")
_RENAMED = {"ood_fallback_level": "ood_fallback"}


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
    engines: tuple = ()                                # what ran the models: onnxruntime, PyTorch (none if resumed)
    #: with --priors: rows whose context shifted the probabilities, whose answer changed, whose keys conflicted,
    #: and the taxa the priors file names that the model does not know
    priors: dict | None = None
    embeddings: Path | None = None                     # --embeddings: the Parquet file written
    embedding_dims: tuple = ()                         # its feature width per model

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
        engines = f" with {' and '.join(self.engines)}" if self.engines else ""
        lines = [f"predicted {self.n_predicted} of {self.n_images} images ({self.decision}, {members}{tta}{procs})"
                 f"{engines} in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s); wrote {self.out} ({self.fmt})"]
        if self.embeddings is not None:
            width = " + ".join(str(d) for d in self.embedding_dims)
            lines.append(f"wrote the pooled features of {self.n_predicted} images ({width} per image) to "
                         f"{self.embeddings}")
        if self.chunks_resumed:
            lines.append(f"resumed: {self.chunks_resumed} of {self.chunks} chunks were already predicted")
        if self.n_unknown is not None:
            lines.append(f"{self.n_unknown} image(s) flagged unknown by the OOD score")
        if self.priors is not None:
            lines.append(prior_summary(self.priors, self.n_predicted, self.fmt))
        if self.skipped:
            shown = "; ".join(f"{p} ({r})" for p, r in self.skipped[:3])
            more = f"; and {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
            fill = ", answered with the fill answer" if self.n_filled else ", left out of the output"
            lines.append(f"skipped {len(self.skipped)} unreadable image(s){fill}: {shown}{more}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- predict
def predict(checkpoints: Sequence[str | Path] | str | Path, images: str | Path, out: str | Path,
            options: DecisionOptions | None = None, *, fmt: str = "csv", batch_size: int = 64, device: str = "auto",
            ensemble_mode: str = "arithmetic", weights: Sequence[float] | None = None, progress: bool = True,
            split: str | None = None, num_workers: int = -1, fill_unreadable: bool = False,
            chunk_size: int = DEFAULT_CHUNK_SIZE, resume: bool = False, strict: bool = False,
            trust_code: bool = False, engine: str = "auto", embeddings: str | Path | None = None,
            **decision) -> PredictSummary:
    """Predict every image of `images` with one model or an ensemble, and write `out`.

    Args:
        checkpoints: checkpoint files, run directories (→ their best checkpoint) or exported `.onnx` files.
            Several = an ensemble: same labels and taxonomy required; each member uses its own preprocessing,
            temperature and TTA views; probabilities are combined with `decide.combine_probs(weights,
            ensemble_mode)`.
        images: a folder (recursive), a CSV with a `path` column relative to its folder (other columns are
            kept), or a dataset directory (`split` keeps one split).
        options: how probabilities become answers (`decide.DecisionOptions`: the rule, candidates, thresholds,
            OOD method and threshold, fallback, TTA); default `DecisionOptions()` (argmax). Its fields may be given
            as keywords instead (`decision="min-risk", ood="energy"`, …; `ood_fallback_level` is `ood_fallback`),
            as in earlier versions:
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
            answer falls back to the deepest ancestor at or above `ood_fallback` (`auto`: order for ranked trees,
            depth 1 otherwise) that is a candidate (`decide.ood_fallback`); argmax answers are only flagged.
        tta: None, True (`DEFAULT_TTA`), a spec (`parse_tta`) or a list of `View`s; `tta_mode` merges views.
        fmt: `csv` — `path,prediction,confidence`, one column per rank (or depth), `expected_distance`,
            [`ood_score,unknown`], then the input's other columns; unreadable images get no row.
            `kaggle` — `annotation_id,concept_name` for every input row, validated before writing; an
            unreadable image is an error unless `fill_unreadable` (then it gets the candidate with the least
            mean distance to the labels, and the summary says how many).
            `dwc` — Darwin Core: one identification per answered row with Darwin Core terms only (`occurrenceID`,
            `identificationID`, `associatedMedia`, `scientificName`, the qualifier, rank and lineage, remarks,
            `identifiedBy`, `dateIdentified`; `inference.formats.dwc_table` says how each is filled).
            `jsonl` — one JSON object per answered image: `path`, the answer as `serve` returns it (decision,
            confidence, rank, lineage with P per level, top labels, OOD, the rule; the raw answer with priors) and
            `input`, the input's other columns (`inference.formats.jsonl_lines`).
        embeddings: also write each answered image's pooled features to this Parquet file (needs pyarrow, the
            `parquet` extra): `path`, the input's `occurrenceID`/`annotation_id`/`image_id` columns, and a
            fixed-size list<float32> column `embedding` (`embedding_0`, `embedding_1`, … per ensemble member); with
            TTA the mean over the views. The file's metadata names each column's model, SHA-256 and width
            (`inference.formats.read_embeddings_metadata`).
        chunk_size: rows per chunk. Each chunk's decisions are written atomically to `OUT.parts/` and the
            folder is removed once `out` is written. Every row's answer depends on that row alone (the OOD
            threshold comes from the stored calibration), so chunks are independent.
        resume: keep the parts of an interrupted run with the same models, options and images (a part whose
            key differs is predicted again); without it every chunk is predicted.
        strict: stop at the first unreadable image with an error naming it, instead of skipping and listing it.
        trust_code: load checkpoints whose backbone imports code (`module:`) or fetches it (`open_clip:hf-hub:`);
            without it they are refused (a model file is data). ONNX files never import their backbone.
        engine: what runs a checkpoint (`inference.onnx_model.ENGINES`). `auto`: onnxruntime on CPU — the
            checkpoint exported once into `onnx_model.onnx_cache_dir()`, keyed by its SHA-256 — when the `onnx`
            extra is installed, the export succeeds and no option needs PyTorch (`--ood odin|mc-dropout`); else
            PyTorch, as on CUDA and MPS. `torch` and `onnx` force one (`onnx` refuses what it cannot run). An
            `.onnx` file always runs on onnxruntime. Answers agree across engines; probabilities within ~1e-5.

    `out` and `embeddings` may not be one of the inputs (the images CSV, the dataset's annotations.csv or
    taxonomy.csv, an image, a model file, the candidates file) nor each other: that is refused before anything runs.

    Under torchrun (WORLD_SIZE > 1) chunk c goes to rank c mod WORLD_SIZE (gloo on CPU, nccl on CUDA, each
    rank on cuda:LOCAL_RANK), and rank 0 merges the parts in chunk order once every rank is done, so the
    output equals a single-process run. With several nodes `out` must be on a filesystem they share.

    Returns a `PredictSummary` (on ranks other than 0, of that rank's chunks). The outputs are written atomically,
    once every chunk is done.
    """
    from taxonomist.inference.tta import views_for
    from taxonomist.runtime import configure_threads, select_device

    start = time.time()
    # every option is checked before a model runs: a typo must not cost a pass over the images
    options = _options(options, decision)
    for value, allowed, what in ((fmt, FORMATS, "format"), (ensemble_mode, COMBINE_MODES, "ensemble mode")):
        if value not in allowed:
            raise ConfigError(f"unknown {what} {value!r}{suggest(str(value), allowed)}; "
                              f"choose one of {', '.join(allowed)}")
    if embeddings is not None:
        embeddings = check_embeddings_path(embeddings)
        require_pyarrow()  # now, not after a pass over the images
    for value, what in ((batch_size, "batch size"), (chunk_size, "chunk size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    ckpts, cards = _models(checkpoints, options, weights, engine, trust_code)
    taxonomy = cards[0].taxonomy
    spec = options.candidates
    if spec is None and fmt == "kaggle":
        options = options.replace(candidates="")  # a submission may only name labels the scorer knows
    options = options.resolve(taxonomy, model_metric=cards[0].metric, label_prior=cards[0].label_prior)
    tta_views = views_for(options.tta)
    images_in = read_images(images, split)
    _check_contexts(options, images_in)
    _refuse_out_over_inputs(out, ckpts, images_in, spec)
    if embeddings is not None:
        _refuse_out_over_inputs(embeddings, ckpts, images_in, spec, option="--embeddings")
        if embeddings.resolve() == Path(out).expanduser().resolve():
            raise ConfigError(f"--embeddings {embeddings} is also --out; give the embeddings a file of their own")
    ids = annotation_ids(images_in) if fmt == "kaggle" else None

    shard = Shard.from_env()
    dev = select_device(device)
    if dev.type == "cuda" and shard.world > 1:
        import torch

        dev = torch.device("cuda", shard.local_rank)
        torch.cuda.set_device(dev)
    configure_threads(0, dev, num_workers)
    plan = _Plan(taxonomy, options, weights, ensemble_mode, tta_views, batch_size, num_workers, strict,
                 features=embeddings is not None, records=fmt == "jsonl")
    base_key = run_key({"models": [_model_identity(c, card) for c, card in zip(ckpts, cards)], "rules": plan.key(),
                        "images": str(images_in.root.resolve())})
    store = PartStore(out)
    started = start_group(shard, dev)
    try:
        mine = shard.chunks(len(images_in.rows), chunk_size)
        n_answered, n_resumed, engines = _predict_chunks(ckpts, images_in, mine, store, base_key, plan, dev, shard,
                                                         resume, progress, trust_code, engine)
        n_resumed_all, _ = sum_across([n_resumed, 0], shard, dev)  # also: wait until every rank is done
    finally:
        end_group(started)
    out = Path(out)
    views = tuple(v.name for v in tta_views) if tta_views else ()
    n_chunks = chunk_count(len(images_in.rows), chunk_size)
    decision_name = options.decision
    if shard.rank != 0:
        return PredictSummary(out, len(images_in.rows), n_answered, seconds=time.time() - start,
                              decision=decision_name, checkpoints=ckpts, views=views, fmt=fmt, chunks=n_chunks,
                              chunks_resumed=n_resumed, processes=shard.world, rank=shard.rank, engines=engines)

    merged = ChunkResult.concat([_read_part(store, k, base_key, images_in, chunk_size) for k in range(n_chunks)])
    common = merged.positions
    paths_col = images_in.rows["path"].to_numpy()
    skipped = [(paths_col[p], str(r)) for p, r in zip(merged.skipped_positions, merged.skipped_reasons)]
    if len(common) == 0:
        path, reason = skipped[0]
        raise DataError(f"{images_in.source}: no image could be read ({len(skipped)} unreadable; the first: "
                        f"{path}: {reason})")
    unknown = merged.unknown.astype(bool) if options.ood else None
    priors = None
    if options.priors is not None:
        priors = {**_prior_counts(merged), "source": options.priors.source,
                  "unknown_taxa": list(options.prior_shift.unknown_taxa)}
    identity = ModelIdentity.of(ckpts, cards) if fmt == "dwc" or embeddings is not None else None
    n_filled = 0
    if fmt == "kaggle":
        frame, n_filled = _kaggle_table(images_in, merged, skipped, plan, ids, fill_unreadable)
    elif fmt == "csv":
        frame = _decisions_table(images_in, merged, taxonomy, options)
    elif fmt == "dwc":
        provenance = Provenance(identity, options, plan.rules_key(), datetime.fromtimestamp(start, timezone.utc),
                                ensemble_mode, views)
        frame = dwc_table(images_in.rows, merged, taxonomy, provenance)
    if embeddings is not None:  # before `out`: a finished `out` means every file of the run is there
        with atomic_path(embeddings) as tmp:
            write_embeddings(tmp, images_in.rows, merged, identity, views)
    with atomic_path(out) as tmp:
        if fmt == "jsonl":
            write_jsonl(tmp, images_in.rows, merged)
        else:
            frame.to_csv(tmp, index=False)
    store.remove()
    dims = tuple(int(d) for d in merged.feature_dims[0]) if embeddings is not None else ()
    return PredictSummary(out, len(images_in.rows), len(common), skipped,
                          None if unknown is None else int(unknown.sum()), n_filled, time.time() - start,
                          decision_name, ckpts, views, fmt, n_chunks, n_resumed_all, shard.world, 0, engines,
                          priors=priors, embeddings=embeddings, embedding_dims=dims)


def _models(checkpoints, options: DecisionOptions, weights, engine: str,
            trust_code: bool) -> tuple[list[Path], list[ModelCard]]:
    """The model files resolved and their cards read, checked as the members of one prediction before any image
    is read: one weight each, an engine that can run the options, trusted code, shared labels and taxonomy."""
    from taxonomist.inference.model_file import read_card, resolve_model
    from taxonomist.inference.onnx_model import choose_engine

    paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not paths:
        raise ConfigError("no checkpoint given")
    ckpts = [resolve_model(p) for p in paths]
    if weights is not None and len(weights) != len(ckpts):
        raise ConfigError(f"{len(weights)} weights for {len(ckpts)} checkpoints; give one weight per checkpoint")
    check_ood_members(options, ckpts)
    for ckpt in ckpts:  # an engine that cannot run the options is refused now (the device cannot change that)
        choose_engine(engine, ckpt, "cpu", options.needs_torch)
    cards = [read_card(ckpt) for ckpt in ckpts]
    _check_trusted(ckpts, cards, trust_code)  # refused now, before the images are read or OUT.parts/ is made
    for ckpt, card in zip(ckpts[1:], cards[1:]):
        if list(card.labels) != list(cards[0].labels):
            raise ModelError(f"{ckpt}: its {len(card.labels)} labels differ from those of {ckpts[0]} "
                             f"({len(cards[0].labels)} labels); ensemble members must share one label list")
        if card.taxonomy.hash != cards[0].taxonomy.hash:
            raise ModelError(f"{ckpt}: its taxonomy differs from that of {ckpts[0]}; ensemble members must share one")
    return ckpts, cards


def _kaggle_table(images_in: ImageInput, merged: ChunkResult, skipped: list, plan: _Plan, ids,
                  fill_unreadable: bool) -> tuple[pd.DataFrame, int]:
    """`annotation_id,concept_name` for every input row, validated; and how many unreadable rows were filled."""
    taxonomy, options = plan.taxonomy, plan.options
    answers = np.full(len(images_in.rows), "", dtype=object)
    answers[merged.positions] = [taxonomy.names[n] for n in merged.nodes]
    allowed = list(options.candidates) if options.candidates is not None else list(taxonomy.labels)
    n_filled = 0
    if skipped:
        if not fill_unreadable:
            path, reason = skipped[0]
            raise DataError(f"{images_in.root / path}: {reason}; --format kaggle needs an answer for every "
                            f"annotation ({len(skipped)} unreadable image(s)); fix them or pass --fill-unreadable")
        missing = np.setdiff1d(np.arange(len(images_in.rows)), merged.positions)
        answers[missing] = fill_answer(taxonomy, options.metric, allowed)
        n_filled = len(missing)
    frame = pd.DataFrame({"annotation_id": ids, "concept_name": answers})
    check_kaggle_submission(frame, ids, allowed)
    return frame, n_filled


#: Where each output format keeps the answers without the context priors.
_RAW_ANSWER = {"csv": "raw_prediction keeps the answer without them", "jsonl": "raw holds the answer without them",
               "dwc": "identificationRemarks names the answer without them",
               "kaggle": "a submission holds the final answers only"}


def prior_summary(counts: dict, n: int, fmt: str = "csv") -> str:
    """One line on what the context priors did (`counts` from `_prior_counts`)."""
    line = (f"priors {counts['source']}: applied to {counts['applied']} of {n} images, changing "
            f"{counts['changed']} answers ({_RAW_ANSWER.get(fmt, _RAW_ANSWER['csv'])})")
    if counts["conflicts"]:
        line += (f"; {counts['conflicts']} image(s) left unchanged because their context's keys block every label "
                 "together")
    if counts["unknown_taxa"]:
        names = counts["unknown_taxa"]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        line += f"; ignored {len(names)} taxa the model does not know: {', '.join(names[:3])}{more}"
    return line


def _prior_counts(merged: ChunkResult) -> dict:
    from taxonomist.decide.priors import APPLIED, CONFLICT

    return {"applied": int((merged.prior_applied == APPLIED).sum()),
            "conflicts": int((merged.prior_applied == CONFLICT).sum()),
            "changed": int((merged.raw_nodes != merged.nodes).sum())}


def _check_contexts(options: DecisionOptions, images_in: ImageInput) -> None:
    """--priors needs the images' `context` column (checked before any model runs)."""
    if options.priors is not None and "context" not in images_in.rows.columns:
        what = {"csv": "the images CSV", "dataset": "the dataset's annotations.csv"}.get(images_in.kind)
        where = f"{images_in.source}: {what} has" if what else f"{images_in.source}: a folder of images has"
        raise DataError(f"{where} no 'context' column; --priors applies to each image's context (e.g. "
                        "region=Monterey;depth=200-400): give a CSV with the columns path,context")


def _options(options: DecisionOptions | None, keywords: dict) -> DecisionOptions:
    """`options`, or the options the keywords name (the keyword path of earlier versions)."""
    unknown = sorted(set(keywords) - DECISION_KEYWORDS - set(_RENAMED))
    if unknown:
        raise TypeError(f"predict() got an unexpected keyword argument {unknown[0]!r}")
    if options is not None and keywords:
        raise TypeError(f"predict() takes the decision options either as `options` or as keywords, not both "
                        f"(got options and {', '.join(sorted(keywords))})")
    if options is not None:
        if not isinstance(options, DecisionOptions):
            raise TypeError(f"options must be a DecisionOptions, got {type(options).__name__}")
        return options
    return DecisionOptions(**{_RENAMED.get(k, k): v for k, v in keywords.items()})


@dataclass
class _Plan:
    """Everything besides the models and the images that decides a row's answer."""

    taxonomy: Taxonomy
    options: DecisionOptions          # resolved for the taxonomy
    weights: Sequence[float] | None
    ensemble_mode: str
    tta_views: list | None
    batch_size: int
    num_workers: int
    strict: bool = False     # fail on the first unreadable image; changes no answer, so not part of the key
    features: bool = False   # the parts store the pooled features (--embeddings)
    records: bool = False    # the parts store each answer's JSON record (--format jsonl)

    def key(self) -> dict:
        """What a part file's key covers (the batch size too: it can move float results in the last digit)."""
        o = self.options
        return {"taxonomy": self.taxonomy.hash, "decision": o.decision, "metric": o.metric,
                "candidates": None if o.candidates is None else [str(n) for n in o.candidates],
                "thresholds": repr(o.rule_thresholds), "weights": None if self.weights is None else list(self.weights),
                "ensemble_mode": self.ensemble_mode, "ood": o.ood, "ood_threshold": o.ood_threshold,
                "ood_tpr": o.ood_tpr, "fallback": repr(o.ood_fallback if o.ood else None),
                "tta": [v.name for v in self.tta_views] if self.tta_views else None, "tta_mode": o.tta_mode,
                "batch_size": self.batch_size, "top_k": o.top_k, "features": self.features, "records": self.records,
                # the models' label priors are in their cards, which the key covers too
                "priors": None if o.priors is None else [o.priors.digest, o.prior_strength, o.prior_floor]}

    def rules_key(self) -> dict:
        """What decides an answer besides the models and the image (`key` less what only changes the parts)."""
        return {k: v for k, v in self.key().items() if k not in ("batch_size", "features", "records")}


def _model_identity(path: Path, card: ModelCard) -> dict:
    """A model as a part key sees it: the file (path, size, modification time) and its card."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "metadata": run_key(card.to_dict())}


def _check_trusted(ckpts: list[Path], cards: list[ModelCard], trust_code: bool) -> None:
    """A checkpoint whose backbone imports code is refused without `trust_code` (an ONNX file builds none)."""
    from taxonomist.inference.model_file import is_onnx
    from taxonomist.models.backbones import check_backbone_trusted
    from taxonomist.models.checkpoint import metadata_path

    for ckpt, card in zip(ckpts, cards):
        if not is_onnx(ckpt):
            check_backbone_trusted(card.model_config.get("backbone"), metadata_path(ckpt), trust_code)


def _refuse_out_over_inputs(out, ckpts: list[Path], images_in: ImageInput, candidates, option: str = "--out") -> None:
    """`out` (the file of `option`) must be none of the files predict reads: refused by resolved path (or as the same
    file)."""
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
    refuse_output_over_inputs(out, inputs, option)
    # an image among the inputs (a folder, or the rows of a CSV or dataset)
    try:
        relative = Path(out).expanduser().resolve().relative_to(images_in.root.resolve()).as_posix()
    except ValueError:
        return
    if relative in set(images_in.rows["path"].astype(str)):
        refuse_output_over_inputs(out, [(images_in.root / relative, "one of the images")], option)


def _predict_chunks(ckpts: list[Path], images_in: ImageInput, mine: list, store: PartStore, base_key: str,
                    plan: _Plan, dev, shard: Shard, resume: bool, progress: bool, trust_code: bool = False,
                    engine: str = "auto") -> tuple[int, int, tuple[str, ...]]:
    """Predict this process's chunks into part files; return (rows answered, chunks kept from a previous run, the
    engines that ran the models: none when every chunk was kept)."""
    from tqdm import tqdm

    from taxonomist.inference.model_file import load_model
    from taxonomist.inference.onnx_model import OnnxTaxonModel

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
        return n_answered, n_resumed, ()
    # models load once per process, and not at all when every chunk of a resumed process is done
    options = plan.options
    members = [Member(p, *load_model(p, device=str(dev), trust_code=trust_code, engine=engine,
                                     needs_torch=options.needs_torch)) for p in ckpts]
    engines = tuple(dict.fromkeys("onnxruntime" if isinstance(m.model, OnnxTaxonModel) else "PyTorch"
                                  for m in members))
    scorers = (member_ood_scorers(ckpts, options.ood, options.ood_threshold, options.ood_tpr) if options.ood
               else None)
    desc = "predict" if shard.world == 1 else f"predict (rank 0 of {shard.world})"
    with tqdm(total=sum(b - a for _, a, b, _ in todo), desc=desc, unit="img", leave=False, file=sys.stderr,
              disable=not progress or shard.rank != 0) as bar:
        for c, a, b, key in todo:
            chunk = ImageInput(images_in.root, images_in.rows.iloc[a:b].reset_index(drop=True), images_in.kind,
                               images_in.source)
            result = _predict_chunk(members, chunk, a, plan, scorers, dev)
            store.write(c, key, result)
            n_answered += len(result.positions)
            bar.update(b - a)
    return n_answered, n_resumed, engines


def _predict_chunk(members: list[Member], chunk: ImageInput, offset: int, plan: _Plan, scorers,
                   dev) -> ChunkResult:
    """The decisions of one chunk's rows (positions in the result are absolute: `offset` + row in the chunk)."""
    options = plan.options
    common, aligned, skipped = run_members(members, chunk, dev, plan.tta_views, options.tta_mode, plan.batch_size,
                                           plan.num_workers, plan.strict)
    skipped_positions = np.array([offset + k for k, _ in skipped], dtype=np.int64)
    skipped_reasons = np.array([reason for _, reason in skipped], dtype=str)
    empty_f, empty_i = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    if len(common) == 0:
        return ChunkResult(empty_i, empty_i, empty_f, empty_f, empty_f, np.zeros(0, dtype=bool), skipped_positions,
                           skipped_reasons)
    probs = aligned[0].probs if len(aligned) == 1 else combine_probs([m.probs for m in aligned], plan.weights,
                                                                     plan.ensemble_mode, kind="probs")
    score = threshold = None
    if scorers is not None:
        score, threshold = ood_scores(options, scorers, members, aligned, chunk, common, dev, plan.batch_size,
                                      plan.num_workers, plan.strict)
    contexts = chunk.rows["context"].to_numpy()[common] if options.priors is not None else None
    answers = answer(probs, plan.taxonomy, options, score, threshold, contexts=contexts)
    ood_score = empty_f if answers.ood_score is None else answers.ood_score
    unknown = np.zeros(0, dtype=bool) if answers.unknown is None else answers.unknown
    priors = {}
    if answers.raw_nodes is not None:
        status = np.where(answers.prior_conflict, -1, answers.prior_applied.astype(np.int8)).astype(np.int8)
        priors = {"raw_nodes": answers.raw_nodes.astype(np.int64), "prior_applied": status}
    stored = chunk_outputs(answers, [m.features for m in aligned], threshold, plan.taxonomy, options, contexts,
                           features=plan.features, records=plan.records)
    return ChunkResult(offset + common.astype(np.int64), answers.nodes.astype(np.int64),
                       answers.confidence.astype(np.float64), answers.expected_distance.astype(np.float64),
                       ood_score, unknown, skipped_positions, skipped_reasons, **priors, **stored)


def _read_part(store: PartStore, chunk: int, base_key: str, images_in: ImageInput, chunk_size: int) -> ChunkResult:
    a = chunk * chunk_size
    b = min(len(images_in.rows), a + chunk_size)
    part = store.read(chunk, chunk_key(base_key, images_in.rows["path"].to_numpy()[a:b]))
    if part is None:
        raise DataError(f"{store.path(chunk)}: the part of rows {a + 1}–{b} is missing or stale after every process "
                        "finished; with several nodes, --out must be on a filesystem they all share")
    return part


def _decisions_table(images_in: ImageInput, merged: ChunkResult, taxonomy: Taxonomy,
                     options: DecisionOptions) -> pd.DataFrame:
    """The csv output: path, prediction, confidence, levels, expected distance, OOD columns, with priors the raw
    answer and whether they applied, then the input columns."""
    common, nodes = merged.positions, merged.nodes
    frame = pd.DataFrame({"path": images_in.rows["path"].to_numpy()[common],
                          "prediction": [taxonomy.names[n] for n in nodes],
                          "confidence": np.round(merged.confidence, 6)})
    blank = np.array([*taxonomy.names, ""], dtype=object)  # index -1 → ""
    for name, idx in answer_levels(taxonomy, nodes).items():
        frame[name] = blank[idx].tolist()
    frame["expected_distance"] = np.round(merged.expected_distance, 6)
    if options.ood:
        # unrounded: ODIN's scores (max softmax at T = 1000) differ in the 7th decimal
        frame["ood_score"] = np.asarray(merged.ood_score, dtype=np.float64)
        frame["unknown"] = merged.unknown.astype(bool)
    if options.priors is not None:
        frame["raw_prediction"] = [taxonomy.names[n] for n in merged.raw_nodes]
        frame["prior_applied"] = np.asarray(merged.prior_applied) == 1
    for col in images_in.rows.columns:
        if col != "path":
            frame[col if col not in frame.columns else f"{col}_input"] = images_in.rows[col].to_numpy()[common]
    return frame


__all__ = ["FORMATS", "IMAGE_EXTENSIONS", "PREDICT_OOD_METHODS", "PredictSummary", "ImageInput", "predict",
           "read_images", "check_kaggle_submission"]
