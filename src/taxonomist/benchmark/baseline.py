"""The naive reference pipeline, written the common way (timm's train.py, the seed repos): PIL open +
torchvision.transforms v1 Compose in a DataLoader with the same worker count, default torch threads,
float32, argmax answers."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from taxonomist.benchmark.measure import timed_steps


class PILFolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, paths: list[str], targets: list[int], transform):
        self.root, self.paths, self.targets, self.transform = root, paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.root / self.paths[i]) as im:
            image = im.convert("RGB")
        return self.transform(image), self.targets[i]


def _loader(root, paths, targets, transform, batch_size, workers, train):
    ds = PILFolderDataset(Path(root), paths, targets, transform)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def baseline_train(model, device, root, paths, targets, image_size, mean, std, batch_size, workers, warmup,
                   steps) -> float:
    tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                    T.ToTensor(), T.Normalize(mean, std)])
    loader = _loader(root, paths, targets, tf, batch_size, workers, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def step(batch):
        image, target = batch[0].to(device), batch[1].to(device)
        loss = loss_fn(model(image)["logits"], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return timed_steps(((b, len(b[1])) for b in loader), step, warmup, steps, device)
    finally:
        del loader


def baseline_predict(model, device, root, paths, targets, image_size, mean, std, batch_size, workers, warmup,
                     steps) -> float:
    tf = T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(),
                    T.Normalize(mean, std)])
    loader = _loader(root, paths, targets, tf, batch_size, workers, False)
    model.eval()

    @torch.no_grad()
    def step(batch):
        model(batch[0].to(device))["logits"].softmax(1).argmax(1).cpu()

    try:
        return timed_steps(((b, len(b[1])) for b in loader), step, warmup, steps, device)
    finally:
        del loader
