"""The networks of the paper sections: paper 1's ReLU MLP, ResNet-20 (with or without BN) and
LeNet with BN."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3×3 convs; the shortcut subsamples and zero-pads channels (ResNet's CIFAR
    option A), so every weight of the network is a conv or the final FC."""

    def __init__(self, cin, cout, stride, bn):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + short)


class ResNet20(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, bn=True, blocks=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=not bn)
        self.bn = nn.BatchNorm2d(16) if bn else nn.Identity()
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1, bn))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(out.mean((2, 3)))


class LeNetBN(nn.Module):
    """Paper 2's LeNet (Fig. 1): BN before each ReLU, no biases; BN without affine
    parameters, as in its experiments. Input (B, C, 32, 32)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.cv1 = nn.Conv2d(in_channels, 6, 5, bias=False)
        self.bn1 = nn.BatchNorm2d(6, affine=False)
        self.cv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=False)
        self.fc1 = nn.Linear(16 * 5 * 5, 120, bias=False)
        self.bn3 = nn.BatchNorm1d(120, affine=False)
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn4 = nn.BatchNorm1d(84, affine=False)
        self.fc3 = nn.Linear(84, num_classes, bias=False)

    def forward(self, x):
        x = F.relu(self.bn1(F.max_pool2d(self.cv1(x), 2)))
        x = F.relu(self.bn2(F.max_pool2d(self.cv2(x), 2)))
        x = F.relu(self.bn3(self.fc1(x.flatten(1))))
        x = F.relu(self.bn4(self.fc2(x)))
        return self.fc3(x)


def relu_mlp(n_in: int, n_out: int, width: int, depth: int, seed: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width``, Kaiming-normal weights, zero biases (paper 1's
    MLP), initialised from ``seed``."""
    torch.manual_seed(seed)
    layers, d = [], n_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out))
    model = nn.Sequential(*layers)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class SignalConvNet(nn.Module):
    """MNIST-1D's convnet (its paper's baseline: three convolutions of 25 channels, kernel 5,
    stride 2, padding 1, ReLU, then a linear layer), each 1-D convolution written as a (1×k)
    Conv2d (written before Conv1d was a C-layer, and kept so the recorded results stay
    comparable: CConv1d computes the same matched gradient, as Conv2d's on a unit height).
    Input (B, 1, 1, L)."""

    def __init__(self, length=40, num_classes=10, channels=25, kernel=5):
        super().__init__()
        convs, cin, n = [], 1, length
        for _ in range(3):
            convs.append(nn.Conv2d(cin, channels, (1, kernel), (1, 2), (0, 1)))
            cin, n = channels, (n + 2 - kernel) // 2 + 1
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(channels * n, num_classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.fc(x.flatten(1))
