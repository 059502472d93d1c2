"""The plankton benchmark's machinery on a tiny generated parent-table dataset with PlanktonSet-like names:
split written beside the images, cached features, probe heads, decisions over internal nodes, OOD, the
fine-tuned run, results.json/.md accumulating over invocations."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# a forest (two roots), a label that is also an ancestor of a label, hyphens and long names
PARENTS = {
    "Organism": "", "Non-organism": "", "Crustacea": "Organism", "copepod": "Crustacea",
    "copepod_calanoid": "copepod", "copepod_calanoid_eucalanus": "copepod_calanoid",
    "shrimp-like_other": "Crustacea", "Protista": "Organism", "acantharia_protist": "Protista",
    "tornaria_acorn_worm_larvae": "Organism", "detritus_other": "Non-organism", "artifacts_edge": "Non-organism",
}
LABELS = ["copepod_calanoid", "copepod_calanoid_eucalanus", "shrimp-like_other", "acantharia_protist",
          "tornaria_acorn_worm_larvae", "detritus_other", "artifacts_edge"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("plankton_ndsb", ROOT / "benchmarks" / "plankton_ndsb.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def make_dataset(root: Path, per_label: int = 12) -> Path:
    """Small grey ROIs of mixed sizes and aspect ratios; each label a different blob brightness and shape."""
    rng = np.random.default_rng(0)
    rows = []
    for k, label in enumerate(LABELS):
        folder = root / "images" / label
        folder.mkdir(parents=True)
        for i in range(per_label):
            h, w = int(rng.integers(16, 40)), int(rng.integers(16, 60))
            image = rng.integers(0, 40, (h, w)).astype(np.uint8)
            image[h // 4: h // 4 + 2 + k, : w // 2] = 60 + 25 * k
            Image.fromarray(np.stack([image] * 3, axis=2)).save(folder / f"{100 + i}.jpg", quality=95)
            rows.append({"path": f"images/{label}/{100 + i}.jpg", "label": label})
    pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)
    pd.DataFrame({"concept_name": list(PARENTS), "parent": list(PARENTS.values())}).to_csv(root / "taxonomy.csv",
                                                                                           index=False)
    return root


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


def tiny_preset(bench):
    return dataclasses.replace(
        bench.PRESETS["cpu"], name="tiny", backbone="test_efficientnet", pretrained="none", image_size=32,
        small_image_size=24, feature_batch_size=32, head_epochs=3, head_batch_size=16, ood_taxa=1,
        finetune=("model.finetune=full", "train.epochs=1", "train.batch_size=16", "augment.randaugment="))


@pytest.fixture
def one_thread(monkeypatch):
    """run_benchmark(threads=1) sets OMP_NUM_THREADS and torch's threads; give both back afterwards."""
    import torch
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_benchmark_end_to_end_on_a_parent_table(tmp_path, bench, one_thread):
    data = make_dataset(tmp_path / "plankton")
    out = tmp_path / "out"
    preset = tiny_preset(bench)
    results = bench.run_benchmark(data, out, preset, list(bench.VARIANTS), seed=0, device="cpu", workers=0,
                                  threads=1, command="bench")
    rows = results["rows"]
    assert set(rows) == set(bench.VARIANTS)

    # the split is a dataset dir of its own whose paths reach the original images; no image was copied
    frame = pd.read_csv(out / "data" / "annotations.csv")
    assert len(frame) == len(LABELS) * 12 and set(frame["split"]) == {"train", "val", "test"}
    assert all((out / "data" / p).resolve().is_file() for p in frame["path"])
    assert not list((out / "data").rglob("*.jpg"))
    n_test = int((frame["split"] == "test").sum())

    for name, what in bench.VARIANTS.items():
        r = rows[name]
        assert r["command"] == f"bench --variants {name}"
        if what[0] in ("main", "imbalance", "scale"):
            assert r["n"] == n_test
            for key in ("top1", "macro_f1", "mhd", "hierarchical_accuracy", "ece", "ece_uncalibrated"):
                assert math.isfinite(r[key]), (name, key)
            assert 0 <= r["top1"] <= 1 and 0 <= r["mhd"] <= 6  # lca over the forest: at most 3 up, 3 down
            assert r["log_loss"] > 0 and r["temperature"] > 0
            assert list(r["per_level_top1"]) == [f"depth{d}" for d in range(5)]  # per depth: no ranks
    assert rows["probe-rotaug"]["train_rows"] == 4 * rows["probe"]["train_rows"]

    # decisions over internal nodes: min-risk with every node as candidate may answer "Crustacea", never worse
    # in expected distance than argmax; selective thresholds trade coverage for fewer hierarchical errors
    for name in ("probe", "finetune"):
        rules = {(d["rule"], d["candidates"], d["threshold"]): d for d in rows[name]["decisions"]}
        assert rules[("argmax", "labels", None)]["label_share"] == 1.0
        assert rules[("argmax", "labels", None)]["exact"] == pytest.approx(rows[name]["top1"])
        cover = [rules[("selective", "all nodes", t)]["coverage"] for t in preset.selective_thresholds]
        assert cover == sorted(cover, reverse=True)
        # the other tools' rules and Plaud et al.'s hF1 decoding, each on its own measure
        assert {("rollup", "all nodes", None), ("common-ancestor", "all nodes", None),
                ("hf1-optimal", "all nodes", None)} <= set(rules)
        assert all(0 <= d["hf1"] <= 1 for d in rules.values())
    assert rows["probe"]["group_level"] == "depth1"

    ood = rows["ood"]
    assert ood["n_unknown"] > 0 and len(ood["ood_labels"]) == 1
    knn = {m for m in ood["methods"] if m.startswith("knn k=")}
    assert {"msp", "energy", "max-logit", "mahalanobis", "relative-mahalanobis", "vim", "react-energy",
            "mahalanobis, ridge 1"} <= set(ood["methods"]) - knn
    assert "knn k=1" in knn and knn <= {f"knn k={k}" for k in (1, 5, 10, 20, 50, 100, 200)}
    assert all(0 <= m["auroc"] <= 1 for m in ood["methods"].values())

    images = rows["images"]
    assert images["n"] == len(frame) and images["grey_share"] == 1.0

    ft = rows["finetune"]
    assert ft["epochs"] == 1 and (out / "runs" / "finetune" / "report.html").is_file()
    # training's image cache upscales with the interpolation evaluation uses (it was bilinear vs bicubic)
    meta = json.loads((out / "runs" / "finetune" / "checkpoints" / "best.json").read_text())
    cache = json.loads(next((out / "cache").glob("*/index.json")).read_text())
    assert cache["interpolation"] == meta["preprocessing"]["interpolation"] == "bicubic"
    assert 0 <= ft["tta"]["top1"] <= 1

    md = (out / "results.md").read_text()
    assert "| `probe` |" in md and "## OOD" in md and "## Decisions on `finetune`" in md

    # a second invocation reuses the split and the features and keeps the other rows
    features = sorted((out / "features").glob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in features]
    again = bench.run_benchmark(data, out, preset, ["probe"], seed=0, device="cpu", workers=0, threads=1,
                                command="bench")
    assert set(again["rows"]) == set(bench.VARIANTS)
    assert again["rows"]["probe"]["top1"] == rows["probe"]["top1"]  # seeded: the same head again
    assert [f.stat().st_mtime_ns for f in features] == stamps
    assert json.loads((out / "results.json").read_text())["rows"]["probe"]["mhd"] == rows["probe"]["mhd"]


def test_hierarchical_f_loss_by_hand():
    """hF1 over lineage sets without the root: a1 vs A is P = 1, R = 1/2; a1 vs b1 shares nothing below R."""
    from taxonomist.taxonomy import Taxonomy
    bench = load_benchmark()
    tax = Taxonomy.from_parents({"R": None, "A": "R", "B": "R", "a1": "A", "a2": "A", "b1": "B"})
    loss = bench.hierarchical_f_loss(tax)
    col = {n: i for i, n in enumerate(tax.names)}
    a1 = list(tax.labels).index("a1")
    assert loss[a1, col["a1"]] == pytest.approx(0.0)
    assert loss[a1, col["A"]] == pytest.approx(1 - 2 * 1 * 0.5 / 1.5)   # hF1 = 2PR / (P + R) = 2/3
    assert loss[a1, col["a2"]] == pytest.approx(0.5)                      # P = R = 1/2
    assert loss[a1, col["b1"]] == pytest.approx(1.0) and loss[a1, col["R"]] == pytest.approx(1.0)
