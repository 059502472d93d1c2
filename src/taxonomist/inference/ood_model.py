"""OOD scores that need the model itself, not only its outputs: ODIN (input perturbation) and MC-dropout
(K stochastic passes). Both turn a DataLoader into numpy arrays; `decide.ood` then scores and thresholds them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from taxonomist.errors import ConfigError, ModelError

#: ODIN's defaults (Liang et al. 2018, tuned on CIFAR there): T = 1000, ε = 0.0014 in [0, 1] pixel units.
ODIN_TEMPERATURE = 1000.0
ODIN_EPSILON = 0.0014
#: Stochastic passes of MC-dropout (Gal & Ghahramani 2016 use 10–100; 10 is the usual cheap setting).
MC_PASSES = 10
#: The scores `evaluate_run(model_ood=…)` computes from the model; each needs the model, not only its outputs.
MODEL_OOD_METHODS = ("odin", "mc-dropout")


@dataclass
class ModelOODResult:
    """Per-example OOD scores (higher = more unknown) in the loader's order, with the dataset row positions."""

    scores: np.ndarray      # (N,)
    indices: np.ndarray     # (N,) row positions (batch["index"])
    targets: np.ndarray     # (N,) label index, -1 when unknown
    extra: dict | None = None


def _forward(model, batch, device, image=None):
    image = batch["image"].to(device) if image is None else image
    if "context" in batch:
        return model(image, batch["context"].to(device))
    return model(image)


def odin_scores(model, loader, device, temperature: float = ODIN_TEMPERATURE, epsilon: float = ODIN_EPSILON,
                std: Sequence[float] = (1.0, 1.0, 1.0), progress: bool = False) -> ModelOODResult:
    """ODIN (Liang et al. 2018): score = −max softmax(f(x̃) / T), x̃ = x − ε · sign(∇ₓ CE(f(x) / T, ŷ)) / std.

    The step moves each input towards higher confidence in its own top-1 label ŷ; in-distribution inputs
    gain more than unknowns, which widens the MSP gap. `epsilon` is in [0, 1] pixel units: the loader's
    images are normalised by `std` per channel (the model's preprocessing), so the step is divided by it,
    as the reference code does. `epsilon=0` is MSP at temperature T.
    """
    import torch
    from tqdm import tqdm

    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"ODIN temperature must be > 0, got {temperature!r}")
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0):
        raise ConfigError(f"ODIN epsilon must be >= 0, got {epsilon!r}")
    model.eval()
    scale = torch.tensor([float(s) for s in std], device=device).view(1, -1, 1, 1)
    scores, indices, targets = [], [], []
    for batch in tqdm(loader, desc="ood: odin", unit="batch", leave=False, disable=not progress, file=sys.stderr):
        x = batch["image"].to(device).requires_grad_(True)
        with torch.enable_grad():
            logits = _forward(model, batch, device, x)["logits"].float() / temperature
            loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1))
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            moved = x.detach() - epsilon * grad.sign() / scale[:, : x.shape[1]]
            z = _forward(model, batch, device, moved)["logits"].float() / temperature
            scores.append((-torch.softmax(z, 1).max(1).values).double().cpu())
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

    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
        raise ConfigError(f"MC-dropout needs an integer number of passes >= 2, got {passes!r}")
    layers = dropout_layers(model)
    if not layers:
        raise ModelError("MC-dropout needs dropout in the model, and it has no dropout layer with p > 0 "
                         "(train with model.drop_rate > 0, e.g. the default 0.2)")
    model.eval()
    probs, indices, targets = [], [], []
    devices = [device] if getattr(device, "type", str(device)) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            for layer in layers:
                layer.train()
            with torch.inference_mode():
                for batch in tqdm(loader, desc=f"ood: mc-dropout ×{passes}", unit="batch", leave=False,
                                  disable=not progress, file=sys.stderr):
                    image = batch["image"].to(device)
                    stack = [torch.softmax(_forward(model, batch, device, image)["logits"].float() / temperature, 1)
                             for _ in range(passes)]
                    probs.append(torch.stack(stack).double().cpu())
                    indices.append(batch["index"].cpu())
                    targets.append(batch["target"].cpu())
        finally:
            model.eval()
    if not probs:
        return np.zeros((passes, 0, 0)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(probs, 1).numpy(), _cat(indices, np.int64), _cat(targets, np.int64)


def mc_dropout_scores(model, loader, device, passes: int = MC_PASSES, temperature: float = 1.0, seed: int = 0,
                      score: str = "predictive_entropy", progress: bool = False) -> ModelOODResult:
    """MC-dropout OOD score: `decide.stack_score` (default predictive entropy) over `passes` dropout passes."""
    from taxonomist.decide import stack_score

    probs, indices, targets = mc_dropout_probs(model, loader, device, passes, temperature, seed, progress)
    scores = stack_score(probs, score) if probs.shape[1] else np.zeros(0)
    return ModelOODResult(scores, indices, targets, {"passes": passes, "score": score})


def model_ood_scores(method: str, model, loader, device, temperature: float = 1.0,
                     std: Sequence[float] = (1.0, 1.0, 1.0), options: dict | None = None,
                     progress: bool = False) -> ModelOODResult:
    """Dispatch on a `MODEL_OOD_METHODS` name; `temperature` is the checkpoint's (used by MC-dropout; ODIN has
    its own, `options["temperature"]`)."""
    from taxonomist.taxonomy import suggest

    options = dict(options or {})
    try:
        if method == "odin":
            return odin_scores(model, loader, device, std=std, progress=progress, **options)
        if method == "mc-dropout":
            return mc_dropout_scores(model, loader, device, temperature=temperature, progress=progress, **options)
    except TypeError as e:
        raise ConfigError(f"bad options for the {method} OOD score: {e}") from None
    raise ConfigError(f"unknown model OOD method {method!r}{suggest(str(method), MODEL_OOD_METHODS)}; "
                      f"choose from {', '.join(MODEL_OOD_METHODS)}")


def _cat(chunks, dtype) -> np.ndarray:
    import torch
    return torch.cat(chunks).numpy().astype(dtype) if chunks else np.zeros(0, dtype)
