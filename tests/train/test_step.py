"""`TrainStep`, the step `train()` and `taxonomist benchmark` share: accumulation, clipping, scheduler and EMA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from taxonomist.train.step import TrainStep


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return {"logits": self.fc(x.flatten(1))}


def ce(outputs, target):
    return nn.functional.cross_entropy(outputs["logits"], target), {}


def batch(lo, hi):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    return {"image": x[lo:hi], "target": y[lo:hi], "index": torch.arange(lo, hi)}


def make(accumulate=1, grad_clip=0.0, lr=0.1, **kw):
    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, TrainStep(model, ce, opt, torch.device("cpu"), accumulate=accumulate, grad_clip=grad_clip, **kw)


def test_two_accumulated_halves_equal_one_full_batch():
    full, step = make(accumulate=1)
    step.zero_grad()
    assert step(batch(0, 8), 0).updated
    halves, step2 = make(accumulate=2)
    step2.zero_grad()
    w0 = halves.fc.weight.detach().clone()
    first = step2(batch(0, 4), 0)
    assert not first.updated and torch.equal(halves.fc.weight, w0)  # no optimiser step yet
    second = step2(batch(4, 8), 1)
    assert second.updated and second.n == 4
    torch.testing.assert_close(halves.fc.weight, full.fc.weight)
    torch.testing.assert_close(halves.fc.bias, full.fc.bias)


def test_gradient_clipping_bounds_the_update():
    model, step = make(grad_clip=1e-3, lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    step.zero_grad()
    step(batch(0, 8), 0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)  # SGD: Δ = lr · clipped gradient


def test_scheduler_and_ema_follow_optimizer_steps_only():
    from timm.utils import ModelEmaV3

    model = Linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    ema = ModelEmaV3(model, decay=0.5)
    step = TrainStep(model, ce, opt, torch.device("cpu"), scheduler=sched, ema=ema, accumulate=2)
    step.zero_grad()
    flags = [step(batch(0, 4), i, global_step=i // 2).updated for i in range(4)]
    assert flags == [False, True, False, True]
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    assert not torch.equal(ema.module.fc.weight, Linear().fc.weight)  # the EMA moved from the initial weights


def test_mixup_keeps_the_hard_targets_and_loss_is_detached():
    from timm.data import Mixup

    _, step = make(mixup=Mixup(mixup_alpha=0.4, num_classes=3, label_smoothing=0.0))
    step.criterion = lambda out, t: (nn.functional.cross_entropy(out["logits"], t), {})  # soft targets
    step.zero_grad()
    out = step(batch(0, 8), 0)
    assert out.target.tolist() == batch(0, 8)["target"].tolist()
    assert not out.loss.requires_grad and out.outputs["logits"].shape == (8, 3)


def test_amp_and_channels_last_are_cuda_only_and_accumulate_is_checked():
    _, step = make(amp=True, channels_last=True)
    assert not step.amp and not step.channels_last  # CPU: float32, contiguous
    with pytest.raises(ValueError, match="accumulate"):
        make(accumulate=0)
