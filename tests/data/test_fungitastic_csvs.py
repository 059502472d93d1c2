"""FungiTastic as it ships: one rank CSV per split (`--train/--val/--test`) → one dataset with a `split` column,
empty rank cells meaning "no name at that rank"."""
from __future__ import annotations

import warnings

import pandas as pd
import pytest
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data import load_dataset
from taxonomist.data.readers import convert_to_dataset, read_split_csvs
from taxonomist.errors import ConfigError, DataError, TaxonomyError

HEADER = ["filename", "observationID", "kingdom", "phylum", "class", "order", "family", "genus", "species",
          "scientificName", "category_id"]
AMANITA = ["Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita"]
RUSSULA = ["Fungi", "Basidiomycota", "Agaricomycetes", "Russulales", "Russulaceae", "Russula"]
# FungiTastic leaves cells empty where a rank is unknown: a genus-level row, a row without family
ROWS = {
    "train": [["a1.jpg", 1, *AMANITA, "Amanita muscaria", "Amanita muscaria (L.) Lam.", 0],
              ["a2.jpg", 1, *AMANITA, "Amanita muscaria", "Amanita muscaria (L.) Lam.", 0],
              ["r1.jpg", 2, *RUSSULA, "Russula emetica", "Russula emetica (Schaeff.) Pers.", 1],
              ["g1.jpg", 3, *AMANITA, "", "Amanita", 2],                                # genus only
              ["m1.jpg", 4, "Fungi", "Ascomycota", "Pezizomycetes", "Pezizales", "", "Morchella", "Morchella esculenta",
               "Morchella esculenta (L.) Pers.", 3]],                                    # family unknown
    "val": [["a3.jpg", 10, *AMANITA, "Amanita muscaria", "Amanita muscaria (L.) Lam.", 0],
            ["r2.jpg", 11, *RUSSULA, "Russula emetica", "Russula emetica (Schaeff.) Pers.", 1]],
    "test": [["m2.jpg", 20, "Fungi", "Ascomycota", "Pezizomycetes", "Pezizales", "", "Morchella",
              "Morchella esculenta", "Morchella esculenta (L.) Pers.", 3],
             ["r3.jpg", 21, *RUSSULA, "Russula emetica", "Russula emetica (Schaeff.) Pers.", 1]],
}


@pytest.fixture
def fungitastic(tmp_path):
    """FungiTastic's layout: metadata/FungiTastic-{Train,Val,Test}.csv, images in FungiTastic/{split}/300p."""
    meta = tmp_path / "metadata"
    meta.mkdir()
    csvs = {}
    for split, rows in ROWS.items():
        folder = tmp_path / "FungiTastic" / split / "300p"
        folder.mkdir(parents=True)
        for row in rows:
            Image.new("RGB", (16, 12), (len(row[0]) * 20, 80, 40)).save(folder / row[0])
        csvs[split] = meta / f"FungiTastic-{split.capitalize()}.csv"
        pd.DataFrame(rows, columns=HEADER).to_csv(csvs[split], index=False)   # empty cells stay empty
    return csvs, tmp_path / "FungiTastic" / "{split}" / "300p"


def test_split_csvs_become_one_dataset_with_a_split_column(fungitastic, tmp_path):
    csvs, root = fungitastic
    summary = convert_to_dataset(None, tmp_path / "fungi", format="rank-csv", splits=csvs, image_root=root)
    assert summary.n_examples == 9 and summary.n_labels == 4
    ds = load_dataset(tmp_path / "fungi")
    ann = ds.annotations
    assert ann["split"].value_counts().to_dict() == {"train": 5, "val": 2, "test": 2}
    assert ann.loc[ann["path"].str.endswith("g1.jpg"), "label"].item() == "Amanita"   # deepest named rank
    assert ann.loc[ann["path"].str.endswith("m2.jpg"), "split"].item() == "test"
    assert set(ann["image_id"].astype(str)) == {"1", "2", "3", "4", "10", "11", "20", "21"}   # observationID
    assert all((tmp_path / "fungi" / p).is_file() for p in ann["path"])
    tax = ds.taxonomy
    # the missing family is skipped: Morchella sits directly under its order
    assert tax.lineage("Morchella esculenta") == ["Fungi", "Ascomycota", "Pezizomycetes", "Pezizales", "Morchella",
                                                  "Morchella esculenta"]
    assert tax.lineage("Amanita muscaria")[-2:] == ["Amanita", "Amanita muscaria"]
    assert "Amanita" in ds.labels   # a genus label and the parent of a species label at once
    # training reads the splits as given
    assert len(ds.rows("train")) == 5 and len(ds.rows("val")) == 2 and len(ds.rows("test")) == 2


def test_cli_train_val_test(fungitastic, tmp_path, capsys):
    csvs, root = fungitastic
    rc = main(["data", "convert", str(tmp_path / "fungi"), "--format", "rank-csv", "--train", str(csvs["train"]),
               "--val", str(csvs["val"]), "--test", str(csvs["test"]), "--image-root", str(root),
               "--link", "symlink"])
    assert rc == 0, capsys.readouterr().err
    assert "9 images, 4 labels" in capsys.readouterr().out
    ann = pd.read_csv(tmp_path / "fungi" / "annotations.csv")
    assert sorted(ann["path"])[0] == "images/test/300p/m2.jpg"       # images/ mirrors FungiTastic/{split}/300p
    assert (tmp_path / "fungi" / "images" / "val" / "300p" / "a3.jpg").is_symlink()
    # one of each kind of mistake: one error line
    rc = main(["data", "convert", str(csvs["train"]), str(tmp_path / "x"), "--format", "rank-csv",
               "--train", str(csvs["train"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: give either SOURCE or per-split CSVs (--train/--val/--test), not both"]


def test_a_lineage_that_disagrees_across_files_names_both_files(fungitastic, tmp_path):
    csvs, root = fungitastic
    frame = pd.read_csv(csvs["val"], keep_default_na=False)
    frame.loc[1, ["order", "family"]] = ["Agaricales", "Amanitaceae"]   # Russula under another family than in train
    frame.to_csv(csvs["val"], index=False)
    with pytest.raises(TaxonomyError) as err:
        read_split_csvs(csvs, image_root=root)
    message = str(err.value)
    assert message.startswith(f"{csvs['val']}: row 3: genus 'Russula' is under 'Amanitaceae' here")
    assert f"under 'Russulaceae' in {csvs['train']} row 4" in message


def test_a_file_without_a_rank_column_and_per_file_errors(fungitastic, tmp_path):
    csvs, root = fungitastic
    test = pd.read_csv(csvs["test"], keep_default_na=False).drop(columns=["species"])   # test file: genus at most
    test.to_csv(csvs["test"], index=False)
    table = read_split_csvs(csvs, image_root=root)
    assert table.frame.loc[table.frame["split"] == "test", "label"].tolist() == ["Morchella", "Russula"]

    (root.parent.parent / "val" / "300p" / "a3.jpg").unlink()
    with pytest.raises(DataError, match=r"FungiTastic-Val.csv: row 2: image 'a3.jpg' not found under .*val/300p"):
        read_split_csvs(csvs, image_root=root)
    kept = read_split_csvs(csvs, image_root=root, skip_missing=True)
    assert len(kept.frame) == 8 and "FungiTastic-Val.csv: row 2" in kept.notes[0]
    with pytest.raises(ConfigError, match="unknown split 'valid'"):
        read_split_csvs({"train": csvs["train"], "valid": csvs["val"]})
    with pytest.raises(ConfigError, match="same CSV"):
        read_split_csvs({"train": csvs["train"], "test": csvs["train"]}, image_root=root)


def test_na_strings_count_as_empty_cells(tmp_path):
    """pandas and R write a missing name as NaN/NA: no name at that rank, like an empty cell."""
    images = tmp_path / "img"
    images.mkdir()
    for name in ("x.jpg", "y.jpg"):
        Image.new("RGB", (8, 8)).save(images / name)
    (tmp_path / "train.csv").write_text("filename,kingdom,family,genus,species\n"
                                        "x.jpg,Fungi,Amanitaceae,Amanita,NaN\n")
    (tmp_path / "val.csv").write_text("filename,kingdom,family,genus,species\n"
                                      "y.jpg,Fungi,Amanitaceae,Amanita,NA\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = read_split_csvs({"train": tmp_path / "train.csv", "val": tmp_path / "val.csv"}, image_root=images)
    assert table.labels == ["Amanita"] and table.frame["split"].tolist() == ["train", "val"]
