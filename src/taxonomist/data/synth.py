"""`taxonomist data synth`: a procedural dataset of organism-like images whose looks follow a taxonomy.

Phylum sets the body plan, class the colour, order the pattern, family/genus/species ever subtler marks;
pose, scale, water, snow, noise, blur and occlusion vary per image. Deterministic by seed. No torch.
"""
from __future__ import annotations

import colorsys
import csv
import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from taxonomist.data.dataset import ANNOTATIONS, TAXONOMY, write_annotations
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import RANKS, Taxonomy, write_taxonomy
from taxonomist.utils.files import atomic_write_text

#: written first (complete: false) and last (complete: true); marks a directory synth may overwrite
MARKER = "synth.json"
#: With `sites`: each site's species list, a `predict --priors` table.
PRIORS = "priors.csv"
#: one body plan per phylum: the coarsest and most visible trait
BODY_PLANS = ("radial", "fish", "medusa", "branching", "sponge", "worm")
#: one pattern per order
TEXTURES = ("plain", "stripes", "spots", "rings", "mottled", "band")
SUBSTRATES = ("sand", "mud", "rock", "rubble")
IMAGE_FORMATS = ("jpg", "png")
BOX_COLUMNS = ("bbox_x", "bbox_y", "bbox_w", "bbox_h")
_PLAN_SUFFIX = {"radial": "astera", "fish": "ichthya", "medusa": "omedusae", "branching": "anthozoa",
                "sponge": "ospongia", "worm": "helminthes"}
_SESSILE = {"branching", "sponge", "radial"}  # plans whose families mostly live on the sea floor
_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "x", "z", "br", "cr", "dr", "gl",
           "pl", "tr", "ph", "th", "ch", "st", "sc", "qu", "h")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "y", "io", "au")


@dataclass
class SynthSummary:
    """What `synthesize` wrote; `str()` is the one-paragraph summary the CLI prints."""

    out_dir: Path
    n_images: int
    n_labels: int
    labels_per_rank: dict[str, int]
    n_ranks: int
    n_phyla: int
    image_size: int
    context: bool
    seconds: float
    sites: int = 0

    def __str__(self) -> str:
        by_rank = ", ".join(f"{n} {rank}" for rank, n in self.labels_per_rank.items())
        ctx = f" + {self.n_images} context images ({2 * self.image_size} px)" if self.context else ""
        sites = (f"; {self.sites} sites in the context column, their species lists in {PRIORS}" if self.sites
                 else "")
        return (f"wrote {self.n_images} images ({self.image_size} px){ctx} of {self.n_labels} labels "
                f"({by_rank}; {self.n_ranks} ranks, {self.n_phyla} phyla{sites}) to {self.out_dir} "
                f"in {self.seconds:.1f} s")


@dataclass
class _Node:
    name: str
    rank: str
    parent: int  # index into the node list, -1 for the root
    traits: dict = field(default_factory=dict)


@dataclass
class _Look:
    """Everything that decides how one species (or one individual) is drawn."""

    plan: str
    hue: float            # degrees
    sat: float
    val: float
    texture: str
    tex_freq: float       # pattern cycles per body unit
    accent_dh: float      # accent hue offset, degrees
    accent_val: float     # accent brightness relative to the body
    form: dict            # plan-specific shape parameters
    mark: tuple           # (kind, u, v, radius): a spot or ring at a body position; kind "" = none
    zone: str = "water"   # habitat, shown only in the context image
    substrate: str = "sand"
    depth: int = 1


# ---------------------------------------------------------------------------------------------- public


def synthesize(out_dir: str | Path, n_taxa: int = 24, per_class: int = 40, image_size: int = 96, seed: int = 0,
               n_phyla: int = 4, species_per_genus: float = 2.0, internal_fraction: float = 0.15,
               difficulty: float = 1.0, context: bool = True, image_format: str = "jpg",
               progress: bool = False, sites: int = 0) -> SynthSummary:
    """Generate a hierarchical image dataset (annotations.csv, taxonomy.csv, images/, context/) in `out_dir`.

    `n_taxa` labels with `per_class` images each. About `internal_fraction` of the labels sit at genus or
    family rank (their images show members of their subtree, mostly species without a label of their
    own), and at least one of them is an ancestor of other labels, as in FathomNet. `n_phyla` body plans
    (at most 6) head the tree; `species_per_genus` sets how bushy its tips are. `difficulty` scales every
    nuisance (noise, blur, occlusion, colour cast, individual variation); 0 gives clean images. With
    `context`, each example also gets a scene twice the size with the organism small in it and habitat
    cues (sea floor or open water, substrate, depth) that hint at its lineage. With `sites` > 0 each label
    lives at about half of that many sites (at least one) and each of its images is taken at one of them: a
    `context` column (`site=1` …) and `priors.csv`, each site's species list (`context,taxon,weight` with weight
    1: an allow list for `predict --priors`). The same arguments always give the same files. A directory holding an earlier synth output is replaced; any other non-empty
    directory is refused.

    >>> s = synthesize("data/synth", n_taxa=6, per_class=3, image_size=48)   # doctest: +SKIP
    >>> print(s)                                                              # doctest: +SKIP
    wrote 18 images (48 px) + 18 context images (96 px) of 6 labels (5 species, 1 genus; 7 ranks, 3 phyla) …
    """
    t0 = time.perf_counter()
    _check_int("n_taxa", n_taxa, 2, 5000)
    _check_int("per_class", per_class, 1, 100_000)
    _check_int("image_size", image_size, 32, 1024)
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("n_phyla", n_phyla, 1, len(BODY_PLANS))
    _check_float("species_per_genus", species_per_genus, 1.0, 20.0)
    _check_float("internal_fraction", internal_fraction, 0.0, 0.5)
    _check_float("difficulty", difficulty, 0.0, 3.0)
    _check_int("sites", sites, 0, 1000)
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format {image_format!r} is not supported; use one of {', '.join(IMAGE_FORMATS)}")
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise ConfigError(f"out_dir must be a directory path, got {out_dir!r}")
    out = Path(out_dir)
    params = dict(n_taxa=n_taxa, per_class=per_class, image_size=image_size, seed=seed, n_phyla=n_phyla,
                  species_per_genus=float(species_per_genus), internal_fraction=float(internal_fraction),
                  difficulty=float(difficulty), context=bool(context), image_format=image_format, sites=int(sites))
    _prepare_out_dir(out, params)

    nodes, labels, draws = _build_tree(np.random.default_rng([seed, 0]), n_taxa, n_phyla, species_per_genus,
                                       internal_fraction)
    _assign_looks(np.random.default_rng([seed, 1]), nodes)
    taxonomy = _to_taxonomy(nodes, labels)

    from tqdm.auto import tqdm  # imported here: the CLI imports this module only when synth runs

    rows = []
    width = max(4, len(str(per_class - 1)))
    bar = tqdm(total=len(labels) * per_class, desc="synth", unit="img", file=sys.stderr,
               disable=not (progress and sys.stderr.isatty()))
    try:
        for li, label in enumerate(labels):
            slug = _slug(nodes[label].name)
            (out / "images" / slug).mkdir(parents=True, exist_ok=True)
            if context:
                (out / "context" / slug).mkdir(parents=True, exist_ok=True)
            leaves, weights = draws[label]
            for k in range(per_class):
                # one generator per example: the files do not depend on the order they are drawn in
                rng = np.random.default_rng([seed, 2, li, k])
                leaf = leaves[rng.choice(len(leaves), p=weights)]
                look = _individual(rng, nodes[leaf].traits["look"], difficulty)
                roi, ctx, box = _render_example(rng, look, image_size, difficulty, context)
                name = f"{k:0{width}d}.{image_format}"
                row = {"path": f"images/{slug}/{name}", "label": nodes[label].name}
                _save_image(roi, out / row["path"], image_format)
                if context:
                    row["context_path"] = f"context/{slug}/{name}"
                    row.update(zip(BOX_COLUMNS, (f"{v:g}" for v in box)))
                    _save_image(ctx, out / row["context_path"], image_format)
                rows.append(row)
                bar.update(1)
    finally:
        bar.close()

    frame = pd.DataFrame(rows)
    frame.insert(0, "annotation_id", [str(i + 1) for i in range(len(frame))])
    frame.insert(1, "image_id", frame["annotation_id"])  # one organism per frame
    # with context the scene is the frame (image_id) and the bbox columns the ROI's box in it, as `data prepare` writes
    frame = frame[["path", "label", "image_id", "annotation_id"] + (["context_path", *BOX_COLUMNS] if context else [])]
    if sites:
        frame["context"], site_list = _sites(np.random.default_rng([seed, 3]), frame["label"].to_numpy(), sites)
        atomic_write_text(out / PRIORS, site_list)
    write_taxonomy(taxonomy, out / TAXONOMY)
    write_annotations(frame, out / ANNOTATIONS)
    per_rank: dict[str, int] = {}
    for rank in reversed(RANKS):
        n = sum(1 for lab in labels if nodes[lab].rank == rank)
        if n:
            per_rank[rank] = n
    _write_marker(out, params, complete=True)
    return SynthSummary(out, len(frame), len(labels), per_rank, len(RANKS),
                        sum(1 for n in nodes if n.rank == "phylum"), image_size, bool(context),
                        time.perf_counter() - t0, int(sites))


def _sites(rng: np.random.Generator, labels: np.ndarray, n_sites: int) -> tuple[list[str], str]:
    """Each label at about half the sites (at least one), each image at one of its label's: the images' contexts
    and the sites' species lists as a priors CSV."""
    names = list(dict.fromkeys(labels.tolist()))
    at = {}
    for name in names:
        where = np.flatnonzero(rng.random(n_sites) < 0.5)
        at[name] = where if len(where) else rng.choice(n_sites, 1)
    contexts = [f"site={int(rng.choice(at[name])) + 1}" for name in labels.tolist()]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["context", "taxon", "weight"])
    for site in range(n_sites):
        writer.writerows([f"site={site + 1}", name, 1] for name in names if site in at[name])
    return contexts, table.getvalue()


# ---------------------------------------------------------------------------------------------- checks


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")


def _check_float(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (lo <= float(value) <= hi):  # also rejects NaN
        raise ConfigError(f"{name} must be between {lo:g} and {hi:g}, got {value}")


def _prepare_out_dir(out: Path, params: dict) -> None:
    """Create `out`, or clear an earlier synth output there; refuse anything else that is not empty."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        marker = out / MARKER
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
            ours = previous.get("generator") == "taxonomist data synth"
        except (OSError, ValueError, AttributeError, RecursionError):
            ours = False
        if not ours:
            raise DataError(f"{out}: directory is not empty and holds no earlier synth output ({MARKER}); "
                            "choose a new or empty directory")
        # only what synth itself writes is removed; files others added (e.g. reports) stay
        for sub in ("images", "context"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
        for name in (ANNOTATIONS, TAXONOMY, PRIORS):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, params, complete=False)


def _write_marker(out: Path, params: dict, complete: bool) -> None:
    text = json.dumps({"generator": "taxonomist data synth", "complete": complete, "params": params}, indent=2)
    atomic_write_text(out / MARKER, text + "\n")


# ---------------------------------------------------------------------------------------------- taxonomy


def _latin(rng: np.random.Generator, syllables: int) -> str:
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return stem + rng.choice(("n", "r", "l", "s", "x", "m", ""))


def _build_tree(rng: np.random.Generator, n_taxa: int, n_phyla: int, species_per_genus: float,
                internal_fraction: float) -> tuple[list[_Node], list[int], dict[int, tuple[list[int], np.ndarray]]]:
    """The tree (kingdom → species), the label nodes in depth-first order, and for each label the leaves
    its images are drawn from with their probabilities."""
    n_internal = min(n_taxa - 1, max(1, round(internal_fraction * n_taxa))) if internal_fraction > 0 else 0
    n_leaves = n_taxa  # species labels + one species without a label per internal label
    n_phyla = min(n_phyla, max(1, n_leaves // 2))
    n_genera = min(n_leaves, max(n_phyla, round(n_leaves / species_per_genus)))
    # node counts per rank grow geometrically from the phyla to the genera, so every rank branches a
    # little; each phylum gets two classes when there are genera enough, so colour varies within a plan
    n_classes = min(n_genera, max(2 * n_phyla, round(n_phyla * (n_genera / n_phyla) ** 0.25)))
    counts = [1, n_phyla, n_classes] + [round(n_classes * (n_genera / n_classes) ** (k / 3)) for k in (1, 2)]
    counts += [n_genera, n_leaves]
    counts = list(np.maximum.accumulate(counts))

    used: set[str] = set()  # lower-cased: names also become folder names on case-insensitive disks

    def fresh(make) -> str:
        for _ in range(1000):
            name = make()
            if name.lower() not in used:
                used.add(name.lower())
                return name
        raise DataError("could not invent enough distinct taxon names; use fewer taxa")

    plans = [BODY_PLANS[i] for i in rng.permutation(len(BODY_PLANS))[:n_phyla]]
    nodes = [_Node(fresh(lambda: _latin(rng, 2).capitalize() + "ia"), "kingdom", -1)]
    previous = [0]
    for depth, rank in enumerate(RANKS[1:], start=1):
        # every parent gets one child; the rest go to the parents with the fewest children, in the phyla
        # with the fewest nodes at this rank: balanced subtrees, so no body plan dominates the labels
        n_children = dict.fromkeys(previous, 1)
        phylum_of = {p: nodes[p].traits.get("phylum", p) for p in previous}
        for _ in range(counts[depth] - len(previous)):
            per_phylum: dict[int, int] = {}
            for p, n in n_children.items():
                per_phylum[phylum_of[p]] = per_phylum.get(phylum_of[p], 0) + n
            key = {p: (n, per_phylum[phylum_of[p]]) for p, n in n_children.items()}
            best = min(key.values())
            n_children[int(rng.choice([p for p, k in key.items() if k == best]))] += 1
        parents = [p for p in previous for _ in range(n_children[p])]  # siblings stay together
        current = []
        for p in parents:
            if rank == "phylum":
                plan = plans[len(current)]
                name = fresh(lambda: _latin(rng, 1).capitalize() + _PLAN_SUFFIX[plan])
            elif rank == "class":
                name = fresh(lambda: _latin(rng, 2).capitalize() + "ea")
            elif rank == "order":
                name = fresh(lambda: _latin(rng, 2).capitalize() + "iformes")
            elif rank == "family":
                name = fresh(lambda: _latin(rng, 2).capitalize() + "idae")
            elif rank == "genus":
                name = fresh(lambda: _latin(rng, 2).capitalize() + rng.choice(("us", "a", "ella", "ium", "ops")))
            else:
                genus = nodes[p].name
                name = fresh(lambda: genus + " " + _latin(rng, int(rng.integers(1, 3)))
                             + rng.choice(("ensis", "i", "ata", "us", "oides", "ica", "a")))
            # each node remembers its phylum (for the balancing above) and a phylum its body plan
            traits = {"phylum": len(nodes), "plan": plan} if rank == "phylum" else {
                "phylum": nodes[p].traits.get("phylum", -1)}
            nodes.append(_Node(name, rank, p, traits))
            current.append(len(nodes) - 1)
        previous = current
    leaves = previous

    children: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        children.setdefault(n.parent, []).append(i)

    def leaves_under(i: int) -> list[int]:
        if nodes[i].rank == "species":
            return [i]
        return [leaf for c in children.get(i, []) for leaf in leaves_under(c)]

    # internal labels: genera (then families) with two or more species; one species in each is left
    # without a label of its own, like the specimens FathomNet annotators could name only to genus
    hidden: set[int] = set()
    internal: list[int] = []
    candidates = [i for i, n in enumerate(nodes) if n.rank == "genus" and len(leaves_under(i)) >= 2]
    candidates = list(rng.permutation(candidates)) + list(rng.permutation(
        [i for i, n in enumerate(nodes) if n.rank in ("family", "order", "class", "phylum")
         and len(leaves_under(i)) >= 2]))
    for c in candidates:
        if len(internal) == n_internal:
            break
        free = [leaf for leaf in leaves_under(int(c)) if leaf not in hidden]
        if len(free) < 2:
            continue
        hidden.add(int(rng.choice(free)))
        internal.append(int(c))
    label_set = set(internal) | (set(leaves) - hidden)

    order: list[int] = []

    def walk(i: int) -> None:
        if i in label_set:
            order.append(i)
        for c in children.get(i, []):
            walk(c)

    walk(0)
    draws = {}
    for lab in order:
        sub = leaves_under(lab)
        # an internal label's images are mostly its unlabelled species, sometimes a labelled one
        w = np.array([3.0 if leaf in hidden else 1.0 for leaf in sub])
        draws[lab] = (sub, w / w.sum())
    return nodes, order, draws


def _to_taxonomy(nodes: list[_Node], labels: list[int]) -> Taxonomy:
    keep: set[int] = set()
    for lab in labels:
        i = lab
        while i >= 0 and i not in keep:
            keep.add(i)
            i = nodes[i].parent
    parent_of = {nodes[i].name: (nodes[nodes[i].parent].name if nodes[i].parent >= 0 else None) for i in sorted(keep)}
    ranks = {nodes[i].name: nodes[i].rank for i in keep}
    return Taxonomy.from_parents(parent_of, labels=[nodes[i].name for i in labels], ranks=ranks,
                                 source_format="ranks")


def _slug(name: str) -> str:
    return "-".join(name.lower().split())


# ---------------------------------------------------------------------------------------------- traits


def _assign_looks(rng: np.random.Generator, nodes: list[_Node]) -> None:
    """Give every node its share of the look, coarse to fine; a species' `_Look` sums its lineage."""
    children: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        children.setdefault(n.parent, []).append(i)
    for i, node in enumerate(nodes):
        sibs = children[node.parent] if node.parent >= 0 else [i]
        k, n_sib = sibs.index(i), len(sibs)
        t = dict(nodes[node.parent].traits) if node.parent >= 0 else {}
        if node.rank == "phylum":
            t["plan"] = node.traits["plan"]  # chosen with the name in _build_tree
            t["hue0"] = float(rng.uniform(0, 360))
        elif node.rank == "class":
            # classes of one phylum spread over the colour wheel
            t["hue"] = (t["hue0"] + 360.0 * k / n_sib + rng.uniform(-12, 12)) % 360
            t["sat"] = float(rng.uniform(0.55, 0.85))
            t["zone_bias"] = 0.8 if t["plan"] in _SESSILE else float(rng.choice((0.2, 0.5)))
        elif node.rank == "order":
            start = int(rng.integers(len(TEXTURES)))
            t["texture"] = TEXTURES[(start + k) % len(TEXTURES)]
            t["tex_freq"] = float(rng.uniform(2.2, 3.6))
        elif node.rank == "family":
            t["form_level"] = (int(rng.integers(3)) + k) % 3
            t["val"] = float(rng.uniform(0.72, 0.95))
        elif node.rank == "genus":
            start = int(rng.integers(4))
            t["accent_dh"], t["accent_val"] = [(35.0, 0.55), (180.0, 0.9), (-40.0, 1.25), (0.0, 0.45)][(start + k) % 4]
            t["mark_kind"] = ("spot", "ring", "", "spot")[(start + k) % 4]
            # habitat, seen only in context scenes: sea floor or open water per genus; the substrate and
            # depth differ between sibling species, where the organism itself differs least
            t["zone"] = "floor" if rng.random() < t["zone_bias"] else "water"
            t["habitat0"] = int(rng.integers(12))
            t["freq_mul"] = float(rng.choice((0.85, 1.0, 1.2)))
        elif node.rank == "species":
            # sibling species differ by a small hue shift and the place and size of their mark
            shift = (k - (n_sib - 1) / 2) * 14.0 + rng.uniform(-3, 3)
            angle = 2 * math.pi * (k / max(n_sib, 1)) + rng.uniform(-0.3, 0.3)
            mark_r = 0.35 + 0.25 * rng.random()
            form = _form(t["plan"], t["form_level"], rng)
            t["look"] = _Look(
                plan=t["plan"], hue=(t["hue"] + shift) % 360, sat=t["sat"], val=t["val"], texture=t["texture"],
                tex_freq=t["tex_freq"] * t["freq_mul"] * float(rng.uniform(0.9, 1.1)),
                accent_dh=t["accent_dh"], accent_val=t["accent_val"], form=form,
                mark=(t["mark_kind"] or ("spot" if k % 2 else ""), mark_r * math.cos(angle) * 0.8,
                      mark_r * math.sin(angle) * 0.8, float(rng.uniform(0.07, 0.12))),
                zone=t["zone"], substrate=SUBSTRATES[(t["habitat0"] + k) % len(SUBSTRATES)],
                depth=(t["habitat0"] + k) % 3)
        node.traits = t


def _form(plan: str, level: int, rng: np.random.Generator) -> dict:
    """Plan-specific shape parameters; `level` (one per family) picks a clearly different variant."""
    if plan == "radial":
        return {"arms": (5, 6, 8)[level], "core": 0.32 + 0.08 * rng.random(), "sharp": 1.5 + level * 0.8,
                "curl": float(rng.choice((-0.6, 0.0, 0.6)))}
    if plan == "fish":
        return {"aspect": (0.24, 0.32, 0.4)[level], "fork": level != 1, "fin": 0.12 + 0.06 * rng.random()}
    if plan == "medusa":
        return {"tentacles": (4, 6, 9)[level], "bell": (0.45, 0.6, 0.75)[level], "length": 0.55 + 0.3 * rng.random()}
    if plan == "branching":
        return {"spread": (0.35, 0.6, 0.85)[level], "ratio": 0.62 + 0.1 * rng.random(), "depth": 3}
    if plan == "sponge":
        return {"lobes": (3, 5, 7)[level], "lumpy": 0.06 + 0.05 * rng.random(), "oscula": 1 + level}
    return {"waves": (1.0, 1.6, 2.3)[level], "amp": 0.12 + 0.08 * rng.random(), "width": 0.12 + 0.04 * rng.random()}


def _individual(rng: np.random.Generator, look: _Look, difficulty: float) -> _Look:
    """One individual of a species: small, random departures from the species' look."""
    j = 0.5 + 0.5 * difficulty
    form = dict(look.form)
    for key, value in form.items():
        if isinstance(value, float):
            form[key] = value * float(1 + rng.normal(0, 0.06 * j))
    kind, mu, mv, mr = look.mark
    q = 0.15 * min(difficulty, 2.0)  # habitat cues in the context image are informative, not decisive
    return replace(look, hue=(look.hue + rng.normal(0, 4.0 * j)) % 360,
                   sat=float(np.clip(look.sat + rng.normal(0, 0.05 * j), 0.2, 1.0)),
                   val=float(np.clip(look.val + rng.normal(0, 0.05 * j), 0.3, 1.0)),
                   tex_freq=look.tex_freq * float(1 + rng.normal(0, 0.05 * j)), form=form,
                   mark=(kind, mu + rng.normal(0, 0.05 * j), mv + rng.normal(0, 0.05 * j), mr),
                   zone=look.zone if rng.random() >= q else ("floor", "water")[int(rng.integers(2))],
                   substrate=look.substrate if rng.random() >= q else SUBSTRATES[int(rng.integers(4))],
                   depth=look.depth if rng.random() >= q else int(rng.integers(3)))


# ---------------------------------------------------------------------------------------------- drawing


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)),
                    dtype=np.float32)


def _ellipse_sd(u, v, cu, cv, a, b):
    """Approximate signed distance (body units, negative inside) to an axis-aligned ellipse."""
    return (np.sqrt(((u - cu) / a) ** 2 + ((v - cv) / b) ** 2) - 1.0) * min(a, b)


def _segments_sd(u, v, a: np.ndarray, b: np.ndarray, w: np.ndarray):
    """Signed distance to a union of capsules (segments a→b with half-widths w), all at once."""
    ab = b - a
    pu, pv = u[None] - a[:, 0, None, None], v[None] - a[:, 1, None, None]
    t = np.clip((pu * ab[:, 0, None, None] + pv * ab[:, 1, None, None]) / (ab ** 2).sum(1)[:, None, None], 0, 1)
    d = np.hypot(pu - t * ab[:, 0, None, None], pv - t * ab[:, 1, None, None]) - w[:, None, None]
    return d.min(0)


def _shape(u, v, look: _Look, rng: np.random.Generator):
    """Signed distance of the body plan, plus (alpha-scale, feature layer list) for plan-specific details.

    Features are (sd, rgb or None for dark) painted over the body: eyes, oscula, polyps.
    """
    f = look.form
    r = np.hypot(u, v)
    features = []
    opacity = 1.0
    if look.plan == "radial":
        phi = np.arctan2(v, u) + f["curl"] * r
        w = (0.5 + 0.5 * np.cos(f["arms"] * phi)) ** f["sharp"]
        sd = (r - (f["core"] + (0.95 - f["core"]) * w)) * 0.6
        features.append((r - f["core"] * 0.55, "dark"))  # the central disc
    elif look.plan == "fish":
        b = f["aspect"]
        body = _ellipse_sd(u, v, 0.15, 0.0, 0.62, b)
        x = -u - 0.42  # 0 where the tail starts, growing towards its tip
        tail = np.maximum.reduce([-x, x - 0.5, np.abs(v) - (0.04 + 0.75 * x)])
        if f["fork"]:
            tail = np.maximum(tail, -(np.abs(v) - 0.9 * (x - 0.3)))  # the notch of a forked tail
        fin = np.maximum.reduce([-v, v - (b + f["fin"]) + 1.3 * np.abs(u - 0.05), -(v - b * 0.5)])
        sd = np.minimum.reduce([body, tail * 0.7, fin * 0.7])
        features.append((np.hypot(u - 0.58, v - b * 0.25) - 0.055, "eye"))
    elif look.plan == "medusa":
        bell = np.maximum(_ellipse_sd(u, v, -0.1, 0.0, f["bell"], 0.62), -(u + 0.1))
        wave = v + 0.05 * np.sin(9.0 * u + float(rng.uniform(0, 6.3)))
        n = f["tentacles"]
        spacing = 1.1 / n
        d = np.abs(((wave + 0.55) / spacing) % 1.0 - 0.5) * spacing
        reach = 0.1 + f["length"]
        tent = np.maximum.reduce([d - 0.025 * (1.0 + (u + 0.1) * 1.2), -(u + reach), u + 0.05, np.abs(v) - 0.55])
        sd = np.minimum(bell, tent)
        opacity = 0.82  # jellies are translucent: the water shows through
    elif look.plan == "branching":
        a, b, w = _branches(f, rng)
        sd = _segments_sd(u, v, a, b, w)
        tips = b[-(2 ** f["depth"]):]
        features.append((_segments_sd(u, v, tips, tips + 1e-3, np.full(len(tips), 0.06, np.float32)), "accent"))
    elif look.plan == "sponge":
        phi = np.arctan2(v, u)
        ph = rng.uniform(0, 6.3, size=3)
        radius = 0.78 + 0.12 * np.cos(f["lobes"] * phi + ph[0]) + f["lumpy"] * np.cos(11 * phi + ph[1])
        sd = (r - radius) * 0.8
        for k in range(f["oscula"]):
            ang = ph[2] + 2 * math.pi * k / f["oscula"]
            rad = 0.0 if f["oscula"] == 1 else 0.38
            features.append((np.hypot(u - rad * math.cos(ang), v - rad * math.sin(ang)) - 0.12, "dark"))
    else:  # worm
        centre = f["amp"] * np.sin(math.pi * f["waves"] * u + float(rng.uniform(0, 6.3)))
        width = f["width"] * np.sqrt(np.clip(1.0 - (u / 0.95) ** 2, 0.0, 1.0)) + 0.02
        bristle = 0.05 * ((u * 14.0) % 1.0 < 0.35)  # parapodia along both flanks
        sd = np.maximum(np.abs(v - centre) - width - bristle * (np.abs(u) < 0.85), np.abs(u) - 0.97)
        features.append((np.hypot(u - 0.86, v - centre) - 0.05, "dark"))
    return sd, opacity, features


def _branches(f: dict, rng: np.random.Generator):
    """A binary branching colony as segment endpoints and half-widths, fitted into the unit disc."""
    starts, ends, widths = [np.array([-0.9, 0.0])], [np.array([-0.35, 0.0])], [0.09]
    level = [(ends[0], 0.0, 0.5)]
    for depth in range(1, f["depth"] + 1):
        nxt = []
        for point, heading, length in level:
            for side in (-1, 1):
                h = heading + side * f["spread"] + rng.normal(0, 0.12)
                end = point + length * np.array([math.cos(h), math.sin(h)])
                starts.append(point)
                ends.append(end)
                widths.append(0.09 * 0.72 ** depth)
                nxt.append((end, h, length * f["ratio"]))
        level = nxt
    a, b = np.array(starts, np.float32), np.array(ends, np.float32)
    pts = np.concatenate([a, b])
    centre = (pts.max(0) + pts.min(0)) / 2
    scale = 0.92 / max(np.abs(pts - centre).max(), 1e-6)
    return (a - centre) * scale, (b - centre) * scale, np.array(widths, np.float32) * min(scale, 1.3)


def _texture(u, v, look: _Look, rng: np.random.Generator):
    """Pattern weight in [0, 1] (0 = body colour, 1 = accent colour), in body coordinates."""
    f = look.tex_freq
    phase = float(rng.uniform(0, 6.3))
    soft = lambda x: np.clip(x * 3.0 + 0.5, 0.0, 1.0)  # noqa: E731 - sharpen a sinusoid into a pattern
    if look.texture == "stripes":
        return soft(np.sin(2 * math.pi * f * u + phase))
    if look.texture == "rings":
        return soft(np.sin(2 * math.pi * f * np.hypot(u, v) + phase))
    if look.texture == "spots":
        cu, cv = u * f * 1.6 + phase, v * f * 1.6
        cu = cu + 0.5 * (np.floor(cv) % 2)  # staggered rows
        d = np.hypot(cu % 1.0 - 0.5, cv % 1.0 - 0.5)
        return np.clip((0.27 - d) * 12.0, 0.0, 1.0)
    if look.texture == "mottled":
        k = rng.uniform(0.8, 1.3, size=(3, 2)) * 2 * math.pi * f * 0.6
        p = rng.uniform(0, 6.3, size=3)
        s = sum(np.sin(k[i, 0] * u + k[i, 1] * v + p[i]) for i in range(3))
        return soft(s * 0.5 - 0.3)
    if look.texture == "band":
        return np.clip((0.09 - np.abs(v)) * 25.0, 0.0, 1.0)  # a stripe along the body axis
    return np.zeros_like(u)


def _paint_organism(img: np.ndarray, look: _Look, cx: float, cy: float, radius: float, angle: float,
                    mirror: bool, rng: np.random.Generator) -> None:
    """Paint one individual centred at (cx, cy) px with `radius` px onto `img` (in place).

    Only the window around the organism is computed: in a context scene it covers a few % of the pixels.
    """
    reach = 1.15 * radius + 2  # every body plan fits in the unit disc, plus individual variation
    x0, x1 = max(0, int(cx - reach)), min(img.shape[1], int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(img.shape[0], int(math.ceil(cy + reach)))
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xs - cx, ys - cy
    u = (dx * c + dy * s) / radius
    v = (dy * c - dx * s) / radius * (-1.0 if mirror else 1.0)
    px = 1.0 / radius  # one pixel in body units: the width of the anti-aliased edge
    sd, opacity, features = _shape(u, v, look, rng)
    alpha = np.clip(0.5 - sd / px, 0.0, 1.0) * opacity
    base = _hsv(look.hue, look.sat, look.val)
    accent = _hsv(look.hue + look.accent_dh, look.sat * 0.9, look.val * look.accent_val)
    t = _texture(u, v, look, rng)[..., None]
    colour = base * (1 - t) + accent * t
    # darker towards the rim and away from a light above the frame: reads as a 3-D body
    depth_in = np.clip(-sd / 0.18, 0.0, 1.0)
    light = 0.62 + 0.38 * np.sqrt(depth_in) + 0.04 * (cy - ys) / radius
    colour = colour * light[..., None]
    kind, mu, mv, mr = look.mark
    if kind:
        d = np.hypot(u - mu, v - mv)
        m = np.clip(0.5 - (d - mr) / px, 0.0, 1.0)
        if kind == "ring":
            m = m * np.clip(0.5 + (d - mr * 0.5) / px, 0.0, 1.0)
        mark_rgb = _hsv(look.hue + 180, 0.3, 0.12) if look.val * look.accent_val > 0.6 else _hsv(look.hue, 0.2, 0.95)
        m = (m * (sd < -0.01))[..., None]
        colour = colour * (1 - m) + mark_rgb * m
    for fsd, what in features:
        m = np.clip(0.5 - fsd / px, 0.0, 1.0)[..., None]
        rgb = {"dark": np.array([0.06, 0.05, 0.07], np.float32) + base * 0.15, "eye": np.array([0.02, 0.02, 0.03],
               np.float32), "accent": _hsv(look.hue + look.accent_dh + 20, 0.5, 0.98)}[what]
        colour = colour * (1 - m) + rgb * m
        if what == "accent":
            alpha = np.maximum(alpha, m[..., 0] * opacity)
    window = img[y0:y1, x0:x1]
    alpha = alpha[..., None]
    window *= 1 - alpha
    window += colour * alpha


_WATER = {0: ((0.10, 0.32, 0.34), (0.05, 0.20, 0.24)),   # shallow: green-blue, bright
          1: ((0.05, 0.17, 0.26), (0.02, 0.09, 0.15)),   # mid-water: blue
          2: ((0.02, 0.06, 0.12), (0.01, 0.02, 0.05))}   # deep: dark navy
_SUBSTRATE_RGB = {"sand": (0.50, 0.45, 0.33), "mud": (0.28, 0.25, 0.19), "rock": (0.32, 0.33, 0.35),
                  "rubble": (0.42, 0.38, 0.34)}


def _water(rng: np.random.Generator, size: int, depth: int, difficulty: float) -> np.ndarray:
    top, bottom = (np.array(c, np.float32) for c in _WATER[depth])
    jitter = (1 + rng.normal(0, 0.12 * difficulty, size=3)).astype(np.float32)
    g = (np.arange(size, dtype=np.float32)[:, None, None] + 0.5) / size
    column = (top * (1 - g) + bottom * g) * jitter  # (size, 1, 3): the gradient runs top to bottom
    return np.repeat(column, size, axis=1)


def _noise_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bilinearly (cheap, no per-pixel loops)."""
    small = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _snow(rng: np.random.Generator, img: np.ndarray, density: float) -> None:
    """Marine snow: small bright specks, blurred a little (in place)."""
    size = img.shape[0]
    n = rng.poisson(density * (size / 96) ** 2)
    if n == 0:
        return
    layer = np.zeros((size + 2, size + 2), np.float32)
    ys, xs = rng.integers(1, size + 1, size=(2, n))
    np.add.at(layer, (ys, xs), rng.uniform(0.4, 1.6, size=n).astype(np.float32))
    layer = (layer[:-2] + 2 * layer[1:-1] + layer[2:]) / 4  # [1 2 1] blur in y, then in x
    layer = (layer[:, :-2] + 2 * layer[:, 1:-1] + layer[:, 2:]) / 4
    img += layer[..., None] * np.array([0.55, 0.6, 0.6], np.float32)


def _finish(rng: np.random.Generator, img: np.ndarray, difficulty: float) -> Image.Image:
    """Camera and water: colour cast, brightness, sensor noise, blur; float RGB → 8-bit image."""
    cast = np.array([1 - rng.uniform(0, 0.35), 1 + rng.normal(0, 0.08), 1 + rng.normal(0, 0.08)], np.float32)
    cast = 1 + (cast - 1) * difficulty
    img = img * cast * float(rng.uniform(1 - 0.3 * difficulty, 1 + 0.3 * difficulty) if difficulty else 1.0)
    sigma = rng.uniform(0.01, 0.05) * difficulty
    if sigma:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    out = Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.4 * min(difficulty, 2.0):
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.3)) * img.shape[0] / 96))
    return out


def _occlude(rng: np.random.Generator, img: np.ndarray, cx: float, cy: float, radius: float) -> None:
    """Partial occlusion (in place): a blurry dark clump of silt or rock over part of the organism."""
    size = img.shape[0]
    xs, ys = _grid(size)
    ang = rng.uniform(0, 2 * math.pi)
    ox, oy = cx + math.cos(ang) * radius * rng.uniform(0.6, 1.1), cy + math.sin(ang) * radius * rng.uniform(0.6, 1.1)
    a, b = radius * rng.uniform(0.3, 0.6), radius * rng.uniform(0.2, 0.45)
    rot = rng.uniform(0, math.pi)
    c, s = math.cos(rot), math.sin(rot)
    du, dv = (xs - ox) * c + (ys - oy) * s, (ys - oy) * c - (xs - ox) * s
    d = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
    m = np.clip((1.0 - d) * 4.0, 0.0, 1.0)[..., None] * rng.uniform(0.75, 1.0)
    rgb = np.array([0.16, 0.15, 0.13], np.float32) * rng.uniform(0.5, 1.5)
    img *= 1 - m
    img += rgb * m


def _scene(rng: np.random.Generator, look: _Look, size: int, difficulty: float) -> tuple[np.ndarray, float]:
    """The context background: water at the species' depth, with the sea floor when it lives there.
    Returns the image and the lowest y (px) where the organism may sit."""
    img = _water(rng, size, look.depth, difficulty)
    if look.zone != "floor":
        return img, 0.0
    xs, ys = _grid(size)
    horizon = size * rng.uniform(0.3, 0.5) + (xs - size / 2) * rng.uniform(-0.25, 0.25)
    ground = np.clip((ys - horizon) / 3.0, 0.0, 1.0)[..., None]
    rgb = np.array(_SUBSTRATE_RGB[look.substrate], np.float32) * (1 - 0.28 * look.depth)
    tex = _noise_field(rng, size, {"sand": 24, "mud": 8, "rock": 6, "rubble": 16}[look.substrate])
    contrast = {"sand": 0.25, "mud": 0.2, "rock": 0.6, "rubble": 0.75}[look.substrate]
    # haze: the floor fades into the water towards the horizon
    haze = np.clip((ys - horizon) / (size * 0.5), 0.0, 1.0)[..., None]
    floor = rgb * (1 - contrast / 2 + contrast * tex[..., None])
    floor = img * (1 - haze) * 0.6 + floor * (0.4 + 0.6 * haze)
    return img * (1 - ground) + floor * ground, float(np.median(horizon))


def _render_example(rng: np.random.Generator, look: _Look, size: int, difficulty: float, context: bool):
    """The ROI image and, when asked, its context scene (twice the size, the organism small in it) and the ROI's
    box in that scene (x, y, w, h; clipped to the scene): the window that frames the organism as the ROI does."""
    angle = float(rng.uniform(0, 2 * math.pi))
    mirror = bool(rng.random() < 0.5)
    scale = float(rng.uniform(0.4, 1.0))  # organism diameter as a share of the frame
    radius = scale * size / 2
    slack = size / 2 - radius + 0.12 * radius * difficulty  # a little may leave the frame
    cx, cy = size / 2 + rng.uniform(-slack, slack), size / 2 + rng.uniform(-slack, slack)
    img = _water(rng, size, int(rng.integers(3)), difficulty)  # the ROI's water says nothing about the label
    _snow(rng, img, 14 * difficulty)
    _paint_organism(img, look, cx, cy, radius, angle, mirror, rng)
    if rng.random() < 0.3 * min(difficulty, 2.0):
        _occlude(rng, img, cx, cy, radius)
    _snow(rng, img, 10 * difficulty)
    roi = _finish(rng, img, difficulty)
    if not context:
        return roi, None, None
    big = 2 * size
    scene, top = _scene(rng, look, big, difficulty)
    r2 = radius * 0.5
    lo_y = max(top + r2 * 0.3, r2)
    cx2, cy2 = rng.uniform(r2, big - r2), rng.uniform(min(lo_y, big - r2), big - r2)
    _paint_organism(scene, look, cx2, cy2, r2, angle, mirror, rng)
    _snow(rng, scene, 30 * difficulty)
    # the organism is drawn at half its ROI scale: the ROI's window, halved, around the same centre
    x0, y0 = max(0.0, cx2 - cx / 2), max(0.0, cy2 - cy / 2)
    x1, y1 = min(float(big), cx2 + (size - cx) / 2), min(float(big), cy2 + (size - cy) / 2)
    box = tuple(round(v, 1) for v in (x0, y0, x1 - x0, y1 - y0))
    return roi, _finish(rng, scene, difficulty), box


def _save_image(image: Image.Image, path: Path, image_format: str) -> None:
    if image_format == "jpg":
        image.save(path, format="JPEG", quality=90)
    else:
        image.save(path, format="PNG", compress_level=1)  # fast to write; the data stays lossless
