"""OOD scores that need the model itself, not only its outputs: ODIN (input perturbation) and MC-dropout
(K stochastic passes). Both turn a DataLoader into numpy arrays; `decide.ood` then scores and thresholds them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from taxonomist.card import ModelCard
from taxonomist.decide.ood import MODEL_OOD_METHODS
from taxonomist.errors import ConfigError, ModelError

#: ODIN's defaults (Liang et al. 2018, tuned on CIFAR there): T = 1000, ε = 0.0014 in [0, 1] pixel units.
ODIN_TEMPERATURE = 1000.0
ODIN_EPSILON = 0.0014
#: Stochastic passes of MC-dropout (Gal & Ghahramani 2016 use 10–100; 10 is the usual cheap setting).
MC_PASSES = 10


def check_model_ood(model_ood: Sequence[str], options: Mapping[str, dict] | None = None) -> dict[str, dict]:
    """`model_ood` (a list of `MODEL_OOD_METHODS` names) checked, with each method's options: a dict per
    method; options for a method not in the list are an error."""
    from taxonomist.taxonomy import suggest

    if isinstance(model_ood, str):
        raise ConfigError(f"model_ood must be a list of methods, got the string {model_ood!r}")
    options = dict(options or {})
    out = {}
    for m in dict.fromkeys(model_ood or ()):
        if m not in MODEL_OOD_METHODS:
            raise ConfigError(f"unknown model OOD method {m!r}{suggest(str(m), MODEL_OOD_METHODS)}; "
                              f"choose from {', '.join(MODEL_OOD_METHODS)}")
        out[m] = dict(options.pop(m, None) or {})
    if options:
        raise ConfigError(f"options for {', '.join(sorted(options))} but that method is not in model_ood")
    return out


@dataclass
class ModelOODResult:
    """Per-example OOD scores (higher = more unknown) in the loader's order, with the dataset row positions."""

    scores: np.ndarray      # (N,)
    indices: np.ndarray     # (N,) row positions (batch["index"])
    targets: np.ndarray     # (N,) label index, -1 when unknown
    extra: dict | None = None


def _forward(model, image, context=None):
    return model(image) if context is None else model(image, context)


def _context(batch, device):
    return batch["context"].to(device) if "context" in batch else None


def check_torch_model(model, method: str) -> None:
    """Refuse a model these scores cannot run on: an exported ONNX session has no gradients and no dropout."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise ModelError(f"the {method} OOD score needs the PyTorch checkpoint ("
                         f"{'gradients with respect to the input' if method == 'odin' else 'dropout at inference'}); "
                         "an exported ONNX model cannot give them: use the .safetensors checkpoint")


def odin_batch(model, image, context=None, temperature: float = ODIN_TEMPERATURE, epsilon: float = ODIN_EPSILON,
               std: Sequence[float] = (1.0, 1.0, 1.0)):
    """ODIN scores (B,) float64 on the CPU of one normalised batch already on the model's device (see
    `odin_scores`). The model must be in eval mode."""
    import torch

    scale = torch.tensor([float(v) for v in std], device=image.device).view(1, -1, 1, 1)
    x = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = _forward(model, x, context)["logits"].float() / temperature
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
        (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        moved = x.detach() - epsilon * grad.sign() / scale[:, : x.shape[1]]
        # float64: at T = 1000 every probability sits within ~1e-5 of 1/L, below float32's resolution there
        z = _forward(model, moved, context)["logits"].double() / temperature
        return (-torch.softmax(z, 1).max(1).values).cpu()


def _head_only(model) -> bool:
    """True when every dropout layer of a `TaxonModel` sits in its head: the backbone's features are then the
    same in every MC pass, and only the head needs running K times."""
    from taxonomist.models import TaxonModel

    if not isinstance(model, TaxonModel):
        return False
    return not any(dropout_layers(bb) for _, bb in model.named_backbones())


def mc_dropout_batch(model, image, context=None, passes: int = MC_PASSES, temperature: float = 1.0,
                     reuse_features: bool = True):
    """(passes, B, L) float64 softmax(logits / temperature) of one batch, with only the dropout layers in
    training mode during the passes (the model is back in eval mode afterwards). Seed the generator yourself
    (`mc_dropout_probs` does) for repeatable masks.

    When all dropout sits in the head (the default models: timm backbones without their classifier, the
    heads' `model.drop_rate`), the backbone runs once and the head `passes` times — the same numbers as
    `passes` full forwards (the backbone draws no random numbers in eval mode), about `passes` times faster.
    `reuse_features=False` runs the full model each pass.
    """
    import torch

    layers = _dropout_or_fail(model)
    model.eval()
    try:
        for layer in layers:
            layer.train()
        with torch.inference_mode():
            if reuse_features and _head_only(model):
                features = model.backbone(image)
                if model.head_type == "two_stream":
                    if context is None:
                        raise ModelError("a two_stream model needs the context image too")
                    ctx = (model.context_backbone or model.backbone)(context)
                    run = lambda: model.head(features, ctx)  # noqa: E731
                else:
                    run = lambda: model.head(features)  # noqa: E731
            else:
                run = lambda: _forward(model, image, context)  # noqa: E731
            stack = [torch.softmax(run()["logits"].float() / temperature, 1) for _ in range(passes)]
    finally:
        model.eval()
    return torch.stack(stack).double().cpu()


def _dropout_or_fail(model) -> list:
    layers = dropout_layers(model)
    if not layers:
        raise ModelError("MC-dropout needs dropout in the model, and it has no dropout layer with p > 0 "
                         "(train with model.drop_rate > 0, e.g. the default 0.2)")
    return layers


def _check_options(method: str, temperature=None, epsilon=None, passes=None) -> None:
    if method == "odin":
        if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ConfigError(f"ODIN temperature must be > 0, got {temperature!r}")
        if isinstance(epsilon, bool) or not (isinstance(epsilon, (int, float)) and epsilon >= 0):
            raise ConfigError(f"ODIN epsilon must be >= 0, got {epsilon!r}")
    elif isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
        raise ConfigError(f"MC-dropout needs an integer number of passes >= 2, got {passes!r}")


def odin_scores(model, loader, device, temperature: float = ODIN_TEMPERATURE, epsilon: float = ODIN_EPSILON,
                std: Sequence[float] = (1.0, 1.0, 1.0), progress: bool = False) -> ModelOODResult:
    """ODIN (Liang et al. 2018): score = −max softmax(f(x̃) / T), x̃ = x − ε · sign(∇ₓ CE(f(x) / T, ŷ)) / std.

    The step moves each input towards higher confidence in its own top-1 label ŷ; in-distribution inputs
    gain more than unknowns, which widens the MSP gap. `epsilon` is in [0, 1] pixel units: the loader's
    images are normalised by `std` per channel (the model's preprocessing), so the step is divided by it,
    as the reference code does. `epsilon=0` is MSP at temperature T.
    """
    from tqdm import tqdm

    _check_options("odin", temperature=temperature, epsilon=epsilon)
    check_torch_model(model, "odin")
    model.eval()
    scores, indices, targets = [], [], []
    for batch in tqdm(loader, desc="ood: odin", unit="batch", leave=False, disable=not progress, file=sys.stderr):
        scores.append(odin_batch(model, batch["image"].to(device), _context(batch, device), temperature, epsilon,
                                 std))
        indices.append(batch["index"].cpu())
        targets.append(batch["target"].cpu())
    return ModelOODResult(_cat(scores, np.float64), _cat(indices, np.int64), _cat(targets, np.int64),
                          {"temperature": float(temperature), "epsilon": float(epsilon)})


def dropout_layers(model) -> list:
    """The model's dropout modules with p > 0 (the head's `model.drop_rate`, timm's own dropout layers)."""
    from torch import nn
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def mc_dropout_probs(model, loader, device, passes: int = MC_PASSES, temperature: float = 1.0, seed: int = 0,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K stochastic forward passes with only the dropout layers in training mode (BatchNorm stays in eval).

    Returns (probs (K, N, L) = softmax(logits / temperature) per pass, indices (N,), targets (N,)). Seeded:
    the same seed gives the same masks. The model is left in eval mode.
    """
    import torch
    from tqdm import tqdm

    _check_options("mc-dropout", passes=passes)
    check_torch_model(model, "mc-dropout")
    _dropout_or_fail(model)
    probs, indices, targets = [], [], []
    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in tqdm(loader, desc=f"ood: mc-dropout ×{passes}", unit="batch", leave=False,
                          disable=not progress, file=sys.stderr):
            probs.append(mc_dropout_batch(model, batch["image"].to(device), _context(batch, device), passes,
                                          temperature))
            indices.append(batch["index"].cpu())
            targets.append(batch["target"].cpu())
    if not probs:
        return np.zeros((passes, 0, 0)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(probs, 1).numpy(), _cat(indices, np.int64), _cat(targets, np.int64)


def mc_dropout_scores(model, loader, device, passes: int = MC_PASSES, temperature: float = 1.0, seed: int = 0,
                      score: str = "predictive_entropy", progress: bool = False) -> ModelOODResult:
    """MC-dropout OOD score: `decide.stack_score` (default predictive entropy) over `passes` dropout passes."""
    from taxonomist.decide import stack_score

    probs, indices, targets = mc_dropout_probs(model, loader, device, passes, temperature, seed, progress)
    scores = stack_score(probs, score) if probs.shape[1] else np.zeros(0)
    return ModelOODResult(scores, indices, targets, {"passes": passes, "score": score, "seed": seed})


def model_ood_batch(method: str, model, image, context=None, temperature: float = 1.0,
                    std: Sequence[float] = (1.0, 1.0, 1.0), options: dict | None = None) -> np.ndarray:
    """Scores (B,) of one batch already on the model's device: `model_ood_scores` for a single batch, with
    the same options and defaults (`odin_batch`; `mc_dropout_batch_scores`, whose masks are seeded for this
    batch alone)."""
    options = dict(options or {})
    try:
        if method == "odin":
            return odin_batch(model, image, context, std=std, **options).numpy()
        if method == "mc-dropout":
            return mc_dropout_batch_scores(model, image, context, temperature=temperature, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for the {method} OOD score: {e}") from None
    check_model_ood([method])  # raises: an unknown method, named with the known ones
    raise AssertionError(method)


def mc_dropout_batch_scores(model, image, context=None, passes: int = MC_PASSES, temperature: float = 1.0,
                            seed: int = 0, score: str = "predictive_entropy") -> np.ndarray:
    """`mc_dropout_scores` of one batch: the generator seeded with `seed` for this batch alone, so the same
    batch gets the same scores, but an image's score depends on the images batched with it."""
    import torch

    from taxonomist.decide import stack_score

    devices = [image.device] if image.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        probs = mc_dropout_batch(model, image, context, passes, temperature)
    return stack_score(probs.numpy(), score)


def model_ood_scores(method: str, model, loader, device, temperature: float = 1.0,
                     std: Sequence[float] = (1.0, 1.0, 1.0), options: dict | None = None,
                     progress: bool = False) -> ModelOODResult:
    """Dispatch on a `MODEL_OOD_METHODS` name; `temperature` is the checkpoint's (used by MC-dropout; ODIN has
    its own, `options["temperature"]`)."""
    options = dict(options or {})
    try:
        if method == "odin":
            return odin_scores(model, loader, device, std=std, progress=progress, **options)
        if method == "mc-dropout":
            return mc_dropout_scores(model, loader, device, temperature=temperature, progress=progress, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for the {method} OOD score: {e}") from None
    check_model_ood([method])  # raises: an unknown method, named with the known ones
    raise AssertionError(method)


def model_ood_rows(method: str, model, card: ModelCard, dataset, rows, device, label_index: dict[str, int],
                   options: dict | None = None, temperature: float | None = None, batch_size: int = 64,
                   num_workers: int = -1, allow_unknown: bool = False, strict: bool = False,
                   path_column: str | None = None, progress: bool = False) -> ModelOODResult:
    """`model_ood_scores` over dataset rows, read as the model's card prescribes (`run_model.rows_loader`).

    `temperature` defaults to the card's; `result.indices` are positions in `rows` (unreadable ones absent).
    """
    from taxonomist.inference.run_model import input_settings, rows_loader

    check_torch_model(model, method)
    t = card.temperature if temperature is None else float(temperature)
    _, pre, _, _ = input_settings(card)
    _, loader = rows_loader(card, dataset, rows, label_index, batch_size, num_workers, allow_unknown, strict,
                            path_column)
    try:
        return model_ood_scores(method, model, loader, device, t, pre.std, options, progress)
    finally:
        loader.close()


def _cat(chunks, dtype) -> np.ndarray:
    import torch
    return torch.cat(chunks).numpy().astype(dtype) if chunks else np.zeros(0, dtype)
