"""Backbones: images (B, 3, H, W) → pooled features (B, F), from timm, a user factory, or `scratch_cnn`.

`create_backbone` is the one door; it also loads pretrained weights (`auto`, `none` or a file).
"""
from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taxonomist.errors import ModelError
from taxonomist.models import pretrained as weights
from taxonomist.taxonomy.core import suggest

SCRATCH = "scratch_cnn"
MODULE_PREFIX = "module:"
OPEN_CLIP_PREFIX = "open_clip:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: backbones the user's own config chose for the current training (see `chosen_by_user`)
_CHOSEN_BY_USER: contextvars.ContextVar[frozenset] = contextvars.ContextVar("taxonomist_backbones", default=frozenset())


@dataclass
class Backbone:
    """A feature extractor and what a model needs to know about it.

    `source` says where the weights came from: `none`, `timm`, `lite0-offline`, `factory` or `file:PATH`.
    """

    module: nn.Module
    name: str
    num_features: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    kind: str = "timm"               #: `timm` | `module` | `scratch`
    source: str = "none"


def create_backbone(name: str, image_size: int, pretrained: str = "none") -> Backbone:
    """Build the backbone `name` for square inputs of `image_size` pixels and load its weights.

    `name` is a timm model name (optionally with a pretrained tag, `convnext_tiny.fb_in22k`), `scratch_cnn`,
    `module:PACKAGE.PATH:FACTORY`, or `open_clip:NAME` — the image encoder of an open_clip model, e.g.
    `open_clip:hf-hub:imageomics/bioclip` (BioCLIP; `auto` downloads it from the hub; needs `[bioclip]`).
    The factory protocol: `FACTORY()` takes no arguments and returns an
    `nn.Module` that maps float images (B, 3, H, W) to features (B, F). Optional attributes on it:
    `num_features` (else F is inferred from one forward pass on zeros), `preprocessing` (a dict with
    `mean`, `std`, `interpolation`; else ImageNet statistics, bilinear) and `blocks` (a sequence of its
    stages in forward order, needed for `finetune=last_n` and layer-wise lr decay).

    `pretrained`: `none`; `auto` (timm's weights; for `tf_efficientnet_lite0` the offline weights when the
    download fails; a factory or `scratch_cnn` keeps its own initialisation); or a path to a state dict.

    >>> bb = create_backbone("test_efficientnet", image_size=32)
    >>> bb.num_features, bb.preprocessing["input_size"]
    (256, 32)
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError("model.backbone is empty; give a timm name (e.g. tf_efficientnet_lite0), "
                         f"{SCRATCH} or {MODULE_PREFIX}PACKAGE.PATH:FACTORY")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ModelError(f"image size must be an integer of at least 8 pixels, got {image_size!r}")
    pretrained = (pretrained or "none").strip()
    path = None
    if pretrained not in ("auto", "none"):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"model.pretrained={pretrained}: no such weights file "
                             "(expected auto, none or the path of a .safetensors/.pth/.pt file)")

    name = name.strip()
    if name == SCRATCH:
        from taxonomist.models.scratch import scratch_cnn
        module = scratch_cnn()
        bb = Backbone(module, name, module.num_features, dict(module.preprocessing), "scratch")
    elif name.startswith(MODULE_PREFIX):
        bb = _factory_backbone(name, image_size)
    elif name.startswith(OPEN_CLIP_PREFIX):
        from taxonomist.models.bioclip import open_clip_backbone
        module = open_clip_backbone(name[len(OPEN_CLIP_PREFIX):], image_size,
                                    "auto" if pretrained == "auto" else "none")  # a file is loaded below
        bb = Backbone(module, name, module.num_features, dict(module.preprocessing), "open_clip",
                      "open_clip" if pretrained == "auto" else "none")
    else:
        bb = _timm_backbone(name, image_size, auto=pretrained == "auto")
    if path is not None:
        weights.load_weights_file(bb.module, path, name)
        bb.source = f"file:{path}"
    bb.preprocessing["input_size"] = image_size
    return bb


def code_named_by(name: str) -> str | None:
    """What building backbone `name` would run or fetch beyond taxonomist, timm and torch: the module a
    `module:` factory imports, or the hub repository of an `open_clip:hf-hub:` model (its config chooses the text
    tower and tokenizer, and its tokenizer settings can ask transformers to run the repository's code); None for a
    name from a registry (a timm name, `scratch_cnn`, an open_clip architecture), which is data.

    >>> code_named_by("module:payload:make"), code_named_by("test_efficientnet")
    ('module payload', None)
    """
    name = (name or "").strip() if isinstance(name, str) else ""
    if name.startswith(MODULE_PREFIX):
        return f"module {name[len(MODULE_PREFIX):].rpartition(':')[0] or name}"
    if name.startswith(OPEN_CLIP_PREFIX) and name[len(OPEN_CLIP_PREFIX):].strip() not in _open_clip_builtins():
        return f"open_clip model {name[len(OPEN_CLIP_PREFIX):]}"
    return None


def _open_clip_builtins() -> set[str]:
    """open_clip's architectures (and those registered in this process); empty without open_clip installed."""
    try:
        import open_clip
    except ImportError:
        return set()
    return set(open_clip.list_models())


def check_backbone_trusted(name: str, where: str | Path, trust_code: bool = False) -> None:
    """Refuse to build backbone `name` read from a model file (`where`) when that would import or fetch code
    (`code_named_by`), unless the user passed `trust_code` (`--trust-code`): a model file is data.

    >>> check_backbone_trusted("module:payload:make", "x/best.json")
    Traceback (most recent call last):
    taxonomist.errors.ModelError: x/best.json names code to import (backbone module:payload:make); pass --trust-code to run it, only for model files you trust
    """
    if trust_code or code_named_by(name) is None or str(name).strip() in _CHOSEN_BY_USER.get():
        return
    raise ModelError(f"{where} names code to import (backbone {str(name).strip()}); pass --trust-code to run it, "
                     "only for model files you trust")


@contextlib.contextmanager
def chosen_by_user(name: str):
    """Within the block, model files naming backbone `name` load without `trust_code`: the config the user
    wrote chose it (`train` and the calibration and evaluation of the checkpoints it has just written). A file
    naming any other code-selecting backbone is still refused."""
    token = _CHOSEN_BY_USER.set(_CHOSEN_BY_USER.get() | {str(name).strip()})
    try:
        yield
    finally:
        _CHOSEN_BY_USER.reset(token)


def _timm_backbone(name: str, image_size: int, auto: bool) -> Backbone:
    import timm
    if not timm.is_model(name):
        raise ModelError(f"unknown backbone {name!r}{timm_suggestion(name)}; "
                         f"see timm.list_models('*{name.split('.')[0][:8]}*'), or use {SCRATCH} or "
                         f"{MODULE_PREFIX}PACKAGE.PATH:FACTORY")
    kwargs: dict[str, Any] = {"num_classes": 0}
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # the architecture exists but not this pretrained tag
        arch = name.split(".")[0]
        tags = timm.list_pretrained(f"{arch}.*")
        raise ModelError(f"unknown pretrained tag in backbone {name!r}; {arch} has "
                         f"{', '.join(tags[:5]) or 'no pretrained tags'}{' …' if len(tags) > 5 else ''}") from None
    if cfg is not None and cfg.fixed_input_size:
        # ViT-style models build their position embeddings for one input size; timm resamples pretrained ones.
        kwargs["img_size"] = image_size
    preprocessing = None
    if auto:
        module, source, preprocessing = weights.create_timm_auto(name, **kwargs)
    else:
        module, source = timm.create_model(name, pretrained=False, **kwargs), "none"
    pcfg = getattr(module, "pretrained_cfg", None) or {}
    if preprocessing is None:
        preprocessing = {"mean": tuple(float(v) for v in pcfg.get("mean", IMAGENET_MEAN)),
                         "std": tuple(float(v) for v in pcfg.get("std", IMAGENET_STD)),
                         "interpolation": "bicubic" if pcfg.get("interpolation") == "bicubic" else "bilinear"}
    return Backbone(module, name, int(module.num_features), dict(preprocessing), "timm", source)


def timm_suggestion(name: str) -> str:
    """` (did you mean 'x'?)` from timm's registry: close spellings first, then names containing `name`."""
    import timm
    arch = name.split(".")[0]
    hint = suggest(arch, timm.list_models())
    if hint:
        return hint
    close = fnmatch.filter(timm.list_models(), f"*{arch.lower()}*")[:3]
    return (" (did you mean " + " or ".join(repr(c) for c in close) + "?)") if close else ""


def _factory_backbone(name: str, image_size: int) -> Backbone:
    spec = name[len(MODULE_PREFIX):]
    module_path, _, factory_name = spec.rpartition(":")
    if not all(part.isidentifier() for part in (*module_path.split("."), factory_name)):
        raise ModelError(f"model.backbone={name!r}: expected {MODULE_PREFIX}PACKAGE.PATH:FACTORY")
    try:
        package = importlib.import_module(module_path)
    except ImportError as e:
        raise ModelError(f"model.backbone={name!r}: cannot import {module_path!r} ({e})") from None
    factory = getattr(package, factory_name, None)
    if not callable(factory):
        raise ModelError(f"model.backbone={name!r}: {module_path} has no callable {factory_name!r}"
                         f"{suggest(factory_name, [n for n in dir(package) if not n.startswith('_')])}")
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.backbone={name!r}: {factory_name}() returned {type(module).__name__}, "
                         "not a torch.nn.Module")
    num_features = getattr(module, "num_features", None)
    if num_features is None:
        num_features = _infer_num_features(module, image_size, name)
    if not isinstance(num_features, int) or num_features < 1:
        raise ModelError(f"model.backbone={name!r}: num_features must be a positive int, got {num_features!r}")
    pre = dict(getattr(module, "preprocessing", None) or {})
    preprocessing = {"mean": tuple(float(v) for v in pre.get("mean", IMAGENET_MEAN)),
                     "std": tuple(float(v) for v in pre.get("std", IMAGENET_STD)),
                     "interpolation": pre.get("interpolation", "bilinear")}
    return Backbone(module, name, num_features, preprocessing, "module", "factory")


def _infer_num_features(module: nn.Module, image_size: int, name: str) -> int:
    was_training = module.training
    module.eval()  # no BatchNorm statistics update from the probe
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        raise ModelError(f"model.backbone={name!r}: a forward pass on a (1, 3, {image_size}, {image_size}) "
                         f"image failed ({type(e).__name__}: {e})") from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model.backbone={name!r}: the factory's module must return features (B, F), got {shape}")
    return int(out.shape[1])


def backbone_blocks(module: nn.Module, name: str = "backbone") -> list[nn.Module]:
    """The backbone's blocks in forward order, the units of `finetune=last_n` and layer-wise lr decay.

    Found by attribute, as timm names them: `blocks` (EfficientNet: its stages `blocks.i`; ViT: each
    transformer block), `stages` (ConvNeXt, many CNNs), `layers` (Swin), `layer1…layerN` (ResNet), or a
    torchvision-style `features` Sequential. A `module:` backbone should expose `blocks`.

    >>> import timm
    >>> len(backbone_blocks(timm.create_model("test_convnext", num_classes=0)))
    4
    """
    for attr in ("blocks", "stages", "layers"):
        seq = getattr(module, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return list(seq)
    numbered = []
    while isinstance(getattr(module, f"layer{len(numbered) + 1}", None), nn.Module):
        numbered.append(getattr(module, f"layer{len(numbered) + 1}"))
    if numbered:
        return numbered
    features = getattr(module, "features", None)
    if isinstance(features, nn.Sequential) and len(features):
        return list(features)
    raise ModelError(f"cannot find the blocks of backbone {name} (no blocks, stages, layers, layer1… or features "
                     "attribute); last_n fine-tuning and layer-wise lr decay need them")
