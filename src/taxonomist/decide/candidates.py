"""Candidate sets: the taxonomy nodes a decision rule may answer with.

`--candidates` names them: the training labels (default), `all` nodes, the 79 `fathomnet2025` names, or a file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from taxonomist.errors import DataError, UnknownLabelError
from taxonomist.taxonomy import Taxonomy, builtin_taxonomy, suggest

#: Words `candidate_nodes` understands besides a file path.
CANDIDATE_KEYWORDS = ("", "all", "fathomnet2025")


def candidate_nodes(taxonomy: Taxonomy, spec: str | Path | Sequence[str] | None = None) -> list[str]:
    """The node names a decision may answer with, in a stable order.

    Args:
        taxonomy: the model's taxonomy.
        spec: `None` or `""` = the training labels (`taxonomy.labels`); `"all"` = every node of the taxonomy;
            `"fathomnet2025"` = the 79 FathomNet 2025 (Kaggle) names, each of which must be a node of
            `taxonomy`; a path to a UTF-8 text file with one name per line (blank lines and lines starting
            with `#` are skipped); or a list of names. Duplicates are dropped, first occurrence kept.

    Raises:
        UnknownLabelError: a name is not a node of the taxonomy (with a "did you mean" hint).
        DataError: the file is missing, unreadable or names nothing.

    >>> tax = Taxonomy.from_parents({"Fish": None, "Cod": "Fish", "Hake": "Fish"})
    >>> candidate_nodes(tax), candidate_nodes(tax, "all")
    (['Cod', 'Hake'], ['Fish', 'Cod', 'Hake'])
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return list(taxonomy.labels)
    if isinstance(spec, (list, tuple)):
        names = [str(n) for n in spec]
        _check_known(taxonomy, names, where="the candidate list", lines=None)
        return _unique(names)
    if not isinstance(spec, (str, Path)):
        raise DataError(f"candidates must be '', 'all', 'fathomnet2025', a file path or a list of names, "
                        f"got {type(spec).__name__}")
    text = str(spec).strip()
    if text == "all":
        return list(taxonomy.names)
    if text == "fathomnet2025":
        names = list(builtin_taxonomy("fathomnet2025").labels)
        missing = [n for n in names if n not in taxonomy]
        if missing:
            shown = ", ".join(f"{n!r}{suggest(n, taxonomy.names)}" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UnknownLabelError(f"candidates 'fathomnet2025': {len(missing)} of the 79 names are not nodes "
                                    f"of the model's taxonomy: {shown}{more}")
        return names
    return _read_candidate_file(taxonomy, Path(text))


def candidate_mask(taxonomy: Taxonomy, candidates: Sequence[str] | None) -> np.ndarray:
    """(len(taxonomy),) boolean mask of the nodes in `candidates`; `None` = every node."""
    if candidates is None:
        return np.ones(len(taxonomy), dtype=bool)
    names = list(candidates)
    if not names:
        raise DataError("candidates is empty; give at least one node name")
    _check_known(taxonomy, names, where="candidates", lines=None)
    mask = np.zeros(len(taxonomy), dtype=bool)
    mask[taxonomy.indices(names)] = True
    return mask


def _read_candidate_file(taxonomy: Taxonomy, path: Path) -> list[str]:
    if not path.is_file():
        words = CANDIDATE_KEYWORDS[1:]
        hint = f"; or one of {', '.join(repr(k) for k in words)}" + suggest(path.name, words)
        raise DataError(f"{path}: candidates file not found (expected a text file with one name per line{hint})")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: candidates file is not UTF-8 text") from None
    names, lines = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        name = line.strip()
        if name and not name.startswith("#"):
            names.append(name)
            lines.append(number)
    if not names:
        raise DataError(f"{path}: candidates file names no taxon (one name per line expected)")
    _check_known(taxonomy, names, where=str(path), lines=lines)
    return _unique(names)


def _check_known(taxonomy: Taxonomy, names: list[str], where: str, lines: list[int] | None) -> None:
    unknown = [k for k, n in enumerate(names) if n not in taxonomy]
    if unknown:
        first = unknown[0]
        loc = f"{where}, line {lines[first]}" if lines is not None else where
        more = f" ({len(unknown)} unknown names in all)" if len(unknown) > 1 else ""
        raise UnknownLabelError(f"{loc}: candidate {names[first]!r} is not a node of the taxonomy"
                                f"{suggest(names[first], taxonomy.names)}{more}")


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
