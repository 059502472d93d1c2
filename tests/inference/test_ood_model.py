"""ODIN and MC-dropout on a tiny trained model, and their use (with ensemble disagreement) in `evaluate`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from taxonomist.data.loading import TaxonDataset, build_loader
from taxonomist.decide import MSPScorer
from taxonomist.errors import ConfigError, ModelError, TaxonomistError
from taxonomist.inference.run_model import eval_transform
from taxonomist.inference.ood_model import dropout_layers, mc_dropout_probs, mc_dropout_scores, odin_scores
from taxonomist.train.checkpoint import load_checkpoint
from taxonomist.inference.forward import run_inference

DEV = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_loader(tiny_run, tiny_data):
    model, meta, taxonomy = load_checkpoint(tiny_run, device="cpu")
    from taxonomist.evaluate.run import _open_dataset
    dataset = _open_dataset(tiny_data, taxonomy)
    rows = dataset.annotations[dataset.annotations["split"] == "test"]
    labels = {lab: i for i, lab in enumerate(meta["labels"])}
    ds = TaxonDataset(dataset, rows, eval_transform(meta), label_index=labels)
    return model, meta, build_loader(ds, 8, train=False, num_workers=0)


def test_odin_without_perturbation_is_msp_at_its_temperature(model_and_loader):
    model, meta, loader = model_and_loader
    plain = run_inference(model, loader, DEV)
    odin = odin_scores(model, loader, DEV, temperature=7.0, epsilon=0.0)
    np.testing.assert_array_equal(odin.indices, plain.indices)
    np.testing.assert_allclose(odin.scores, MSPScorer(7.0).score(None, plain.logits), atol=1e-5)


def test_odin_step_raises_the_confidence_it_follows(model_and_loader):
    model, meta, loader = model_and_loader
    base = odin_scores(model, loader, DEV, temperature=1.0, epsilon=0.0).scores
    moved = odin_scores(model, loader, DEV, temperature=1.0, epsilon=0.01, std=meta["preprocessing"]["std"]).scores
    # the step follows the gradient of the top-1 log-probability: the max softmax rises (score falls)
    assert (moved < base).mean() >= 0.9
    assert not model.training
    with pytest.raises(ConfigError, match="epsilon"):
        odin_scores(model, loader, DEV, epsilon=-1.0)


def test_mc_dropout_passes_differ_are_seeded_and_leave_eval_mode(model_and_loader):
    model, meta, loader = model_and_loader
    assert dropout_layers(model)  # the head's default drop_rate 0.2
    probs, idx, _ = mc_dropout_probs(model, loader, DEV, passes=4, seed=3)
    assert probs.shape == (4, len(idx), len(meta["labels"]))
    np.testing.assert_allclose(probs.sum(2), 1.0, atol=1e-5)
    assert not np.allclose(probs[0], probs[1])          # dropout was on
    again, _, _ = mc_dropout_probs(model, loader, DEV, passes=4, seed=3)
    np.testing.assert_array_equal(probs, again)         # the seed fixes the masks
    assert not model.training and not any(m.training for m in dropout_layers(model))
    scores = mc_dropout_scores(model, loader, DEV, passes=4, seed=3).scores
    mean = probs.mean(0)
    np.testing.assert_allclose(scores, -(mean * np.log(mean)).sum(1), atol=1e-9)


def test_mc_dropout_runs_the_backbone_once_with_the_same_numbers(model_and_loader, monkeypatch):
    """All dropout sits in the head, so the passes reuse the backbone's features: the same masks (the backbone
    draws no random numbers in eval mode) and the same probabilities as full forwards, with 1 backbone call."""
    from taxonomist.inference.ood_model import _head_only, mc_dropout_batch

    model, _, loader = model_and_loader
    assert _head_only(model)
    image = next(iter(loader))["image"]
    calls = []
    hook = model.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        torch.manual_seed(5)
        fast = mc_dropout_batch(model, image, passes=5)
        assert len(calls) == 1
        torch.manual_seed(5)
        full = mc_dropout_batch(model, image, passes=5, reuse_features=False)
        assert len(calls) == 1 + 5
    finally:
        hook.remove()
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-6)
    assert not np.allclose(fast[0], fast[1])            # dropout was on in the head
    # dropout inside a backbone (e.g. LoRA's) means full passes
    monkeypatch.setattr(model.backbone, "extra_dropout", torch.nn.Dropout(0.1), raising=False)
    assert not _head_only(model)


def test_mc_dropout_without_dropout_is_refused(model_and_loader):
    model, _, loader = model_and_loader
    saved = [(m, m.p) for m in dropout_layers(model)]
    try:
        for m, _ in saved:
            m.p = 0.0
        with pytest.raises(ModelError, match="model.drop_rate"):
            mc_dropout_probs(model, loader, DEV, passes=2)
    finally:
        for m, p in saved:
            m.p = p


def test_evaluate_scores_model_ood_and_ensemble(tiny_run, tiny_data, second_checkpoint, tmp_path):
    from taxonomist.cli.main import main

    out = tmp_path / "eval"
    assert main(["evaluate", str(tiny_run), "--data", str(tiny_data), "--out", str(out), "--no-report",
                 "--device", "cpu", "--num-workers", "0", "--model-ood", "odin", "mc-dropout",
                 "--ensemble", str(second_checkpoint)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"odin", "mc-dropout", "ensemble", "msp"} <= set(m["ood"])
    for method in ("odin", "mc-dropout", "ensemble"):
        v = m["ood"][method]
        assert 0.0 <= v["auroc"] <= 1.0 and 0.0 <= v["fpr95"] <= 1.0
        assert v["threshold_source"] == "95% of the val rows kept"
        assert v["n_unknown"] > 0 and v["n_known"] == m["n"]
        assert v["recall"] == pytest.approx(1 - v["unknown_missed"])
    assert set(m["curves"]["ood_roc"]) >= {"odin", "mc-dropout", "ensemble"}


def test_evaluate_rejects_an_ensemble_with_other_labels(tiny_run, tiny_data, tmp_path):
    import shutil

    from taxonomist.evaluate.run import evaluate_run
    from taxonomist.train.checkpoint import metadata_path

    other = tmp_path / "other.safetensors"
    shutil.copyfile(tiny_run / "checkpoints" / "best.safetensors", other)
    meta = json.loads(metadata_path(tiny_run / "checkpoints" / "best.safetensors").read_text())
    meta["labels"] = list(reversed(meta["labels"]))
    metadata_path(other).write_text(json.dumps(meta))
    # refused by the checkpoint's own consistency check or by the ensemble's label check, in one line either way
    with pytest.raises(TaxonomistError, match="labels"):
        evaluate_run(tiny_run, tiny_data, out=tmp_path / "e", device="cpu", num_workers=0, progress=False,
                     ensemble=[other])


def test_unknown_model_ood_method_is_refused_before_inference(tiny_run, tiny_data, tmp_path):
    from taxonomist.evaluate.run import evaluate_run
    with pytest.raises(ConfigError, match="did you mean 'odin'"):
        evaluate_run(tiny_run, tiny_data, out=tmp_path / "e", device="cpu", num_workers=0, progress=False,
                     model_ood=["odn"])
