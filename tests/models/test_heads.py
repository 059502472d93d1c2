"""Heads through `build_model`: output shapes, multirank levels, two-stream entropy gating, metadata."""
import json
import math

import pytest
import torch

from taxonomist.config import ModelConfig
from taxonomist.errors import ConfigError, ModelError
from taxonomist.models import build_model, entropy_gated_fusion, model_metadata


def cfg(**kw) -> ModelConfig:
    kw.setdefault("backbone", "test_efficientnet")
    kw.setdefault("pretrained", "none")
    return ModelConfig(**kw)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_convnext", "test_vit", "scratch_cnn"])
def test_flat_head_outputs(ranked_taxonomy, backbone):
    model = build_model(cfg(backbone=backbone), ranked_taxonomy, image_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert set(out) == {"logits", "features"}
    assert out["logits"].shape == (2, 3)
    assert out["features"].shape == (2, model.num_features)
    assert model.head_type == "flat" and model.labels == ranked_taxonomy.labels


def test_multirank_rank_logits_match_taxonomy_levels(ranked_taxonomy):
    model = build_model(cfg(head="multirank"), ranked_taxonomy, image_size=32)
    out = model(torch.randn(4, 3, 32, 32))
    levels = ranked_taxonomy.levels()
    assert [lv.name for lv in levels] == ["kingdom", "phylum", "genus", "species"]
    assert list(out["rank_logits"]) == [lv.name for lv in levels]
    for level in levels:
        assert out["rank_logits"][level.name].shape == (4, len(level.nodes))
    assert {k: len(lv.nodes) for k, lv in zip(out["rank_logits"], levels)} == {
        "kingdom": 1, "phylum": 2, "genus": 2, "species": 2}
    assert out["logits"].shape == (4, 3)  # the label head stays the prediction


def test_multirank_on_an_unranked_tree_uses_depths():
    from taxonomist.taxonomy import Taxonomy
    tax = Taxonomy.from_parents({"root": None, "a": "root", "b": "root", "a1": "a", "a2": "a", "b1": "b"})
    model = build_model(cfg(head="multirank"), tax, image_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert {k: v.shape[1] for k, v in out["rank_logits"].items()} == {"depth1": 2, "depth2": 3}


def test_entropy_gating_favours_the_confident_stream():
    roi = torch.tensor([[6.0, 0.0, 0.0], [0.1, 0.0, 0.0]])      # sample 0: ROI sure; sample 1: ROI unsure
    context = torch.tensor([[0.0, 0.5, 0.0], [0.0, 0.0, 6.0]])  # sample 0: context unsure; sample 1: sure
    fused, w = entropy_gated_fusion([roi, context], tau=1.0)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0, 0] > 0.7 and w[1, 1] > 0.7
    assert fused.argmax(1).tolist() == [0, 2]
    assert torch.allclose(fused.exp().sum(1), torch.ones(2), atol=1e-6)  # normalized log-probabilities
    # exact weights: w_s ∝ exp(-H_s / tau)
    h = [-(torch.softmax(s, 1) * torch.log_softmax(s, 1)).sum(1) for s in (roi, context)]
    expected = torch.softmax(-torch.stack(h, 1), 1)
    assert torch.allclose(w, expected)
    # a hotter temperature flattens the gate toward 1/2
    _, w_hot = entropy_gated_fusion([roi, context], tau=100.0)
    assert abs(float(w_hot[0, 0]) - 0.5) < 0.01
    with pytest.raises(ModelError, match="fusion_temperature must be > 0"):
        entropy_gated_fusion([roi, context], tau=0.0)


@pytest.mark.parametrize("shared", [True, False])
def test_two_stream_outputs(ranked_taxonomy, shared):
    model = build_model(cfg(head="two_stream", shared_backbone=shared), ranked_taxonomy, image_size=32)
    out = model(torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32))
    assert out["logits"].shape == (3, 3)
    assert set(out["stream_logits"]) == {"roi", "context"}
    assert out["stream_logits"]["roi"].shape == out["stream_logits"]["context"].shape == (3, 3)
    assert torch.allclose(out["stream_weights"].sum(1), torch.ones(3))
    assert out["features"].shape == (3, 2 * 256) and model.num_features == 512
    assert (model.context_backbone is None) == shared
    if not shared:  # same start, separate parameters
        assert torch.equal(model.context_backbone.conv_stem.weight, model.backbone.conv_stem.weight)
        assert model.context_backbone.conv_stem.weight is not model.backbone.conv_stem.weight
    # both stream heads receive gradient through the fused logits
    torch.nn.functional.nll_loss(out["logits"], torch.tensor([0, 1, 2])).backward()
    assert model.head.heads["roi"].fc.weight.grad.abs().sum() > 0
    assert model.head.heads["context"].fc.weight.grad.abs().sum() > 0


def test_two_stream_needs_context(ranked_taxonomy):
    model = build_model(cfg(head="two_stream"), ranked_taxonomy, image_size=32)
    with pytest.raises(ModelError, match="needs the context image"):
        model(torch.randn(2, 3, 32, 32))


def test_dropout_rate_is_used_before_the_heads(ranked_taxonomy):
    model = build_model(cfg(head="multirank", drop_rate=0.3), ranked_taxonomy, image_size=32)
    assert model.head.drop.p == 0.3
    with pytest.raises(ModelError, match=r"drop_rate must be in \[0, 1\)"):
        build_model(cfg(drop_rate=1.0), ranked_taxonomy, image_size=32)


def test_config_errors(ranked_taxonomy):
    with pytest.raises(ConfigError, match=r"model.head='multi_rank' .*did you mean 'multirank'"):
        build_model(cfg(head="multi_rank"), ranked_taxonomy, 32)
    with pytest.raises(ConfigError, match="model.finetune='linar'"):
        build_model(cfg(finetune="linar"), ranked_taxonomy, 32)


def test_model_metadata_is_json(ranked_taxonomy):
    model = build_model(cfg(head="multirank"), ranked_taxonomy, image_size=32)
    meta = json.loads(json.dumps(model_metadata(model)))
    assert meta["backbone"] == "test_efficientnet" and meta["head"] == "multirank"
    assert meta["num_features"] == 256 and meta["num_labels"] == 3 and meta["finetune"] == "full"
    assert meta["preprocessing"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                     "interpolation": "bicubic", "input_size": 32}
    assert meta["levels"] == ["kingdom", "phylum", "genus", "species"]
    assert meta["pretrained"] == "none"
    assert meta["trainable_parameters"] == meta["parameters"] == model.trainable_parameter_count()
    assert math.isclose(model.preprocessing["std"][0], 0.229)
