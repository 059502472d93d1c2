"""Calibration of a checkpoint: temperature and ECE in the metadata, OOD statistics beside it, thresholds."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from taxonomist.config import load_config
from taxonomist.data.dataset import load_dataset
from taxonomist.decide import OOD_METHODS, build_ood_scorer
from taxonomist.errors import ConfigError, DataError, ModelError
from taxonomist.inference import known_threshold, load_ood_scorers, ood_path, ood_threshold
from taxonomist.inference.calibrate import TPR_LEVELS
from taxonomist.inference.run_model import infer_rows
from taxonomist.train.checkpoint import load_checkpoint
from taxonomist.data.split import split_rows


def test_calibration_writes_temperature_ece_and_the_ood_file(tiny_run):
    ckpt = tiny_run / "checkpoints" / "best.safetensors"
    meta = json.loads((tiny_run / "checkpoints" / "best.json").read_text())
    assert 0.05 <= meta["temperature"] <= 20
    cal = meta["calibration"]
    assert cal["n_val"] == 10 and 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    # T minimises the validation NLL, not the ECE: on 10 images ECE may move either way (tests/decide checks
    # the fit on data large enough for ECE to follow)
    ood = meta["ood"]
    assert ood["file"] == "best.ood.safetensors" == ood_path(ckpt).name
    assert ood["methods"] == list(OOD_METHODS) and ood["n_train"] == 30
    tensors = load_file(str(ood_path(ckpt)))
    assert {"msp/temperature", "mahalanobis/whitener", "mahalanobis/means", "knn/bank", "knn/k"} <= set(tensors)
    for method in OOD_METHODS:
        scores = tensors[f"{method}/val_known_scores"]
        assert len(scores) == 10 and np.all(np.diff(scores) >= 0)  # sorted
        assert set(ood["thresholds"][method]) == {f"{t:g}" for t in TPR_LEVELS}
    assert tensors["msp/temperature"].reshape(-1)[0] == pytest.approx(meta["temperature"])
    # the other keys of the training metadata are untouched
    assert meta["labels"] and meta["epoch"] == 1 and "preprocessing" in meta


def test_last_checkpoint_with_the_same_weights_gets_a_copy(tiny_run):
    best = json.loads((tiny_run / "checkpoints" / "best.json").read_text())
    last = json.loads((tiny_run / "checkpoints" / "last.json").read_text())
    assert last["temperature"] == best["temperature"] and last["ood"]["file"] == "last.ood.safetensors"
    assert (tiny_run / "checkpoints" / "last.ood.safetensors").read_bytes() == \
        (tiny_run / "checkpoints" / "best.ood.safetensors").read_bytes()


def test_reloaded_scorers_score_like_freshly_fitted_ones(tiny_run, tiny_data):
    ckpt = tiny_run / "checkpoints" / "best.safetensors"
    model, meta, taxonomy = load_checkpoint(ckpt)
    cfg = load_config(tiny_run / "config.yaml")
    dataset = load_dataset(tiny_data, taxonomy)
    train_rows, val_rows = split_rows(dataset, cfg)
    index = {lab: i for i, lab in enumerate(meta["labels"])}
    import torch
    train = infer_rows(model, meta, dataset, train_rows, torch.device("cpu"), index, num_workers=0).result
    val = infer_rows(model, meta, dataset, val_rows, torch.device("cpu"), index, num_workers=0).result
    stored = load_ood_scorers(ckpt)
    assert list(stored) == list(OOD_METHODS)
    stored_val = load_file(str(ood_path(ckpt)))
    for method in OOD_METHODS:
        options = {"temperature": meta["temperature"]} if method == "msp" else {}
        if method == "knn":
            options = {"k": 10, "max_bank": 20_000}
        fresh = build_ood_scorer(method, **options).fit(train.features, train.logits, train.targets)
        np.testing.assert_array_equal(stored[method].score(val.features, val.logits),
                                      fresh.score(val.features, val.logits), err_msg=method)
        np.testing.assert_array_equal(np.sort(stored[method].score(val.features, val.logits)),
                                      stored_val[f"{method}/val_known_scores"])


def test_known_threshold_keeps_the_share_of_known_examples():
    scores = np.arange(1.0, 21.0)
    for tpr, kept in ((0.95, 19), (0.9, 18), (1.0, 20), (0.01, 1)):
        t = known_threshold(scores, tpr)
        assert int((scores < t).sum()) == kept and int((scores >= t).sum()) == 20 - kept
    ties = np.array([0.0, 1.0, 1.0, 1.0])
    assert (ties < known_threshold(ties, 0.5)).sum() == 4  # ties are kept together, never split
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        known_threshold(scores, 1.5)
    with pytest.raises(DataError, match="non-empty"):
        known_threshold(np.array([]), 0.9)


def test_ood_threshold_uses_stored_values_or_the_stored_scores(tiny_run):
    ckpt = tiny_run / "checkpoints" / "best.safetensors"
    meta = json.loads((tiny_run / "checkpoints" / "best.json").read_text())
    assert ood_threshold(ckpt, "energy", 0.95) == meta["ood"]["thresholds"]["energy"]["0.95"]
    val_scores = load_file(str(ood_path(ckpt)))["energy/val_known_scores"]
    assert ood_threshold(ckpt, "energy", 0.93) == known_threshold(val_scores, 0.93)
    assert ood_threshold(tiny_run, "knn", 0.9) == meta["ood"]["thresholds"]["knn"]["0.9"]  # a run directory


def test_an_uncalibrated_checkpoint_has_no_scorers(tiny_run, tmp_path):
    import shutil
    src = tiny_run / "checkpoints"
    shutil.copyfile(src / "best.safetensors", tmp_path / "m.safetensors")
    meta = json.loads((src / "best.json").read_text())
    for key in ("temperature", "calibration", "ood"):
        meta.pop(key)
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert load_ood_scorers(tmp_path / "m.safetensors") == {}
    with pytest.raises(ModelError, match="calibrate it first"):
        ood_threshold(tmp_path / "m.safetensors", "energy", 0.95)
    meta["ood"] = {"file": "m.ood.safetensors", "methods": ["energy"]}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="m.ood.safetensors: OOD statistics named in m.json are missing"):
        load_ood_scorers(tmp_path / "m.safetensors")


def test_a_lone_checkpoint_needs_its_dataset(tiny_run, tiny_data, tmp_path):
    from taxonomist.inference import calibrate_checkpoint
    for name in ("best.safetensors", "best.json"):
        shutil.copyfile(tiny_run / "checkpoints" / name, tmp_path / name)
    with pytest.raises(DataError, match="best.safetensors: no run directory config.yaml names its dataset"):
        calibrate_checkpoint(tmp_path / "best.safetensors", device="cpu", num_workers=0)
    cal = calibrate_checkpoint(tmp_path / "best.safetensors", data=tiny_data, device="cpu", num_workers=0,
                               ood_methods=["energy"])
    meta = json.loads((tmp_path / "best.json").read_text())
    assert cal.n_val == 10 and meta["ood"]["methods"] == ["energy"]
    assert list(load_ood_scorers(tmp_path / "best.safetensors")) == ["energy"]
    with pytest.raises(ConfigError, match="unknown OOD method 'enrgy' \\(did you mean 'energy'"):
        calibrate_checkpoint(tmp_path / "best.safetensors", data=tiny_data, ood_methods=["enrgy"])


@pytest.mark.parametrize("objective", ["risk", "node-nll", "none"])
def test_decide_temperature_chooses_what_the_temperature_is_fitted_for(tiny_run, tiny_data, tmp_path, objective):
    import torch
    import yaml

    from taxonomist.decide import fit_temperature_for
    from taxonomist.inference.calibrate import calibrate_checkpoint
    from taxonomist.taxonomy import distance_matrix

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg_dict = yaml.safe_load((run / "config.yaml").read_text())
    cfg_dict["decide"].update(temperature=objective, decision="min-risk", candidates="all")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg_dict))
    cal = calibrate_checkpoint(run, ood_methods=(), num_workers=0)
    meta = json.loads((run / "checkpoints" / "best.json").read_text())
    assert meta["calibration"]["objective"] == cal.objective == objective
    assert f"fitted for {objective}" in cal.summary() and meta["temperature"] == pytest.approx(cal.temperature)
    if objective == "none":
        assert cal.temperature == 1.0 and cal.nll_before == cal.nll_after
        return
    # the same fit, redone on the same validation logits
    model, meta, taxonomy = load_checkpoint(run)
    dataset = load_dataset(tiny_data, taxonomy)
    _, val_rows = split_rows(dataset, load_config(run / "config.yaml"))
    index = {lab: i for i, lab in enumerate(meta["labels"])}
    val = infer_rows(model, meta, dataset, val_rows, torch.device("cpu"), index, num_workers=0).result
    d = distance_matrix(taxonomy, meta["metric"], taxonomy.labels, taxonomy.names)
    assert cal.temperature == pytest.approx(fit_temperature_for(val.logits, val.targets, objective, taxonomy, d))


def test_an_unknown_temperature_objective_is_refused_before_training(tmp_path):
    from taxonomist.cli.main import main
    assert main(["train", "--set", f"out={tmp_path / 'run'}", "--set", "decide.temperature=ecee"]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd", "sub/best.ood.safetensors", ".."])
def test_ood_file_named_outside_the_model_folder_is_refused(tiny_run, tmp_path, name):
    """A checkpoint's metadata is untrusted: its `ood.file` may name a file beside the model, nothing else."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(tiny_run / "checkpoints", folder)
    (tmp_path / "secret.safetensors").write_bytes((folder / "best.ood.safetensors").read_bytes())
    meta_file = folder / "best.json"
    meta = json.loads(meta_file.read_text())
    meta["ood"]["file"] = name
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="outside the model's folder"):
        load_ood_scorers(folder / "best.safetensors")
