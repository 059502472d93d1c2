"""The outputs of `taxonomist predict` besides its decisions CSV and Kaggle table: Darwin Core identifications
(`--format dwc`), one JSON object per image (`--format jsonl`) and the pooled features as Parquet (`--embeddings`).

Each writer reads the merged `ChunkResult` of a run and the input rows; `predict` calls them once every chunk is done.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from taxonomist.card import ModelCard
from taxonomist.decide import Answers, DecisionOptions, answer_levels, answer_records
from taxonomist.errors import ConfigError
from taxonomist.inference.sharding import ChunkResult
from taxonomist.taxonomy import RANKS, Taxonomy

#: `predict --format`: the decisions CSV, a Kaggle submission, Darwin Core, JSON lines.
FORMATS = ("csv", "kaggle", "dwc", "jsonl")
#: The Darwin Core terms of `--format dwc`, in the order written (tests/fixtures/dwc_terms.txt lists the standard's).
DWC_COLUMNS = ("occurrenceID", "identificationID", "associatedMedia", "scientificName", "verbatimIdentification",
               "identificationQualifier", "taxonRank", "kingdom", "phylum", "class", "order", "family", "genus",
               "specificEpithet", "identificationRemarks", "identifiedBy", "dateIdentified")
#: A species answer with P(answer) below this is published as doubtful: its genus, qualified `cf. <epithet>`.
CF_BELOW = 0.5
#: Input columns that identify an occurrence or an image, kept beside the embeddings.
ID_COLUMNS = ("occurrenceID", "annotation_id", "image_id")
#: The Parquet key-value metadata key that describes the embeddings (a JSON object).
EMBEDDINGS_METADATA_KEY = b"taxonomist"
#: The namespace of `identificationID`s (UUID 5 of the models' hashes, the rules and the occurrence).
_IDENTIFICATION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://taxonomist/dwc/identificationID")


# ---------------------------------------------------------------------------------------------- who identified
@dataclass(frozen=True)
class ModelIdentity:
    """The models behind a prediction: per model, a readable name, the SHA-256 of its file and its backbone."""

    names: tuple[str, ...]
    sha256: tuple[str, ...]
    backbones: tuple[str, ...]

    @classmethod
    def of(cls, paths: Sequence[Path], cards: Sequence[ModelCard]) -> ModelIdentity:
        """Hash each model file (a checkpoint's weights, or the `.onnx` graph) once."""
        from taxonomist.utils.files import file_sha256

        return cls(tuple(model_name(p) for p in paths), tuple(file_sha256(p) for p in paths),
                   tuple(c.backbone or "" for c in cards))

    @property
    def agent(self) -> str:
        """`identifiedBy`: the package version and each model by name, backbone and the first 12 hex of its hash."""
        from taxonomist import __version__

        models = [f"{name} ({f'{bb}, ' if bb else ''}sha256 {digest[:12]})"
                  for name, bb, digest in zip(self.names, self.backbones, self.sha256)]
        what = f"model {models[0]}" if len(models) == 1 else f"ensemble of {' + '.join(models)}"
        return f"taxonomist {__version__}, {what}"

    def describe(self) -> list[dict]:
        return [{"model": n, "sha256": d, "backbone": b or None}
                for n, d, b in zip(self.names, self.sha256, self.backbones)]


def model_name(path: Path) -> str:
    """A model file as a reader knows it: `hf-hub:ORG/NAME@COMMIT` for a file in the Hugging Face cache,
    `RUN/checkpoints/best.safetensors` for a run's checkpoint, `FOLDER/model.safetensors` for a Hub-layout folder,
    else the file's name.

    >>> model_name(Path("runs/first/checkpoints/best.safetensors")), model_name(Path("/x/model.onnx"))
    ('first/checkpoints/best.safetensors', 'model.onnx')
    >>> model_name(Path("/hf/models--my-lab--plankton/snapshots/0123456789abcdef/model.safetensors"))
    'hf-hub:my-lab/plankton@0123456789ab'
    """
    path = Path(path)
    parts = path.parts
    if len(parts) >= 4 and parts[-3] == "snapshots" and parts[-4].startswith("models--"):
        repo = parts[-4].removeprefix("models--").replace("--", "/", 1)
        return f"hf-hub:{repo}@{parts[-2][:12]}"
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/checkpoints/{path.name}"
    if path.name == "model.safetensors" and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


@dataclass(frozen=True)
class Provenance:
    """What made a run's answers, for `identifiedBy`, `identificationID` and `identificationRemarks`.

    `rules` is the part key of everything besides the models that decides an answer (`predict._Plan.key`, less
    batch size and what the parts store): the same models, rules and image give the same `identificationID`."""

    identity: ModelIdentity
    options: DecisionOptions
    rules: dict
    when: datetime
    ensemble_mode: str = "arithmetic"
    tta_views: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        text = json.dumps({"models": list(self.identity.sha256), "rules": self.rules}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def date(self) -> str:
        """ISO 8601 in UTC, to the second."""
        return self.when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    @property
    def method(self) -> str:
        """The decision rule, its distance, the ensemble and the TTA views, in words."""
        o = self.options
        rule = f"{o.decision} decision" + (f" ({o.metric} distance)" if o.decision == "min-risk" else "")
        n = len(self.identity.names)
        parts = [rule]
        if n > 1:
            parts.append(f"ensemble of {n} ({self.ensemble_mode} mean)")
        if self.tta_views:
            parts.append(f"TTA {len(self.tta_views)} views")
        return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- per chunk
def chunk_outputs(answers: Answers, member_features: Sequence[np.ndarray], ood_threshold: float | None,
                  taxonomy: Taxonomy, options: DecisionOptions, contexts: Sequence | None = None, *,
                  features: bool = False, records: bool = False) -> dict[str, np.ndarray]:
    """What a chunk's part file keeps for the formats, as `ChunkResult` fields: the OOD threshold per row (with
    `--ood`), the members' pooled features side by side and their widths (`features`), each answer's JSON record
    (`records`: `decide.answer_records`, with the rows' `contexts` when priors apply). What is not asked stays
    empty, so that part files stay small."""
    n = len(answers)
    out: dict[str, np.ndarray] = {}
    if answers.ood_score is not None and ood_threshold is not None:
        out["ood_threshold"] = np.full(n, float(ood_threshold))
    if features:
        out["features"] = np.concatenate([np.asarray(f, dtype=np.float32) for f in member_features], axis=1)
        out["feature_dims"] = np.tile(np.array([f.shape[1] for f in member_features], dtype=np.int64), (n, 1))
    if records:
        found = answer_records(answers, taxonomy, options, ood_threshold=ood_threshold, contexts=contexts)
        out["records"] = np.array([json.dumps(_finite(r), ensure_ascii=False, allow_nan=False, default=_json_default)
                                   for r in found], dtype=str)
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value):
    """`value` with every NaN or infinity made None: JSON has neither, and strict readers refuse them."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------- Darwin Core
def dwc_table(rows: pd.DataFrame, result: ChunkResult, taxonomy: Taxonomy, provenance: Provenance) -> pd.DataFrame:
    """One Darwin Core identification per answered row of `rows` (`result.positions`; an unreadable image has no
    row), with the terms of `DWC_COLUMNS` only: the input's other columns are not Darwin Core terms and are left out
    (the csv format keeps them).

    - `occurrenceID`: the input's `occurrenceID` column, else its `annotation_id`, else the image path.
    - `identificationID`: a UUID 5 of the models' SHA-256, the decision rules and the occurrenceID: the same run
      again gives the same ids; another model or rule, other ids.
    - `associatedMedia`: the input's `associatedMedia` column, else its `url`, else the image path.
    - `scientificName`, `taxonRank`, `kingdom` … `genus`, `specificEpithet`, `identificationQualifier`,
      `verbatimIdentification`: the answer with open nomenclature (ranked taxonomies). A genus answer is
      `Genus sp.`; an answer above genus (or an unranked group such as a subfamily) `Name indet.`; a species answer
      with P(answer) below `CF_BELOW`, or flagged unknown by the OOD score, is published at its genus, qualified
      `cf. epithet` (`Genus cf. epithet`), as OBIS's manual and Darwin Core's own example of the qualifier do:
      scientificName holds the name the identification can be trusted to. An unranked tree (`depthN` levels) has
      no Darwin Core ranks: the rank columns, `taxonRank` and the qualifier stay empty.
    - `identificationRemarks`: `dwc_remarks`. `identifiedBy`: `ModelIdentity.agent`. `dateIdentified`: the run's
      start, ISO 8601 in UTC.
    """
    pos = result.positions
    n = len(pos)
    names = np.array(taxonomy.names, dtype=object)
    answer_names = names[result.nodes].astype(str) if n else np.zeros(0, dtype=object)
    ranked = taxonomy.has_ranks
    lineage = {rank: np.full(n, "", dtype=object) for rank in RANKS}
    if ranked and n:
        blank = np.array([*taxonomy.names, ""], dtype=object)  # index -1 → ""
        for level, idx in answer_levels(taxonomy, result.nodes).items():
            lineage[level] = blank[idx]
    ranks = np.array([(taxonomy.ranks[k] or "") if ranked else "" for k in result.nodes], dtype=object)
    unknown = result.unknown.astype(bool) if len(result.unknown) else np.zeros(n, dtype=bool)

    scientific = answer_names.astype(object).copy()
    epithet = np.full(n, "", dtype=object)
    qualifier = np.full(n, "", dtype=object)
    verbatim = answer_names.astype(object).copy()
    for i in range(n):
        rank, name, genus = ranks[i], answer_names[i], lineage["genus"][i]
        if rank == "species":
            ep = specific_epithet(name)
            if result.confidence[i] >= CF_BELOW and not unknown[i]:
                epithet[i] = ep
            elif genus and ep:  # doubtful: published at the genus, the rank the name can be trusted to
                scientific[i], ranks[i], qualifier[i], verbatim[i] = genus, "genus", f"cf. {ep}", f"{genus} cf. {ep}"
            else:
                qualifier[i], verbatim[i] = "cf.", f"cf. {name}"
        elif rank == "genus":
            qualifier[i], verbatim[i] = "sp.", f"{name} sp."
        elif ranked and taxonomy.deepest_rank(name) not in ("genus", "species"):
            # above genus: a rank, or an unranked group between ranks (a subfamily); never below a genus
            qualifier[i], verbatim[i] = "indet.", f"{name} indet."

    occurrence = _first_column(rows, ("occurrenceID", "annotation_id"), pos)
    media = _first_column(rows, ("associatedMedia", "url"), pos)
    digest = provenance.digest
    frame = pd.DataFrame({
        "occurrenceID": occurrence,
        "identificationID": [str(uuid.uuid5(_IDENTIFICATION_NAMESPACE, f"{digest}\n{o}")) for o in occurrence],
        "associatedMedia": media,
        "scientificName": scientific,
        "verbatimIdentification": verbatim,
        "identificationQualifier": qualifier,
        "taxonRank": ranks,
        **{rank: lineage[rank] for rank in RANKS[:-1]},
        "specificEpithet": epithet,
        "identificationRemarks": dwc_remarks(result, provenance, taxonomy),
        "identifiedBy": provenance.identity.agent,
        "dateIdentified": provenance.date,
    })
    return frame[list(DWC_COLUMNS)]


def specific_epithet(name: str) -> str:
    """The second word of a binomial (`Sebastes diploproa` → `diploproa`); "" when there is none (`Sebastes sp.`).

    >>> specific_epithet("Sebastes diploproa"), specific_epithet("Sebastes sp. A"), specific_epithet("Fish")
    ('diploproa', '', '')
    """
    words = name.split()
    if len(words) < 2:
        return ""
    word = words[1]  # an epithet is one lowercase word, maybe hyphenated; "sp.", "cf." and "(Subgenus)" are not
    return word if word[:1].islower() and word.replace("-", "").isalpha() else ""


def _first_column(rows: pd.DataFrame, columns: Sequence[str], positions: np.ndarray) -> np.ndarray:
    """Per row: the first of `columns` that the input has and that is not empty there, else the image path."""
    out = rows["path"].to_numpy().astype(object)[positions]
    for col in reversed(columns):
        if col in rows.columns:
            values = rows[col].to_numpy().astype(object)[positions]
            has = np.array([not pd.isna(v) and str(v).strip() != "" for v in values], dtype=bool)
            out = np.where(has, values.astype(str), out)
    return out.astype(object)


def dwc_remarks(result: ChunkResult, provenance: Provenance, taxonomy: Taxonomy) -> list[str]:
    """`identificationRemarks`: how the answer was made and how sure it is, one readable sentence a row — the rule
    (its distance, the ensemble, TTA), P(answer), the expected distance, the OOD verdict against its threshold and
    what the context priors did."""
    o = provenance.options
    n = len(result.positions)
    has_ood = o.ood is not None and len(result.ood_score) == n
    thresholds = result.ood_threshold if len(result.ood_threshold) == n else None
    has_priors = len(result.prior_applied) == n and len(result.raw_nodes) == n
    out = []
    for i in range(n):
        parts = [provenance.method, f"P(answer)={result.confidence[i]:.3f}",
                 f"expected distance {result.expected_distance[i]:.3g}"]
        if has_ood:
            score = float(result.ood_score[i])
            t = f" {float(thresholds[i]):.6g}" if thresholds is not None else ""
            if result.unknown[i]:
                fell = (f", answered at its {_fallback_words(o.ood_fallback)}" if o.decision != "argmax" else "")
                parts.append(f"flagged unknown by {o.ood} (score {score:.6g} >= threshold{t}){fell}")
            else:
                parts.append(f"OOD score ({o.ood}) {score:.6g} < threshold{t}")
        if has_priors:
            status, raw = int(result.prior_applied[i]), int(result.raw_nodes[i])  # 1 applied, -1 conflict, 0 none
            if status == 1:
                changed = f", without them {taxonomy.names[raw]}" if raw != int(result.nodes[i]) else ""
                parts.append(f"context priors applied{changed}")
            elif status < 0:
                parts.append("context priors not applied (its context's keys block every label together)")
        out.append("; ".join(parts))
    return out


def _fallback_words(fallback) -> str:
    if isinstance(fallback, float):
        return f"deepest ancestor with P >= {fallback:g}"
    if isinstance(fallback, int):
        return f"ancestor at depth {fallback}"
    return f"ancestor at {fallback}"


# ---------------------------------------------------------------------------------------------- JSON lines
def jsonl_lines(rows: pd.DataFrame, result: ChunkResult) -> Iterator[str]:
    """One JSON object per answered row, in input order: `path`, the answer record (`decide.answer_records`: what
    `serve` answers — decision, confidence, rank, lineage, top labels, OOD, rule, and with priors the raw answer)
    and `input`, the input's other columns (an empty cell is "", a missing number null)."""
    paths = rows["path"].to_numpy()
    others = [c for c in rows.columns if c != "path"]
    values = {c: rows[c].to_numpy() for c in others}
    for k, p in enumerate(result.positions):
        record = json.loads(str(result.records[k]))
        line = {"path": str(paths[p]), **record, "input": {c: _finite(values[c][p]) for c in others}}
        yield json.dumps(line, ensure_ascii=False, allow_nan=False, default=str)


def write_jsonl(path: Path, rows: pd.DataFrame, result: ChunkResult) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for line in jsonl_lines(rows, result):
            f.write(line + "\n")


# ---------------------------------------------------------------------------------------------- embeddings
def require_pyarrow():
    """pyarrow, or a one-line `ConfigError` naming the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("--embeddings writes Parquet, which needs pyarrow: pip install 'taxonomist[parquet]'") \
            from None
    return pyarrow


def check_embeddings_path(path: str | Path) -> Path:
    """`--embeddings FILE.parquet`: a `.parquet` file name that is not a folder."""
    p = Path(path).expanduser()
    if p.suffix.lower() != ".parquet":
        raise ConfigError(f"--embeddings {path}: the embeddings are written as Parquet; give a file name ending in "
                          ".parquet")
    if p.is_dir():
        raise ConfigError(f"--embeddings {path}: is a folder; give a file name ending in .parquet")
    return p


def embedding_columns(n_models: int) -> list[str]:
    """`embedding` for one model; `embedding_0` … for an ensemble's members, in the order given."""
    return ["embedding"] if n_models == 1 else [f"embedding_{k}" for k in range(n_models)]


def embeddings_table(rows: pd.DataFrame, result: ChunkResult, identity: ModelIdentity, tta_views: Sequence[str] = ()):
    """A pyarrow Table: `path`, the input's id columns (`ID_COLUMNS`) when present, and each model's pooled features
    as a fixed-size list<float32> column; its schema metadata says which model, hash and width each column holds."""
    pa = require_pyarrow()
    pos = result.positions
    dims = [int(d) for d in result.feature_dims[0]] if len(result.feature_dims) else []
    if len(dims) != len(identity.names):
        raise ValueError(f"features of {len(dims)} models stored for {len(identity.names)} models")
    arrays = {"path": pa.array(rows["path"].to_numpy()[pos].astype(str), pa.string())}
    for col in ID_COLUMNS:
        if col in rows.columns:
            arrays[col] = pa.array(rows[col].to_numpy()[pos].astype(str), pa.string())
    features = np.ascontiguousarray(result.features, dtype=np.float32)
    start, models = 0, []
    for column, dim, desc in zip(embedding_columns(len(dims)), dims, identity.describe()):
        block = np.ascontiguousarray(features[:, start:start + dim]).reshape(-1)
        arrays[column] = pa.FixedSizeListArray.from_arrays(pa.array(block, pa.float32()), dim)
        models.append({"column": column, **desc, "feature_dim": dim})
        start += dim
    from taxonomist import __version__

    meta = {"format": "taxonomist embeddings", "version": 1, "taxonomist": __version__, "models": models,
            "rows": len(pos), "features": "pooled features (the model's `features` output, what OOD scores read)",
            "tta": list(tta_views) or None, "tta_features": "mean over the views" if tta_views else None}
    return pa.table(arrays).replace_schema_metadata({EMBEDDINGS_METADATA_KEY: json.dumps(meta).encode()})


def write_embeddings(path: Path, rows: pd.DataFrame, result: ChunkResult, identity: ModelIdentity,
                     tta_views: Sequence[str] = ()) -> None:
    require_pyarrow()
    import pyarrow.parquet as pq

    pq.write_table(embeddings_table(rows, result, identity, tta_views), str(path))


def read_embeddings_metadata(path: str | Path) -> dict:
    """The JSON metadata of an embeddings file (models, columns, widths, TTA)."""
    require_pyarrow()
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(str(path)).metadata[EMBEDDINGS_METADATA_KEY])


__all__ = ["FORMATS", "DWC_COLUMNS", "CF_BELOW", "ModelIdentity", "Provenance", "dwc_table", "jsonl_lines",
           "write_jsonl", "embeddings_table", "write_embeddings", "read_embeddings_metadata", "require_pyarrow",
           "check_embeddings_path", "model_name"]
