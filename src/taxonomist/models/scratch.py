"""`scratch_cnn`: a small residual CNN trained from random weights, the baseline a pretrained backbone must beat.

Four stages of ResNet basic blocks (32 → 256 channels), global average pooling; about 1.2 M parameters.
"""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with a shortcut; the first conv may downsample."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_chans))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ScratchCNN(nn.Module):
    """Images (B, 3, H, W) → pooled features (B, `num_features`); any H, W ≥ 16.

    `blocks` holds the four stages, so `finetune=last_n` and layer-wise lr decay work as for timm models.

    >>> import torch
    >>> ScratchCNN()(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 256])
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), in_chans: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages = []
        prev = widths[0]
        for i, width in enumerate(widths):
            stages.append(BasicBlock(prev, width, stride=1 if i == 0 else 2))
            prev = width
        self.blocks = nn.Sequential(*stages)
        self.num_features = widths[-1]
        #: no pretrained statistics to match: inputs scaled to [-1, 1]
        self.preprocessing = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as identity, which trains
        # faster and more stably from scratch (Goyal et al. 2017).
        for block in stages:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


def scratch_cnn() -> ScratchCNN:
    """The `scratch_cnn` backbone."""
    return ScratchCNN()
