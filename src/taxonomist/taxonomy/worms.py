"""Resolve taxon names to seven-rank lineages through WoRMS (fathomnet-py), with an on-disk JSON cache.

WoRMS returns ancestor chains with sub-ranks (suborder, infraclass, superfamily, …); only the seven
Linnaean ranks are kept. A name at another rank (e.g. "Tunicata", a subphylum) stays a label below its
deepest Linnaean ancestor, as in the official FathomNet 2025 table.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from taxonomist.errors import TaxonomistError
from taxonomist.taxonomy.core import RANK_INDEX, RANKS, Taxonomy
from taxonomist.utils.files import atomic_write_text

#: A client takes a name and returns its ancestor chain, root first, as (name, rank) pairs ending at
#: the name itself; it raises `LookupError` when the name is unknown.
AncestorClient = Callable[[str], Sequence[tuple[str, str]]]

CACHE_FILE = "worms_cache.json"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "taxonomist"


def fathomnet_client(name: str) -> list[tuple[str, str]]:
    """Ancestors of `name` from the FathomNet WoRMS service (needs the `worms` extra and internet)."""
    try:
        from fathomnet.api import worms
    except ImportError:
        raise TaxonomistError("WoRMS resolution needs fathomnet-py: pip install 'taxonomist[worms]' "
                              "(or use --offline with a filled cache)") from None
    try:
        node = worms.get_ancestors(name)
    except Exception as e:  # fathomnet-py raises requests errors, ValueError, or its own
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 404 or "not found" in str(e).lower():
            raise LookupError(name) from None
        raise ConnectionError(f"WoRMS request for {name!r} failed: {e}") from None
    chain = []
    while node is not None:
        chain.append((getattr(node, "name", None) or getattr(node, "scientific_name", ""), node.rank or ""))
        children = getattr(node, "children", None) or []
        node = children[0] if children else None
    if not chain or chain[-1][0] != name:
        # the service answers with the accepted name for a synonym; keep the name the user gave
        chain.append((name, chain[-1][1] if chain else ""))
    return chain


@dataclass
class Resolution:
    """The result of `resolve_names`: lineages per resolved name, and what could not be resolved."""

    lineages: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {rank: name}
    unresolved: dict[str, str] = field(default_factory=dict)           # name -> reason

    def to_taxonomy(self) -> Taxonomy:
        """A rank-column taxonomy of the resolved names (labels in the order given)."""
        from taxonomist.taxonomy.io import parse_taxonomy
        rows = [{"concept_name": n, **{r: lin.get(r, "") for r in RANKS}} for n, lin in self.lineages.items()]
        return parse_taxonomy(["concept_name", *RANKS], rows, "<WoRMS resolution>")


def seven_ranks(chain: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Keep the seven Linnaean ranks of a WoRMS chain; sub-ranks and super-ranks are dropped.

    >>> seven_ranks([("Biota", "Superdomain"), ("Animalia", "Kingdom"), ("Chordata", "Phylum"),
    ...              ("Tunicata", "Subphylum")])
    {'kingdom': 'Animalia', 'phylum': 'Chordata'}
    """
    out: dict[str, str] = {}
    for name, rank in chain:
        key = re.sub(r"\s+", "", (rank or "").lower())
        if key in RANK_INDEX and name:
            out[key] = name
    return out


def resolve_names(names: Iterable[str], client: AncestorClient | None = None, cache_dir: str | Path | None = None,
                  offline: bool = False, progress: bool = False) -> Resolution:
    """Lineages for `names`, from the cache first, then the client (unless `offline`).

    Every name ends in `lineages` or in `unresolved` with a reason; nothing is dropped silently. The cache
    (`CACHE_DIR/worms_cache.json`, name → chain) is rewritten atomically after each successful lookup, so
    an interrupted run keeps what it fetched.

    >>> chains = {"Sebastes": [("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Actinopteri", "Class"),
    ...                        ("Perciformes", "Order"), ("Sebastinae", "Subfamily"), ("Sebastes", "Genus")]}
    >>> def client(name):
    ...     if name not in chains:
    ...         raise LookupError(name)
    ...     return chains[name]
    >>> res = resolve_names(["Sebastes", "Nessie"], client=client, cache_dir="cache")   # doctest: +SKIP
    >>> res.lineages["Sebastes"]["genus"], res.unresolved                              # doctest: +SKIP
    ('Sebastes', {'Nessie': 'not found in WoRMS'})
    """
    if isinstance(names, str):  # one name, not its characters
        names = [names]
    names = [n.strip() for n in names if isinstance(n, str) and n.strip()]
    cache_path = Path(cache_dir or default_cache_dir()) / CACHE_FILE
    cache: dict[str, list[list[str]]] = {}
    if cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            cache = None  # type: ignore[assignment]
        if not isinstance(cache, dict):
            raise TaxonomistError(f"{cache_path}: the WoRMS cache is corrupt; delete it to start again")
    client = client or fathomnet_client
    result = Resolution()
    iterator = names
    if progress and not offline:
        from tqdm import tqdm
        iterator = tqdm(names, desc="WoRMS", unit="name")
    for name in iterator:
        if name in result.lineages or name in result.unresolved:
            continue
        chain = cache.get(name)
        if chain is None:
            if offline:
                result.unresolved[name] = "not in the cache (--offline)"
                continue
            try:
                chain = [list(pair) for pair in client(name)]
                if not all(len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in chain):
                    raise ValueError
            except (ValueError, TypeError):
                result.unresolved[name] = "malformed answer from the WoRMS client (expected (name, rank) pairs)"
                continue
            except LookupError:
                result.unresolved[name] = "not found in WoRMS"
                continue
            except (ConnectionError, OSError, TimeoutError) as e:
                result.unresolved[name] = f"lookup failed ({e})"
                continue
            cache[name] = chain
            atomic_write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True))
        lineage = seven_ranks(chain)
        if not lineage:
            result.unresolved[name] = "WoRMS gave no kingdom…species ranks"
            continue
        result.lineages[name] = lineage
    return result
