"""Context priors: what is known about where an image was taken — a region, a site, a depth band, an instrument —
as a prior over the labels, applied to the model's probabilities before the decision rule.

A priors table (`predict --priors priors.csv`) has the columns `context,taxon,weight`. `context` is one key such
as `region=Monterey`; an image's `context` may join several keys with `;` (`region=Monterey;depth=200-400`),
each looked up on its own. `taxon` is any node of the model's taxonomy: its weight applies to every label under
it, and a row for a deeper node overrides a shallower one for the labels it covers. A weight is

- `0`: blocked — the label cannot occur in this context;
- `1`: allowed — in a list of 0s and 1s only;
- anything else: a relative frequency or an occurrence count.

The labels a key does not list get the **floor**: a list of blocks only (every weight 0) leaves them as they are;
an allow list or a table of counts gives each unlisted label `floor` × the mean weight of the listed, non-blocked
labels, because a site list is never complete.

The prior shift is Bayes' rule with the model's own label prior π_train (the training frequencies the card records,
else uniform):

    p(y | x, c) ∝ p(y | x) · Π_k (π_k(y) / π_train(y))^λ

over the image's keys k found in the table (a product, as for independent evidence); λ is the strength (0: no
change, 1: full Bayes). A key absent from the table changes nothing, and so does an image without a context. When
its keys' lists exclude each other (every label blocked by one key or another), an image keeps its probabilities
and is counted as a conflict. Blocking a label moves its probability to the labels that remain, in proportion:
with a min-risk decision over every node of the tree, a blocked species whose siblings stay plausible becomes
their genus instead of one arbitrary sibling.

>>> from taxonomist.taxonomy import Taxonomy
>>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish", "Crab": None, "Kelp crab": "Crab"})
>>> priors = ContextPriors.from_rows([("site=A", "Hake", 0.0)])
>>> shift = priors.resolve(tax)
>>> shifted, status = shift.apply(np.array([[0.6, 0.3, 0.1]]), ["site=A"])
>>> shifted.round(3).tolist(), status.tolist()
([[0.857, 0.0, 0.143]], [1])
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Taxonomy

#: An unlisted label's weight, as a share of the mean listed weight (allow lists and counts): a site list is never
#: complete, and a floor of 0 would make a missing species impossible to predict (docs/decisions.md measures it).
DEFAULT_PRIOR_FLOOR = 0.1
#: λ: the prior's full weight, as Bayes' rule gives it.
DEFAULT_PRIOR_STRENGTH = 1.0
#: What separates the keys of an image's context.
KEY_SEPARATOR = ";"
COLUMNS = ("context", "taxon", "weight")
#: Status codes of `PriorShift.apply`: no key of the row's context is in the table; the prior was applied; the
#: row's keys block every label together (left unchanged).
NOT_APPLIED, APPLIED, CONFLICT = 0, 1, -1


def context_keys(context) -> list[str]:
    """The keys of one image's context: `region=Monterey;depth=200-400` → both; empty or missing → none.

    >>> context_keys(" region=Monterey ; depth=200-400;"), context_keys(None), context_keys(float("nan"))
    (['region=Monterey', 'depth=200-400'], [], [])
    """
    if context is None or (isinstance(context, float) and math.isnan(context)):
        return []
    return [k.strip() for k in str(context).split(KEY_SEPARATOR) if k.strip()]


@dataclass(frozen=True)
class ContextPriors:
    """A priors table as read: context key → ((taxon, weight, row), …) in file order. `resolve` makes it a
    `PriorShift` for one model's taxonomy.

    Attributes:
        keys: the table's rows grouped by context key.
        source: the file (for messages), or `<priors>` for a table made in code.
        digest: SHA-256 of the table's content (what a resumed prediction compares).
    """

    keys: dict[str, tuple[tuple[str, float, int], ...]]
    source: str = "<priors>"
    digest: str = ""

    @classmethod
    def read(cls, path: str | Path) -> ContextPriors:
        """Read a `context,taxon,weight` CSV (other columns are ignored). A `DataError` names the file and row of
        a missing column, an empty field, a weight that is not a finite number ≥ 0, a context holding `;`, or a
        (context, taxon) pair given twice."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: priors file not found") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a folder; --priors takes a CSV file with the columns "
                            f"{','.join(COLUMNS)}") from None
        except OSError as e:
            raise DataError(f"{path}: cannot read the priors file ({e.strerror or e})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); --priors takes a CSV file") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty priors file; expected the columns {','.join(COLUMNS)}") from None
        except csv.Error as e:
            raise DataError(f"{path}: not a valid CSV ({e})") from None
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; a priors file has the columns "
                            f"{','.join(COLUMNS)} (found: {','.join(header) or 'none'})")
        at = [header.index(c) for c in COLUMNS]
        rows = []
        try:
            for number, record in enumerate(reader, start=2):
                if not any(v.strip() for v in record):
                    continue
                values = [record[i].strip() if i < len(record) else "" for i in at]
                rows.append((*values, number))
        except csv.Error as e:
            raise DataError(f"{path}: row {reader.line_num}: not a valid CSV row ({e})") from None
        return cls._build(rows, str(path), hashlib.sha256(data).hexdigest())

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence], source: str = "<priors>") -> ContextPriors:
        """A table from (context, taxon, weight) triples, checked as `read` checks a file's rows."""
        rows = [(str(c), str(t), w, k + 1) for k, (c, t, w) in enumerate(rows)]
        digest = hashlib.sha256(repr([r[:3] for r in rows]).encode()).hexdigest()
        return cls._build(rows, source, digest)

    @classmethod
    def _build(cls, rows: list, source: str, digest: str) -> ContextPriors:
        keys: dict[str, list] = {}
        seen: dict[tuple[str, str], int] = {}
        for context, taxon, weight, number in rows:
            where = f"{source}: row {number}"
            context, taxon = context.strip(), taxon.strip()
            if not context:
                raise DataError(f"{where}: empty context; each row gives a context key such as region=Monterey")
            if KEY_SEPARATOR in context:
                raise DataError(f"{where}: context {context!r} holds {KEY_SEPARATOR!r}; give one key per row (an "
                                f"image's context may join several keys with {KEY_SEPARATOR!r})")
            if not taxon:
                raise DataError(f"{where}: empty taxon")
            value = _weight(weight, where)
            if (context, taxon) in seen:
                raise DataError(f"{where}: {context} / {taxon} is given twice (first in row {seen[context, taxon]})")
            seen[context, taxon] = number
            keys.setdefault(context, []).append((taxon, value, number))
        if not keys:
            raise DataError(f"{source}: the priors file has no rows")
        return cls({k: tuple(v) for k, v in keys.items()}, source, digest)

    def __len__(self) -> int:
        return len(self.keys)

    def resolve(self, taxonomy: Taxonomy, train_prior: Sequence[float] | None = None,
                strength: float = DEFAULT_PRIOR_STRENGTH, floor: float = DEFAULT_PRIOR_FLOOR) -> PriorShift:
        """The table as log prior ratios over `taxonomy.labels`, one row per context key.

        `train_prior`: the label frequencies the model learned (per label; normalised here), None = uniform.
        A taxon that is not in the taxonomy is ignored and listed in `PriorShift.unknown_taxa` (a site list may
        name species the model does not know); a key whose rows block every label is a `DataError`.
        """
        strength, floor = check_strength(strength), check_floor(floor)
        labels = taxonomy.labels
        n = len(labels)
        log_train = np.zeros(n) if train_prior is None else _log_train(train_prior, n, self.source)
        anc = taxonomy.ancestor_table()[taxonomy.label_indices]          # (L, D+1)
        depths = taxonomy.depths
        ratios = np.zeros((len(self.keys), n))
        unknown: dict[str, int] = {}
        for k, (key, rows) in enumerate(self.keys.items()):
            weight = np.full(n, np.nan)
            known = [(taxonomy.index(t), w) for t, w, _ in rows if t in taxonomy]
            for taxon, _, number in rows:
                if taxon not in taxonomy:
                    unknown.setdefault(taxon, number)
            for node, w in sorted(known, key=lambda item: depths[item[0]]):   # deeper rows override
                weight[(anc[:, depths[node]] == node)] = w
            listed = ~np.isnan(weight)
            if not listed.any():
                continue                                  # every taxon unknown: the key changes nothing
            values = weight[listed]
            if np.all(values == 0):
                weight[~listed] = 1.0                     # a block list: the rest as they are
            else:
                weight[~listed] = floor * values[values > 0].mean()
            if not (weight > 0).any():
                raise DataError(f"{self.source}: context {key!r} blocks every label of the model "
                                f"({n} labels); an image there could get no answer")
            with np.errstate(divide="ignore"):
                ratios[k] = strength * (np.log(weight) - log_train) if strength > 0 else 0.0
        return PriorShift({key: k for k, key in enumerate(self.keys)}, ratios, tuple(unknown), self.source,
                          self.digest, strength, floor)


@dataclass(frozen=True)
class PriorShift:
    """A priors table resolved for one model: `log_ratios[k]` = λ · log(π_k / π_train) per label (−inf: blocked,
    up to a constant per key, which the normalisation removes)."""

    index: dict[str, int]
    log_ratios: np.ndarray
    unknown_taxa: tuple[str, ...] = ()
    source: str = "<priors>"
    digest: str = ""
    strength: float = DEFAULT_PRIOR_STRENGTH
    floor: float = DEFAULT_PRIOR_FLOOR
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def row_ratios(self, context) -> np.ndarray | None:
        """The summed log ratios of one context's keys found in the table; None when none is."""
        keys = [self.index[k] for k in context_keys(context) if k in self.index]
        if not keys:
            return None
        cache_key = tuple(keys)
        if cache_key not in self._cache:
            self._cache[cache_key] = self.log_ratios[keys].sum(axis=0)
        return self._cache[cache_key]

    def apply(self, probs: np.ndarray, contexts: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(N, L) probabilities shifted by each row's context, and a status per row: `APPLIED`, `NOT_APPLIED`
        (no key in the table: unchanged) or `CONFLICT` (its keys block every label together: unchanged)."""
        p = np.asarray(probs, dtype=np.float64)
        if len(contexts) != len(p):
            raise DataError(f"{len(contexts)} contexts for {len(p)} rows of probabilities; give one per row")
        out = p.copy()
        status = np.full(len(p), NOT_APPLIED, dtype=np.int8)
        for i, context in enumerate(contexts):
            ratio = self.row_ratios(context)
            if ratio is None:
                continue
            with np.errstate(divide="ignore"):
                logp = np.log(p[i]) + ratio
            top = logp.max()
            if not np.isfinite(top):
                status[i] = CONFLICT
                continue
            shifted = np.exp(logp - top)
            out[i] = shifted / shifted.sum()
            status[i] = APPLIED
        return out, status


def check_strength(value) -> float:
    """λ, a finite number ≥ 0 (`--prior-strength`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise ConfigError(f"--prior-strength must be a finite number ≥ 0 (1 = Bayes' rule, 0 = off), got {value!r}")
    return float(value)


def check_floor(value) -> float:
    """The floor, a number in [0, 1] (`--prior-floor`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not 0 <= value <= 1:
        raise ConfigError(f"--prior-floor must be a number in [0, 1] (an unlisted label's weight as a share of the "
                          f"mean listed weight), got {value!r}")
    return float(value)


def _weight(text, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: weight {text!r} is not a number (0 blocks, 1 allows, other values are relative "
                        "frequencies or counts)") from None
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{where}: weight {text!r} must be a finite number ≥ 0")
    return value


def _log_train(train_prior: Sequence[float], n: int, source: str) -> np.ndarray:
    prior = np.asarray(train_prior, dtype=np.float64)
    if prior.shape != (n,) or not np.all(np.isfinite(prior)) or np.any(prior < 0) or prior.sum() <= 0:
        raise DataError(f"{source}: the model's label prior must be {n} finite non-negative numbers with a "
                        f"positive sum")
    positive = prior[prior > 0]
    prior = np.where(prior > 0, prior, positive.min())   # a label never seen in training: as the rarest seen
    return np.log(prior / prior.sum())


__all__ = ["ContextPriors", "PriorShift", "context_keys", "check_strength", "check_floor", "DEFAULT_PRIOR_FLOOR",
           "DEFAULT_PRIOR_STRENGTH", "COLUMNS", "KEY_SEPARATOR", "APPLIED", "NOT_APPLIED", "CONFLICT"]
