"""The model-only ceiling: train steps (forward, loss, backward, AdamW) and inference forwards on one
synthetic batch already on the device — what the model alone can do, with no input pipeline."""
from __future__ import annotations

import itertools

import torch

from taxonomist.benchmark.measure import timed_steps


def ceiling_train(model, criterion, device, batch_size: int, image_size: int, num_labels: int, warmup: int,
                  steps: int, amp: bool, channels_last: bool) -> float:
    image = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, num_labels, (batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(_):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = criterion(model(image), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(((None, batch_size) for _ in itertools.count()), step, warmup, steps, device)


def ceiling_predict(model, device, batch_size: int, image_size: int, warmup: int, steps: int, amp: bool,
                    channels_last: bool) -> float:
    image = torch.randn(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    model.eval()

    @torch.inference_mode()
    def step(_):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            model(image)["logits"].float().softmax(1).cpu()

    return timed_steps(((None, batch_size) for _ in itertools.count()), step, warmup, steps, device)
