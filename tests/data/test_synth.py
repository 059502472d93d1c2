"""`taxonomist data synth`: layout, determinism, taxonomy, argument checks, CLI, and coarse-vs-fine difficulty."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data import load_dataset, read_annotations
from taxonomist.data.synth import MARKER, SynthSummary, synthesize
from taxonomist.errors import ConfigError, DataError
from taxonomist.taxonomy import RANKS, read_taxonomy


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 6-label dataset with context scenes, shared by the read-only tests."""
    out = tmp_path_factory.mktemp("synth") / "d"
    summary = synthesize(out, n_taxa=6, per_class=3, image_size=48, seed=0)
    return out, summary


def test_layout_and_summary(small):
    out, summary = small
    assert isinstance(summary, SynthSummary)
    assert (summary.n_images, summary.n_labels, summary.image_size, summary.context) == (18, 6, 48, True)
    assert sum(summary.labels_per_rank.values()) == 6
    text = str(summary)
    assert "18 images (48 px)" in text and "6 labels" in text and str(out) in text

    frame = read_annotations(out / "annotations.csv")
    assert list(frame.columns) == ["path", "label", "image_id", "annotation_id", "context_path",
                                   "bbox_x", "bbox_y", "bbox_w", "bbox_h"]
    assert frame["annotation_id"].tolist() == [str(i) for i in range(1, 19)]
    assert frame["annotation_id"].is_unique and frame["image_id"].is_unique
    assert frame.groupby("label").size().tolist() == [3] * 6
    for path, ctx in zip(frame["path"], frame["context_path"]):
        assert path.startswith("images/") and path.endswith(".jpg")
        assert ctx.startswith("context/") and ctx.split("/")[1:] == path.split("/")[1:]
        with Image.open(out / path) as im:
            assert (im.size, im.mode) == ((48, 48), "RGB")
        with Image.open(out / ctx) as im:
            assert im.size == (96, 96)
    # one folder per label, named after it
    assert len({p.split("/")[1] for p in frame["path"]}) == 6
    marker = json.loads((out / MARKER).read_text())
    assert marker["complete"] is True and marker["params"]["n_taxa"] == 6


def test_taxonomy_is_valid_and_has_internal_labels(small):
    out, _ = small
    header = (out / "taxonomy.csv").read_text().splitlines()[0]
    assert header == "concept_name," + ",".join(RANKS)
    tax = read_taxonomy(out / "taxonomy.csv")
    ds = load_dataset(out)
    assert set(ds.labels) == set(tax.labels) and len(ds.labels) == 6
    assert all(lab in tax for lab in ds.annotations["label"])
    assert all(len(tax.lineage(lab)) == RANKS.index(tax.rank(lab)) + 1 for lab in tax.labels)  # no gaps
    internal = [lab for lab in tax.labels if tax.rank(lab) != "species"]
    assert len(internal) == 1 and tax.rank(internal[0]) in ("genus", "family")
    # FathomNet-like: an internal label that is also an ancestor of another label
    assert set(tax.descendants(internal[0])) & set(tax.labels)
    species = [lab for lab in tax.labels if tax.rank(lab) == "species"]
    assert all(lab.split()[0] == tax.ancestor_at(lab, "genus") for lab in species)  # binomial names


def test_default_tree_shape(tmp_path):
    summary = synthesize(tmp_path / "d", per_class=1, image_size=32, context=False)
    tax = load_dataset(tmp_path / "d").taxonomy
    assert summary.n_labels == 24 and summary.labels_per_rank == {"species": 20, "genus": 4}
    phyla = [tax.ancestor_at(lab, "phylum") for lab in tax.labels]
    counts = sorted(phyla.count(p) for p in set(phyla))
    assert len(counts) == 4 and counts[-1] - counts[0] <= 2  # balanced: no body plan dominates
    classes = {tax.ancestor_at(lab, "class") for lab in tax.labels}
    assert len(classes) == 8  # two colours per body plan
    # labels are listed depth-first, so relatives sit next to each other
    assert phyla == sorted(phyla, key=phyla.index)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", n_taxa=4, per_class=2, image_size=40, seed=7)
    b = synthesize(tmp_path / "b", n_taxa=4, per_class=2, image_size=40, seed=7)
    c = synthesize(tmp_path / "c", n_taxa=4, per_class=2, image_size=40, seed=8)
    for name in ("annotations.csv", "taxonomy.csv"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes()
    assert (a.out_dir / "taxonomy.csv").read_bytes() != (c.out_dir / "taxonomy.csv").read_bytes()
    frame = read_annotations(a.out_dir / "annotations.csv")
    for rel in list(frame["path"]) + list(frame["context_path"]):
        pa = np.asarray(Image.open(a.out_dir / rel))
        pb = np.asarray(Image.open(b.out_dir / rel))
        assert np.array_equal(pa, pb), rel


def test_png_without_context(tmp_path):
    s = synthesize(tmp_path / "d", n_taxa=3, per_class=2, image_size=32, context=False, image_format="png",
                   difficulty=0.0)
    frame = read_annotations(s.out_dir / "annotations.csv")
    assert "context_path" not in frame.columns and not (s.out_dir / "context").exists()
    assert all(p.endswith(".png") for p in frame["path"])
    assert "context images" not in str(s)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_taxa=1), "n_taxa must be between 2 and"),
    (dict(n_taxa=2.5), "n_taxa must be an integer, got 2.5"),
    (dict(per_class=0), "per_class must be between 1 and"),
    (dict(image_size=31), "image_size must be between 32 and"),
    (dict(seed=-1), "seed must be between 0 and"),
    (dict(n_phyla=7), "n_phyla must be between 1 and 6, got 7"),
    (dict(species_per_genus=0.5), "species_per_genus must be between 1 and 20"),
    (dict(internal_fraction=0.9), "internal_fraction must be between 0 and 0.5"),
    (dict(difficulty=float("nan")), "difficulty must be between 0 and 3, got nan"),
    (dict(per_class=True), "per_class must be an integer, got True"),
    (dict(image_format="gif"), "image_format 'gif' is not supported"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
        synthesize(tmp_path / "d", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "d").exists()  # nothing is written before the arguments are checked


def test_refuses_foreign_directory_and_replaces_its_own_output(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and holds no earlier synth output"):
        synthesize(foreign, n_taxa=2, per_class=1, image_size=32)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a directory"):
        synthesize(tmp_path / "file", n_taxa=2, per_class=1, image_size=32)

    out = tmp_path / "d"
    synthesize(out, n_taxa=4, per_class=3, image_size=32)
    (out / "report.html").write_text("kept")
    summary = synthesize(out, n_taxa=3, per_class=1, image_size=32, seed=1, context=False)
    frame = read_annotations(out / "annotations.csv")
    on_disk = sorted(str(p.relative_to(out)) for p in (out / "images").rglob("*.jpg"))
    assert on_disk == sorted(frame["path"]) and summary.n_images == 3  # no stale images left behind
    assert not (out / "context").exists() and (out / "report.html").read_text() == "kept"


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth", str(out), "--taxa", "6", "--per-class", "3", "--image-size", "48"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 18 images (48 px) + 18 context images (96 px) of 6 labels" in printed
    assert len(load_dataset(out).annotations) == 18

    assert main(["data", "synth", str(tmp_path / "e"), "--taxa", "3", "--per-class", "2", "--image-size", "32",
                 "--phyla", "2", "--difficulty", "0", "--no-context", "--format", "png"]) == 0
    frame = read_annotations(tmp_path / "e" / "annotations.csv")
    assert "context_path" not in frame.columns and frame["path"].str.endswith(".png").all()

    assert main(["data", "synth", str(tmp_path / "f"), "--taxa", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: n_taxa must be between 2 and 5000, got 1"]


def _nearest_centroid(out, size=16):
    """Accuracy at the label and phylum level of a nearest-centroid classifier on rotation-invariant
    features (the sorted pixel values of each HSV channel: colour and size, not pose)."""
    ds = load_dataset(out)
    labels = ds.labels
    y = np.array([labels.index(lab) for lab in ds.annotations["label"]])
    ims = np.stack([np.asarray(Image.open(out / p).convert("HSV").resize((size, size)), np.float32) / 255
                    for p in ds.annotations["path"]])
    x = np.sort(ims.reshape(len(ims), -1, 3), axis=1)[:, ::8].reshape(len(ims), -1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    train = np.arange(len(y)) % 2 == 0
    centroids = np.stack([x[train & (y == k)].mean(0) for k in range(len(labels))])
    pred = ((x[~train, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    truth = y[~train]
    phylum = ds.taxonomy.rank_codes(labels)[:, RANKS.index("phylum")]
    wrong = pred != truth
    same = (phylum[:, None] == phylum[None]) & ~np.eye(len(labels), dtype=bool)
    return dict(label=np.mean(pred == truth), phylum=np.mean(phylum[pred] == phylum[truth]),
                within_phylum=np.mean(phylum[pred[wrong]] == phylum[truth[wrong]]),
                chance_within=same.sum(1).mean() / (len(labels) - 1), n_labels=len(labels))


def test_coarse_ranks_are_easier_and_confusions_stay_among_relatives(tmp_path):
    synthesize(tmp_path / "d", n_taxa=12, per_class=16, image_size=48, seed=0, context=False)
    acc = _nearest_centroid(tmp_path / "d")
    assert acc["label"] > 2 / acc["n_labels"]            # well above chance …
    assert acc["label"] < 0.6                             # … but far from solved
    assert acc["phylum"] > acc["label"] + 0.15            # the body plan is easier than the species
    assert acc["within_phylum"] > acc["chance_within"]    # mistakes fall among relatives


def test_difficulty_zero_is_easier(tmp_path):
    synthesize(tmp_path / "hard", n_taxa=12, per_class=16, image_size=48, seed=0, context=False)
    synthesize(tmp_path / "clean", n_taxa=12, per_class=16, image_size=48, seed=0, context=False, difficulty=0.0)
    assert _nearest_centroid(tmp_path / "clean")["label"] > _nearest_centroid(tmp_path / "hard")["label"] + 0.1


def test_boxes_frame_the_organism_in_its_scene_as_the_roi_does(small):
    """The bbox columns: the ROI's window in the context scene (the frame), inside it, half the ROI's side
    (the scene draws the organism at half scale) unless clipped at the scene's border."""
    import numpy as np
    from PIL import Image

    out, _ = small
    frame = read_annotations(out / "annotations.csv")
    box = frame[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].astype(float).to_numpy()
    assert (box[:, :2] >= 0).all() and (box[:, 0] + box[:, 2] <= 96).all() and (box[:, 1] + box[:, 3] <= 96).all()
    assert (box[:, 2:] <= 24).all() and (np.isclose(box[:, 2:], 24, atol=0.15).mean() > 0.5)
    # the organism is in the box: the box's pixels stand out from the scene's other windows of the same size
    rng = np.random.default_rng(0)
    stands_out = []
    for ctx, (x, y, w, h) in zip(frame["context_path"], box):
        scene = np.asarray(Image.open(out / ctx).convert("RGB"), dtype=float)
        background = np.median(scene.reshape(-1, 3), axis=0)

        def contrast(x0, y0):
            window = scene[int(y0):int(y0 + h), int(x0):int(x0 + w)]
            return np.abs(window - background).sum(axis=2).max()
        others = [contrast(rng.uniform(0, 96 - w), rng.uniform(0, 96 - h)) for _ in range(8)]
        stands_out.append(contrast(x, y) > np.median(others))
    assert np.mean(stands_out) > 0.8


def test_sites_give_a_context_column_and_each_sites_species_list(tmp_path):
    from taxonomist.decide import ContextPriors

    s = synthesize(tmp_path / "d", n_taxa=8, per_class=6, image_size=32, seed=2, sites=3, context=False)
    assert "3 sites in the context column" in str(s)
    rows = read_annotations(tmp_path / "d" / "annotations.csv")
    priors = ContextPriors.read(tmp_path / "d" / "priors.csv")
    assert set(rows["context"]) <= {"site=1", "site=2", "site=3"} and set(priors.keys) <= set(rows["context"]) | {
        "site=1", "site=2", "site=3"}
    listed = {(key, taxon) for key, entries in priors.keys.items() for taxon, weight, _ in entries if weight == 1}
    assert all((c, label) in listed for c, label in zip(rows["context"], rows["label"]))  # every image is listed
    assert {label for _, label in listed} == set(rows["label"])
    again = synthesize(tmp_path / "e", n_taxa=8, per_class=6, image_size=32, seed=2, sites=3, context=False)
    assert (again.out_dir / "priors.csv").read_bytes() == (tmp_path / "d" / "priors.csv").read_bytes()
    # no sites: no column, no file
    synthesize(tmp_path / "d", n_taxa=8, per_class=6, image_size=32, seed=2, context=False)
    assert "context" not in read_annotations(tmp_path / "d" / "annotations.csv").columns
    assert not (tmp_path / "d" / "priors.csv").exists()
