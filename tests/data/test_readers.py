"""ImageFolder and rank-column CSV readers, and `convert_to_dataset` in its four link modes."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from taxonomist.cli.main import main
from taxonomist.data import load_dataset
from taxonomist.data.readers import (FlatFolderWarning, convert_to_dataset, read_image_folder, read_rank_csv)
from taxonomist.errors import ConfigError, DataError, TaxonomyError


def _image(path, value=0, size=(4, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "photos"
    _image(src / "Sebastes" / "a.jpg", 10)
    _image(src / "Sebastes" / "b.png", 20)
    _image(src / "Sebastes" / "2021" / "c.JPG", 30)          # nested folder, upper-case extension
    _image(src / "Chionoecetes_tanneri" / "d.webp", 40)       # underscore for a space
    (src / "Chionoecetes_tanneri" / "notes.txt").write_text("not an image")
    _image(src / ".thumbs" / "e.jpg", 50)                     # hidden folder: skipped
    _image(src / "loose.jpg", 60)                             # no label folder: skipped, noted
    (src / "empty").mkdir()
    return src


def _parent_taxonomy(path):
    path.write_text("concept_name,parent\nAnimalia,\nSebastes,Animalia\nChionoecetes tanneri,Animalia\n"
                    "Octopus,Animalia\n")
    return path


def test_image_folder_flat_warns_once_and_lists_images(folder):
    with pytest.warns(FlatFolderWarning) as record:
        table = read_image_folder(folder)
    assert len(record) == 1
    assert table.taxonomy is None
    names = sorted(os.path.relpath(s, folder) for s in table.frame["source"])
    assert names == ["Chionoecetes_tanneri/d.webp", "Sebastes/2021/c.JPG", "Sebastes/a.jpg", "Sebastes/b.png"]
    assert table.frame["label"].value_counts().to_dict() == {"Sebastes": 3, "Chionoecetes_tanneri": 1}
    assert any("loose.jpg" in n for n in table.notes) and any("'empty'" in n for n in table.notes)


def test_image_folder_with_taxonomy_maps_underscores(folder, tmp_path):
    table = read_image_folder(folder, taxonomy=_parent_taxonomy(tmp_path / "tax.csv"))
    assert sorted(set(table.frame["label"])) == ["Chionoecetes tanneri", "Sebastes"]
    builtin = read_image_folder(folder, taxonomy="fathomnet2025")
    assert builtin.taxonomy.lineage("Sebastes")[:2] == ["Animalia", "Chordata"]


def test_misspelled_folder_is_reported_with_a_suggestion(tmp_path):
    _image(tmp_path / "photos" / "Sebastse" / "a.jpg")
    with pytest.raises(DataError) as e:
        read_image_folder(tmp_path / "photos", taxonomy=_parent_taxonomy(tmp_path / "tax.csv"))
    msg = str(e.value)
    assert "Sebastse" in msg and "did you mean 'Sebastes'" in msg and "\n" not in msg


def test_worms_resolution_uses_the_client(folder, tmp_path):
    lineages = {
        "Sebastes": [("Animalia", "Kingdom"), ("Chordata", "Phylum"), ("Actinopteri", "Class"),
                     ("Scorpaeniformes", "Order"), ("Sebastidae", "Family"), ("Sebastes", "Genus")],
        "Chionoecetes tanneri": [("Animalia", "Kingdom"), ("Arthropoda", "Phylum"), ("Malacostraca", "Class"),
                                 ("Decapoda", "Order"), ("Oregoniidae", "Family"), ("Chionoecetes", "Genus"),
                                 ("Chionoecetes tanneri", "Species")],
    }
    asked = []

    def client(name):
        asked.append(name)
        if name not in lineages:
            raise LookupError(name)
        return lineages[name]

    table = read_image_folder(folder, resolve_worms=True, worms_client=client, worms_cache=tmp_path / "cache")
    assert sorted(asked) == ["Chionoecetes tanneri", "Sebastes"]
    assert table.taxonomy.ancestor_at("Chionoecetes tanneri", "family") == "Oregoniidae"
    assert table.origin == "WoRMS"
    _image(folder / "Nonexistus" / "x.jpg")
    with pytest.raises(DataError, match="'Nonexistus' could not be resolved through WoRMS"):
        read_image_folder(folder, resolve_worms=True, worms_client=client, worms_cache=tmp_path / "cache")


def test_convert_relative_paths_point_at_the_originals(folder, tmp_path):
    out = tmp_path / "datasets" / "photos"
    summary = convert_to_dataset(folder, out, taxonomy=_parent_taxonomy(tmp_path / "tax.csv"))
    assert (summary.n_examples, summary.n_labels, summary.link) == (4, 2, "relative")
    frame = pd.read_csv(out / "annotations.csv", dtype=str)
    assert list(frame.columns) == ["path", "label"]
    assert "../../photos/Sebastes/a.jpg" in set(frame["path"])
    ds = load_dataset(out)
    assert all(ds.image_path(p).is_file() for p in ds.annotations["path"])
    assert not (out / "images").exists()
    assert ds.taxonomy.parent("Sebastes") == "Animalia"


def test_convert_symlink_copy_and_none(folder, tmp_path):
    tax = _parent_taxonomy(tmp_path / "tax.csv")
    linked = convert_to_dataset(folder, tmp_path / "linked", link="symlink", taxonomy=tax)
    link = tmp_path / "linked" / "images" / "Sebastes" / "a.jpg"
    assert link.is_symlink() and os.readlink(link) == str(folder / "Sebastes" / "a.jpg")
    assert linked.n_written == 4
    again = convert_to_dataset(folder, tmp_path / "linked", link="symlink", taxonomy=tax)
    assert (again.n_written, again.n_reused) == (0, 4)

    copied = convert_to_dataset(folder, tmp_path / "copied", link="copy", taxonomy=tax)
    copy = tmp_path / "copied" / "images" / "Chionoecetes_tanneri" / "d.webp"
    assert copy.is_file() and not copy.is_symlink() and copied.n_written == 4
    assert copy.read_bytes() == (folder / "Chionoecetes_tanneri" / "d.webp").read_bytes()

    with pytest.warns(FlatFolderWarning):
        in_place = convert_to_dataset(folder, None, link="none")
    assert in_place.out_dir == folder
    frame = pd.read_csv(folder / "annotations.csv", dtype=str)
    assert "Sebastes/a.jpg" in set(frame["path"])
    assert not (folder / "taxonomy.csv").exists()
    with pytest.raises(ConfigError, match="--link none"):
        convert_to_dataset(folder, tmp_path / "elsewhere", link="none")


def test_convert_refuses_out_dir_inside_the_image_folder(folder):
    with pytest.raises(DataError, match="inside the image folder"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_to_dataset(folder, folder / "dataset")


# ------------------------------------------------------------------------------------------ rank CSV
FUNGI_HEADER = "filename,observationID,kingdom,phylum,class,order,family,genus,specificEpithet,species\n"
AMANITA = "Fungi,Basidiomycota,Agaricomycetes,Agaricales,Amanitaceae,Amanita"
BOLETUS = "Fungi,Basidiomycota,Agaricomycetes,Boletales,Boletaceae,Boletus"


@pytest.fixture
def fungi(tmp_path):
    images = tmp_path / "300p"
    for name in ("1.jpg", "2.jpg", "3.jpg", "4.jpg"):
        _image(images / name)
    csv = tmp_path / "FungiTastic-Mini-Train.csv"
    csv.write_text(FUNGI_HEADER
                   + f"1.jpg,7,{AMANITA},muscaria,Amanita muscaria\n"
                   + f"2.jpg,7,{AMANITA},muscaria,Amanita muscaria\n"
                   + f"3.jpg,8,{AMANITA},,\n"                      # identified to genus only
                   + f"4.jpg,9,{BOLETUS},edulis,Boletus edulis\n")
    return csv, images


def test_rank_csv_builds_the_taxonomy_and_labels_at_the_deepest_rank(fungi):
    csv, images = fungi
    table = read_rank_csv(csv, image_root=images)
    assert table.frame["label"].tolist() == ["Amanita muscaria", "Amanita muscaria", "Amanita", "Boletus edulis"]
    assert table.frame["image_id"].tolist() == ["7", "7", "8", "9"]      # observationID keeps photos together
    tax = table.taxonomy
    assert tax.lineage("Amanita muscaria") == ["Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales",
                                               "Amanitaceae", "Amanita", "Amanita muscaria"]
    assert tax.rank("Amanita") == "genus" and "Amanita" in tax.labels
    assert sorted(tax.labels) == ["Amanita", "Amanita muscaria", "Boletus edulis"]


def test_rank_csv_columns_any_case_and_explicit_image_column(tmp_path):
    _image(tmp_path / "img" / "x.png")
    csv = tmp_path / "meta.csv"
    csv.write_text("Photo,Kingdom,Genus,Species\nimg/x.png,Fungi,Amanita,Amanita muscaria\n")
    with pytest.raises(DataError, match="no image path column"):
        read_rank_csv(csv)
    table = read_rank_csv(csv, image_column="photo")
    assert table.taxonomy.lineage("Amanita muscaria") == ["Fungi", "Amanita", "Amanita muscaria"]


def test_rank_csv_conflicting_parents_name_both_rows(fungi, tmp_path):
    csv, images = fungi
    text = csv.read_text() + "1.jpg,10,Fungi,Basidiomycota,Agaricomycetes,Agaricales,Pluteaceae,Amanita,x,Amanita x\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(TaxonomyError) as e:
        read_rank_csv(bad, image_root=images)
    msg = str(e.value)
    assert "row 6: genus 'Amanita' is under 'Pluteaceae' here but under 'Amanitaceae' in row 2" in msg


def test_rank_csv_name_at_two_ranks(tmp_path):
    _image(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,family,genus\na.jpg,Amanitaceae,Amanita\na.jpg,Amanita,Other\n")
    with pytest.raises(TaxonomyError, match="row 3: 'Amanita' is a family here but a genus in row 2"):
        read_rank_csv(csv)


def test_rank_csv_missing_images(fungi, tmp_path):
    csv, images = fungi
    (images / "3.jpg").unlink()
    with pytest.raises(DataError, match=r"row 4: image '3.jpg' not found"):
        read_rank_csv(csv, image_root=images)
    table = read_rank_csv(csv, image_root=images, skip_missing=True)
    assert len(table.frame) == 3 and "Amanita" not in table.taxonomy.labels
    assert "1 rows whose image is missing" in table.notes[0]


def test_rank_csv_row_without_any_rank(tmp_path):
    _image(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,genus,species\na.jpg,Amanita,\na.jpg,NaN,\n")
    with pytest.raises(DataError, match="row 3: no name in any rank column"):
        read_rank_csv(csv)


def test_convert_rank_csv_and_cli(fungi, tmp_path, capsys):
    csv, images = fungi
    out = tmp_path / "ds"
    code = main(["data", "convert", str(csv), str(out), "--format", "rank-csv", "--image-root", str(images)])
    assert code == 0
    assert "4 images, 3 labels" in capsys.readouterr().out
    ds = load_dataset(out)
    assert ds.annotations["path"].tolist()[0] == "../300p/1.jpg"
    assert ds.taxonomy.parent("Boletus edulis") == "Boletus"
    assert (out / "taxonomy.csv").read_text().startswith("concept_name,kingdom,phylum,class,order,family,genus,species")

    assert main(["data", "convert", str(csv), str(out), "--format", "rank-csv"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_convert_imagefolder_with_worms(folder, tmp_path, monkeypatch, capsys):
    import taxonomist.taxonomy.worms as worms

    def fake(name):
        genus = name.split()[0]
        chain = [("Animalia", "Kingdom"), ("Chordata" if genus == "Sebastes" else "Arthropoda", "Phylum"),
                 (genus, "Genus")]
        return chain + ([(name, "Species")] if " " in name else [])

    monkeypatch.setattr(worms, "fathomnet_client", fake)
    out = tmp_path / "ds"
    code = main(["data", "convert", str(folder), str(out), "--format", "imagefolder", "--resolve-worms",
                 "--cache", str(tmp_path / "cache"), "--link", "symlink"])
    captured = capsys.readouterr()
    assert code == 0 and "taxonomy: WoRMS" in captured.out and "symlinks" in captured.out
    ds = load_dataset(out)
    assert ds.taxonomy.lineage("Chionoecetes tanneri") == ["Animalia", "Arthropoda", "Chionoecetes",
                                                           "Chionoecetes tanneri"]
    assert (out / "images" / "Sebastes" / "2021" / "c.JPG").is_symlink()

    assert main(["data", "convert", str(folder), str(tmp_path / "flat"), "--format", "imagefolder"]) == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "flat taxonomy" in warning_lines[0]
