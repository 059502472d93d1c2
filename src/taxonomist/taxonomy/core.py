"""The `Taxonomy`: a forest of named nodes with ranks, lineages and the labels a model predicts.

Pure Python + numpy. Every later stage (data, models, losses, decisions, metrics) takes a Taxonomy.
"""
from __future__ import annotations

import difflib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from taxonomist.errors import TaxonomyError, UnknownLabelError

#: The seven Linnaean ranks, coarse to fine. The one place in the project that knows their names.
RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
RANK_INDEX = {r: i for i, r in enumerate(RANKS)}
#: The most names one lineage may hold, root to leaf. Real trees stay far below it (the seven Linnaean ranks;
#: WoRMS or NCBI lineages with sub- and super-ranks, 20–50); a deeper table is refused on reading, because the
#: ancestor table and the distance computations cost nodes × depth (a 10,000-node chain took 2.5 GB).
MAX_DEPTH = 128


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """A ` (did you mean 'X'?)` hint for a misspelled name, or an empty string."""
    pool = list(choices)
    # difflib's cutoff 0.6 needs len(name) ≤ 2.34 × len(choice); skipping hopeless cases keeps a huge cell
    # from a broken CSV (a megabyte of text) from costing seconds
    longest = max(map(len, pool), default=0)
    if len(name) > 2.34 * longest + 1:
        return ""
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in pool}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.6)]
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


@dataclass(frozen=True)
class Level:
    """One rank (or depth) of a taxonomy: its nodes, and each label's ancestor among them.

    `label_to_node[l]` is the position in `nodes` of label l's ancestor-or-self at this level, -1 if none.
    """

    name: str
    nodes: tuple[str, ...]
    label_to_node: np.ndarray


def _positions(per_label: np.ndarray, nodes: list[int]) -> np.ndarray:
    """Position in `nodes` of each node index in `per_label` (-1 for -1 or a node not listed), vectorised."""
    per_label = np.asarray(per_label, dtype=np.int64)
    size = max(int(per_label.max(initial=-1)), max(nodes, default=-1)) + 1
    lookup = np.full(size + 1, -1, dtype=np.int64)   # the extra last cell answers -1 for per_label == -1
    lookup[np.asarray(nodes, dtype=np.int64)] = np.arange(len(nodes))
    return lookup[per_label]


@dataclass(frozen=True)
class Taxonomy:
    """A forest of taxa.

    Attributes:
        names: every node, parents before children.
        parents: index of each node's parent in `names`, -1 for a root (roots hang under a virtual root).
        ranks: each node's rank (one of `RANKS`), or None for a node at no Linnaean rank (e.g. the
            FathomNet label "Tunicata", a subphylum) and for every node of a parent-table taxonomy
            without a rank column.
        labels: the nodes a model predicts (a label may also be an ancestor of other labels).
        source_format: "ranks" (one column per rank) or "parents" (a `concept_name,parent` table).

    Example:
        >>> tax = Taxonomy.from_parents({"Animalia": None, "Chordata": "Animalia", "Fish": "Chordata"})
        >>> tax.lineage("Fish")
        ['Animalia', 'Chordata', 'Fish']
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    ranks: tuple[str | None, ...]
    labels: tuple[str, ...]
    source_format: str = "parents"
    _index: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self):
        index = {n: i for i, n in enumerate(self.names)}
        if len(index) != len(self.names):
            dup = sorted(n for n, k in Counter(self.names).items() if k > 1)
            raise TaxonomyError(f"duplicate node names: {', '.join(dup[:5])}")
        object.__setattr__(self, "_index", index)
        for i, p in enumerate(self.parents):
            if p >= i:
                raise TaxonomyError(f"internal ordering error: parent of {self.names[i]!r} comes after it")
        if len(self) and self.max_depth >= MAX_DEPTH:
            deepest = int(self.depths.argmax())
            raise TaxonomyError(f"{self._chain(deepest)} holds {self.max_depth + 1} names; a lineage may hold at most "
                                f"{MAX_DEPTH} (taxonomist.taxonomy.MAX_DEPTH)")
        for lab in self.labels:
            if lab not in index:
                raise UnknownLabelError(f"label {lab!r} is not a node of the taxonomy{suggest(lab, self.names)}")
        if len(set(self.labels)) != len(self.labels):
            dup = sorted(lab for lab, k in Counter(self.labels).items() if k > 1)
            raise TaxonomyError(f"duplicate labels: {', '.join(dup[:5])}")

    def _chain(self, i: int) -> str:
        """`the lineage of 'X' ('A' → 'B' → … → 'X')`, its first and last names only, for an error message."""
        path = self._path(i)
        shown = [repr(self.names[j]) for j in path]
        if len(shown) > 6:
            shown = shown[:3] + ["…"] + shown[-2:]
        return f"the lineage of {self.names[i]!r} ({' → '.join(shown)})"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_parents(cls, parent_of: dict[str, str | None], labels: Sequence[str] | None = None,
                     ranks: dict[str, str | None] | None = None, source_format: str = "parents") -> "Taxonomy":
        """Build from `{name: parent or None}`; checks unknown parents, cycles and the order of ranks.

        `labels` defaults to the leaves. `ranks` gives a rank (or None) per node; ranks must get finer
        down every lineage (a family cannot sit below a genus).

        >>> tax = Taxonomy.from_parents({"Animalia": None, "Porifera": "Animalia", "Sponge X": "Porifera"},
        ...                             labels=["Porifera", "Sponge X"], ranks={"Animalia": "kingdom"})
        >>> tax.ancestors("Sponge X"), tax.rank("Animalia"), tax.rank("Porifera")
        (['Animalia', 'Porifera'], 'kingdom', None)
        """
        if not isinstance(parent_of, dict):
            raise TaxonomyError(f"parent_of must be a dict {{name: parent or None}}, got {type(parent_of).__name__}")
        for name, parent in parent_of.items():
            if not isinstance(name, str) or not name:
                raise TaxonomyError(f"node names must be non-empty strings, got {name!r}")
            if parent is not None and parent not in parent_of:
                raise TaxonomyError(f"node {name!r} has unknown parent {parent!r}{suggest(parent, parent_of)}")
            if parent == name:
                raise TaxonomyError(f"node {name!r} is its own parent")
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the current path, 2 = placed
        for start in parent_of:
            path = []
            node = start
            while node is not None and state.get(node) != 2:
                if state.get(node) == 1:
                    cycle = path[path.index(node):] + [node]
                    raise TaxonomyError("cycle in the taxonomy: " + " -> ".join(cycle))
                state[node] = 1
                path.append(node)
                node = parent_of[node]
            for n in reversed(path):
                state[n] = 2
                order.append(n)
        index = {n: i for i, n in enumerate(order)}
        parents = tuple(-1 if parent_of[n] is None else index[parent_of[n]] for n in order)
        rank_of = ranks or {}
        for n, r in rank_of.items():
            if r is not None and r not in RANK_INDEX:
                raise TaxonomyError(f"node {n!r} has unknown rank {r!r}; ranks are {', '.join(RANKS)}")
        ranked_above: dict[str, str | None] = {}  # nearest ranked ancestor-or-self, filled parents first
        for n in order:
            p = parent_of[n]
            above = ranked_above[p] if p is not None else None
            r = rank_of.get(n)
            if r is not None and above is not None and RANK_INDEX[rank_of[above]] >= RANK_INDEX[r]:
                raise TaxonomyError(f"node {n!r} ({r}) sits below {above!r} ({rank_of[above]}); "
                                    f"ranks must get finer down a lineage: {', '.join(RANKS)}")
            ranked_above[n] = n if r is not None else above
        if labels is None:
            has_child = set(parent_of[n] for n in order if parent_of[n] is not None)
            labels = [n for n in order if n not in has_child]
        return cls(tuple(order), parents, tuple(rank_of.get(n) for n in order), tuple(labels), source_format)

    @classmethod
    def flat(cls, labels: Sequence[str], root: str = "Organism") -> "Taxonomy":
        """Every label under one root: the fallback when a dataset has no taxonomy.csv."""
        labels = list(dict.fromkeys(labels))
        if root in labels:
            root = "<root>"
        parent_of = {root: None, **{lab: root for lab in labels}}
        return cls.from_parents(parent_of, labels=labels)

    def with_labels(self, labels: Sequence[str]) -> "Taxonomy":
        """The same tree with another label set (e.g. the labels present in a dataset)."""
        labels = list(dict.fromkeys(labels))
        self.check_names(labels, what="label")
        return Taxonomy(self.names, self.parents, self.ranks, tuple(labels), self.source_format)

    def subtree(self, keep: Iterable[str], labels: Sequence[str] | None = None) -> "Taxonomy":
        """The smallest sub-forest holding `keep` and all their ancestors."""
        keep_idx = set()
        for name in keep:
            i = self.index(name)
            while i >= 0 and i not in keep_idx:
                keep_idx.add(i)
                i = self.parents[i]
        parent_of = {self.names[i]: (self.names[self.parents[i]] if self.parents[i] >= 0 else None)
                     for i in sorted(keep_idx)}
        ranks = {self.names[i]: self.ranks[i] for i in keep_idx}
        labs = list(labels) if labels is not None else [lab for lab in self.labels if self.index(lab) in keep_idx]
        return Taxonomy.from_parents(parent_of, labels=labs, ranks=ranks, source_format=self.source_format)

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise UnknownLabelError(f"{name!r} is not a node of the taxonomy{suggest(name, self.names)}") from None

    def indices(self, names: Iterable[str]) -> np.ndarray:
        return np.array([self.index(n) for n in names], dtype=np.int64)

    def check_names(self, names: Iterable[str], what: str = "name", where: str = "") -> None:
        """Raise one `UnknownLabelError` naming the first unknown name (with a suggestion) and the count."""
        unknown = [n for n in dict.fromkeys(names) if n not in self._index]
        if unknown:
            more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
            loc = f" in {where}" if where else ""
            raise UnknownLabelError(f"{what} {unknown[0]!r}{loc} is not a node of the taxonomy"
                                    f"{suggest(unknown[0], self.names)}{more}")

    @property
    def label_indices(self) -> np.ndarray:
        """Node index of each label, in label order."""
        return self.indices(self.labels)

    def parent(self, name: str) -> str | None:
        p = self.parents[self.index(name)]
        return None if p < 0 else self.names[p]

    def rank(self, name: str) -> str | None:
        return self.ranks[self.index(name)]

    def lineage(self, name: str) -> list[str]:
        """Ancestors from the root down to `name` itself."""
        return [self.names[i] for i in self._path(self.index(name))]

    def ancestors(self, name: str) -> list[str]:
        """Proper ancestors, root first."""
        return self.lineage(name)[:-1]

    def children(self, name: str) -> list[str]:
        i = self.index(name)
        return [self.names[j] for j, p in enumerate(self.parents) if p == i]

    def descendants(self, name: str) -> list[str]:
        """Proper descendants in taxonomy order."""
        i = self.index(name)
        below = self.ancestor_table()[:, self.depths[i]] == i  # -1 for the nodes above that depth
        below[i] = False
        return [self.names[j] for j in np.flatnonzero(below)]

    @property
    def roots(self) -> list[str]:
        return [n for n, p in zip(self.names, self.parents) if p < 0]

    @property
    def internal_nodes(self) -> list[str]:
        """Nodes with at least one child."""
        has_child = set(p for p in self.parents if p >= 0)
        return [self.names[i] for i in sorted(has_child)]

    @property
    def leaves(self) -> list[str]:
        has_child = set(p for p in self.parents if p >= 0)
        return [n for i, n in enumerate(self.names) if i not in has_child]

    @property
    def has_ranks(self) -> bool:
        """True when nodes carry Linnaean ranks (a rank-column table, or a parent table with `rank`)."""
        return any(r is not None for r in self.ranks)

    def deepest_rank(self, name: str) -> str | None:
        """The finest Linnaean rank on the lineage of `name` (its own rank when it has one)."""
        for i in reversed(self._path(self.index(name))):
            if self.ranks[i] is not None:
                return self.ranks[i]
        return None

    def ancestor_at(self, name: str, rank: str) -> str | None:
        """The node of `name`'s lineage at `rank`, or None when the lineage has no name there."""
        if rank not in RANK_INDEX:
            raise TaxonomyError(f"unknown rank {rank!r}; ranks are {', '.join(RANKS)}")
        for i in self._path(self.index(name)):
            if self.ranks[i] == rank:
                return self.names[i]
        return None

    # ------------------------------------------------------------------ arrays
    def _path(self, i: int) -> list[int]:
        path = []
        while i >= 0:
            path.append(i)
            i = self.parents[i]
        return path[::-1]

    @property
    def depths(self) -> np.ndarray:
        """Depth of each node; roots have depth 0."""
        def build():
            depths = np.zeros(len(self), dtype=np.int64)
            for i, p in enumerate(self.parents):  # parents come first: one pass
                if p >= 0:
                    depths[i] = depths[p] + 1
            return depths
        return self._cached("_depths", build)

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

    def ancestor_table(self) -> np.ndarray:
        """`A[i, d]` = index of node i's ancestor at depth d (itself at its own depth), -1 below it."""
        def build():
            table = np.full((len(self), self.max_depth + 1), -1, dtype=np.int64)
            for i in range(len(self)):
                p = self.parents[i]
                if p >= 0:
                    table[i] = table[p]
                table[i, self.depths[i]] = i
            return table
        return self._cached("_anc_table", build)

    def ancestor_matrix(self, rows: Sequence[str] | None = None, cols: Sequence[str] | None = None) -> np.ndarray:
        """`M[r, c]` = 1.0 when node `cols[c]` is `rows[r]` or one of its ancestors.

        With rows = labels and cols = nodes, `probs @ M` gives the probability of every node as the sum
        of its descendant labels' probabilities.
        """
        r = self.label_indices if rows is None else self.indices(rows)
        c = np.arange(len(self)) if cols is None else self.indices(cols)
        anc = self.ancestor_table()[r]  # (R, D)
        depth_c = self.depths[c]
        ok = depth_c[None, :] < anc.shape[1]
        lookup = anc[:, np.minimum(depth_c, anc.shape[1] - 1)]  # (R, C): r's ancestor at c's depth
        return ((lookup == c[None, :]) & ok).astype(np.float64)

    def levels(self) -> list["Level"]:
        """The levels a per-rank metric or a multirank head works on.

        For a ranked taxonomy: the seven ranks that occur (kingdom … species). For a parent-table tree:
        depth 1 … max depth, named `depth1`, `depth2`, … (depth 0, the roots, is skipped when there is a
        single root). Each level lists its nodes and, for each label, the index of the label's ancestor
        at that level (or -1 when the label's lineage has no node there, e.g. a genus-level label at the
        species level).
        """
        def build():
            label_idx = self.label_indices
            out: list[Level] = []
            if self.has_ranks:
                codes = self.rank_codes()  # (N, 7) node index per rank
                for k, rank in enumerate(RANKS):
                    per_label = codes[label_idx, k]
                    nodes = [i for i in range(len(self)) if self.ranks[i] == rank]
                    if not nodes:
                        continue
                    out.append(Level(rank, tuple(self.names[i] for i in nodes), _positions(per_label, nodes)))
            else:
                anc = self.ancestor_table()
                first = 0 if len(self.roots) > 1 else 1
                for depth in range(first, self.max_depth + 1):
                    per_label = anc[label_idx, depth]
                    nodes = np.flatnonzero(self.depths == depth).tolist()
                    out.append(Level(f"depth{depth}", tuple(self.names[i] for i in nodes), _positions(per_label, nodes)))
            return out
        return self._cached("_levels", build)

    def rank_codes(self, nodes: Sequence[str] | None = None) -> np.ndarray:
        """`C[i, r]` = integer id of the name at rank r on the lineage of node i, -1 when none.

        The per-rank view the FathomNet scorer uses. Ids are node indices, so equal ids mean equal names.
        """
        idx = np.arange(len(self)) if nodes is None else self.indices(nodes)
        table = np.full((len(self), len(RANKS)), -1, dtype=np.int64)
        for i in range(len(self)):
            p = self.parents[i]
            if p >= 0:
                table[i] = table[p]
            if self.ranks[i] is not None:
                table[i, RANK_INDEX[self.ranks[i]]] = i
        return table[idx]

    def _cached(self, key: str, build):
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    # ------------------------------------------------------------------ identity
    def to_rows(self) -> list[dict[str, str]]:
        """Rows for `taxonomy.csv`, in the format the taxonomy was read from.

        A rank-column table gets one row per label, then one per leaf that is not a label, so that no node
        of the tree is lost (a model trained on some of a table's labels keeps the others as nodes).
        """
        if self.source_format == "ranks":
            rows = []
            labels = set(self.labels)
            for name in list(self.labels) + [leaf for leaf in self.leaves if leaf not in labels]:
                row = {"concept_name": name, **{r: "" for r in RANKS}}
                for i in self._path(self.index(name)):
                    if self.ranks[i] is not None:
                        row[self.ranks[i]] = self.names[i]
                rows.append(row)
            return rows
        with_rank = self.has_ranks
        rows = []
        for i, n in enumerate(self.names):
            row = {"concept_name": n, "parent": "" if self.parents[i] < 0 else self.names[self.parents[i]]}
            if with_rank:
                row["rank"] = self.ranks[i] or ""
            rows.append(row)
        return rows

    @property
    def hash(self) -> str:
        """sha256 of the tree, ranks and labels; identical taxonomies hash alike whatever their file layout."""
        h = hashlib.sha256()
        # nodes in name order (their stored order depends on how the table was read); labels in model order
        lines = sorted(f"{n}\t{self.names[self.parents[i]] if self.parents[i] >= 0 else ''}\t{self.ranks[i] or ''}\n"
                       for i, n in enumerate(self.names))
        for line in lines:
            h.update(line.encode())
        h.update(("labels\t" + "\t".join(self.labels)).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"Taxonomy({len(self)} nodes, {len(self.labels)} labels, {len(self.roots)} roots, "
                f"max depth {self.max_depth}, {'ranked' if self.has_ranks else 'unranked'})")
