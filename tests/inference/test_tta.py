"""TTA views: spec parsing, the geometry of each view, composition, and inference merged over views."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from taxonomist.decide import aggregate_views, apply_temperature, softmax
from taxonomist.errors import ConfigError
from taxonomist.inference.tta import DEFAULT_TTA, TTA_PRESETS, View, parse_tta, run_inference_tta
from taxonomist.inference.forward import run_inference


def names(spec):
    return [v.name for v in parse_tta(spec)]


def test_parse_presets_and_products():
    assert names("identity") == ["identity"]
    assert names("rot2") == ["identity", "rot180"]                     # FathomNet 2nd place: 2 views
    assert names("flip") == ["identity", "hflip", "vflip"]
    assert names("rot4") == ["identity", "rot180", "rot90", "rot270"]
    assert len(parse_tta("d4")) == 8 and len(set(parse_tta("d4"))) == 8
    assert names("rot2+flip") == ["identity", "hflip", "vflip", "rot180"]   # hflip ∘ rot180 = vflip, deduplicated
    assert parse_tta(None) == parse_tta(DEFAULT_TTA) == parse_tta("")
    assert len(parse_tta("d4+rot4+flip")) == 8                           # a product inside the group stays in it
    assert names("hflip+scales=0.875,1.0,1.125") == ["identity", "hflip", "identity@1.125", "hflip@1.125",
                                                     "identity@0.875", "hflip@0.875"]


@pytest.mark.parametrize("spec, message", [
    ("rot3", "unknown view set 'rot3'"),
    ("flipp", "did you mean 'flip'"),
    ("scales=0.9,x", "scale 'x' is not a number"),
    ("scales=0", "must lie in (0, 4]"),
])
def test_parse_errors_name_the_token(spec, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_tta(spec)
    assert message in str(info.value)


def test_rot90_of_a_known_tensor_turns_counter_clockwise():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert View(1).apply(x)[0, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert View(2).apply(x)[0, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert View(3).apply(x)[0, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]
    assert View(0, True).apply(x)[0, 0].tolist() == [[2.0, 1.0], [4.0, 3.0]]      # hflip
    assert View(2, True).apply(x)[0, 0].tolist() == [[3.0, 4.0], [1.0, 2.0]]      # vflip
    assert View(2, True).name == "vflip" and View(1, True).name == "rot90+hflip"


def test_compose_matches_applying_one_view_after_the_other():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    for a, b in itertools.product(TTA_PRESETS["d4"], repeat=2):
        assert torch.equal(a.compose(b).apply(x), a.apply(b.apply(x))), (a.name, b.name)


def test_scale_views_keep_the_input_size_and_zoom_about_the_centre():
    x = torch.zeros(1, 3, 16, 16)
    x[..., 6:10, 6:10] = 1.0
    zoom_in, zoom_out = View(scale=2.0).apply(x), View(scale=0.5).apply(x)
    assert zoom_in.shape == zoom_out.shape == x.shape
    assert zoom_in[..., 5:11, 5:11].min() > 0.99 and zoom_in[..., :3, :].max() == 0  # the square doubled
    assert zoom_out[..., :4, :].abs().max() == 0         # the border is padding (0 = the normalisation mean)
    assert 0.2 < zoom_out[..., 7:9, 7:9].mean() <= 1.0


class _TinyModel(torch.nn.Module):
    """Logits that depend on where the pixels are, so that views change them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, image):
        flat = torch.nn.functional.adaptive_avg_pool2d(image, 4).flatten(1)
        return {"logits": self.fc(flat), "features": flat}


def _loader():
    torch.manual_seed(1)
    images = torch.randn(10, 3, 8, 8)
    return [{"image": images[s:s + 4], "target": torch.arange(s, min(s + 4, 10)) % 5,
             "index": torch.arange(s, min(s + 4, 10))} for s in range(0, 10, 4)]


def test_one_identity_view_gives_the_plain_inference():
    model, loader = _TinyModel(), _loader()
    plain = run_inference(model, loader, torch.device("cpu"))
    tta = run_inference_tta(model, loader, torch.device("cpu"), [View()])
    np.testing.assert_allclose(softmax(tta.logits.astype(np.float64)), softmax(plain.logits.astype(np.float64)),
                               atol=1e-6)
    np.testing.assert_allclose(tta.mean_logits, plain.logits, atol=1e-6)
    np.testing.assert_allclose(tta.features, plain.features, atol=1e-6)
    assert tta.indices.tolist() == list(range(10)) and tta.views == ("identity",)


@pytest.mark.parametrize("mode", ["mean_probs", "mean_logits"])
def test_views_merge_as_aggregate_views_with_the_temperature_per_view(mode):
    model, loader = _TinyModel(), _loader()
    views = parse_tta("rot2+hflip")
    per_view = []
    for v in views:
        batches = [{**b, "image": v.apply(b["image"])} for b in loader]
        per_view.append(run_inference(model, batches, torch.device("cpu")).logits.astype(np.float64))
    res = run_inference_tta(model, loader, torch.device("cpu"), views, mode=mode, temperature=2.0)
    expected = aggregate_views(np.stack(per_view) / 2.0, mode)
    np.testing.assert_allclose(softmax(res.logits.astype(np.float64)), expected, atol=1e-5)
    np.testing.assert_allclose(res.mean_logits, np.mean(per_view, axis=0), atol=1e-5)  # raw, for OOD scores
    assert not np.allclose(expected, apply_temperature(per_view[0], 2.0), atol=1e-3)  # the views mattered


def test_bad_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="mean_probs"):
        run_inference_tta(_TinyModel(), _loader(), torch.device("cpu"), "rot2", mode="median")
