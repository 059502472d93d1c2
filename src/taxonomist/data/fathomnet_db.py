"""The FathomNet database at the source: database-wide figures, concept selection and COCO export.

`scan_database` counts, `select_concepts` picks concepts by their counts (optionally below a WoRMS taxon),
`fetch_coco` pulls the boxes of chosen concepts into a COCO file that `data download`/`data prepare` take.
Every call to the service goes through one injectable client, so tests run on recorded answers offline.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from taxonomist.errors import ConfigError, DataError, DownloadError, UnknownLabelError
from taxonomist.taxonomy import suggest
from taxonomist.utils.files import atomic_path, atomic_write_json, atomic_write_text

SCAN_JSON = "scan.json"
SCAN_PNG = "scan.png"
COUNTS_CSV = "concept_counts.csv"
COCO_JSON = "fathomnet.json"
CONCEPT_CACHE = "concepts"           # OUT_DIR/concepts/<slug>.json: one concept's images as the service sent them
#: histogram bins of boxes per concept: 0, 1-9, 10-99, … (decades: the counts span five orders of magnitude)
DECADES = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)


class FathomNetError(DownloadError):
    """The FathomNet service could not answer (timeout, connection, 5xx, malformed answer)."""


# ---------------------------------------------------------------------------------------------- client
class FathomNetClient(Protocol):
    """What the functions below need from the service; `FathomNetAPI` is the real one.

    `images(concept)` returns plain dicts: `uuid`, `url`, `width`, `height`, `timestamp` and `boxes`, a list
    of dicts with `uuid`, `concept`, `x`, `y`, `width`, `height`, `rejected` (the fields of fathomnet-py's
    `AImageDTO` and `ABoundingBoxDTO`).
    """

    def concepts(self) -> list[str]: ...
    def box_counts(self) -> dict[str, int]: ...
    def image_count(self) -> int: ...
    def box_count(self) -> int: ...
    def images(self, concept: str) -> list[dict]: ...
    def descendants(self, taxon: str) -> list[str]: ...


class FathomNetAPI:
    """`FathomNetClient` over fathomnet-py (`pip install 'taxonomist[fathomnet]'`), with a timeout and retries.

    Timeouts, connection errors and 5xx answers are retried `retries` times (backoff 1 s, 2 s, 4 s, …);
    what still fails becomes one `FathomNetError` line naming the request. A 404 for a concept or taxon
    becomes `UnknownLabelError`.
    """

    def __init__(self, timeout: float = 60.0, retries: int = 2, backoff: float = 1.0):
        try:
            import fathomnet.api as api
            from fathomnet.api import boundingboxes, images, worms
        except ImportError:
            raise ConfigError("the FathomNet database needs fathomnet-py: "
                              "pip install 'taxonomist[fathomnet]'") from None
        self._api, self._boxes, self._images, self._worms = api, boundingboxes, images, worms
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)

    def concepts(self) -> list[str]:
        return [str(c) for c in self._call("the concept list", self._boxes.find_concepts)]

    def box_counts(self) -> dict[str, int]:
        counts = self._call("the box counts per concept", self._boxes.count_total_by_concept)
        return {c.concept: int(c.count or 0) for c in counts if c.concept}

    def image_count(self) -> int:
        return int(self._call("the image count", self._images.count_all).count or 0)

    def box_count(self) -> int:
        return int(self._call("the box count", self._boxes.count_all).count or 0)

    def images(self, concept: str) -> list[dict]:
        found = self._call(f"the images of concept {concept!r}", self._images.find_by_concept, concept, missing=concept)
        return [_image_dict(im) for im in found]

    def descendants(self, taxon: str) -> list[str]:
        names = self._call(f"the WoRMS descendants of {taxon!r}", self._worms.get_descendants_names, taxon,
                           missing=taxon)
        return [str(n) for n in names]

    def _call(self, what: str, fn: Callable, *args, missing: str | None = None):
        import requests
        session = self._api.SESSION
        # fathomnet-py sends requests without a timeout; give its session one for the length of the call
        patched_before = "request" in vars(session)
        original = session.request
        session.request = lambda method, url, **kw: original(method, url, **{"timeout": self.timeout, **kw})
        try:
            for attempt in range(self.retries + 1):
                try:
                    return fn(*args)
                except requests.Timeout:
                    reason = f"no answer within {self.timeout:g} s"
                except requests.ConnectionError as e:
                    reason = f"cannot reach {self._api.get_api_url()} ({type(e).__name__})"
                except ValueError as e:  # fathomnet-py's HTTP errors: "Server error (503), …" + a long dump
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    status = re.search(r"\((\d{3})\)", first)
                    code = int(status.group(1)) if status else 0
                    if code == 404 and missing is not None:
                        raise UnknownLabelError(f"FathomNet does not know {missing!r} (404 for {what})") from None
                    if code and code < 500:
                        raise FathomNetError(f"FathomNet refused the request for {what}: HTTP {code}") from None
                    reason = f"HTTP {code} (server error)" if code else f"malformed answer ({first[:120]})"
                if attempt < self.retries:
                    time.sleep(self.backoff * 2 ** attempt)
            raise FathomNetError(f"FathomNet: {what} failed after {self.retries + 1} tries: {reason}")
        finally:
            if patched_before:
                session.request = original
            else:
                del session.request


def _image_dict(im) -> dict:
    boxes = [{"uuid": b.uuid, "concept": b.concept, "x": b.x, "y": b.y, "width": b.width, "height": b.height,
              "rejected": bool(b.rejected)} for b in (im.boundingBoxes or [])]
    return {"uuid": im.uuid, "url": im.url, "width": im.width, "height": im.height, "timestamp": im.timestamp,
            "boxes": boxes}


# ---------------------------------------------------------------------------------------------- scan
@dataclass
class DatabaseScan:
    """Database-wide figures: `counts` is concept → boxes (the database counts localizations per concept)."""

    n_images: int
    n_boxes: int
    counts: dict[str, int]
    out_dir: Path | None = None

    @property
    def n_concepts(self) -> int:
        return len(self.counts)

    def figures(self) -> dict:
        values = np.array(sorted(self.counts.values(), reverse=True), dtype=np.int64)
        hist, _ = np.histogram(values, bins=[*DECADES, np.iinfo(np.int64).max])
        labels = ["0"] + [f"{lo}-{hi - 1}" for lo, hi in zip(DECADES[1:], DECADES[2:])] + [f">={DECADES[-1]}"]
        per = {"mean": float(values.mean()) if len(values) else 0.0,
               "median": float(np.median(values)) if len(values) else 0.0,
               "min": int(values.min()) if len(values) else 0, "max": int(values.max()) if len(values) else 0}
        at_least = {str(k): int((values >= k).sum()) for k in (10, 50, 100, 500, 1000)}
        top = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        return {"concepts": self.n_concepts, "images": self.n_images, "boxes": self.n_boxes,
                "boxes_per_concept": per, "histogram": dict(zip(labels, map(int, hist))),
                "concepts_with_at_least": at_least, "top_concepts": dict(top),
                "note": "per-concept figures count boxes (localizations), the unit the database counts by "
                        "concept; an image with two boxes of a concept counts twice"}

    def __str__(self) -> str:
        f = self.figures()
        per = f["boxes_per_concept"]
        lines = [f"FathomNet: {f['concepts']} concepts, {f['images']} images, {f['boxes']} boxes",
                 f"boxes per concept: mean {per['mean']:.1f}, median {per['median']:.0f}, max {per['max']}",
                 "concepts with at least N boxes: "
                 + ", ".join(f"{k}: {v}" for k, v in f["concepts_with_at_least"].items())]
        if self.out_dir is not None:
            lines.append(f"wrote {self.out_dir / SCAN_JSON}, {self.out_dir / SCAN_PNG}, {self.out_dir / COUNTS_CSV}")
        return "\n".join(lines)


def scan_database(out_dir: str | Path | None = None, client: FathomNetClient | None = None) -> DatabaseScan:
    """Count concepts, images and boxes per concept; with `out_dir`, write scan.json, scan.png and
    concept_counts.csv (which `select_concepts(counts=…)` reads back offline).

    Concepts the concept list names but the counts omit count 0.

    Example:
        >>> scan = scan_database("fathomnet-scan")          # doctest: +SKIP
        >>> scan.figures()["boxes_per_concept"]["median"]    # doctest: +SKIP
    """
    client = client or FathomNetAPI()
    counts = {c: 0 for c in client.concepts()}
    counts.update(client.box_counts())
    scan = DatabaseScan(client.image_count(), client.box_count(), counts)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_counts(scan.counts, out / COUNTS_CSV)
        atomic_write_json(out / SCAN_JSON, scan.figures())
        _plot_scan(scan, out / SCAN_PNG)
        scan.out_dir = out
    return scan


def write_counts(counts: dict[str, int], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["concept", "boxes"])
    writer.writerows(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    atomic_write_text(path, buf.getvalue())


def read_counts(path: str | Path) -> dict[str, int]:
    """A concept_counts.csv written by `scan_database`: concept → boxes."""
    path = Path(path)
    if path.is_dir():
        path = path / COUNTS_CSV
    if not path.is_file():
        raise DataError(f"{path}: counts file not found (written by `taxonomist data fathomnet scan OUT_DIR`)")
    counts = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"concept", "boxes"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected the header concept,boxes (got {','.join(reader.fieldnames or [])})")
        for i, row in enumerate(reader, start=2):
            try:
                counts[row["concept"]] = int(row["boxes"])
            except (TypeError, ValueError):
                raise DataError(f"{path}: row {i}: boxes {row['boxes']!r} is not a whole number") from None
    return counts


def _plot_scan(scan: DatabaseScan, path: Path) -> None:
    from matplotlib.figure import Figure
    values = np.array(sorted(scan.counts.values(), reverse=True))
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    positive = values[values > 0]
    if len(positive):
        bins = np.logspace(0, np.log10(positive.max() + 1), 30)
        left.hist(positive, bins=bins, color="#3b7dd8")
        left.set_xscale("log")
    left.set_xlabel("boxes per concept (log scale)")
    left.set_ylabel("concepts")
    left.set_title(f"{scan.n_concepts:,} concepts ({int((values == 0).sum()):,} with no box)")
    right.plot(np.arange(1, len(positive) + 1), positive, color="#5aa469")
    right.set_yscale("log")
    right.set_xlabel("concepts with a box, most to least boxes")
    right.set_ylabel("boxes (log scale)")
    right.set_title(f"{scan.n_images:,} images, {scan.n_boxes:,} boxes")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


# ---------------------------------------------------------------------------------------------- select
@dataclass
class Selection:
    concepts: dict[str, int]          # chosen concept → boxes, most first
    considered: int                   # concepts the filters looked at
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        c = list(self.concepts.values())
        lines = [f"selected {len(c)} of {self.considered} concepts"
                 + (f" ({min(c)}-{max(c)} boxes each, {sum(c)} in all)" if c else "")]
        if self.out is not None:
            lines.append(f"wrote {self.out} (one concept a line; next: "
                         f"taxonomist data fathomnet fetch {self.out} OUT_DIR)")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def select_concepts(min_count: int = 1, max_count: int = 0, classes: int = 0, under: str | None = None, *,
                    counts: str | Path | dict[str, int] | None = None, out: str | Path | None = None,
                    client: FathomNetClient | None = None) -> Selection:
    """Concepts with `min_count` ≤ boxes ≤ `max_count` (0 = no upper bound), optionally only `under` a taxon
    (the taxon and its WoRMS descendants), then the `classes` with most boxes (0 = all); ties by name.

    `counts` is a scan's concept_counts.csv (or its folder, or a dict) to select offline; without it the
    service is asked. With `out`, the names are written one a line (the format `fetch_coco` and
    `--candidates` read).

    Example:
        >>> select_concepts(min_count=100, classes=30, under="Actinopterygii",   # doctest: +SKIP
        ...                 counts="fathomnet-scan")
    """
    if min_count < 0 or max_count < 0 or classes < 0:
        raise ConfigError("--min, --max and --classes must be 0 or more")
    if max_count and max_count < min_count:
        raise ConfigError(f"--max {max_count} is below --min {min_count}")
    if isinstance(counts, dict):
        table = dict(counts)
    elif counts is not None:
        table = read_counts(counts)
    else:
        client = client or FathomNetAPI()
        table = {c: 0 for c in client.concepts()}
        table.update(client.box_counts())
    notes = []
    pool = table
    if under:
        client = client or FathomNetAPI()
        below = set(client.descendants(under)) | {under}
        pool = {c: n for c, n in table.items() if c in below}
        notes.append(f"{len(pool)} of the {len(table)} concepts lie under {under} (WoRMS)")
        if not pool:
            raise UnknownLabelError(f"no FathomNet concept lies under {under!r}{suggest(under, table)}")
    kept = {c: n for c, n in pool.items() if n >= min_count and (not max_count or n <= max_count)}
    ranked = sorted(kept.items(), key=lambda kv: (-kv[1], kv[0]))
    if classes and len(ranked) < classes:
        notes.append(f"--classes {classes} asked, only {len(ranked)} concepts pass the filters")
    chosen = dict(ranked[:classes] if classes else ranked)
    path = None
    if out is not None:
        path = Path(out)
        if path.is_dir():
            raise DataError(f"{path}: is a folder; --out takes a file name (e.g. concepts.txt)")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(f"{c}\n" for c in chosen))
    return Selection(chosen, len(pool), path, notes)


def read_concepts(source: str | Path | Sequence[str]) -> list[str]:
    """Concept names from a file (one a line, `#` comments) or a comma-separated string or a list."""
    if isinstance(source, (list, tuple)):
        names = [str(s).strip() for s in source]
    else:
        path = Path(source)
        if path.is_file():
            names = [ln.split("#", 1)[0].strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        elif path.suffix in (".txt", ".csv") or "/" in str(source):
            raise DataError(f"{path}: concept list not found")
        else:
            names = [s.strip() for s in str(source).split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise DataError(f"{source}: no concept names")
    return names


# ---------------------------------------------------------------------------------------------- fetch
@dataclass
class FetchSummary:
    out: Path
    boxes: dict[str, int]           # concept → boxes written
    available: dict[str, int]       # concept → usable boxes the service had
    n_images: int
    fetched: int                    # concepts asked of the service by this run
    cached: int                     # concepts read from OUT_DIR/concepts/
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        capped = sum(1 for c in self.boxes if self.boxes[c] < self.available[c])
        lines = [f"wrote {self.out}: {sum(self.boxes.values())} boxes of {len(self.boxes)} concepts on "
                 f"{self.n_images} images ({capped} concepts capped)",
                 f"concepts: {self.fetched} fetched, {self.cached} from the cache in {self.out.parent / CONCEPT_CACHE}",
                 f"next: taxonomist data download {self.out} IMAGES_DIR"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def fetch_coco(concepts: str | Path | Sequence[str], out_dir: str | Path, max_per_class: int = 0, seed: int = 0,
               *, client: FathomNetClient | None = None, check_names: bool = True,
               progress: bool = False) -> FetchSummary:
    """Write OUT_DIR/fathomnet.json, a COCO file of the boxes of `concepts`, at most `max_per_class` each.

    Each concept's images are asked once and kept as OUT_DIR/concepts/<name>.json, so an interrupted
    fetch resumes where it stopped and a different cap or seed needs no new request. Per concept, the
    boxes labelled with it (rejected ones and boxes without geometry left out) are taken from its
    images in a seeded order until the cap; an image shared by several concepts appears once. Images
    are named `<uuid>.<ext>` with their URL as `coco_url`, as fathomnet-py's own COCO export does.

    Example:
        >>> fetch_coco("concepts.txt", "fathomnet-fish", max_per_class=200)   # doctest: +SKIP
    """
    if max_per_class < 0:
        raise ConfigError("--max-per-class must be 0 (no cap) or more")
    names = read_concepts(concepts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    cache = out / CONCEPT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not _cache_file(cache, n).is_file()]
    if todo and check_names:
        client = client or FathomNetAPI()
        known = set(client.concepts())
        unknown = [n for n in todo if n not in known]
        if unknown:
            more = f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
            raise UnknownLabelError(f"{unknown[0]!r} is not a FathomNet concept{suggest(unknown[0], known)}{more}")
    from tqdm import tqdm
    fetched = 0
    per_concept: dict[str, list[dict]] = {}
    with tqdm(names, desc="FathomNet", unit="concept", file=sys.stderr,
              disable=not progress or not sys.stderr.isatty()) as bar:
        for name in bar:
            path = _cache_file(cache, name)
            if path.is_file():
                per_concept[name] = _read_cache(path, name)
                continue
            client = client or FathomNetAPI()
            try:
                found = client.images(name)
            except (FathomNetError, UnknownLabelError) as e:
                raise type(e)(f"{e}; {len(per_concept)} of {len(names)} concepts are kept in {cache}, "
                              "run the same command again to resume") from None
            atomic_write_json(path, {"concept": name, "images": found})
            per_concept[name] = found
            fetched += 1
    coco, boxes, available, notes = _to_coco(per_concept, max_per_class, seed)
    target = out / COCO_JSON
    atomic_write_text(target, json.dumps(coco, indent=1))
    empty = [n for n in names if not boxes[n]]
    if empty:
        notes.append(f"{len(empty)} concepts have no usable box: {', '.join(map(repr, empty[:5]))}")
    return FetchSummary(target, boxes, available, len(coco["images"]), fetched, len(names) - fetched, notes)


def _cache_file(cache: Path, name: str) -> Path:
    # readable and collision-free: names differing only in dropped characters get different checksums
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "concept"
    return cache / f"{slug}-{zlib.crc32(name.encode()):08x}.json"


def _read_cache(path: Path, name: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("concept") != name or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: corrupt cache entry for {name!r}; delete it to fetch the concept again")
    return data["images"]


def _usable(box: dict) -> bool:
    geometry = [box.get(k) for k in ("x", "y", "width", "height")]
    return (not box.get("rejected") and all(isinstance(v, (int, float)) for v in geometry)
            and geometry[2] > 0 and geometry[3] > 0)


def _to_coco(per_concept: dict[str, list[dict]], cap: int, seed: int):
    categories = sorted(per_concept)
    cat_id = {c: i for i, c in enumerate(categories, start=1)}
    chosen: dict[str, tuple[dict, dict, str]] = {}   # box uuid → (box, image, concept)
    boxes = dict.fromkeys(categories, 0)
    available = dict.fromkeys(categories, 0)
    no_url = 0
    for concept in categories:
        images = [im for im in per_concept[concept] if isinstance(im, dict)]
        usable = [im for im in images if im.get("url") and im.get("uuid")]
        no_url += len(images) - len(usable)
        # seeded per concept, so adding a concept to the list leaves the others' picks unchanged
        order = np.random.default_rng([seed, zlib.crc32(concept.encode())]).permutation(len(usable))
        for i in order:
            im = usable[i]
            for box in im.get("boxes") or []:
                if box.get("concept") != concept or not _usable(box):
                    continue
                key = box.get("uuid") or f"{im['uuid']}:{box['x']},{box['y']},{box['width']},{box['height']}"
                if key in chosen:
                    continue
                available[concept] += 1
                if not cap or boxes[concept] < cap:
                    chosen[key] = (box, im, concept)
                    boxes[concept] += 1
    image_ids: dict[str, int] = {}
    coco_images, annotations = [], []
    for key, (box, im, concept) in sorted(chosen.items(), key=lambda kv: (kv[1][1]["uuid"], kv[0])):
        if im["uuid"] not in image_ids:
            image_ids[im["uuid"]] = len(image_ids) + 1
            last = im["url"].split("?", 1)[0].rsplit("/", 1)[-1]
            ext = last.rsplit(".", 1)[-1].lower() if "." in last else "png"
            coco_images.append({"id": image_ids[im["uuid"]], "file_name": f"{im['uuid']}.{ext}",
                                "coco_url": im["url"], "width": im.get("width"), "height": im.get("height"),
                                "fathomnet_uuid": im["uuid"]})
        annotations.append({"id": len(annotations) + 1, "image_id": image_ids[im["uuid"]],
                            "category_id": cat_id[concept],
                            "bbox": [float(box["x"]), float(box["y"]), float(box["width"]), float(box["height"])],
                            "area": float(box["width"] * box["height"]), "iscrowd": 0,
                            "fathomnet_uuid": box.get("uuid")})
    notes = [f"{no_url} images without a URL or uuid were left out"] if no_url else []
    coco = {"info": {"description": "FathomNet boxes selected by taxonomist data fathomnet fetch",
                     "url": "https://database.fathomnet.org", "seed": seed, "max_per_class": cap},
            "licenses": [{"id": 0, "name": "FathomNet", "url": "http://fathomnet.org/fathomnet/#/license"}],
            "images": coco_images, "annotations": annotations,
            "categories": [{"id": cat_id[c], "name": c, "supercategory": ""} for c in categories]}
    return coco, boxes, available, notes


__all__ = ["FathomNetClient", "FathomNetAPI", "FathomNetError", "DatabaseScan", "Selection", "FetchSummary",
           "scan_database", "select_concepts", "fetch_coco", "read_counts", "read_concepts"]
