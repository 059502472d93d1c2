"""Specimen galleries: the worst mistakes, well- and poorly-recognised taxa, critical taxa — each specimen a
small embedded JPEG thumbnail beside its true and predicted lineages. Galleries are sampled, never exhaustive.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from taxonomist.errors import UnknownLabelError
from taxonomist.report.figures import data_uri
from taxonomist.report.runs import RunResults
from taxonomist.taxonomy import Taxonomy, suggest

THUMB_SIZE = 112
JPEG_QUALITY = 70
N_MISTAKES = 24
N_TAXA = 8              # well- and poorly-recognised taxa shown
PER_TAXON = 3           # specimens per taxon
N_CRITICAL = 12         # specimens per critical taxon


@dataclass
class Specimen:
    path: str
    thumb: str | None            # data URI, None when the image is not available
    truth: list[tuple[str, bool]]      # lineage, True where it agrees with the other lineage
    predicted: list[tuple[str, bool]]
    confidence: float
    distance: float


def thumbnail(path: Path, size: int = THUMB_SIZE) -> str | None:
    """A JPEG data URI of the image scaled to fit `size`×`size`, or None when it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, much faster for large frames
            im = im.convert("RGB")
            im.thumbnail((size, size))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(buf.getvalue(), "image/jpeg")


def _lineage(taxonomy: Taxonomy | None, name: str) -> list[str]:
    if taxonomy is not None and name in taxonomy:
        return taxonomy.lineage(name)
    return [name]


def paired_lineages(taxonomy: Taxonomy | None, truth: str, predicted: str):
    """Both lineages, each name flagged True where the two lineages agree (their shared ancestors)."""
    a, b = _lineage(taxonomy, truth), _lineage(taxonomy, predicted)
    shared = set(a) & set(b)
    return [(n, n in shared) for n in a], [(n, n in shared) for n in b]


class Gallery:
    """Makes specimens of one run's predictions; remembers whether its images could be found."""

    def __init__(self, run: RunResults):
        self.run = run
        self.missing = 0
        self.shown = 0

    def specimens(self, rows: pd.DataFrame) -> list[Specimen]:
        out = []
        for row in rows.itertuples(index=False):
            thumb = None
            if self.run.data_root is not None:
                thumb = thumbnail(self.run.data_root / row.path)
                self.missing += thumb is None
            truth, pred = paired_lineages(self.run.taxonomy, row.label, row.prediction)
            out.append(Specimen(row.path, thumb, truth, pred, float(row.confidence), float(row.distance)))
            self.shown += 1
        return out

    def note(self) -> str | None:
        if self.run.data_root is None:
            return None  # the run's notes already say the dataset is absent
        if self.missing:
            return f"{self.missing} of {self.shown} gallery images could not be read under {self.run.data_root}"
        return None


def worst_mistakes(gallery: Gallery, n: int = N_MISTAKES) -> list[Specimen]:
    """The wrong answers farthest from the truth, the most confident first among equals."""
    p = gallery.run.predictions
    wrong = p[p["distance"] > 0]
    order = np.lexsort((-wrong["confidence"].to_numpy(), -wrong["distance"].to_numpy()))[:n]
    return gallery.specimens(wrong.iloc[order])


def recognised_taxa(gallery: Gallery, n_taxa: int = N_TAXA, per_taxon: int = PER_TAXON) -> dict[str, list[dict]]:
    """`well`: the taxa with the highest F1, each with its most confident right answers; `poorly`: the lowest
    recall, each with its most confident mistakes and what it was most often taken for."""
    p = gallery.run.predictions
    per_label = gallery.run.metrics.get("per_label") or {}
    stats = pd.DataFrame.from_dict(per_label, orient="index")
    if stats.empty:
        return {"well": [], "poorly": []}
    stats = stats[stats["support"] > 0]
    stats["name"] = stats.index
    by_label = p.groupby("label", sort=False)
    out = {}
    well = stats.sort_values(["f1", "support", "name"], ascending=[False, False, True]).head(n_taxa)
    # poorly recognised: some examples missed, and not already listed as well recognised
    rest = stats[~stats["name"].isin(well["name"]) & (stats["recall"] < 1.0)]
    picks = {"well": well,
             "poorly": rest.sort_values(["recall", "support", "name"], ascending=[True, False, True]).head(n_taxa)}
    for kind, table in picks.items():
        entries = []
        for name, r in table.iterrows():
            rows = by_label.get_group(name) if name in by_label.groups else p.iloc[:0]
            right = rows["prediction"] == name
            chosen = rows[right] if kind == "well" else rows[~right]
            chosen = chosen.sort_values("confidence", ascending=False).head(per_taxon)
            confused = rows.loc[~right, "prediction"].value_counts()
            entries.append({"name": name, "f1": float(r["f1"]), "precision": float(r["precision"]),
                            "recall": float(r["recall"]), "support": int(r["support"]),
                            "confused_with": [(k, int(v)) for k, v in confused.head(3).items()],
                            "specimens": gallery.specimens(chosen)})
        out[kind] = entries
    return out


def check_critical(names: Sequence[str], taxonomy: Taxonomy | None, predictions: pd.DataFrame) -> None:
    """Every `--critical` name must be a taxon of the run (a node of its taxonomy, or a label in its predictions)."""
    known = set(predictions["label"]) | set(predictions["prediction"])
    for name in names:
        if (taxonomy is None or name not in taxonomy) and name not in known:
            choices = list(taxonomy.names) if taxonomy is not None else sorted(known)
            raise UnknownLabelError(f"--critical {name!r} is not a taxon of this run{suggest(name, choices)}")


def critical_taxon(gallery: Gallery, name: str, n: int = N_CRITICAL) -> dict:
    """A taxon that matters (e.g. a poisonous species): accuracy at every rank of its lineage over its
    examples, how often it is found (recall) and how often an answer naming it is right (precision), and its
    specimens, mistakes first."""
    run = gallery.run
    p = run.predictions
    tax = run.taxonomy
    if tax is not None and name in tax:
        lineage = tax.lineage(name)
        under = {name, *tax.descendants(name)}
    else:
        lineage, under = [name], {name}
    mine = p["label"].isin(under).to_numpy()
    answered = p["prediction"].isin(under).to_numpy()
    ranks = []
    for level in run.levels:
        col_t, col_p = f"label_{level}", f"prediction_{level}"
        if col_t not in p.columns:
            continue
        truth = p.loc[mine, col_t]
        node = truth[truth != ""]
        # the ranks of its lineage: levels where this taxon's examples have a (single) true node on the lineage
        if node.empty or not set(node).issubset(set(lineage)):
            continue
        right = (p.loc[node.index, col_p] == node).to_numpy()
        ranks.append({"level": level, "taxon": str(node.iloc[0]), "accuracy": float(right.mean()),
                      "n": int(len(node))})
    rows = p[mine]
    order = np.lexsort((-rows["confidence"].to_numpy(), -rows["distance"].to_numpy()))[:n]
    found = answered[mine]
    return {"name": name, "lineage": lineage, "n": int(mine.sum()),
            "recall": float(found.mean()) if mine.any() else None,
            "precision": float(mine[answered].mean()) if answered.any() else None,
            "n_answered": int(answered.sum()), "ranks": ranks,
            "specimens": gallery.specimens(rows.iloc[order])}


__all__ = ["Specimen", "Gallery", "thumbnail", "paired_lineages", "worst_mistakes", "recognised_taxa",
           "check_critical", "critical_taxon"]
