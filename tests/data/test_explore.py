"""`explore_dataset`: exact counts, imbalance, duplicates (exact and perceptual), corrupt files, plots."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from taxonomist.data.explore import (PLOTS, explore_dataset, imbalance, near_duplicate_components, perceptual_hash,
                                     top_level_groups)
from taxonomist.errors import DataError
from taxonomist.taxonomy import Taxonomy

TAXONOMY = """concept_name,kingdom,phylum,class,order,family,genus,species
Sebastes diploproa,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,Sebastes diploproa
Sebastes,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,
Chionoecetes tanneri,Animalia,Arthropoda,Malacostraca,Decapoda,Oregoniidae,Chionoecetes,Chionoecetes tanneri
Octopus rubescens,Animalia,Mollusca,Cephalopoda,Octopoda,Octopodidae,Octopus,Octopus rubescens
"""
COUNTS = {"Sebastes diploproa": 6, "Sebastes": 3, "Chionoecetes tanneri": 4, "Octopus rubescens": 2}


def _pattern(rng, size=32):
    """A random picture with a natural image's 1/f spectrum: structure at every scale for the hash to see
    (an upscaled 4×4 grid would leave most DCT coefficients at zero, their hash bits noise)."""
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.fftfreq(size)[None, :])
    amplitude = 1 / np.maximum(f, 1 / size)
    channels = [np.real(np.fft.ifft2(amplitude * np.exp(2j * np.pi * rng.random((size, size))))) for _ in range(3)]
    x = np.stack(channels, axis=-1)
    return Image.fromarray(((x - x.min()) / np.ptp(x) * 255).astype(np.uint8))


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    rows = []
    for label, n in COUNTS.items():
        for k in range(n):
            rel = f"images/{label.replace(' ', '_')}/{k}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            _pattern(rng, size=32 if k % 2 else 24).save(root / rel)
            rows.append({"path": rel, "label": label, "bbox_x": "1", "bbox_y": "2", "bbox_w": str(10 + k),
                         "bbox_h": "20"})
    frame = pd.DataFrame(rows)
    base = Image.open(root / frame.at[0, "path"]).convert("RGB")
    # an exact copy (same bytes), a brightened copy and a resized copy of the first Sebastes diploproa image
    (root / "images/copy.png").write_bytes((root / frame.at[0, "path"]).read_bytes())
    ImageEnhance.Brightness(base).enhance(1.1).save(root / "images/bright.png")
    base.resize((36, 36), Image.Resampling.BILINEAR).save(root / "images/resized.jpg", quality=90)
    (root / "images/corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    extra = [("images/copy.png", "Sebastes"), ("images/bright.png", "Sebastes diploproa"),
             ("images/resized.jpg", "Sebastes diploproa"), ("images/corrupt.jpg", "Octopus rubescens"),
             ("images/missing.png", "Octopus rubescens")]
    frame = pd.concat([frame, pd.DataFrame([{"path": p, "label": lab, "bbox_x": "", "bbox_y": "", "bbox_w": "",
                                             "bbox_h": ""} for p, lab in extra])], ignore_index=True)
    frame.to_csv(root / "annotations.csv", index=False)
    (root / "taxonomy.csv").write_text(TAXONOMY)
    return root


def test_explore_counts_duplicates_and_corrupt_files(dataset, tmp_path):
    out = tmp_path / "explore"
    s = explore_dataset(dataset, out)
    d = json.loads((out / "summary.json").read_text())
    assert d == s.data | {"plots": d["plots"]}
    assert {"dataset", "n_examples", "n_labels", "n_images", "label_counts", "rank_counts", "imbalance", "groups",
            "image_sizes", "boxes", "duplicates", "unreadable", "plots"} <= set(d)
    assert d["n_examples"] == 20 and d["n_images"] == 20 and d["n_labels"] == 4
    assert d["label_counts"] == {"Sebastes diploproa": 8, "Sebastes": 4, "Octopus rubescens": 4,
                                 "Chionoecetes tanneri": 4}
    # genus level: Sebastes holds its own 4 examples plus the 8 of its species
    assert d["rank_counts"]["genus"]["counts"] == {"Sebastes": 12, "Chionoecetes": 4, "Octopus": 4}
    assert d["rank_counts"]["species"] == {"taxa": 3, "examples": 16, "unassigned": 4,
                                           "counts": {"Sebastes diploproa": 8, "Chionoecetes tanneri": 4,
                                                      "Octopus rubescens": 4}}
    assert d["groups"]["level"] == "phylum"
    assert [(g["name"], g["labels"], g["examples"]) for g in d["groups"]["rows"]] == [
        ("Chordata", 2, 12), ("Arthropoda", 1, 4), ("Mollusca", 1, 4)]
    imb = d["imbalance"]
    assert (imb["max"], imb["min"], imb["ratio"]) == (8, 4, 2.0)
    assert imb["rare_labels"] == ["Chionoecetes tanneri", "Octopus rubescens", "Sebastes"]  # 4 < 5 each

    exact = d["duplicates"]["exact"]
    assert exact["groups"] == 1
    assert sorted(exact["list"][0]["paths"]) == ["images/Sebastes_diploproa/0.png", "images/copy.png"]
    assert exact["conflicting_labels"] == 1                 # the copy was labelled Sebastes
    near = d["duplicates"]["near"]
    assert near["groups"] == 1
    assert sorted(near["list"][0]["paths"]) == ["images/Sebastes_diploproa/0.png", "images/bright.png",
                                                "images/copy.png", "images/resized.jpg"]
    bad = {u["path"]: u["reason"] for u in d["unreadable"]["list"]}
    assert set(bad) == {"images/corrupt.jpg", "images/missing.png"}
    assert bad["images/missing.png"] == "file not found" and bad["images/corrupt.jpg"].startswith("cannot decode")

    sizes = d["image_sizes"]
    assert sizes["n"] == 18 and sizes["width"]["min"] == 24 and sizes["width"]["max"] == 36
    assert d["boxes"]["n"] == 15 and d["boxes"]["width"]["max"] == 15 and d["boxes"]["small"] == 15

    assert d["plots"] == PLOTS  # every plot has something to show here
    for name in PLOTS.values():
        raw = (out / name).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as im:
            im.verify()
    text = str(s)
    assert "20 examples of 4 labels" in text and "1 exact groups, 1 near-duplicate groups" in text


def test_explore_flat_dataset_without_boxes(tmp_path):
    root = tmp_path / "flat"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for k in range(6):
        _pattern(rng).save(root / f"img/{k}.png")
        rows.append({"path": f"img/{k}.png", "label": "a" if k < 4 else "b"})
    pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)
    s = explore_dataset(root, tmp_path / "e")
    assert s["flat_taxonomy"] is True and s["groups"] is None and s["boxes"] is None
    assert s["duplicates"]["exact"]["groups"] == 0 and s["duplicates"]["near"]["groups"] == 0
    assert set(s["plots"]) == {"label_counts", "rank_counts", "image_sizes"}
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["image_sizes.png", "label_counts.png",
                                                                  "rank_counts.png", "summary.json"]


def test_imbalance_values():
    r = imbalance(np.array([1, 1, 1, 9]), names=["a", "b", "c", "d"], rare_threshold=5)
    assert r["ratio"] == 9.0 and r["rare_labels"] == ["a", "b", "c"]
    assert r["gini"] == pytest.approx(0.5)            # mean abs difference 4 over twice the mean 3
    p = np.array([1, 1, 1, 9]) / 12
    assert r["effective_labels"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), abs=1e-6)
    with pytest.raises(DataError):
        imbalance(np.array([3, 0]))


def test_perceptual_hash_and_grouping():
    rng = np.random.default_rng(2)
    a, b = _pattern(rng), _pattern(rng)
    ha, hb = perceptual_hash(a), perceptual_hash(b)
    assert ha.shape == (32,)                                   # 256 bits
    brighter = perceptual_hash(ImageEnhance.Brightness(a).enhance(1.1))
    assert np.unpackbits(ha ^ brighter).sum() <= 8
    assert np.unpackbits(ha ^ hb).sum() > 60
    hashes = np.stack([ha, hb, brighter, ha])
    comp = near_duplicate_components(hashes, 24, max_elements=64)          # tiny blocks: the loop runs
    assert comp[0] == comp[2] == comp[3] != comp[1]
    # the aspect test keeps a same-hash image of another shape apart
    comp = near_duplicate_components(hashes, 24, aspect=np.array([1.0, 1.0, 1.0, 2.0]))
    assert comp[0] == comp[2] != comp[3]


def test_top_level_groups_for_a_parent_tree():
    tax = Taxonomy.from_parents({"root": None, "Crustacea": "root", "copepod": "Crustacea", "Cnidaria": "root",
                                 "medusa": "Cnidaria"})
    level = top_level_groups(tax)
    assert level.name == "depth1" and set(level.nodes) == {"Crustacea", "Cnidaria"}


def test_explore_refuses_a_file_as_out_dir(dataset, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        explore_dataset(dataset, tmp_path / "file")
