"""Read and write `taxonomy.csv` in its two layouts, with one-line errors that name the file and row.

Layouts (see DESIGN.md): rank columns `concept_name,kingdom,…,species`, or a parent table
`concept_name,parent[,rank]` for trees whose levels are not Linnaean ranks.
"""
from __future__ import annotations

import csv
import io
from collections import Counter
from importlib import resources
from pathlib import Path

from taxonomist.errors import TaxonomyError
from taxonomist.taxonomy.core import RANK_INDEX, RANKS, Taxonomy, suggest
from taxonomist.utils.files import atomic_write_text

BUILTIN = ("fathomnet2025",)


def read_csv_rows(path: str | Path, what: str = "CSV") -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV (a BOM is tolerated); one-line errors for the usual mistakes."""
    header, rows, _ = _read_csv(path, what)
    return header, rows


def _read_csv(path: str | Path, what: str) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """`read_csv_rows` plus each row's line number in the file (blank lines are skipped but counted)."""
    path = Path(path)
    if not path.exists():
        raise TaxonomyError(f"{path}: {what} file not found")
    if path.is_dir():
        raise TaxonomyError(f"{path}: is a directory, expected a {what} file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TaxonomyError(f"{path}: not UTF-8 text (invalid byte at line {line}); save it as UTF-8") from None
    if not text.strip():
        raise TaxonomyError(f"{path}: empty file")
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        repeated = sorted(h for h, k in Counter(header).items() if k > 1)  # linear: a header may be huge
        if repeated:
            raise TaxonomyError(f"{path}: column {repeated[0]!r} appears twice in the header")
        reader.fieldnames = header
        rows, lines = [], []
        for row in reader:
            if None in row:
                raise TaxonomyError(f"{path}: row {reader.line_num} has more cells than the header")
            rows.append({k: (v or "").strip() for k, v in row.items()})
            lines.append(reader.line_num)
    except csv.Error as e:  # a cell over the csv module's 128 KiB field limit, a NUL byte, …
        raise TaxonomyError(f"{path}: row {reader.line_num + 1}: malformed CSV ({e})") from None
    return header, rows, lines


def read_taxonomy(path: str | Path) -> Taxonomy:
    """Load a taxonomy from a CSV file, or the built-in table named `fathomnet2025`.

    >>> tax = read_taxonomy("fathomnet2025")
    >>> tax.lineage("Sebastes")
    ['Animalia', 'Chordata', 'Teleostei', 'Perciformes', 'Sebastidae', 'Sebastes']
    """
    if str(path) in BUILTIN:
        return builtin_taxonomy(str(path))
    if not Path(path).exists() and suggest(str(path), BUILTIN):  # a misspelled built-in name
        raise TaxonomyError(f"{path}: taxonomy file not found{suggest(str(path), BUILTIN)}")
    header, rows, lines = _read_csv(path, "taxonomy")
    return parse_taxonomy(header, rows, str(path), lines)


def builtin_taxonomy(name: str = "fathomnet2025") -> Taxonomy:
    """A taxonomy shipped with the package (the 79 FathomNet 2025 labels with the scorer's lineages)."""
    if name not in BUILTIN:
        raise TaxonomyError(f"unknown built-in taxonomy {name!r}; built-in: {', '.join(BUILTIN)}")
    text = resources.files("taxonomist.taxonomy").joinpath(f"data/{name}.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    return parse_taxonomy(list(reader.fieldnames or []), list(reader), f"<built-in {name}>")


def parse_taxonomy(header: list[str], rows: list[dict[str, str]], where: str,
                   lines: list[int] | None = None) -> Taxonomy:
    """Build a Taxonomy from CSV rows in either layout; errors start with `where` and the row's line.

    `lines` are the rows' line numbers in the file (default: 2, 3, … as when there are no blank lines).

    >>> tax = parse_taxonomy(["concept_name", "parent"], [{"concept_name": "Fish", "parent": ""},
    ...                      {"concept_name": "Cod", "parent": "Fish"}], "<example>")
    >>> tax.lineage("Cod")
    ['Fish', 'Cod']
    """
    if lines is None:
        lines = list(range(2, len(rows) + 2))
    if len(lines) != len(rows):
        raise TaxonomyError(f"{where}: {len(rows)} rows but {len(lines)} line numbers")
    if "concept_name" not in header:
        raise TaxonomyError(f"{where}: no 'concept_name' column (header: {','.join(header)})")
    if not rows:
        raise TaxonomyError(f"{where}: no rows below the header")
    if "parent" in header:
        return _parse_parent_table(header, rows, where, lines)
    return _parse_rank_table(header, rows, where, lines)


def _check_columns(header: list[str], allowed: list[str], where: str) -> None:
    for col in header:
        if col not in allowed:
            raise TaxonomyError(f"{where}: unknown column {col!r}{suggest(col, allowed)}; "
                                f"expected {','.join(allowed)}")


def _parse_rank_table(header: list[str], rows: list[dict[str, str]], where: str, lines: list[int]) -> Taxonomy:
    _check_columns(header, ["concept_name", *RANKS], where)
    present = [r for r in RANKS if r in header]
    if not present:
        raise TaxonomyError(f"{where}: no rank columns; expected some of {','.join(RANKS)} or a 'parent' column")
    parent_of: dict[str, str | None] = {}
    rank_of: dict[str, str | None] = {}
    first_seen: dict[str, int] = {}
    labels: list[str] = []
    for line, row in zip(lines, rows):
        name = row["concept_name"]
        if not name:
            raise TaxonomyError(f"{where}: row {line}: empty concept_name")
        if name in first_seen:
            raise TaxonomyError(f"{where}: row {line}: duplicate concept_name {name!r} (first at row {first_seen[name]})")
        labels.append(name)
        first_seen[name] = line
        chain = [(row.get(r, ""), r) for r in present if row.get(r, "")]
        if not chain:
            raise TaxonomyError(f"{where}: row {line}: {name!r} has no name at any rank")
        if chain[-1][0] != name:
            # a label at no Linnaean rank (subfamily, infraorder, …) sits below its deepest named rank
            chain.append((name, None))
        parent = None
        for cell, rank in chain:
            if cell in rank_of and rank_of[cell] != rank:
                raise TaxonomyError(f"{where}: row {line}: {cell!r} appears at two ranks "
                                    f"({rank_of[cell] or 'no rank'} and {rank or 'no rank'})")
            if cell in parent_of and parent_of[cell] != parent:
                raise TaxonomyError(f"{where}: row {line}: {cell!r} has two different parents "
                                    f"({parent_of[cell]!r} and {parent!r})")
            if cell == parent:
                raise TaxonomyError(f"{where}: row {line}: {cell!r} is repeated on its own lineage")
            parent_of[cell] = parent
            rank_of[cell] = rank
            parent = cell
    try:
        return Taxonomy.from_parents(parent_of, labels=labels, ranks=rank_of, source_format="ranks")
    except TaxonomyError as e:
        raise TaxonomyError(f"{where}: {e}") from None


def _parse_parent_table(header: list[str], rows: list[dict[str, str]], where: str, lines: list[int]) -> Taxonomy:
    _check_columns(header, ["concept_name", "parent", "rank"], where)
    parent_of: dict[str, str | None] = {}
    rank_of: dict[str, str | None] = {}
    line_of: dict[str, int] = {}
    for line, row in zip(lines, rows):
        name = row["concept_name"]
        if not name:
            raise TaxonomyError(f"{where}: row {line}: empty concept_name")
        if name in parent_of:
            raise TaxonomyError(f"{where}: row {line}: duplicate concept_name {name!r} (first at row {line_of[name]})")
        rank = row.get("rank", "") or None
        if rank is not None and rank not in RANK_INDEX:
            raise TaxonomyError(f"{where}: row {line}: unknown rank {rank!r}{suggest(rank, RANKS)}")
        if row["parent"] == name:
            raise TaxonomyError(f"{where}: row {line}: {name!r} is its own parent")
        parent_of[name] = row["parent"] or None
        rank_of[name] = rank
        line_of[name] = line
    for name, parent in parent_of.items():
        if parent is not None and parent not in parent_of:
            raise TaxonomyError(f"{where}: row {line_of[name]}: parent {parent!r} of {name!r} is not a "
                                f"concept_name of the table{suggest(parent, parent_of)}")
    try:
        return Taxonomy.from_parents(parent_of, ranks=rank_of, source_format="parents")
    except TaxonomyError as e:
        raise TaxonomyError(f"{where}: {e}") from None


def write_taxonomy(taxonomy: Taxonomy, path: str | Path) -> Path:
    """Write `taxonomy.csv` atomically, in the layout it was read from."""
    rows = taxonomy.to_rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
