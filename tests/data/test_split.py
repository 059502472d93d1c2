"""`split_dataset`: determinism, stratification, grouped folds, OOD taxa, filters; and the CLI "done when" line."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from taxonomist.cli.main import main
from taxonomist.data import load_dataset
from taxonomist.data.split import split_dataset
from taxonomist.errors import ConfigError, DataError, UnknownLabelError

# three phyla; Sebastes is both a label and the genus of two labelled species
TAXONOMY = """concept_name,kingdom,phylum,class,order,family,genus,species
Sebastes,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,
Sebastes diploproa,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,Sebastes diploproa
Sebastes mystinus,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastes,Sebastes mystinus
Sebastolobus,Animalia,Chordata,Actinopteri,Perciformes,Sebastidae,Sebastolobus,
Chionoecetes tanneri,Animalia,Arthropoda,Malacostraca,Decapoda,Oregoniidae,Chionoecetes,Chionoecetes tanneri
Octopus rubescens,Animalia,Mollusca,Cephalopoda,Octopoda,Octopodidae,Octopus,Octopus rubescens
Bathypolypus,Animalia,Mollusca,Cephalopoda,Octopoda,Bathypolypodidae,Bathypolypus,
"""
COUNTS = {"Sebastes": 20, "Sebastes diploproa": 40, "Sebastes mystinus": 12, "Sebastolobus": 4,
          "Chionoecetes tanneri": 30, "Octopus rubescens": 2, "Bathypolypus": 1}


def _dataset(root, image_ids=False, rois_per_image=3):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, n in COUNTS.items():
        for k in range(n):
            rows.append({"path": f"images/{label.replace(' ', '_')}/{k}.jpg", "label": label})
    frame = pd.DataFrame(rows)
    if image_ids:
        # ROIs of one frame share an image_id; a frame may hold several labels
        rng = np.random.default_rng(5)
        frame["image_id"] = (rng.permutation(len(frame)) // rois_per_image).astype(str)
    frame.to_csv(root / "annotations.csv", index=False)
    (root / "taxonomy.csv").write_text(TAXONOMY)
    return root


def _read(root):
    return pd.read_csv(root / "annotations.csv", dtype=str, keep_default_na=False)


def test_same_seed_same_split_and_another_seed_differs(tmp_path):
    a, b = _dataset(tmp_path / "a"), _dataset(tmp_path / "b")
    split_dataset(a, seed=3)
    split_dataset(b, seed=3)
    assert _read(a).equals(_read(b))
    split_dataset(b, seed=4)
    assert not _read(a)["split"].equals(_read(b)["split"])


def test_stratified_counts_per_label(tmp_path):
    root = _dataset(tmp_path / "d")
    s = split_dataset(root, val=0.15, test=0.15)
    c = s.counts
    # round(n * 0.15) to val and to test, the rest to train, at least one in train
    assert c.loc["Sebastes diploproa"].tolist() == [28, 6, 6]
    assert c.loc["Chionoecetes tanneri"].tolist() == [20, 5, 5]
    assert c.loc["Sebastes"].tolist() == [14, 3, 3]
    assert c.loc["Sebastes mystinus"].tolist() == [8, 2, 2]
    assert c.loc["Sebastolobus"].tolist() == [2, 1, 1]
    assert c.loc["Octopus rubescens"].tolist() == [2, 0, 0]
    assert c.loc["Bathypolypus"].tolist() == [1, 0, 0]
    assert list(c.columns) == ["train", "val", "test"] and s.rows("ood") == 0
    frame = _read(root)
    assert frame["split"].value_counts().to_dict() == {"train": 75, "val": 17, "test": 17}
    assert "fold" not in frame.columns
    assert "train" in str(s) and "109" in str(s)


def test_grouped_splits_and_folds_keep_images_together(tmp_path):
    root = _dataset(tmp_path / "d", image_ids=True)
    split_dataset(root, test=0.2)
    frame = _read(root)
    assert (frame.groupby("image_id")["split"].nunique() == 1).all()
    assert set(frame["split"]) == {"train", "val", "test"}
    # every label keeps a training example even when it never dominates an image
    assert set(frame.loc[frame["split"] == "train", "label"]) == set(COUNTS)

    s = split_dataset(root, folds=4, test=0.2, seed=1)
    frame = _read(root)
    assert set(frame["split"]) == {"train", "test"}
    train = frame[frame["split"] == "train"]
    assert (train.groupby("image_id")["fold"].nunique() == 1).all()
    assert sorted(set(train["fold"])) == ["0", "1", "2", "3"]
    assert (frame.loc[frame["split"] == "test", "fold"] == "").all()
    assert (frame.groupby("image_id")["split"].nunique() == 1).all()
    assert sum(s.folds) == len(train) and min(s.folds) > 0.15 * len(train)
    # the big label spreads over all folds, roughly evenly
    per_fold = train[train["label"] == "Sebastes diploproa"]["fold"].value_counts()
    assert len(per_fold) == 4 and per_fold.max() - per_fold.min() <= 6
    load_dataset(root)  # the fold column passes the dataset reader


def test_folds_without_image_id_and_refit_drops_stale_folds(tmp_path):
    root = _dataset(tmp_path / "d")
    s = split_dataset(root, folds=5, seed=2)
    frame = _read(root)
    assert s.rows("val") == 0 and len(s.folds) == 5
    big = frame[(frame["label"] == "Sebastes diploproa") & (frame["split"] == "train")]
    assert big["fold"].value_counts().tolist() == [7, 7, 7, 7, 6]   # 34 train rows, stratified
    split_dataset(root)
    assert "fold" not in _read(root).columns
    with pytest.raises(ConfigError, match="--val 0.1 does not apply with --folds 5"):
        split_dataset(root, folds=5, val=0.1)


def test_ood_names_hold_out_whole_subtrees(tmp_path):
    root = _dataset(tmp_path / "d")
    s = split_dataset(root, ood_taxa="Sebastes,Bathypolypus")
    frame = _read(root)
    held = {"Sebastes", "Sebastes diploproa", "Sebastes mystinus", "Bathypolypus"}
    assert set(s.ood_labels) == held
    assert set(frame.loc[frame["split"] == "ood", "label"]) == held
    assert not (frame["label"].isin(held) & (frame["split"] != "ood")).any()
    assert s.rows("ood") == 20 + 40 + 12 + 1
    with pytest.raises(UnknownLabelError, match="did you mean 'Sebastes'"):
        split_dataset(root, ood_taxa="Sebastse")
    with pytest.raises(DataError, match="has no examples"):
        split_dataset(root, ood_taxa="Octopus", min_per_class=3, out=tmp_path / "x")  # its one label is dropped


def test_ood_count_never_empties_a_phylum(tmp_path):
    root = _dataset(tmp_path / "d")
    labels = list(COUNTS)
    phylum = {"Chionoecetes tanneri": "Arthropoda", "Octopus rubescens": "Mollusca", "Bathypolypus": "Mollusca"}
    for seed in range(8):
        s = split_dataset(root, ood_taxa=3, seed=seed)
        assert len(s.ood_labels) == 3
        kept = [lab for lab in labels if lab not in s.ood_labels]
        assert {phylum.get(lab, "Chordata") for lab in kept} == {"Chordata", "Arthropoda", "Mollusca"}
        # "Sebastes" has labels below it: chosen only when the leaves run out, which they do not here
        assert "Sebastes" not in s.ood_labels
    assert split_dataset(root, ood_taxa="3", seed=1).ood_labels == split_dataset(root, ood_taxa=3, seed=1).ood_labels
    with pytest.raises(DataError, match="cannot hold out 6 of 7 labels"):
        split_dataset(root, ood_taxa=6)


def test_filters_need_out_and_write_a_subset_that_reaches_the_images(tmp_path):
    root = _dataset(tmp_path / "d")
    frame = _read(root)
    frame["context_path_full"] = "context/" + frame["path"]       # as `data prepare` writes further scales
    frame.to_csv(root / "annotations.csv", index=False)
    for rel in [*frame["path"], *frame["context_path_full"]]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    before = (root / "annotations.csv").read_bytes()
    with pytest.raises(ConfigError, match="pass --out DIR"):
        split_dataset(root, classes=3)
    assert (root / "annotations.csv").read_bytes() == before

    out = tmp_path / "subsets" / "smoke"
    s = split_dataset(root, classes=3, max_per_class=8, out=out)
    frame = _read(out)
    # capped at 8, the three labels with >= 8 rows tie; more rows before the cap wins
    assert frame["label"].value_counts().to_dict() == {"Sebastes diploproa": 8, "Chionoecetes tanneri": 8,
                                                       "Sebastes": 8}
    assert s.dropped_rows == 109 - 24 and len(s.dropped_labels) == 4
    assert all((out / p).is_file() for p in [*frame["path"], *frame["context_path_full"]])
    assert frame["path"].iloc[0].startswith("../../d/images/")
    assert (out / "taxonomy.csv").read_text() == TAXONOMY
    assert (root / "annotations.csv").read_bytes() == before

    s = split_dataset(root, min_per_class=12, ood_taxa="Sebastes mystinus", out=tmp_path / "min12")
    assert set(s.counts.index) == {"Sebastes", "Sebastes diploproa", "Sebastes mystinus", "Chionoecetes tanneri"}
    assert s.ood_labels == ["Sebastes mystinus"]


@pytest.mark.parametrize("kwargs, message", [
    ({"val": 1.5}, "--val 1.5"), ({"test": -0.1}, "--test -0.1"), ({"val": 0.5, "test": 0.5}, "nothing to train"),
    ({"folds": 1}, "K >= 2"), ({"min_per_class": 9, "max_per_class": 4}, "above --max-per-class"),
    ({"ood_taxa": -2}, "--ood-taxa -2"), ({"seed": -1}, "--seed -1"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    root = _dataset(tmp_path / "d")
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        split_dataset(root, **kwargs)


def test_unlabelled_rows_are_refused(tmp_path):
    root = _dataset(tmp_path / "d")
    frame = _read(root)
    frame.loc[5, "label"] = ""
    frame.to_csv(root / "annotations.csv", index=False)
    with pytest.raises(DataError, match="row 7: empty label"):
        split_dataset(root)


def test_cli_done_when_synth_explore_split(tmp_path, capsys):
    data, explore = tmp_path / "d", tmp_path / "e"
    assert main(["data", "synth", str(data), "--taxa", "8", "--per-class", "10", "--image-size", "32"]) == 0
    assert main(["data", "explore", str(data), "--out", str(explore)]) == 0
    assert (explore / "summary.json").is_file() and (explore / "label_counts.png").is_file()
    assert main(["data", "split", str(data), "--folds", "5", "--ood-taxa", "3"]) == 0
    printed = capsys.readouterr().out
    assert "folds: 5" in printed and "held out as ood" in printed
    ds = load_dataset(data)
    frame = ds.annotations
    assert set(frame["split"]) == {"train", "test", "ood"}
    assert frame.loc[frame["split"] == "ood", "label"].nunique() == 3
    assert sorted(set(frame.loc[frame["split"] == "train", "fold"])) == ["0", "1", "2", "3", "4"]
    assert os.path.isfile(data / frame["path"].iloc[0])

    assert main(["data", "split", str(data), "--classes", "2"]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_solution_file_holds_the_test_rows_and_scores_a_perfect_submission(tmp_path, capsys):
    """Issue 23: the README's `score solution.csv submission.csv` needs a solution that a command makes."""
    data = tmp_path / "d"
    assert main(["data", "synth", str(data), "--taxa", "6", "--per-class", "10", "--image-size", "32"]) == 0
    sol = tmp_path / "solution.csv"
    assert main(["data", "split", str(data), "--test", "0.2", "--solution", str(sol)]) == 0
    assert f"wrote {sol}: the true names of the 12 test rows" in capsys.readouterr().out
    frame = load_dataset(data).annotations
    test = frame[frame["split"] == "test"]
    written = pd.read_csv(sol, dtype=str)
    assert list(written.columns) == ["annotation_id", "concept_name"]
    assert written["annotation_id"].tolist() == test["annotation_id"].tolist()
    assert written["concept_name"].tolist() == test["label"].tolist()
    written.to_csv(tmp_path / "submission.csv", index=False)
    assert main(["score", str(sol), str(tmp_path / "submission.csv"), "--taxonomy", str(data / "taxonomy.csv")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "0.0000"
    # never over the dataset's own files; a split without test rows has no solution
    assert main(["data", "split", str(data), "--solution", str(data / "annotations.csv")]) == 2
    assert "is the dataset's own annotations.csv" in capsys.readouterr().err
    assert main(["data", "split", str(data), "--test", "0", "--solution", str(sol)]) == 2
    assert "no labelled test rows" in capsys.readouterr().err
