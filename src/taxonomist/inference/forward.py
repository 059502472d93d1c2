"""Run a model over a DataLoader and collect logits, features and targets as numpy arrays.

Shared by validation during training, calibration, `evaluate` and `predict`; decisions and metrics then work on
the arrays.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np


@dataclass
class InferenceResult:
    logits: np.ndarray                 # (N, L) label logits
    features: np.ndarray               # (N, F) pooled features
    targets: np.ndarray                # (N,) label index, -1 when unlabelled
    indices: np.ndarray                # (N,) row position in the dataset's rows
    loss: float = float("nan")         # mean loss over labelled examples, when a criterion was given
    rank_logits: dict[str, np.ndarray] = field(default_factory=dict)


def run_inference(model, loader, device, amp: bool = False, progress: bool = False, criterion=None,
                  desc: str = "predict") -> InferenceResult:
    """Forward every batch of `loader` through `model` (eval mode, no grad)."""
    import torch
    from tqdm import tqdm

    model.eval()
    logits, feats, targets, indices = [], [], [], []
    ranks: dict[str, list] = {}
    loss_sum, loss_n = 0.0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (amp and device.type == "cuda") else None
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress, file=sys.stderr):
            image = batch["image"].to(device, non_blocking=True)
            context = batch["context"].to(device, non_blocking=True) if "context" in batch else None
            if autocast is not None:
                with autocast:
                    out = model(image, context) if context is not None else model(image)
            else:
                out = model(image, context) if context is not None else model(image)
            target = batch["target"].to(device)
            if criterion is not None:
                known = target >= 0
                if bool(known.any()):
                    sub = {k: _select(v, known) for k, v in out.items()}
                    loss, _ = criterion(sub, target[known])
                    loss_sum += float(loss) * int(known.sum())
                    loss_n += int(known.sum())
            logits.append(out["logits"].float().cpu())
            feats.append(out["features"].float().cpu())
            targets.append(batch["target"].cpu())
            indices.append(batch["index"].cpu())
            for name, value in (out.get("rank_logits") or {}).items():
                ranks.setdefault(name, []).append(value.float().cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros((0,))  # noqa: E731
    return InferenceResult(
        logits=cat(logits), features=cat(feats), targets=cat(targets).astype(np.int64),
        indices=cat(indices).astype(np.int64), loss=loss_sum / loss_n if loss_n else float("nan"),
        rank_logits={k: cat(v) for k, v in ranks.items()},
    )


def _select(value, mask):
    """The rows of `mask` in an output value, recursively through dicts (a multirank model's rank logits)."""
    if isinstance(value, dict):
        return {k: _select(v, mask) for k, v in value.items()}
    return value[mask]
