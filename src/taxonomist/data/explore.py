"""`explore_dataset`: what a dataset holds and what is wrong with it — counts per label and rank, imbalance,
image and box sizes, exact and near-duplicate images, unreadable files — written as summary.json + PNG plots.
"""
from __future__ import annotations

import hashlib
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from taxonomist.data.dataset import load_dataset
from taxonomist.data.images import open_first_frame
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import Level, Taxonomy
from taxonomist.utils.files import atomic_path, atomic_write_json

SUMMARY = "summary.json"
#: plot key → file name; stable, because the HTML report embeds these files by name
PLOTS = {
    "label_counts": "label_counts.png",
    "rank_counts": "rank_counts.png",
    "groups": "group_counts.png",
    "image_sizes": "image_sizes.png",
    "box_sizes": "box_sizes.png",
}
RARE_THRESHOLD = 5       # labels with fewer examples than this are listed as rare
HASH_SIZE = 16           # pHash of the 16×16 lowest DCT frequencies: 256 bits
# Near duplicates: at most this many of the 256 pHash bits differ and the aspect ratios agree within 10 %.
# Measured on the 24,265 real plankton ROIs of PlanktonSet (small grey blobs on white, the hardest case for
# hashing): 51 groups (128 images, mostly look-alike acantharia), while 90 % of resized, recompressed or
# brightened copies stay within 24 bits. 64-bit hashes chained thousands of distinct ROIs into one group.
NEAR_THRESHOLD = 24
MAX_ASPECT_CHANGE = 0.1  # |log(aspect a / aspect b)|
MAX_LISTED = 1000        # duplicate groups and unreadable files listed in summary.json (totals are always exact)
BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass
class ExploreSummary:
    """What `explore_dataset` found; `data` is the content of summary.json, `plots` the PNG paths written."""

    out_dir: Path
    data: dict
    plots: dict[str, Path]

    def __getitem__(self, key: str):
        return self.data[key]

    def __str__(self) -> str:
        d = self.data
        imb = d["imbalance"]
        lines = [f"{d['dataset']}: {d['n_examples']} examples of {d['n_labels']} labels ({d['n_images']} image files)"]
        if imb:
            lines.append(f"imbalance: largest/smallest label {imb['max']}/{imb['min']} (ratio {imb['ratio']:.1f}), "
                         f"Gini {imb['gini']:.2f}, effective labels {imb['effective_labels']:.1f}; "
                         f"{len(imb['rare_labels'])} labels with < {imb['rare_threshold']} examples")
        sizes = d["image_sizes"]
        if sizes["n"]:
            lines.append(f"images: median {sizes['width']['median']:g}×{sizes['height']['median']:g} px "
                         f"(width {sizes['width']['min']:g}–{sizes['width']['max']:g}, "
                         f"height {sizes['height']['min']:g}–{sizes['height']['max']:g})")
        if d["boxes"]:
            b = d["boxes"]
            lines.append(f"boxes: {b['n']}, median {b['width']['median']:g}×{b['height']['median']:g} px; "
                         f"small/medium/large {b['small']}/{b['medium']}/{b['large']}")
        if d["groups"]:
            top = ", ".join(f"{g['name']} {g['examples']} ({g['labels']} labels)" for g in d["groups"]["rows"][:6])
            more = " …" if len(d["groups"]["rows"]) > 6 else ""
            lines.append(f"per {d['groups']['level']}: {top}{more}")
        dup = d["duplicates"]
        lines.append(f"duplicates: {dup['exact']['groups']} exact groups, {dup['near']['groups']} near-duplicate "
                     f"groups ({dup['near']['hash']} Hamming <= {dup['near']['threshold']}); "
                     f"unreadable files: {d['unreadable']['count']}")
        lines.append(f"wrote {self.out_dir / SUMMARY} and {len(self.plots)} plots")
        return "\n".join(lines)


def explore_dataset(dataset_root: str | Path, out_dir: str | Path, progress: bool = False, *,
                    near_threshold: int = NEAR_THRESHOLD, hash_size: int = HASH_SIZE,
                    rare_threshold: int = RARE_THRESHOLD) -> ExploreSummary:
    """Explore a dataset directory and write `out_dir/summary.json` plus the PNG plots of `PLOTS`.

    Every image file is read once: its sha1 (exact duplicates), its size from the header, and a
    `hash_size`²-bit perceptual hash of a reduced decode (near duplicates: a resized, recompressed or
    slightly brightened copy; at most `near_threshold` differing bits and aspect ratios within 10 %).
    Files that are missing or do not decode are listed, not fatal.

    Example:
        >>> s = explore_dataset("data/synth", "reports/explore")      # doctest: +SKIP
        >>> s["imbalance"]["ratio"], s["plots"]["label_counts"]         # doctest: +SKIP
        (1.0, 'label_counts.png')
    """
    if not isinstance(near_threshold, (int, np.integer)) or near_threshold < 0:
        raise ConfigError(f"near_threshold {near_threshold!r} must be an integer >= 0 (differing hash bits)")
    if not isinstance(hash_size, (int, np.integer)) or not 4 <= hash_size <= 32 or hash_size % 4:
        raise ConfigError(f"hash_size {hash_size!r} must be a multiple of 4 in 4..32")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    with warnings.catch_warnings():
        # a missing taxonomy.csv is reported in the summary (flat_taxonomy) instead of as a warning
        warnings.simplefilter("ignore")
        ds = load_dataset(dataset_root)
    frame = ds.annotations
    tax = ds.taxonomy
    labelled = frame[frame["label"] != ""]
    label_pos = pd.Categorical(labelled["label"], categories=list(tax.labels)).codes.astype(np.int64)
    counts = np.bincount(label_pos, minlength=len(tax.labels))

    paths = list(dict.fromkeys(frame["path"]))
    facts = inspect_images([ds.image_path(p) for p in paths], hash_size=hash_size, progress=progress)
    facts["path"] = paths

    data = {
        "dataset": str(ds.root),
        "n_examples": int(len(frame)),
        "n_unlabelled": int(len(frame) - len(labelled)),
        "n_labels": int((counts > 0).sum()),
        "n_images": len(paths),
        "flat_taxonomy": bool(ds.flat_taxonomy),
        "taxonomy": repr(tax),
        "label_counts": _sorted_counts(tax.labels, counts),
        "rank_counts": _rank_counts(tax, label_pos),
        "imbalance": imbalance(counts[counts > 0], names=[l for l, c in zip(tax.labels, counts) if c > 0],
                               rare_threshold=rare_threshold) if counts.any() else None,
        "groups": None if ds.flat_taxonomy else _group_summary(tax, counts, rare_threshold),
        "image_sizes": _size_stats(facts["width"], facts["height"]),
        "boxes": _box_stats(frame),
        "duplicates": _duplicates(facts, frame, near_threshold),
        "unreadable": _unreadable(facts),
        "splits": frame["split"].replace("", "(none)").value_counts().to_dict() if "split" in frame.columns else None,
    }
    plots = _write_plots(out, data, facts, frame)
    data["plots"] = {key: path.name for key, path in plots.items()}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SUMMARY, data, indent=2)
    return ExploreSummary(out, data, plots)


# --------------------------------------------------------------------------------------------- images
def inspect_images(paths: list[Path], hash_size: int = HASH_SIZE, progress: bool = False) -> dict[str, np.ndarray]:
    """Per file: sha1 of the bytes, width and height, a packed perceptual hash, and an error (or "").

    The JPEG decoder is asked for a reduced-scale decode (`Image.draft`), so a 4k frame costs about what
    a thumbnail does. An animated or multi-page file is its first frame, as in train, predict and serve
    (`data.images`); one whose first frame exceeds the pixel budget is listed as an error, not decoded. A hash of an almost uniform image carries no information; `uniform` marks those so
    that blank frames are not all reported as near duplicates of each other.

    Example:
        >>> facts = inspect_images([Path("a.jpg"), Path("b.png")])     # doctest: +SKIP
        >>> facts["width"], facts["error"]                              # doctest: +SKIP
        (array([640, 32]), array(['', ''], dtype=object))
    """
    from tqdm import tqdm
    n = len(paths)
    side = 4 * hash_size
    nbytes = hash_size * hash_size // 8
    sha1 = np.full(n, "", dtype=object)
    error = np.full(n, "", dtype=object)
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)
    hashes = np.zeros((n, nbytes), dtype=np.uint8)
    uniform = np.zeros(n, dtype=bool)
    bar = tqdm(paths, desc="images", unit="img", file=sys.stderr, disable=not progress or not sys.stderr.isatty())
    for i, path in enumerate(bar):
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            error[i] = "file not found"
            continue
        except OSError as e:
            error[i] = f"cannot read ({e.strerror or e})"
            continue
        sha1[i] = hashlib.sha1(raw).hexdigest()
        try:
            # the frame rule and pixel budget of train, predict and serve: only the first frame is decoded
            with open_first_frame(io.BytesIO(raw)) as im:
                width[i], height[i] = im.size
                im.draft("L", (side, side))
                hashes[i], uniform[i] = _phash(im, hash_size)
        except _IMAGE_ERRORS as e:
            error[i] = f"cannot decode ({str(e).strip() or type(e).__name__})"
            width[i] = height[i] = 0
    return {"sha1": sha1, "width": width, "height": height, "hash": hashes, "uniform": uniform, "error": error}


def perceptual_hash(image: Image.Image, hash_size: int = HASH_SIZE) -> np.ndarray:
    """The pHash of one image as packed bits: which of the hash_size² lowest 2-D DCT frequencies of a
    (4·hash_size)² grey thumbnail lie above their median (the DC term, mere brightness, is left out).

    >>> rng = np.random.default_rng(0)
    >>> a = Image.fromarray(rng.integers(0, 200, (64, 64), dtype=np.uint8))
    >>> b = a.point(lambda v: v + 20)            # brighter: only the DC term moves, and it is left out
    >>> int(np.unpackbits(perceptual_hash(a) ^ perceptual_hash(b)).sum())
    0
    >>> c = Image.fromarray(rng.integers(0, 200, (64, 64), dtype=np.uint8))
    >>> int(np.unpackbits(perceptual_hash(a) ^ perceptual_hash(c)).sum()) > 100     # of 256 bits
    True
    """
    if not isinstance(hash_size, (int, np.integer)) or hash_size < 4 or hash_size % 4:
        raise ConfigError(f"hash_size {hash_size!r} must be a multiple of 4, at least 4")
    return _phash(image, hash_size)[0]


def _phash(image: Image.Image, hash_size: int) -> tuple[np.ndarray, bool]:
    side = 4 * hash_size
    grey = np.asarray(image.convert("L").resize((side, side), Image.Resampling.BOX), dtype=np.float64)
    d = _dct_matrix(side)
    coeffs = (d @ grey @ d.T)[:hash_size, :hash_size].ravel()[1:]
    bits = np.append(coeffs > np.median(coeffs), False)  # pad the dropped DC position to a whole byte
    # an (almost) uniform image has no structure to hash; its bits would be noise
    return np.packbits(bits), bool(np.ptp(grey) <= 2)


def _dct_matrix(n: int, _cache: dict = {}) -> np.ndarray:
    """Orthogonal DCT-II basis: `D @ x` is the 1-D DCT of x, `D @ X @ D.T` the 2-D one."""
    if n not in _cache:
        k = np.arange(n)
        d = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
        d[0] /= np.sqrt(2)
        _cache[n] = d
    return _cache[n]


def near_duplicate_components(hashes: np.ndarray, threshold: int, active: np.ndarray | None = None,
                              aspect: np.ndarray | None = None, max_elements: int = 1 << 22) -> np.ndarray:
    """Connected components of "Hamming distance <= threshold" over packed hashes (N, bytes).

    With `aspect` (width / height per image), a pair also needs aspect ratios within 10 %: a resized
    copy keeps its shape, and the test is free. Pairs are compared block by block (about `max_elements`
    words at a time, so memory stays flat); returns a component id per hash. Hashes not `active` are
    left alone in their own component.

    >>> h = np.array([[0b00000000], [0b00000011], [0b11111111]], dtype=np.uint8)
    >>> near_duplicate_components(h, threshold=2).tolist()
    [0, 0, 1]
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    hashes = np.asarray(hashes, dtype=np.uint8)
    if hashes.ndim != 2:
        raise ConfigError(f"hashes must be a 2-D array of packed bits, got shape {hashes.shape}")
    n = len(hashes)
    idx = np.arange(n) if active is None else np.flatnonzero(active)
    words = _as_words(hashes[idx])
    log_aspect = None if aspect is None else np.log(np.asarray(aspect, dtype=np.float64)[idx])
    rows, cols = [], []
    block = max(1, max_elements // max(1, len(idx) * words.shape[1]))
    for start in range(0, len(idx), block):
        chunk = words[start:start + block]
        dist = _popcount(chunk[:, None, :] ^ words[None, start:, :]).sum(axis=2)
        close = dist <= threshold
        if log_aspect is not None:
            close &= np.abs(log_aspect[start:start + block, None] - log_aspect[None, start:]) < MAX_ASPECT_CHANGE
        i, j = np.nonzero(close)
        keep = j > i  # upper triangle: j indexes from `start`, so j > i means a later item
        rows.append(idx[start + i[keep]])
        cols.append(idx[start + j[keep]])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return comp


if hasattr(np, "bitwise_count"):  # numpy >= 2.0
    _popcount = np.bitwise_count
else:
    _BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(words: np.ndarray) -> np.ndarray:
        return _BITS[words.view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1, dtype=np.uint64)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed bytes as 64-bit words (padding with zero bytes) so XOR + popcount run 8 bytes at a time."""
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.concatenate([packed, np.zeros((len(packed), pad), dtype=np.uint8)], axis=1)
    return np.ascontiguousarray(packed).view(np.uint64)


# --------------------------------------------------------------------------------------------- statistics
def imbalance(counts: np.ndarray, names: list[str] | None = None, rare_threshold: int = RARE_THRESHOLD) -> dict:
    """Imbalance of examples per label: max/min ratio, Gini coefficient (0 = balanced), effective number of
    labels (exp of the entropy; equals the label count when balanced) and the rare labels.

    >>> r = imbalance(np.array([10, 10, 10, 10]))
    >>> r["ratio"], r["gini"], r["effective_labels"]
    (1.0, 0.0, 4.0)
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or not len(c) or (c <= 0).any():
        raise DataError("imbalance needs a 1-D array of positive counts")
    names = list(names) if names is not None else [str(i) for i in range(len(c))]
    s = np.sort(c)
    n = len(s)
    gini = float(2 * np.sum(np.arange(1, n + 1) * s) / (n * s.sum()) - (n + 1) / n)
    p = c / c.sum()
    rare = [names[i] for i in np.lexsort((np.array(names, dtype=str), c)) if c[i] < rare_threshold]
    return {"max": int(c.max()), "min": int(c.min()), "ratio": float(c.max() / c.min()),
            "gini": round(max(gini, 0.0), 6), "effective_labels": round(float(np.exp(-np.sum(p * np.log(p)))), 6),
            "rare_threshold": int(rare_threshold), "rare_labels": rare}


def top_level_groups(taxonomy: Taxonomy) -> Level | None:
    """The level a per-group summary (and the OOD hold-out) works on: phylum for a ranked taxonomy
    (else its coarsest level with several taxa); for a parent-table tree the level just below the root,
    or deeper while that level splits the labels into fewer than three groups (PlanktonSet's two roots,
    Organism and Non-organism, say little; the broad groups below them do).

    >>> tax = Taxonomy.from_parents({"Organism": None, "Non-organism": None, "Crustacea": "Organism",
    ...     "Cnidaria": "Organism", "copepod": "Crustacea", "medusa": "Cnidaria", "detritus": "Non-organism"})
    >>> top_level_groups(tax).nodes
    ('Crustacea', 'Cnidaria', 'detritus')
    """
    levels = taxonomy.levels()
    if not levels:
        return None
    if taxonomy.has_ranks:
        by_name = {lv.name: lv for lv in levels}
        if "phylum" in by_name:
            return by_name["phylum"]
        return next((lv for lv in levels if len(lv.nodes) > 1), levels[0])
    for lv in levels:
        if len(np.unique(lv.label_to_node[lv.label_to_node >= 0])) >= 3:
            return lv
    return levels[0]


def _sorted_counts(labels, counts) -> dict[str, int]:
    order = np.lexsort((np.array(labels, dtype=object).astype(str), -counts))
    return {labels[i]: int(counts[i]) for i in order if counts[i] > 0}


def _rank_counts(tax: Taxonomy, label_pos: np.ndarray) -> dict:
    out = {}
    for lv in tax.levels():
        node = lv.label_to_node[label_pos]
        assigned = node >= 0
        c = np.bincount(node[assigned], minlength=len(lv.nodes))
        out[lv.name] = {"taxa": int((c > 0).sum()), "examples": int(assigned.sum()),
                        "unassigned": int((~assigned).sum()), "counts": _sorted_counts(list(lv.nodes), c)}
    return out


def _group_summary(tax: Taxonomy, counts: np.ndarray, rare_threshold: int) -> dict | None:
    level = top_level_groups(tax)
    if level is None:
        return None
    present = counts > 0
    group = level.label_to_node
    rows = []
    for g in range(-1, len(level.nodes)):
        mine = present & (group == g)
        if not mine.any():
            continue
        c = counts[mine]
        rows.append({"name": level.nodes[g] if g >= 0 else f"(no {level.name})", "labels": int(mine.sum()),
                     "examples": int(c.sum()), "share": round(float(c.sum() / counts.sum()), 6),
                     "min": int(c.min()), "median": float(np.median(c)), "max": int(c.max()),
                     "rare_labels": int((c < rare_threshold).sum())})
    rows.sort(key=lambda r: (-r["examples"], r["name"]))
    return {"level": level.name, "rows": rows}


def _stats(x: np.ndarray) -> dict:
    return {"min": float(x.min()), "p05": float(np.percentile(x, 5)), "median": float(np.median(x)),
            "mean": round(float(x.mean()), 3), "p95": float(np.percentile(x, 95)), "max": float(x.max())}


def _size_stats(width: np.ndarray, height: np.ndarray) -> dict:
    ok = (width > 0) & (height > 0)
    if not ok.any():
        return {"n": 0}
    w, h = width[ok], height[ok]
    sizes = pd.Series(list(zip(w.tolist(), h.tolist()))).value_counts()
    return {"n": int(ok.sum()), "width": _stats(w), "height": _stats(h), "aspect_median": float(np.median(w / h)),
            "most_common": [{"width": a, "height": b, "count": int(k)} for (a, b), k in sizes.head(5).items()]}


def _box_stats(frame: pd.DataFrame) -> dict | None:
    if not all(c in frame.columns for c in BOX_COLUMNS):
        return None
    box = frame[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(box).all(axis=1) & (box[:, 2] > 0) & (box[:, 3] > 0)
    if not ok.any():
        return None
    w, h = box[ok, 2], box[ok, 3]
    area = w * h
    # COCO's size classes: small < 32², medium < 96², large above
    return {"n": int(ok.sum()), "width": _stats(w), "height": _stats(h), "side": _stats(np.sqrt(area)),
            "small": int((area < 32 ** 2).sum()), "medium": int(((area >= 32 ** 2) & (area < 96 ** 2)).sum()),
            "large": int((area >= 96 ** 2).sum())}


def _duplicates(facts: dict, frame: pd.DataFrame, threshold: int) -> dict:
    readable = facts["error"] == ""
    paths = np.array(facts["path"], dtype=object)
    labels_of = frame.groupby("path", sort=False)["label"].agg(lambda s: sorted(set(s) - {""})).to_dict()
    split_of = (frame.groupby("path", sort=False)["split"].agg(lambda s: sorted(set(s) - {""})).to_dict()
                if "split" in frame.columns else None)

    exact_id = pd.factorize(np.where(readable, facts["sha1"], np.arange(len(paths)).astype(str)))[0]
    near_active = readable & ~facts["uniform"]
    aspect = facts["width"] / np.maximum(facts["height"], 1)
    near_id = near_duplicate_components(facts["hash"], threshold, active=near_active,
                                        aspect=np.where(readable, aspect, 1.0))
    # a near group is reported only when it holds at least two different files' contents
    exact_groups = _groups(exact_id, readable)
    near_groups = [g for g in _groups(near_id, near_active) if len(set(exact_id[g])) > 1]

    def describe(groups):
        listed, conflicts, across = [], 0, 0
        for g in groups:
            labels = sorted(set().union(*(labels_of[p] for p in paths[g])))
            conflicts += len(labels) > 1
            if split_of is not None:
                across += len(set().union(*(split_of[p] for p in paths[g]))) > 1
            if len(listed) < MAX_LISTED:
                listed.append({"paths": paths[g].tolist(), "labels": labels})
        out = {"groups": len(groups), "images": int(sum(len(g) for g in groups)), "conflicting_labels": conflicts,
               "list": listed}
        if split_of is not None:
            out["across_splits"] = across
        return out

    return {"exact": describe(exact_groups),
            "near": {"threshold": int(threshold), "hash": f"phash{facts['hash'].shape[1] * 8}",
                     "uniform_images_skipped": int((readable & facts["uniform"]).sum()), **describe(near_groups)}}


def _groups(component: np.ndarray, active: np.ndarray) -> list[np.ndarray]:
    """Indices of each component with two or more active members, largest first."""
    idx = np.flatnonzero(active)
    comp = component[idx]
    order = np.argsort(comp, kind="stable")
    comp, idx = comp[order], idx[order]
    starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]])
    groups = [g for g in np.split(idx, starts[1:]) if len(g) > 1]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


def _unreadable(facts: dict) -> dict:
    bad = np.flatnonzero(facts["error"] != "")
    return {"count": int(len(bad)),
            "list": [{"path": facts["path"][i], "reason": facts["error"][i]} for i in bad[:MAX_LISTED]]}


def _write_plots(out: Path, data: dict, facts: dict, frame: pd.DataFrame) -> dict[str, Path]:
    """Write the PNGs that have something to show; matplotlib's Agg canvas, no pyplot global state."""
    from matplotlib.figure import Figure
    written = {}

    def save(key: str, fig) -> None:
        path = out / PLOTS[key]
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        written[key] = path

    counts = np.array(list(data["label_counts"].values()))
    if len(counts):
        fig = Figure(figsize=(max(6.0, min(16.0, 0.25 * len(counts))), 4))
        ax = fig.subplots()
        ax.bar(np.arange(len(counts)), counts, width=1.0 if len(counts) > 60 else 0.8, color="#3b7dd8")
        ax.set_yscale("log")
        ax.set_ylabel("examples (log scale)")
        ax.set_title(f"examples per label, sorted ({len(counts)} labels)")
        if len(counts) <= 60:
            ax.set_xticks(np.arange(len(counts)), list(data["label_counts"]), rotation=90, fontsize=7)
        else:
            ax.set_xlabel("labels, most to least frequent")
        ax.set_xlim(-0.5, len(counts) - 0.5)
        save("label_counts", fig)

        levels = [(name, np.array(list(v["counts"].values()))) for name, v in data["rank_counts"].items()
                  if v["counts"]]
        fig = Figure(figsize=(max(6.0, 1.1 * len(levels)), 4))
        ax = fig.subplots()
        ax.boxplot([c for _, c in levels], showfliers=True)
        ax.set_xticks(np.arange(1, len(levels) + 1), [f"{n}\n({len(c)} taxa)" for n, c in levels], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("examples per taxon (log scale)")
        ax.set_title("examples per taxon at each rank")
        save("rank_counts", fig)

    if data["groups"] and data["groups"]["rows"]:
        rows = data["groups"]["rows"][:40]
        fig = Figure(figsize=(8, max(2.5, 0.3 * len(rows) + 1)))
        ax = fig.subplots()
        y = np.arange(len(rows))[::-1]
        ax.barh(y, [r["examples"] for r in rows], color="#5aa469")
        ax.set_yticks(y, [f"{r['name']} ({r['labels']})" for r in rows], fontsize=8)
        ax.set_xlabel("examples")
        ax.set_title(f"examples per {data['groups']['level']} (labels in brackets)")
        save("groups", fig)

    ok = facts["width"] > 0
    if ok.any():
        w, h = facts["width"][ok], facts["height"][ok]
        fig = Figure(figsize=(10, 4))
        ax1, ax2 = fig.subplots(1, 2)
        ax1.scatter(w, h, s=6, alpha=0.4, color="#3b7dd8", edgecolors="none")
        ax1.set_xlabel("width (px)")
        ax1.set_ylabel("height (px)")
        ax1.set_title(f"image sizes ({ok.sum()} files)")
        if max(w.max() / w.min(), h.max() / h.min()) > 20:
            ax1.set_xscale("log")
            ax1.set_yscale("log")
        ax2.hist(np.maximum(w, h), bins=min(50, max(5, len(w) // 5)), color="#3b7dd8")
        ax2.set_xlabel("longer side (px)")
        ax2.set_ylabel("files")
        ax2.set_title("longer side")
        save("image_sizes", fig)

    if data["boxes"]:
        box = frame[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
        good = np.isfinite(box).all(axis=1) & (box[:, 2] > 0) & (box[:, 3] > 0)
        side = np.sqrt(box[good, 2] * box[good, 3])
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        bins = np.geomspace(max(side.min(), 1.0), max(side.max(), 2.0), 40)
        ax.hist(side, bins=bins, color="#d8883b")
        ax.set_xscale("log")
        for edge in (32, 96):  # COCO small / medium / large
            ax.axvline(edge, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("box side √(w·h) in px (log scale)")
        ax.set_ylabel("boxes")
        ax.set_title(f"box sizes ({good.sum()} boxes)")
        save("box_sizes", fig)
    return written


__all__ = ["ExploreSummary", "explore_dataset", "inspect_images", "perceptual_hash", "near_duplicate_components",
           "imbalance", "top_level_groups", "PLOTS", "SUMMARY"]
