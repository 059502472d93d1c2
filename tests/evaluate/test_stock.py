"""Stock models: class names mapped onto the taxonomy, probabilities summed and renormalised, the evaluation
written as a run directory that `report` compares with a fine-tuned run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from taxonomist.cli.main import main
from taxonomist.config import load_config
from taxonomist.data.split import split_dataset
from taxonomist.data.synth import synthesize
from taxonomist.errors import ConfigError, DataError
from taxonomist.models.stock import StockClassifier, map_class_names, read_class_names
from taxonomist.taxonomy import Taxonomy
from taxonomist.train import train

TAX = Taxonomy.from_parents(
    {"Animalia": None, "Chordata": "Animalia", "Carassius": "Chordata", "Carassius auratus": "Carassius",
     "Tinca": "Chordata", "Tinca tinca": "Tinca", "Amanita": "Animalia"},
    labels=["Carassius auratus", "Tinca tinca", "Amanita"])


def test_names_map_by_synonym_case_and_genus():
    names = ["goldfish, Carassius auratus", "TINCA_TINCA", "Amanita muscaria", "amanita  phalloides",
             "Chordata", "tree frog", "Carassius gibelio"]
    m = map_class_names(names, TAX)
    assert m.target.tolist() == [0, 1, 2, 2, -1, -1, -1]
    assert m.how == ["exact", "exact", "genus", "genus", "internal", "unmapped", "unmapped"]
    c = m.counts
    assert (c["mapped"], c["unmapped"], c["internal"], c["labels_covered"], c["many_to_one"]) == (4, 2, 1, 3, 1)
    assert "4 of 7 source classes mapped to 3 of 3 labels" in m.summary()


class FixedLogits(nn.Module):
    """A 'model' whose logits are given: the mapping arithmetic is checked to the digit."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.num_classes = self.logits.shape[1]

    def forward(self, image):
        return self.logits[: image.shape[0]]


def test_stock_probabilities_are_summed_and_renormalised():
    source = np.log(np.array([[0.1, 0.2, 0.3, 0.15, 0.25],     # 0.25 on an unmapped class
                              [0.0001, 0.0001, 0.0001, 0.0001, 0.9996]]))
    names = ["Carassius auratus", "Amanita muscaria", "Amanita phalloides", "Tinca tinca", "Dog"]
    model = StockClassifier(FixedLogits(source), map_class_names(names, TAX)).eval()
    out = model(torch.zeros(2, 3, 8, 8))
    probs = torch.softmax(out["logits"].double(), 1).numpy()
    np.testing.assert_allclose(probs[0], np.array([0.1, 0.15, 0.5]) / 0.75, rtol=1e-5)
    np.testing.assert_allclose(probs[1], [0.25, 0.25, 0.5], rtol=1e-3)
    with pytest.raises(Exception, match="5 classes"):
        StockClassifier(FixedLogits(source), map_class_names(names[:4], TAX))(torch.zeros(1, 3, 8, 8))


def test_class_names_file_errors(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("Tinca tinca\n\nAmanita\n")
    with pytest.raises(DataError, match="line 2 is empty"):
        read_class_names(f)
    f.write_text("class_name,count\nTinca tinca,3\nAmanita,1\n")
    assert read_class_names(f) == ["Tinca tinca", "Amanita"]
    with pytest.raises(DataError, match="not found"):
        read_class_names(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def data_and_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("stock")
    data = root / "data"
    synthesize(data, n_taxa=6, per_class=8, image_size=32, seed=3)
    split_dataset(data, val=0.2, test=0.3, ood_taxa=1, seed=0)
    cfg = load_config(None, [f"data.root={data}", f"out={root / 'run'}", "data.image_size=32", "data.num_workers=0",
                             "model.backbone=test_efficientnet", "model.pretrained=none", "train.batch_size=8",
                             "train.epochs=1", "train.device=cpu", "train.tensorboard=false", "augment.randaugment="])
    train(cfg, progress=False, log=lambda *_: None)
    return data, root / "run"


def test_cli_stock_run_directory_compares_with_a_trained_run(data_and_run, tmp_path, capsys):
    data, run = data_and_run
    frame = pd.read_csv(data / "annotations.csv")
    known = sorted(set(frame.loc[frame["split"] != "ood", "label"]))
    genus_of = {lab: lab.split(" ")[0] for lab in known if " " in lab}
    # made-up class names: two labels by name (one twice, upper-cased), a species of a genus label, junk
    species, other = known[0], known[1]
    names = [species, species.upper(), other, "Nonexistus imaginarius", "zebra"]
    genus_labels = [g for g in genus_of.values() if g in known]
    if genus_labels:
        names.append(f"{genus_labels[0]} fictivus")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    out = tmp_path / "stock"
    assert main(["baseline", "stock", "timm/test_efficientnet", "--pretrained", "none", "--class-names",
                 str(tmp_path / "classes.txt"), "--data", str(data), "--out", str(out), "--image-size", "32",
                 "--device", "cpu", "--num-workers", "0", "--no-report"]) == 0
    assert "source classes mapped" in capsys.readouterr().out
    for name in ("config.yaml", "taxonomy.csv", "metrics.json", "predictions.csv"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    mapping = m["baseline"]["mapping"]
    assert mapping["source_classes"] == len(names)
    assert mapping["unmapped"] == 2 and mapping["mapped"] == len(names) - 2 and mapping["many_to_one"] >= 1
    assert set(m["baseline"]["dropped_classes"]) == {"Nonexistus imaginarius", "zebra"}
    assert m["n_labels"] == len(known) and m["n"] == int((frame["split"] == "test").sum())
    assert {"msp", "energy"} <= set(m["ood"])
    preds = pd.read_csv(out / "predictions.csv")
    # a stock model can only name labels some source class maps to
    covered = {species, other} | ({genus_labels[0]} if genus_labels else set())
    assert set(preds["prediction"]) <= covered
    assert np.isfinite(m["log_loss"])
    # evaluated like any run: the report compares stock and fine-tuned
    assert main(["evaluate", str(run), "--data", str(data), "--device", "cpu", "--num-workers", "0",
                 "--no-report"]) == 0
    html = tmp_path / "compare.html"
    assert main(["report", str(out), str(run), "--out", str(html)]) == 0
    text = html.read_text()
    assert "stock" in text and "run" in text


def test_stock_errors_are_one_line(data_and_run, tmp_path, capsys):
    data, _ = data_and_run
    (tmp_path / "junk.txt").write_text("zebra\nlion\n")
    assert main(["baseline", "stock", "timm/test_efficientnet", "--pretrained", "none", "--class-names",
                 str(tmp_path / "junk.txt"), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: none of the stock model's 2 class names") and err.count("\n") == 1
    assert main(["baseline", "stock", "timm/test_efficientnt", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean" in capsys.readouterr().err
    # a random ImageNet head has no names for these synthetic taxa, and an unnamed head is refused
    with pytest.raises(ConfigError, match="class names are unknown"):
        from taxonomist.models.stock import stock_class_names
        stock_class_names(nn.Linear(2, 3), None)


def test_offline_stock_error_names_the_flag_not_the_config_key(data_and_run, tmp_path, capsys, monkeypatch):
    """Issue 23: `baseline stock` offline advised `model.pretrained=`, a config key this command does not take."""
    import huggingface_hub.constants as hub

    from taxonomist.models import pretrained
    monkeypatch.setattr(pretrained, "_reachable", lambda endpoint: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data, _ = data_and_run
    assert main(["baseline", "stock", "timm/test_efficientnet", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download weights for test_efficientnet (huggingface.co unreachable); "
                          "pass --pretrained FILE") and "--pretrained none" in err
    assert "model.pretrained" not in err and err.count("\n") == 1


def test_imagenet_head_is_named_by_timm():
    import timm

    from taxonomist.models.stock import stock_class_names
    names = stock_class_names(timm.create_model("test_efficientnet", pretrained=False), None)
    assert len(names) == 1000 and names[1] == "goldfish, Carassius auratus"
    m = map_class_names(names, TAX)
    assert m.counts["exact"] == 2 and m.counts["labels_without_source"] == 1   # goldfish and tench; no Amanita
    assert {names[i] for i in np.flatnonzero(m.target >= 0)} == {"tench, Tinca tinca", "goldfish, Carassius auratus"}


def test_imagenet_weights_name_the_cat_among_mapped_classes(tmp_path, monkeypatch):
    """Real weights (the offline ImageNet Lite0): the cat photo goes to a cat class among the 4 mapped ones."""
    from PIL import Image
    from skimage import data as skimage_data

    from taxonomist.errors import ModelError
    from taxonomist.evaluate.baseline import evaluate_stock
    from taxonomist.models import pretrained

    def offline(*args, **kwargs):
        raise ModelError("huggingface.co unreachable (test)")
    monkeypatch.setattr(pretrained, "create_timm_pretrained", offline)  # no network in CI: the offline weights
    root = tmp_path / "cats"
    (root / "images").mkdir(parents=True)
    Image.fromarray(skimage_data.chelsea()).save(root / "images" / "chelsea.jpg")
    (root / "taxonomy.csv").write_text("concept_name,parent\nFelidae,\ntabby,Felidae\ntiger cat,Felidae\n"
                                       "Egyptian cat,Felidae\nlynx,Felidae\n")
    rows = ["path,label,split", "images/chelsea.jpg,tabby,test"] + \
        [f"images/chelsea.jpg,{lab},train" for lab in ("tabby", "tiger cat", "Egyptian cat", "lynx")]
    (root / "annotations.csv").write_text("\n".join(rows) + "\n")
    ev = evaluate_stock("timm/tf_efficientnet_lite0", root, tmp_path / "out", device="cpu", num_workers=0,
                        progress=False)
    mapping = ev.metrics["baseline"]["mapping"]
    assert (mapping["source_classes"], mapping["exact"], mapping["unmapped"]) == (1000, 4, 996)
    row = ev.predictions.iloc[0]
    assert row["prediction"] in {"tabby", "tiger cat", "Egyptian cat"} and row["confidence"] > 0.5
