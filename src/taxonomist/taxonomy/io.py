"""Read and write `taxonomy.csv` in its two layouts, with one-line errors that name the file and row.

Layouts (see DESIGN.md): rank columns `concept_name,kingdom,…,species`, or a parent table
`concept_name,parent[,rank]` for trees whose levels are not Linnaean ranks.
"""
from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path

from taxonomist.errors import TaxonomyError
from taxonomist.taxonomy.core import RANK_INDEX, RANKS, Taxonomy, suggest
from taxonomist.utils.files import atomic_write_text

BUILTIN = ("fathomnet2025",)


def read_csv_rows(path: str | Path, what: str = "CSV") -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV (a BOM is tolerated); one-line errors for the usual mistakes."""
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
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:
            raise TaxonomyError(f"{path}: row {reader.line_num} has more cells than the header")
        rows.append({k: (v or "").strip() for k, v in row.items()})
    return header, rows


def read_taxonomy(path: str | Path) -> Taxonomy:
    """Load a taxonomy from a CSV file, or the built-in table named `fathomnet2025`."""
    if str(path) in BUILTIN:
        return builtin_taxonomy(str(path))
    header, rows = read_csv_rows(path, "taxonomy")
    return parse_taxonomy(header, rows, str(path))


def builtin_taxonomy(name: str = "fathomnet2025") -> Taxonomy:
    """A taxonomy shipped with the package (the 79 FathomNet 2025 labels with the scorer's lineages)."""
    if name not in BUILTIN:
        raise TaxonomyError(f"unknown built-in taxonomy {name!r}; built-in: {', '.join(BUILTIN)}")
    text = resources.files("taxonomist.taxonomy").joinpath(f"data/{name}.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    return parse_taxonomy(list(reader.fieldnames or []), list(reader), f"<built-in {name}>")


def parse_taxonomy(header: list[str], rows: list[dict[str, str]], where: str) -> Taxonomy:
    if "concept_name" not in header:
        raise TaxonomyError(f"{where}: no 'concept_name' column (header: {','.join(header)})")
    if not rows:
        raise TaxonomyError(f"{where}: no rows below the header")
    if "parent" in header:
        return _parse_parent_table(header, rows, where)
    return _parse_rank_table(header, rows, where)


def _check_columns(header: list[str], allowed: list[str], where: str) -> None:
    for col in header:
        if col not in allowed:
            raise TaxonomyError(f"{where}: unknown column {col!r}{suggest(col, allowed)}; "
                                f"expected {','.join(allowed)}")


def _parse_rank_table(header: list[str], rows: list[dict[str, str]], where: str) -> Taxonomy:
    _check_columns(header, ["concept_name", *RANKS], where)
    present = [r for r in RANKS if r in header]
    if not present:
        raise TaxonomyError(f"{where}: no rank columns; expected some of {','.join(RANKS)} or a 'parent' column")
    parent_of: dict[str, str | None] = {}
    rank_of: dict[str, str | None] = {}
    first_seen: dict[str, int] = {}
    labels: list[str] = []
    for line, row in enumerate(rows, start=2):
        name = row["concept_name"]
        if not name:
            raise TaxonomyError(f"{where}: row {line}: empty concept_name")
        if name in labels:
            raise TaxonomyError(f"{where}: row {line}: duplicate concept_name {name!r} (first at row {first_seen[name]})")
        labels.append(name)
        first_seen.setdefault(name, line)
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
    return Taxonomy.from_parents(parent_of, labels=labels, ranks=rank_of, source_format="ranks")


def _parse_parent_table(header: list[str], rows: list[dict[str, str]], where: str) -> Taxonomy:
    _check_columns(header, ["concept_name", "parent", "rank"], where)
    parent_of: dict[str, str | None] = {}
    rank_of: dict[str, str | None] = {}
    line_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        name = row["concept_name"]
        if not name:
            raise TaxonomyError(f"{where}: row {line}: empty concept_name")
        if name in parent_of:
            raise TaxonomyError(f"{where}: row {line}: duplicate concept_name {name!r} (first at row {line_of[name]})")
        rank = row.get("rank", "") or None
        if rank is not None and rank not in RANK_INDEX:
            raise TaxonomyError(f"{where}: row {line}: unknown rank {rank!r}{suggest(rank, RANKS)}")
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
