"""`taxonomist.card.ModelCard`: one `from_dict`/`to_dict` for what every model file carries, the defaults of keys
an older file lacks, the format version, and the read-only mapping view of the stored layout."""
from __future__ import annotations

import copy
import json

import pytest

from taxonomist.card import (FORMAT_VERSION, CalibrationInfo, DataSettings, ModelCard, OODInfo, Preprocessing,
                             taxonomy_to_json)
from taxonomist.errors import ModelError
from taxonomist.taxonomy import Taxonomy

TAXONOMY = Taxonomy.from_parents({"Animalia": None, "Chordata": "Animalia", "Gadus": "Chordata",
                                  "Gadus morhua": "Gadus", "Merluccius": "Chordata"},
                                 ranks={"Animalia": "kingdom", "Chordata": "phylum", "Gadus": "genus",
                                        "Gadus morhua": "species", "Merluccius": "genus"})

#: a calibrated checkpoint's JSON as the training loop and calibration write it, in their key order
WRITTEN = {
    "format_version": 1, "labels": list(TAXONOMY.labels), "taxonomy": taxonomy_to_json(TAXONOMY),
    "taxonomy_hash": TAXONOMY.hash, "backbone": "test_efficientnet", "head": "flat", "image_size": 32,
    "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
                      "input_size": 32},
    "model_config": {"backbone": "test_efficientnet", "pretrained": "none", "head": "flat"},
    "metric": "fathomnet2025", "model": {"backbone": "test_efficientnet", "num_features": 256},
    "data": {"resize": "stretch", "grayscale": False, "crop_pct": 0.875, "input": "path", "context": None},
    "monitor": "val_mhd", "epoch": 3, "metrics": {"epoch": 3, "val_top1": 0.5},
    "temperature": 1.5,
    "calibration": {"ece_before": 0.2, "ece_after": 0.1, "nll_before": 1.2, "nll_after": 1.1, "objective": "nll",
                    "n_val": 18},
    "ood": {"file": "best.ood.safetensors", "methods": ["msp", "energy"], "n_train": 36, "n_val": 18,
            "flag": "score >= threshold", "thresholds": {"energy": {"0.95": -1.5}},
            "model_methods": {"odin": {"temperature": 1000.0, "epsilon": 0.0014}}},
}


def test_a_written_card_round_trips_exactly():
    card = ModelCard.from_dict(copy.deepcopy(WRITTEN), "best.json")
    assert card.to_dict() == WRITTEN and list(card.to_dict()) == list(WRITTEN)
    assert json.dumps(card.to_dict(), indent=1) == json.dumps(WRITTEN, indent=1)
    assert ModelCard.from_dict(card.to_dict()) == card


def test_typed_fields():
    card = ModelCard.from_dict(WRITTEN)
    assert card.labels == ("Gadus morhua", "Merluccius") and card.taxonomy.hash == TAXONOMY.hash
    assert card.preprocessing == Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 32)
    assert card.data == DataSettings() and card.temperature == 1.5 and card.calibrated
    assert card.calibration == CalibrationInfo(0.2, 0.1, 1.2, 1.1, "nll", 18)
    assert card.ood.stored_methods == ["msp", "energy", "odin"] and card.ood.thresholds["energy"]["0.95"] == -1.5
    assert card.distance_metric == "fathomnet2025" and not card.two_stream
    assert card.label_index == {"Gadus morhua": 0, "Merluccius": 1}


def test_an_older_or_hand_written_file_reads_with_the_defaults():
    old = {k: copy.deepcopy(v) for k, v in WRITTEN.items()
           if k not in ("format_version", "backbone", "head", "metric", "temperature", "calibration", "ood")}
    del old["data"]["context"]                            # before the context scale was recorded
    del old["preprocessing"]["interpolation"]
    card = ModelCard.from_dict(old)
    assert card.format_version == FORMAT_VERSION and card.backbone == "test_efficientnet" and card.head == "flat"
    assert card.metric == "auto" and card.distance_metric == "fathomnet2025"   # the taxonomy's default
    assert card.temperature == 1.0 and not card.calibrated and card.ood is None and card.data.context is None
    assert card.preprocessing.interpolation == "bicubic"
    stored = card.to_dict()
    assert "temperature" not in stored and "calibration" not in stored and "ood" not in stored
    assert stored["metric"] == "auto" and stored["data"]["context"] is None
    minimal = ModelCard.from_dict({"labels": ["a"], "image_size": 8, "model_config": {},
                                   "taxonomy": taxonomy_to_json(Taxonomy.from_parents({"a": None}))})
    assert minimal.preprocessing is None and minimal.data == DataSettings() and minimal.distance_metric == "lca"


def test_unknown_keys_are_kept_and_a_newer_format_is_refused():
    card = ModelCard.from_dict({**WRITTEN, "made_by": "another tool"})
    assert card.to_dict()["made_by"] == "another tool" and list(card.to_dict())[-1] == "made_by"
    with pytest.raises(ModelError, match=r"^m\.json: model card format 2 is newer than this taxonomist reads \(1\)"):
        ModelCard.from_dict({**WRITTEN, "format_version": 2}, "m.json")
    with pytest.raises(ModelError, match=r"^m\.json: incomplete checkpoint metadata \(no 'taxonomy'\)$"):
        ModelCard.from_dict({k: v for k, v in WRITTEN.items() if k != "taxonomy"}, "m.json")
    with pytest.raises(ModelError, match=r"^m\.json: incomplete checkpoint metadata \(ValueError"):
        ModelCard.from_dict({**WRITTEN, "image_size": "large"}, "m.json")
    broken = ModelCard.from_dict({**WRITTEN, "taxonomy": {"columns": []}}, "m.json")
    with pytest.raises(ModelError, match=r"^m\.json: "):
        broken.taxonomy


def test_the_card_reads_as_the_stored_mapping_and_changes_by_replace():
    card = ModelCard.from_dict(WRITTEN)
    assert card["labels"] == WRITTEN["labels"] and card.get("epoch") == 3 and "ood" in card and "x" not in card
    assert dict(card) == WRITTEN and {**card, "epoch": 4}["epoch"] == 4
    uncalibrated = card.replace(temperature=1.0, calibration=None, ood=None)
    assert "temperature" not in uncalibrated and uncalibrated.temperature == 1.0 and card.temperature == 1.5
    renamed = card.replace(ood=OODInfo("model.ood.safetensors", ("energy",)))
    assert renamed["ood"] == {"file": "model.ood.safetensors", "methods": ["energy"]}


def test_the_label_prior_round_trips_and_a_corrupt_one_is_refused():
    card = ModelCard.from_dict({**copy.deepcopy(WRITTEN), "label_prior": [0.75, 0.25]}, "best.json")
    assert card.label_prior == (0.75, 0.25) and card.to_dict()["label_prior"] == [0.75, 0.25]
    assert ModelCard.from_dict(WRITTEN).label_prior is None          # older files: uniform
    for bad in ([0.5], [1, -1], ["a", 1], [0, 0], [True, 1]):
        with pytest.raises(ModelError, match="best.json: corrupt checkpoint metadata \\(label_prior"):
            ModelCard.from_dict({**copy.deepcopy(WRITTEN), "label_prior": bad}, "best.json")
